"""Hugging Face checkpoints in and out: per family, our imported model's logits equal `transformers`
running the same weights with the family's attention; the engine decodes it as eager decoding does;
export round-trips exactly and loads in `transformers`; bad folders fail naming the file and field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hf_fixtures import REGULAR, cases, reference_logits, reference_model, write_checkpoint
from pllm import GenerationConfig, ParallelGenerator
from pllm.engine import Engine
from pllm.hf import CheckpointError, export_checkpoint, import_checkpoint

CASES = cases()
IDS = torch.tensor([[3, 17, 250 - 10, 42, 99, 5, 7, 11, 13, 200, 1, 0, 64, 65, 66, 67, 120, 2, 9, 31]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, transformers reference model)"""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, case in CASES.items():
        ref = reference_model(case)
        out[name] = (write_checkpoint(case, ref, root / name), ref)
    return out


@pytest.mark.parametrize("family", list(CASES))
def test_logits_equal_transformers(checkpoints, family):
    folder, ref = checkpoints[family]
    case = CASES[family]
    model, tokenizer = import_checkpoint(folder)
    cfg = model.config
    assert cfg.logits_shift == case.shift
    assert cfg.attention_mode == ("bidirectional" if case.attention == "bidirectional" else "block_causal")
    expected = reference_logits(ref, case, IDS)
    got = model(IDS)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    # the checkpoint's own special ids, in the model and the tokenizer alike
    assert tokenizer.mask_token_id == cfg.mask_token_id and tokenizer.eos_token_id == cfg.eos_token_id
    if family in ("llada", "dream", "fast_dllm_v2", "sdar"):
        mask_token = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "fast_dllm_v2": "|<MASK>|", "sdar": "<|MASK|>"}[family]
        assert cfg.mask_token_id == case.special_id(mask_token)
    if family == "llada":
        assert cfg.eos_token_id == case.special_id("<|endoftext|>")
        assert case.special_id("<|eot_id|>") in cfg.stop_token_ids  # the chat turn's end stops answers


