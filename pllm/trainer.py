"""DistributedTrainer: the training loop for the masked-diffusion objective.

The loop (accumulation, clipping, warmup + cosine LR, periodic validation ELBO, tokens/s and MFU,
checkpoints with the data position, progress) is the same in one process, under `torchrun`, and in
Ray Train workers; how the model is placed on processes (single, DDP, FSDP2, DeepSpeed ZeRO) is a
`Strategy` chosen from the config and applied from outside the model.

Noise is drawn for the *global* batch from a generator seeded by (seed, step, micro-batch) and each
rank takes its rows, so N workers with batch B see exactly the masks one process with batch N*B
would see: sharded and single-process runs are comparable step by step, and resumes are exact.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adaptation import annealing_mask, annealing_seed, future_fraction
from .config import ModelConfig, TrainingConfig
from .diffusion import DiffusionLoss, diffusion_loss, evaluate_elbo, get_schedule, sample_t, to_device, unpack_batch
from .optim import peak_flops
from .strategies import build_strategy

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]
TRAINER_STATE_FILE = "trainer_state.json"


def log_progress_line(metrics: dict[str, float], step: int, total: int) -> None:
    """Progress as one log line: what a log file gets instead of a progress bar."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
    log.info("step %d/%d: %s", step, total, shown)


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader (or its sampler, e.g. a DistributedSampler) which epoch starts: its shuffle."""
    for obj in (loader, getattr(loader, "sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def init_distributed_from_env() -> bool:
    """Join the process group a launcher such as `torchrun` describes (WORLD_SIZE > 1, RANK,
    LOCAL_RANK, MASTER_ADDR / MASTER_PORT), unless one is already up (Ray Train sets its own):
    NCCL with this rank's GPU made current when there are GPUs, gloo otherwise. Returns whether a
    group is up."""
    import os

    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log.info("joined the process group from the environment: rank %s of %s", dist.get_rank(), dist.get_world_size())
    return True


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
        on_save: Callable[["DistributedTrainer"], None] | None = None,
        attention_anneal_steps: int = 0,
    ):
        """attention_anneal_steps (task "adapt", `pllm.adaptation`): over the first N optimizer steps a
        bidirectional model trains under a causal mask opening to bidirectional; 0 = off. Evaluation
        always uses the model's own attention."""
        if train_dataloader is None:
            raise ValueError("train_dataloader is required: an iterable of token-id batches (B, L)")
        self.model_config = model_config or model.config
        if self.model_config.use_fp8 and train_config.mixed_precision != "fp8":  # the model asks for FP8 training
            train_config = train_config.replace(mixed_precision="fp8")  # validated: fp8's rules (no DeepSpeed, no LoRA)
        self.cfg = train_config
        init_distributed_from_env()  # torchrun: the process group and this rank's GPU from its variables
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train_dataloader, self.eval_dataloader = train_dataloader, eval_dataloader
        self.callbacks = list(callbacks or [])
        self.on_save = on_save or (lambda trainer: trainer.save_checkpoint())
        self.schedule = get_schedule(self.model_config.noise_schedule)
        # Block-causal models train with the block-diffusion objective (see diffusion_loss).
        self.block_size = self.model_config.block_size if self.model_config.attention_mode == "block_causal" else None
        if attention_anneal_steps < 0:
            raise ValueError(f"attention_anneal_steps must be >= 0, got {attention_anneal_steps}")
        if attention_anneal_steps and self.model_config.attention_mode != "bidirectional":
            raise ValueError("attention_anneal_steps anneals causal attention to bidirectional: the model's "
                             f"attention_mode is {self.model_config.attention_mode!r}")
        self.attention_anneal_steps = attention_anneal_steps
        self.step = 0
        self.tokens_seen = 0  # global, all ranks
        self.epoch, self.batches_in_epoch = 0, 0  # data position, restored on resume
        self.history: list[dict[str, float]] = []

        if self.cfg.lora is not None:
            from .lora import apply_lora

            model = apply_lora(model, self.cfg.lora)  # before sharding: the strategy wraps the adapters too
        if self.cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        self.strategy = build_strategy(self.cfg, self.device)
        self.strategy.setup(model)
        # A bar redraws in place: on a terminal that is one line, in a log file one line per redraw.
        # Elsewhere the main rank logs a line per log_interval (and per evaluation) instead.
        progress = show_progress and self.strategy.is_main
        self.show_progress = progress and sys.stderr.isatty()
        self.log_progress = progress and not self.show_progress
        self._peak = peak_flops(self.device)
        log.info("training strategy: %s on %d process(es)", self.strategy.name, self.strategy.world_size)

    # Views of the strategy's objects (the wrapped model, optimizer and scheduler).
    @property
    def model(self) -> torch.nn.Module:
        return self.strategy.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.strategy.optimizer

    @property
    def scheduler(self):
        return self.strategy.scheduler

    # -- pieces ----------------------------------------------------------------------------------
    def autocast(self):
        return self.strategy.autocast()

    def _noise(self, input_ids: torch.Tensor, micro: int, per_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, uniforms) for this rank's rows of the global micro-batch (see the module docstring):
        per_row t's a row (default: one, or one per block for block diffusion)."""
        B, L = input_ids.shape
        W, r = self.strategy.world_size, self.strategy.rank
        seed = (self.cfg.seed * 1_000_003 + self.step * self.cfg.gradient_accumulation_steps + micro) % 2**63
        # Drawn on the host: `diffusion_loss` then knows which positions are masked without a sync.
        g = torch.Generator().manual_seed(seed)
        if per_row is None:
            per_row = -(-L // self.block_size) if self.block_size else 1  # block diffusion: a t per block
        t = sample_t(B * W * per_row, generator=g).view(B * W, per_row)[r * B : (r + 1) * B]
        draw = torch.rand((B * W, L), generator=g)[r * B : (r + 1) * B]
        return t, draw

    def training_step(self, batch, micro: int = 0) -> DiffusionLoss:
        """Loss of one micro-batch (override to change the objective): the masked-diffusion NELBO, or
        for SFT batches (with a response_mask, `pllm.sft.sft_dataloader`) the SFT loss."""
        if isinstance(batch, dict) and "response_mask" in batch:
            return self._sft_step(batch, micro)
        input_ids, attention_mask = unpack_batch(batch, self.device)
        t, draw = self._noise(input_ids, micro)
        with self.autocast():
            return diffusion_loss(self.model, input_ids, self.schedule, self.model_config.mask_token_id,
                                  attention_mask, t=t, mask_draw=draw, block_size=self.block_size,
                                  attention_override=self._annealing_mask(input_ids.shape[1], micro))

    def _annealing_mask(self, seq_len: int, micro: int) -> torch.Tensor | None:
        """This step's annealed attention mask while annealing lasts (the same on every rank), else None."""
        if self.step >= self.attention_anneal_steps:
            return None
        fraction = future_fraction(self.step, self.attention_anneal_steps)
        return annealing_mask(seq_len, fraction, annealing_seed(self.cfg.seed, self.step, micro))

    def _sft_step(self, batch: dict, micro: int) -> DiffusionLoss:
        from .sft import sft_loss

        input_ids = to_device(batch["input_ids"], self.device)
        t, draw = self._noise(input_ids, micro, per_row=input_ids.shape[1])  # a t per possible example
        segments = batch["segment_ids"]
        with self.autocast():
            return sft_loss(self.model, input_ids, batch["response_mask"], self.schedule,
                            self.model_config.mask_token_id, segment_ids=segments if bool(segments.any()) else None,
                            t=t, mask_draw=draw)

    def _batches(self):
        """Endless micro-batches, epoch after epoch, starting at the saved data position."""
        for epoch in itertools.count(self.epoch):
            self.epoch = epoch
            set_epoch(self.train_dataloader, epoch)
            skip, yielded = self.batches_in_epoch, False
            for i, batch in enumerate(self.train_dataloader):
                yielded = True
                if i < skip:
                    continue  # already trained on before the checkpoint
                self.batches_in_epoch = i + 1
                yield batch
            if not yielded:
                raise ValueError("train_dataloader yielded no batches")
            self.batches_in_epoch = 0

    def _emit(self, metrics: dict[str, float]) -> None:
        metrics = {"step": self.step, **metrics}
        self.history.append(metrics)
        for cb in self.callbacks:
            cb(metrics, self.step)
        if self.log_progress:
            log_progress_line(metrics, self.step, self.cfg.num_train_steps)

    def _memory_gib(self) -> dict[str, float]:
        """Per-GPU memory, the largest over ranks: the peak so far (activations included) and what is held
        between steps (parameters + optimizer state; gradients are freed), which sharding divides."""
        peak, held = self.strategy.all_reduce([torch.cuda.max_memory_allocated(self.device) / 2**30,
                                               torch.cuda.memory_allocated(self.device) / 2**30], op="max")
        return {"peak_memory_gib": peak, "state_memory_gib": held}

    def _out_of_time(self, deadline: float | None) -> bool:
        if deadline is None:
            return False
        # Every rank must stop at the same step (sharded collectives), so the slowest clock decides.
        return self.strategy.all_reduce([float(time.monotonic() > deadline)], op="max")[0] > 0

    # -- loop ------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg, strategy = self.cfg, self.strategy
        self.model.train()
        batches = self._batches()
        # The time budget counts training only: its clock starts once the first optimizer step is done,
        # after the data pipeline's start-up, the first batch's wait and any compilation.
        deadline: float | None = None
        bar = tqdm(total=cfg.num_train_steps, initial=self.step, desc="train", disable=not self.show_progress,
                   dynamic_ncols=True)
        window_tokens, window_start = 0, time.perf_counter()
        last: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        while self.step < cfg.num_train_steps:
            # Loss and gradient norm stay on the device until a log step reads them: reading one
            # waits for the GPU, and the host could not queue the next step's work meanwhile.
            loss_sum, step_tokens = 0.0, 0
            for micro in range(cfg.gradient_accumulation_steps):
                out = self.training_step(next(batches), micro)
                strategy.backward(out.loss)
                loss_sum = loss_sum + out.loss.detach() / cfg.gradient_accumulation_steps
                step_tokens += out.num_tokens * strategy.world_size  # equal shards on every rank
            grad_norm = strategy.step()
            self.tokens_seen += step_tokens
            window_tokens += step_tokens
            self.step += 1
            bar.update(1)
            if deadline is None and cfg.max_train_minutes:
                deadline = time.monotonic() + cfg.max_train_minutes * 60

            if self.step % cfg.log_interval == 0 or self.step == cfg.num_train_steps:
                elapsed = time.perf_counter() - window_start
                loss = strategy.all_reduce([float(loss_sum)])[0] / strategy.world_size
                bar.set_postfix(loss=f"{loss:.3f}")
                last = {"loss": loss, "lr": strategy.lr, "grad_norm": float(grad_norm),
                        "tokens_per_s": window_tokens / max(elapsed, 1e-9), "tokens_seen": self.tokens_seen}
                if self.attention_anneal_steps:  # the share of future keys the step just taken saw
                    last["attention_future_fraction"] = future_fraction(self.step - 1, self.attention_anneal_steps)
                if self._peak:
                    flops = self.model_config.flops_per_token(cfg.seq_len) * last["tokens_per_s"]
                    last["mfu"] = flops / (self._peak * strategy.world_size)
                if self.device.type == "cuda":
                    last.update(self._memory_gib())
                self._emit(last)
                window_tokens, window_start = 0, time.perf_counter()
            if self.eval_dataloader is not None and self.step % cfg.eval_interval == 0:
                last_eval = {"step": self.step, **self.evaluate()}
                self._emit(last_eval)
            if cfg.save_interval and self.step % cfg.save_interval == 0:
                self.on_save(self)
            if self._out_of_time(deadline):
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
        first = next(iter(self.eval_dataloader))
        if isinstance(first, dict) and "response_mask" in first:  # SFT: the loss on held-out examples
            from .sft import evaluate_sft

            return evaluate_sft(self.model, batches, self.schedule, self.model_config.mask_token_id,
                                autocast=self.autocast, reduce=self.strategy.all_reduce)
        report = evaluate_elbo(self.model, batches, self.schedule, self.model_config.mask_token_id,
                               autocast=self.autocast, reduce=self.strategy.all_reduce, block_size=self.block_size)
        return report.as_metrics()

    # -- checkpoints (collective: every rank calls them) -----------------------------------------
    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Model and optimizer state (in the strategy's format), LR schedule, step and data position."""
        path = Path(path or Path(self.cfg.output_dir) / f"checkpoint-{self.step}")
        path.mkdir(parents=True, exist_ok=True)
        self.strategy.save(path)
        if self.strategy.is_main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "epoch": self.epoch,
                     "batches_in_epoch": self.batches_in_epoch, "strategy": self.strategy.name,
                     "world_size": self.strategy.world_size}
            (path / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
            log.info("saved checkpoint %s", path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
        if state["strategy"] != self.strategy.name:
            raise ValueError(f"checkpoint {path} was written by the {state['strategy']!r} strategy; this run "
                             f"uses {self.strategy.name!r}")
        self.strategy.load(path)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        if state["world_size"] != self.strategy.world_size:
            log.warning("resuming a %d-process checkpoint on %d processes: the data position is approximate",
                        state["world_size"], self.strategy.world_size)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                 self.batches_in_epoch)

    def consolidated_model(self, merge_lora: bool = True) -> torch.nn.Module | None:
        """An unsharded copy of the trained model on rank 0 (None elsewhere); with LoRA, the adapters
        folded into the weights (merge_lora=False: left as adapters, to save them). Collective."""
        state = self.strategy.consolidated_state_dict()
        if state is None:
            return None
        from .model import DiffusionTransformer

        model = DiffusionTransformer(self.model_config)
        if self.cfg.lora is not None:  # the adapters as trained, then folded into the weights
            from .lora import apply_lora

            model = apply_lora(model, self.cfg.lora)
        missing, _ = model.load_state_dict(state, strict=False)
        if self.model_config.tie_word_embeddings:  # the tied LM head may be absent from the state
            missing = [k for k in missing if not k.startswith("lm_head.")]
        if missing:
            raise RuntimeError(f"consolidated state lacks {sorted(missing)}")
        if self.cfg.lora is not None and merge_lora:
            from .lora import merge_lora as merge

            model = merge(model)
        return model.eval()
