"""The Strategy interface: how a model is wrapped, stepped and checkpointed on one or many processes.

Strategies are applied to an unchanged `DiffusionTransformer` from outside (torchtitan's
`parallelize` functions, OpenRLHF's DeepSpeed strategy object); the training loop talks only to this
interface, so the same loop runs single-process, under `torchrun`, or in Ray Train workers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from pllm.kernels import prepare_attention
from ..model import DiffusionTransformer
from ..optim import build_optimizer, build_scheduler, lr_lambda, scheduler_state

OPTIMIZER_FILE = "train_state.pt"
SCHEDULER_FILE = "scheduler.json"
TRAINABLE_FILE = "trainable.safetensors"  # a checkpoint's weights when some are frozen: the trainable ones


def check_trainable_state(result, frozen: set[str], path: Path) -> None:
    """A checkpoint of trainable weights only must give every trainable parameter and nothing else."""
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit this run's trainable parameters (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}): was it written with other LoRA settings?")


def compile_options(mode: str, coordinate_descent_tuning: bool = True) -> dict:
    """torch.compile's Inductor options for the training step: the mode's own, and coordinate descent,
    which searches block sizes and warps for each of Inductor's own kernels at compile time (measured
    faster, see benchmarks/RESULTS.md; "max-autotune" turns it on by itself, False turns it off there
    too: `KernelOptions.coordinate_descent_tuning`)."""
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), "coordinate_descent_tuning": coordinate_descent_tuning}


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Strategy:
    """Single process (the base case). Subclasses override wrap/backward/step/save/load."""

    name = "single"
    casts_itself = False  # True where the wrapper, not autocast, applies mixed precision
    # True where setup() takes a model on the meta device (each rank then allocates only its own part)
    # and load_shards() fills it from a checkpoint folder, each rank reading only its part; elsewhere
    # every rank builds the full model with its weights before setup().
    loads_shards = False

    def __init__(self, cfg: TrainingConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank = dist.get_rank() if distributed() else 0
        self.world_size = dist.get_world_size() if distributed() else 1
        self.model: torch.nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LambdaLR
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and device.type == "cuda")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module) -> None:
        """Move/wrap the model and build optimizer and scheduler."""
        self.module = self._with_kernels(model).to(self.device)
        self.model = self._compile(self.module)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def _with_kernels(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's forward and backward take the training config's kernel choices; with
        mixed_precision="fp8" its projections become float8 layers (before any wrapper)."""
        if isinstance(model, DiffusionTransformer):
            model.use_kernels(self.cfg.kernels)
        if self.cfg.mixed_precision == "fp8":
            from ..fp8_training import convert_to_fp8_training

            convert_to_fp8_training(model, self.device, self.cfg.fp8_recipe)
        return model

    def _compile(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cfg.use_torch_compile and self.device.type == "cuda":
            prepare_attention(self.device)  # the attention backend is chosen outside the compiled graph
            options = compile_options(self.cfg.torch_compile_mode, self.cfg.kernels.coordinate_descent_tuning)
            return torch.compile(model, options=options)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA; fp32 on CPU (CPU bf16 matmuls are slower than fp32 on most CPUs)."""
        if not self.casts_itself and self.device.type == "cuda" and self.cfg.autocast_dtype is not None:
            return torch.autocast("cuda", dtype=self.cfg.autocast_dtype)
        return contextlib.nullcontext()

    # -- one optimizer step ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (scaled for gradient accumulation here)."""
        self.scaler.scale(loss / self.cfg.gradient_accumulation_steps).backward()

    def step(self) -> torch.Tensor | float:
        """Clip, step optimizer and scheduler, zero the gradients; returns the gradient norm (a
        tensor: reading it waits for the GPU, so callers read it only when they log)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm  # 0: no clipping, the norm is only logged
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if max_norm > 0 and self._clips_in_optimizer(grads):
            # Fused AdamW divides every gradient by `grad_scale` inside its own kernel (the hook GradScaler
            # uses), so the clip costs no pass of its own over the gradients (a read and a write of each).
            self.optimizer.grad_scale = ((grad_norm + 1e-6) / max_norm).clamp_(min=1.0)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale
        else:
            if max_norm > 0:  # clip_grad_norm_'s second half, with the norm computed above
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, grad_norm)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def _clips_in_optimizer(self, grads: list[torch.Tensor]) -> bool:
        """Clipping by the fused AdamW kernel: with no loss scaler (it sets `grad_scale` itself) and
        plain-tensor gradients (not sharded DTensors)."""
        return (bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()
                and not any(hasattr(g, "full_tensor") for g in grads))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def optimizer_steps(self) -> int:
        """Steps the optimizer itself has taken (Adam's step count), to check resumes."""
        states = [s for s in self.optimizer.state.values() if "step" in s]
        return int(states[0]["step"]) if states else 0

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if not distributed():
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if distributed():
            dist.barrier()

    # -- checkpoints (collective in subclasses) --------------------------------------------------
    @property
    def frozen(self) -> set[str]:
        """Parameters that do not train (a LoRA run's base weights): checkpoints leave them out, and
        a resume takes them from the starting checkpoint again."""
        return {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def save(self, path: Path) -> None:
        """Weights (safetensors + config; only the trainable ones when some are frozen) and
        optimizer/scheduler state for resuming."""
        from safetensors.torch import save_file

        from ..checkpoint import save_pretrained

        if self.is_main:
            frozen = self.frozen
            if frozen:
                state = {k: v.detach().contiguous() for k, v in self.module.state_dict().items() if k not in frozen}
                save_file(state, str(path / TRAINABLE_FILE))
            else:
                save_pretrained(self.module, path)
            torch.save({"optimizer": self.optimizer.state_dict()}, path / OPTIMIZER_FILE)
            self._save_scheduler(path)

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file, load_model

        if (path / TRAINABLE_FILE).exists():
            state = load_file(str(path / TRAINABLE_FILE), device=str(self.device))
            check_trainable_state(self.module.load_state_dict(state, strict=False), self.frozen, path)
        else:
            load_model(self.module, str(path / "model.safetensors"), device=str(self.device))
        state = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_scheduler(path)

    def _save_scheduler(self, path: Path) -> None:
        (path / SCHEDULER_FILE).write_text(json.dumps(scheduler_state(self.scheduler)))

    def _load_scheduler(self, path: Path) -> None:
        state = json.loads((path / SCHEDULER_FILE).read_text())
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(self.scheduler.base_lrs)})
        # The LR of the next step follows this run's schedule (num_train_steps may have been extended).
        factor = lr_lambda(self.cfg)(self.scheduler.last_epoch)
        for group, base_lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * factor

    def load_shards(self, folder: str | Path) -> None:
        """Starting weights from a checkpoint folder into every rank's part of the model set up from
        the meta device; LoRA adapters get their initial values. Only where `loads_shards`."""
        raise NotImplementedError(f"the {self.name} strategy loads starting weights on every rank before setup()")

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full, unsharded weights on rank 0 (None on other ranks). Collective."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.is_main else None


class DDPStrategy(Strategy):
    """Plain data parallel (every rank holds the full model): used when neither FSDP nor DeepSpeed is
    asked for, and for fsdp_sharding_strategy='no_shard'."""

    name = "ddp"

    def setup(self, model: torch.nn.Module) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.module = self._with_kernels(model).to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = self._compile(DistributedDataParallel(self.module, device_ids=ids))
        self.optimizer = build_optimizer(self.module, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def backward(self, loss: torch.Tensor) -> None:
        # Gradients are all-reduced only on the last micro-batch of an accumulation window.
        self._micro = getattr(self, "_micro", 0) + 1
        sync = self._micro % self.cfg.gradient_accumulation_steps == 0
        ctx = contextlib.nullcontext() if sync else self._unwrap_ddp().no_sync()
        with ctx:
            super().backward(loss)

    def _unwrap_ddp(self):
        return getattr(self.model, "_orig_mod", self.model)

    def save(self, path: Path) -> None:
        super().save(path)
        self.barrier()
