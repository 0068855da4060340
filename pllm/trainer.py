"""DistributedTrainer: the training loop for the masked-diffusion objective.

This module is the loop itself (AdamW, warmup + cosine LR, gradient accumulation and clipping,
autocast, periodic validation ELBO, checkpoints, progress). It runs in one process as is; in a
multi-process job (`torch.distributed` initialised) the parallel strategy is applied to the model
from outside before the loop starts.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ModelConfig, TrainingConfig
from .diffusion import DiffusionLoss, diffusion_loss, evaluate_elbo, get_schedule, unpack_batch

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]
TRAIN_STATE_FILE = "train_state.pt"


def lr_lambda(cfg: TrainingConfig) -> Callable[[int], float]:
    """Linear warmup to the peak LR, then cosine decay to peak * min_lr_ratio at num_train_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.num_train_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


class DistributedTrainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_config: TrainingConfig,
        model_config: ModelConfig | None = None,
        train_dataloader: Iterable | None = None,
        eval_dataloader: Iterable | None = None,
        callbacks: list[MetricsCallback] | None = None,
        device: str | torch.device | None = None,
        show_progress: bool = True,
    ):
        if train_dataloader is None:
            raise ValueError("train_dataloader is required: an iterable of token-id batches (B, L)")
        self.cfg = train_config
        self.model_config = model_config or model.config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.train_dataloader, self.eval_dataloader = train_dataloader, eval_dataloader
        self.callbacks = list(callbacks or [])
        self.show_progress = show_progress
        self.schedule = get_schedule(self.model_config.noise_schedule)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, float]] = []

        if self.cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            raise RuntimeError(
                "DistributedTrainer runs in one process; multi-process (FSDP2 / DeepSpeed ZeRO) "
                "training is not supported by this release"
            )
        if self.cfg.use_fsdp or self.cfg.use_deepspeed:
            log.info("single process: no sharding applied (use_fsdp/use_deepspeed act in multi-worker jobs)")
        if self.cfg.use_torch_compile and self.device.type == "cuda":
            self.model = torch.compile(self.model, mode=self.cfg.torch_compile_mode)
        elif self.cfg.use_torch_compile:
            log.info("torch.compile skipped on %s (applied on CUDA devices)", self.device.type)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg))
        fp16 = self.cfg.mixed_precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    # -- pieces ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA; fp32 on CPU (CPU bf16 matmuls are slower than fp32 on most
        CPUs and the demo sizes gain nothing)."""
        if self.device.type == "cuda" and self.cfg.mixed_precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def training_step(self, batch) -> DiffusionLoss:
        """Loss of one micro-batch (override to change the objective)."""
        input_ids, attention_mask = unpack_batch(batch, self.device)
        with self.autocast():
            return diffusion_loss(self.model, input_ids, self.schedule, self.model_config.mask_token_id, attention_mask)

    def _batches(self):
        for epoch in itertools.count():
            if hasattr(self.train_dataloader, "sampler") and hasattr(self.train_dataloader.sampler, "set_epoch"):
                self.train_dataloader.sampler.set_epoch(epoch)
            empty = True
            for batch in self.train_dataloader:
                empty = False
                yield batch
            if empty:
                raise ValueError("train_dataloader yielded no batches")

    def _emit(self, metrics: dict[str, float]) -> None:
        metrics = {"step": self.step, **metrics}
        self.history.append(metrics)
        for cb in self.callbacks:
            cb(metrics, self.step)

    # -- loop ------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        batches = self._batches()
        deadline = time.monotonic() + cfg.max_train_minutes * 60 if cfg.max_train_minutes else math.inf
        bar = tqdm(total=cfg.num_train_steps, initial=self.step, desc="train", disable=not self.show_progress,
                   dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        last: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        while self.step < cfg.num_train_steps:
            loss_sum = 0.0
            for _ in range(cfg.gradient_accumulation_steps):
                out = self.training_step(next(batches))
                self.scaler.scale(out.loss / cfg.gradient_accumulation_steps).backward()
                loss_sum += float(out.loss.detach()) / cfg.gradient_accumulation_steps
                window_tokens += out.num_tokens
                self.tokens_seen += out.num_tokens
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            )
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")

            if self.step % cfg.log_interval == 0 or self.step == cfg.num_train_steps:
                elapsed = time.perf_counter() - window_start
                last = {"loss": loss_sum, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9), "tokens_seen": self.tokens_seen}
                self._emit(last)
                window_tokens, window_start = 0, time.perf_counter()
            if self.eval_dataloader is not None and self.step % cfg.eval_interval == 0:
                last_eval = {"step": self.step, **self.evaluate()}
                self._emit(last_eval)
            if cfg.save_interval and self.step % cfg.save_interval == 0:
                self.save_checkpoint()
            if time.monotonic() > deadline:
                log.info("stopping at step %d: max_train_minutes=%s reached", self.step, cfg.max_train_minutes)
                break
        bar.close()
        # Finish with a validation of the final weights, unless the loop just did one.
        if self.eval_dataloader is not None and last_eval.get("step") != self.step:
            last_eval = {"step": self.step, **self.evaluate()}
            self._emit(last_eval)
        return {**last, **{k: v for k, v in last_eval.items() if k != "step"}}

    def evaluate(self) -> dict[str, float]:
        if self.eval_dataloader is None:
            raise ValueError("evaluate() needs an eval_dataloader")
        batches = itertools.islice(self.eval_dataloader, self.cfg.eval_batches)
        report = evaluate_elbo(self.model, batches, self.schedule, self.model_config.mask_token_id,
                               autocast=self.autocast)
        return report.as_metrics()

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Weights (safetensors) + config, and the optimizer/scheduler/step state for resuming."""
        from .checkpoint import save_pretrained

        path = Path(path or Path(self.cfg.output_dir) / f"checkpoint-{self.step}")
        save_pretrained(self._unwrapped(), path)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "tokens_seen": self.tokens_seen}, path / TRAIN_STATE_FILE)
        log.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        load_model(self._unwrapped(), str(path / "model.safetensors"), device=str(self.device))
        state = torch.load(path / TRAIN_STATE_FILE, weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])

    def _unwrapped(self) -> torch.nn.Module:
        return getattr(self.model, "_orig_mod", self.model)
