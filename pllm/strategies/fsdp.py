"""PyTorch FSDP2: `fully_shard` per transformer block, then the root (embeddings, final norm and the
tied LM head), with a mixed-precision policy; sharded checkpoints through torch.distributed.checkpoint.

    full          -> parameters resharded after forward (ZeRO-3-like: least memory)
    shard_grad_op -> parameters kept gathered between forward and backward (ZeRO-2-like)
    no_shard      -> not FSDP: plain DDP (see DDPStrategy)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from ..model import DiffusionTransformer
from ..optim import build_optimizer, build_scheduler
from .base import Strategy

DCP_DIR = "dcp"


def apply_fsdp(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place: each block is one FSDP unit, the root holds the rest."""
    kwargs, root_kwargs = {}, {}
    if device.type == "cuda" and cfg.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
        # Logits leave the model in fp32 for the loss.
        root_kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                         output_dtype=torch.float32)}
    reshard = cfg.fsdp_sharding_strategy == "full"
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **root_kwargs)
    if cfg.fsdp_forward_prefetch:
        for block, nxt in zip(blocks, blocks[1:]):
            block.set_modules_to_forward_prefetch([nxt])
    if not cfg.fsdp_backward_prefetch:
        for block in blocks:
            block.set_modules_to_backward_prefetch([])
    return model


class FSDP2Strategy(Strategy):
    name = "fsdp2"
    casts_itself = True  # the mixed-precision policy casts parameters
    loads_from_rank0 = True

    def setup(self, model: torch.nn.Module) -> None:
        on_meta = any(p.is_meta for p in model.parameters())
        model = self._with_kernels(model)
        self.module = apply_fsdp(model if on_meta else model.to(self.device), self.cfg, self.device)
        if on_meta:
            # Sharded first, then allocated: each rank holds only its shards, filled by load_full_state_dict.
            self.module.to_empty(device=self.device)
            if isinstance(model, DiffusionTransformer):
                model.set_rotary_buffers(self.device)
        self.model = self._compile(self.module)
        self.optimizer = build_optimizer(self.module, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)
        if self.scaler.is_enabled():
            self.scaler = ShardedGradScaler()

    def backward(self, loss: torch.Tensor) -> None:
        # Reduce-scatter gradients only on the last micro-batch of an accumulation window.
        self._micro = getattr(self, "_micro", 0) + 1
        self.module.set_requires_gradient_sync(self._micro % self.cfg.gradient_accumulation_steps == 0)
        super().backward(loss)

    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / DCP_DIR))
        if self.is_main:
            self._save_scheduler(path)
        self.barrier()

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self._load_scheduler(path)

    def load_full_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        # Rank 0 sends each tensor in turn; every rank keeps its shard of it (no full copy elsewhere).
        set_model_state_dict(self.module, state if self.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.is_main else None
