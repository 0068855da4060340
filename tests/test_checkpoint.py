import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from pllm import DiffusionTransformer, load_model, save_pretrained


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, tied):
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(tie_word_embeddings=tied, attention_mode="block_causal", block_size=8))
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    x = torch.randint(4, 96, (2, 10))
    assert torch.equal(model.eval()(x), loaded(x))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # plain safetensors, no pickle
        assert "embed_tokens.weight" in f.keys()
    assert json.loads((tmp_path / "config.json").read_text())["attention_mode"] == "block_causal"


def test_weights_saved_with_separate_projections_load_into_the_fused_ones(tmp_path):
    """Models saved before q/k/v and gate/up became one matmul each still load, with equal outputs."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(tie_word_embeddings=False)).eval()
    save_pretrained(model, tmp_path)
    old = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            q, k, v = tensor.split(model.layers[0].attn.qkv_split)
            for part, w in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                old[name.replace("qkv_proj", part)] = w.clone()
        elif name.endswith("gate_up_proj.weight"):
            for part, w in zip(("gate_proj", "up_proj"), tensor.chunk(2)):
                old[name.replace("gate_up_proj", part)] = w.clone()
        else:
            old[name] = tensor.clone()
    assert not any("qkv" in n or "gate_up" in n for n in old)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(tmp_path)
    x = torch.randint(4, 96, (2, 10))
    assert torch.equal(model(x), loaded(x))


def test_loading_a_folder_without_weights_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_loading_mismatched_weights_fails(tmp_path):
    save_pretrained(DiffusionTransformer(tiny_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError):
        load_model(tmp_path)
