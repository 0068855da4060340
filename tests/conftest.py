import os

import pytest
import torch

from pllm import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tokenized-corpus cache in a temp folder unless the caller chose one."""
    os.environ.setdefault("PLLM_CACHE_DIR", str(tmp_path_factory.mktemp("pllm-cache")))
    torch.set_num_threads(max(1, torch.get_num_threads()))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=128, use_flash_attention=False, dtype="float32")
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model():
    from pllm import DiffusionTransformer

    torch.manual_seed(0)
    return DiffusionTransformer(tiny_config()).eval()
