"""Parallel-LLM: train and serve masked-diffusion language models."""

import logging

from .checkpoint import load_model, load_tokenizer, save_pretrained
from .config import DataConfig, GenerationConfig, JobConfig, ModelConfig, TrainingConfig
from .diffusion import diffusion_loss, evaluate_elbo, get_schedule
from .generator import ParallelGenerator
from .model import DiffusionTransformer
from .tokenizer import Tokenizer
from .trainer import DistributedTrainer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "DataConfig", "DiffusionTransformer", "DistributedTrainer", "GenerationConfig", "JobConfig", "ModelConfig",
    "ParallelGenerator", "Tokenizer", "TrainingConfig", "diffusion_loss", "evaluate_elbo", "get_schedule",
    "load_model", "load_tokenizer", "save_pretrained",
]
