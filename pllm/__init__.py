"""Parallel-LLM: train and serve masked-diffusion language models."""

import logging
import os

# In a source checkout (including the copy `ray job submit --working-dir .` ships to the cluster) the
# card's folders actors/, pipelines/, kernels/, cluster/ and configs/ sit beside pllm/ rather than in
# it: let `pllm.actors` etc. resolve there. Installed wheels place them inside pllm/ instead.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pipelines", "__init__.py")):
    __path__.append(_checkout)

from .checkpoint import load_model, load_tokenizer, save_pretrained
from .config import (
    ClusterConfig,
    DataConfig,
    EngineConfig,
    GenerationConfig,
    JobConfig,
    ModelConfig,
    TrackingConfig,
    TrainingConfig,
)
from .diffusion import diffusion_loss, evaluate_elbo, get_schedule
from .generator import ParallelGenerator
from .model import DiffusionTransformer
from .tokenizer import Tokenizer
from .trainer import DistributedTrainer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "ClusterConfig", "DataConfig", "DiffusionTransformer", "DistributedTrainer", "EngineConfig", "GenerationConfig", "JobConfig",
    "ModelConfig", "ParallelGenerator", "Tokenizer", "TrackingConfig", "TrainingConfig", "diffusion_loss",
    "evaluate_elbo", "get_schedule", "load_model", "load_tokenizer", "save_pretrained",
]
