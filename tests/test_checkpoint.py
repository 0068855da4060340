import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from pllm import DiffusionTransformer, load_model


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, tied):
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(tie_word_embeddings=tied, attention_mode="block_causal", block_size=8))
    model.save_pretrained(tmp_path)
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


def test_loading_a_folder_without_weights_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_loading_mismatched_weights_fails(tmp_path):
    DiffusionTransformer(tiny_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError):
        load_model(tmp_path)
