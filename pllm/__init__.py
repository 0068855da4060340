"""Parallel-LLM: train and serve masked-diffusion language models."""

import logging

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
