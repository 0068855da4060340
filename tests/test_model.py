import math

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer
from pllm.kernels import apply_rotary


def test_shapes_and_confidence(tiny_model):
    x = torch.randint(4, 96, (3, 17))
    logits = tiny_model(x, timestep=torch.rand(3))
    assert logits.shape == (3, 17, 96) and logits.dtype == torch.float32
    logits2, conf = tiny_model(x, torch.rand(3), return_confidence=True)
    assert torch.equal(logits, logits2)
    assert torch.allclose(conf, logits.softmax(-1).amax(-1))
    assert ((conf > 0) & (conf <= 1)).all()


def test_logits_mask_returns_only_selected_positions(tiny_model):
    x = torch.randint(4, 96, (2, 9))
    sel = torch.rand(2, 9) < 0.5
    assert torch.allclose(tiny_model(x, logits_mask=sel), tiny_model(x)[sel], atol=1e-6)
    index = sel.flatten().nonzero().squeeze(1)  # the same positions as flat indices b * L + i
    assert torch.allclose(tiny_model(x, logits_mask=index), tiny_model(x)[sel], atol=1e-6)


def test_sequence_longer_than_context_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


def test_bidirectional_attention_sees_the_future(tiny_model):
    x = torch.randint(4, 96, (1, 16))
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1 - 4) % 92 + 4
    assert not torch.allclose(tiny_model(x)[0, :12], tiny_model(y)[0, :12])


def test_block_causal_hides_later_blocks_only():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(attention_mode="block_causal", block_size=4)).eval()
    x = torch.randint(4, 96, (2, 16))
    base = model(x)
    later = x.clone()
    later[:, 8:] = torch.randint(4, 96, (2, 8))  # change blocks 2 and 3
    out = model(later)
    assert torch.equal(base[:, :8], out[:, :8]), "earlier blocks must not see later blocks"
    same_block = x.clone()
    same_block[:, 7] = (x[:, 7] + 1 - 4) % 92 + 4  # last token of block 1
    out = model(same_block)
    assert torch.equal(base[:, :4], out[:, :4])
    assert not torch.allclose(base[:, 4:7], out[:, 4:7]), "tokens inside a block see each other"
    assert not torch.allclose(base[:, 8:], out[:, 8:]), "later blocks see earlier blocks"


def test_block_causal_mask_matches_definition():
    model = DiffusionTransformer(tiny_config(attention_mode="block_causal", block_size=3))
    pos = torch.arange(8)[None]
    mask = model.attention_bias(pos, None)[0, 0]
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (j // 3 <= i // 3)


def test_left_padding_does_not_change_logits(tiny_model):
    x = torch.randint(4, 96, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    am = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], 1).long()
    out = tiny_model(padded, attention_mask=am)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 3:], tiny_model(x), atol=1e-5)


def test_gqa_query_heads_share_kv_heads():
    """Query head h must read key/value head h // (H / KV): compare with an explicit computation."""
    torch.manual_seed(0)
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=2, qk_norm=False)
    model = DiffusionTransformer(cfg).eval()
    attn = model.layers[0].attn
    B, L, H, KV, hd = 2, 6, 4, 2, 8
    x = torch.randn(B, L, 32)
    cos = model.rope_cos[:L][None, None].expand(B, 1, L, hd)
    sin = model.rope_sin[:L][None, None].expand(B, 1, L, hd)
    wq, wk, wv = attn.qkv_proj.weight.split([H * hd, KV * hd, KV * hd])  # rows q | k | v
    q = apply_rotary((x @ wq.T).view(B, L, H, hd).transpose(1, 2), cos, sin)
    k = apply_rotary((x @ wk.T).view(B, L, KV, hd).transpose(1, 2), cos, sin)
    v = (x @ wv.T).view(B, L, KV, hd).transpose(1, 2)
    heads = []
    for h in range(H):
        g = h // (H // KV)
        w = (q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
        heads.append(w @ v[:, g])
    expected = attn.o_proj(torch.stack(heads, 1).transpose(1, 2).reshape(B, L, H * hd))
    assert torch.allclose(attn(x, cos, sin, None), expected, atol=1e-5)
    assert attn.qkv_proj.weight.shape == ((H + 2 * KV) * hd, 32)


def test_tied_and_untied_embeddings():
    tied = DiffusionTransformer(tiny_config(tie_word_embeddings=True))
    untied = DiffusionTransformer(tiny_config(tie_word_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 96 * 32


def test_num_parameters_counts_every_tensor_once():
    model = DiffusionTransformer(tiny_config())
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())  # parameters() dedups ties
    cfg = model.config
    assert cfg.num_matmul_params() + 2 * 2 * 32 + 32 + 2 * 2 * 8 == model.num_parameters()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config())
    x = torch.randint(4, 96, (2, 12))
    model(x).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.train()
    model(x).square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_rotary_tables_stay_fp32_when_the_model_is_cast():
    model = DiffusionTransformer(tiny_config()).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32 and model.rope_sin.dtype == torch.float32
    assert torch.isfinite(model(torch.randint(4, 96, (1, 8))).float()).all()
