"""Training strategies: one object per way of placing the model on processes (see base.Strategy)."""

from __future__ import annotations

import torch

from ..config import TrainingConfig
from .base import DDPStrategy, Strategy, distributed


def build_strategy(cfg: TrainingConfig, device: torch.device) -> Strategy:
    """Pick the strategy the config asks for. In one process nothing is sharded, so FSDP/DeepSpeed
    requests fall back to the plain single-process strategy (same math, same checkpoints)."""
    if not distributed():
        return Strategy(cfg, device)
    if cfg.use_deepspeed:
        from .zero import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, device)
    if cfg.use_fsdp and cfg.fsdp_sharding_strategy != "no_shard":
        from .fsdp import FSDP2Strategy

        return FSDP2Strategy(cfg, device)
    return DDPStrategy(cfg, device)


__all__ = ["DDPStrategy", "Strategy", "build_strategy", "distributed"]
