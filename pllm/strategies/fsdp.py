"""PyTorch FSDP2: `fully_shard` per transformer block, then the root (embeddings, final norm and the
tied LM head), with a mixed-precision policy; sharded checkpoints through torch.distributed.checkpoint.

    full          -> parameters resharded after forward (ZeRO-3-like: least memory)
    shard_grad_op -> parameters kept gathered between forward and backward (ZeRO-2-like)
    no_shard      -> not FSDP: plain DDP (see DDPStrategy)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from ..model import DiffusionTransformer
from ..optim import build_optimizer, build_scheduler
from .base import Strategy

DCP_DIR = "dcp"
log = logging.getLogger(__name__)


def apply_fsdp(model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place: each block is one FSDP unit, the root holds the rest."""
    kwargs, root_kwargs = {}, {}
    dtype = cfg.autocast_dtype
    if device.type == "cuda" and dtype is not None:
        kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
        # Logits leave the model in fp32 for the loss.
        root_kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                         output_dtype=torch.float32)}
    if getattr(cfg, "fsdp_cpu_offload", False):
        # Sharded parameters, gradients and optimizer state live in host memory; each unit's
        # parameters are copied to the device for its forward and backward only.
        kwargs["offload_policy"] = root_kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
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
    loads_shards = True

    def setup(self, model: torch.nn.Module) -> None:
        on_meta = any(p.is_meta for p in model.parameters())
        model = self._with_kernels(model)
        self.module = apply_fsdp(model if on_meta else model.to(self.device), self.cfg, self.device)
        if on_meta:
            # Sharded first, then allocated: each rank holds only its shards, filled by load_shards.
            offload = getattr(self.cfg, "fsdp_cpu_offload", False)
            self.module.to_empty(device="cpu" if offload else self.device)
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

    def _state(self) -> dict:
        """What a checkpoint holds: the trainable weights (all but a LoRA run's frozen base) and the
        optimizer state, as sharded tensors."""
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        frozen = self.frozen
        return {"model": {k: v for k, v in model_sd.items() if k not in frozen}, "optimizer": optim_sd}

    def save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(path / DCP_DIR))
        if self.is_main:
            self._save_scheduler(path)
        self.barrier()

    def load(self, path: Path) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        # Not strict: a LoRA checkpoint leaves out the frozen base, loaded from the starting checkpoint.
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(strict=not self.frozen))
        self._load_scheduler(path)

    def load_shards(self, folder: str | Path) -> None:
        # Each rank reads its own rows of every tensor from the files: no full copy anywhere.
        from ..lora import init_adapters
        from ..sharded_load import load_local_shards

        loaded = load_local_shards(self.module, folder)
        fresh = set(init_adapters(self.module, self.cfg.seed))
        absent = [n for n in loaded.missing if n not in fresh]
        if absent:
            raise ValueError(f"{folder}: holds no tensor for {absent[:3]} ({len(absent)} parameters in all)")
        log.info("rank %d read %.1f MB of its shards from %s", self.rank, loaded.bytes_read / 1e6, folder)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.is_main else None