def test_llada_shape_and_dtype_fields(checkpoints):
    model, _ = import_checkpoint(checkpoints["llada"][0])
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.kv_heads, cfg.rope_theta, cfg.tie_word_embeddings, cfg.qk_norm) == \
        (256, 64, 4, 5e5, False, False)
    assert cfg.dtype == torch.bfloat16  # the checkpoint's dtype, used on a GPU; CPU imports in float32
    assert model.embed_tokens.weight.dtype == torch.float32
    assert model.embed_tokens.weight.device.type == "cpu" and model.rope_cos.device.type == "cpu"
    bf16, _ = import_checkpoint(checkpoints["llada"][0], dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_autoregressive_base_adds_a_mask_token_in_a_spare_row(checkpoints):
    model, tokenizer = import_checkpoint(checkpoints["qwen2"][0])
    # the tokenizer has REGULAR + 3 tokens and the embedding 256 rows: the first spare row
    assert model.config.mask_token_id == REGULAR + 3 == tokenizer.mask_token_id
    # Llama's vocabulary is padded too here; a reserved token is used only where no row is spare
    llama, _ = import_checkpoint(checkpoints["llama"][0])
    assert llama.config.mask_token_id == REGULAR + 3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_autoregressive_base_decodes_as_transformers_generate(checkpoints, family):
    """Greedy decoding of an imported base through our engine (causal, one token per step, exact
    cache) equals transformers' own greedy generate."""
    folder, ref = checkpoints[family]
    model, _ = import_checkpoint(folder)
    prompt = IDS[0, :7]
    n = 8
    with torch.no_grad():
        expected = ref.generate(prompt[None], max_new_tokens=n, do_sample=False, min_new_tokens=n,
                                pad_token_id=0)[0, 7:].tolist()
    cfg = GenerationConfig(max_new_tokens=n, num_refinement_steps=n, block_size=1, temperature=0.0,
                           use_adaptive_steps=False)
    assert Engine(model).generate([prompt], cfg)[0] == expected


@pytest.mark.parametrize("family", list(CASES))
def test_engine_equals_eager_decoding(checkpoints, family):
    model, _ = import_checkpoint(checkpoints[family][0])
    block = model.config.block_size if model.config.attention_mode == "block_causal" else 4
    prompts = [IDS[0, :6], IDS[0, 3:14]]
    for strategy in ("static", "threshold"):
        cfg = GenerationConfig(max_new_tokens=12, num_refinement_steps=6, block_size=max(block, 4) if block > 1 else 1,
                               temperature=0.0, strategy=strategy, confidence_threshold=0.05, use_adaptive_steps=False)
        engine = Engine(model).generate(prompts, cfg)
        eager = [ParallelGenerator(model, cfg, use_kv_cache=False).generate_batch([p])[0].tolist() for p in prompts]
        assert engine == eager, strategy


def test_export_round_trip_is_exact_and_transformers_loads_it(checkpoints, tmp_path):
    import transformers

    for family in ("sdar", "dream", "llama"):
        model, tokenizer = import_checkpoint(checkpoints[family][0])
        out = export_checkpoint(model, tmp_path / family, tokenizer, max_shard_size=20_000)
        assert (out / "model.safetensors.index.json").exists()  # sharded past max_shard_size
        back, back_tok = import_checkpoint(out)
        assert back.config == model.config
        for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), name
        assert back_tok.mask_token_id == tokenizer.mask_token_id
        assert back_tok.chat_template == tokenizer.chat_template
        # transformers loads it with its own class; for the causal (AR) layout the logits agree
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        expected_class = {"sdar": "Qwen3ForCausalLM", "dream": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[family]
        assert type(hf).__name__ == expected_class
        if family == "llama":
            with torch.no_grad():
                ref = hf(IDS).logits
            assert (back(IDS)[:, 1:] - ref[:, :-1]).abs().max().item() <= 1e-4


def test_our_model_exports_in_the_qwen3_layout(tmp_path):
    import transformers
    from conftest import tiny_config
    from pllm import DiffusionTransformer

    torch.manual_seed(1)
    model = DiffusionTransformer(tiny_config(attention_mode="block_causal", block_size=1, logits_shift=True)).eval()
    out = export_checkpoint(model, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(4, 60, (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (model(ids)[:, 1:] - ref[:, :-1]).abs().max().item() <= 1e-4
    back, _ = import_checkpoint(out)
    assert torch.equal(back(ids), model(ids))


# -- bad inputs -------------------------------------------------------------------------------
def _copy(checkpoints, family, tmp_path):
    dst = tmp_path / family
    shutil.copytree(checkpoints[family][0], dst)
    return dst


def test_folder_without_weights(checkpoints, tmp_path):
    folder = _copy(checkpoints, "llada", tmp_path)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"no weights.*model.safetensors.*pytorch_model.bin.*never loaded"):
        import_checkpoint(folder)


def test_shard_missing_from_index(checkpoints, tmp_path):
    folder = _copy(checkpoints, "sdar", tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json.*model-00002-of-00002.safetensors"):
        import_checkpoint(folder)


def test_config_shapes_disagree_with_weights(checkpoints, tmp_path):
    folder = _copy(checkpoints, "dream", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp.*has shape \[96, 64\] but config.json implies \[128, 64\].*intermediate_size=128"):
        import_checkpoint(folder)


def test_tokenizer_without_mask_token(checkpoints, tmp_path):
    folder = _copy(checkpoints, "fast_dllm_v2", tmp_path)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "|<MASK>|"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: no mask token.*\|<MASK>\|"):
        import_checkpoint(folder)
    llada = _copy(checkpoints, "llada", tmp_path)
    config = json.loads((llada / "config.json").read_text())
    config["mask_token_id"] = 255  # a padding row: no such token in the tokenizer
    (llada / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: no mask token: config.json mask_token_id = 255"):
        import_checkpoint(llada)


def test_unknown_and_moe_architectures_are_named(checkpoints, tmp_path):
    folder = _copy(checkpoints, "llada", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for architecture, model_type, note in [("LLaDAMoEModelLM", "llada", "LLaDA-MoE"), ("GPT2LMHeadModel", "gpt2", "")]:
        (folder / "config.json").write_text(json.dumps(config | {"architectures": [architecture], "model_type": model_type}))
        with pytest.raises(CheckpointError, match=rf"config.json: architectures \['{architecture}'\].*{note}.*supported: llada"):
            import_checkpoint(folder)


def test_unsupported_option_is_named(checkpoints, tmp_path):
    folder = _copy(checkpoints, "llada", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"scale_logits": True}))
    with pytest.raises(CheckpointError, match=r"config.json: field 'scale_logits' = True is not supported for llada"):
        import_checkpoint(folder)
