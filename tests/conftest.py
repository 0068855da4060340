import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout root on sys.path, where our top-level `kernels/` folder (installed as
# `pllm.kernels`) would shadow the PyPI package of that name that transformers imports. Tests use the installed
# package, as a user does.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from pllm import ModelConfig  # noqa: E402


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
