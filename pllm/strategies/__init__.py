"""Training strategies: one object per way of placing the model on processes (see base.Strategy)."""

from __future__ import annotations

import torch

from ..config import TrainingConfig
from .base import DDPStrategy, Strategy, distributed


def strategy_class(cfg: TrainingConfig) -> type[Strategy]:
    """The strategy the config asks for. In one process nothing is sharded, so FSDP/DeepSpeed
    requests fall back to the plain single-process strategy (same math, same checkpoints)."""
    if not distributed():
        return Strategy
    if cfg.use_deepspeed:
        from .zero import DeepSpeedStrategy

        return DeepSpeedStrategy
    if cfg.use_fsdp and cfg.fsdp_sharding_strategy != "no_shard":
        from .fsdp import FSDP2Strategy

        return FSDP2Strategy
    return DDPStrategy


def build_strategy(cfg: TrainingConfig, device: torch.device) -> Strategy:
    """The strategy the config asks for (`strategy_class`), for this process's device."""
    return strategy_class(cfg)(cfg, device)


__all__ = ["DDPStrategy", "Strategy", "build_strategy", "distributed", "strategy_class"]
