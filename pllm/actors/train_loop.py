"""The Ray Train worker: a thin shell around `DistributedTrainer`.

Ray Train starts one of these per worker with the process group already initialised (NCCL on GPUs,
gloo on CPU); the trainer picks FSDP2 / DeepSpeed ZeRO / DDP from the config. The worker streams its
dataset shard, logs metrics to MLflow from rank 0, reports sharded checkpoints to Ray Train (every
rank writes its own shard into the same checkpoint folder), resumes from the latest one after a
failure, and finally reports the consolidated model (safetensors + config + tokenizer).

With model.init_from, training starts from that checkpoint: under FSDP2 every rank builds the model
on the meta device, shards it, and reads only its own rows of each tensor from the checkpoint's
files (`pllm.sharded_load`); the other strategies (DDP, DeepSpeed ZeRO, whose engine partitions the
module it is given) read the full model on every rank before wrapping it.

With training.lora, the checkpoints hold only the adapters (and their optimizer state): a resume
reads the base from model.init_from again. The final checkpoint holds the model with the adapters
merged (what serving runs) and the adapter folder naming its base (`pllm.lora.save_adapter`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from pllm.checkpoint import is_model_folder, save_pretrained
from pllm.config import JobConfig
from pllm.lora import is_adapter_folder, merge_lora, save_adapter
from pllm.pipelines.job_stages import init_folder, initial_model
from pllm.pipelines.token_dataset import ShardBatches
from pllm.registry import MetricsLogger
from pllm.strategies import strategy_class
from pllm.tokenizer import Tokenizer
from pllm.trainer import DistributedTrainer, log_progress_line

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final"
ADAPTER_DIR = "adapter"  # in the final checkpoint of a LoRA run, beside model/
SUMMARY_FILE = "summary.json"


def _report_checkpoint(trainer: DistributedTrainer) -> None:
    """Every rank writes its part into a local folder; Ray Train gathers them into one checkpoint."""
    with tempfile.TemporaryDirectory(prefix="pllm-ckpt-") as tmp:
        trainer.save_checkpoint(tmp)
        metrics = {"step": trainer.step, "tokens_seen": trainer.tokens_seen}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{trainer.step:07d}")


def _init_folder(config: dict, job: JobConfig) -> Path | None:
    """model.init_from on this node: the driver's folder, else (another node) resolved here."""
    if job.model.init_from is None:
        return None
    if config.get("init_folder") and is_model_folder(config["init_folder"]):
        return Path(config["init_folder"])
    return init_folder(job.model.init_from, config["tracking_uri"])


def train_loop_per_worker(config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job = JobConfig.from_dict(config["job"])
    ctx = ray.train.get_context()
    rank, cfg = ctx.get_world_rank(), job.training
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
    tokenizer = Tokenizer.from_json(config["tokenizer_json"])

    checkpoint = ray.train.get_checkpoint()
    # Starting weights (none when resuming, unless LoRA's frozen base: the checkpoint holds the rest);
    # fresh ones are seeded alike on every rank.
    start_folder = None if checkpoint and cfg.lora is None else _init_folder(config, job)
    sharded = (start_folder is not None and strategy_class(cfg).loads_shards and not is_adapter_folder(start_folder))
    model = initial_model(job.model, start_folder, cfg.seed, on_meta=sharded)
    train_batches = ShardBatches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.seed,
                                 job.data.shuffle_buffer_rows)
    # The validation shard is small (eval_batches batches): hold it, so every evaluation sees the same rows.
    val_batches = list(ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=cfg.batch_size, dtypes=torch.long, device="cpu", drop_last=True))
    mlflow_metrics = MetricsLogger(config["tracking_uri"], config["run_id"])
    # Rank 0's progress as log lines: Ray forwards worker logs to the driver line by line.
    callbacks = [mlflow_metrics, lambda m, step: log_progress_line(m, step, cfg.num_train_steps)] if rank == 0 else []
    trainer = DistributedTrainer(model, cfg, job.model, train_batches, val_batches or None, callbacks=callbacks,
                                 device=device, show_progress=False, on_save=_report_checkpoint,
                                 attention_anneal_steps=job.adapt.mask_anneal_steps if job.task == "adapt" else 0)
    if sharded:
        trainer.strategy.load_shards(start_folder)
    resumed_from = 0
    if checkpoint:
        with checkpoint.as_directory() as path:
            trainer.load_checkpoint(path)
        resumed_from = trainer.step
        if rank == 0:
            mlflow_metrics({"resumed_from_step": resumed_from}, resumed_from)

    metrics = trainer.train()
    summary = {**metrics, "step": trainer.step, "tokens_seen": trainer.tokens_seen,
               "optimizer_steps": trainer.strategy.optimizer_steps(), "resumed_from_step": resumed_from,
               "strategy": trainer.strategy.name, "world_size": trainer.strategy.world_size}
    # Collective: all ranks take part, rank 0 gets the model (with LoRA, adapters not yet merged).
    final = trainer.consolidated_model(merge_lora=False)
    with tempfile.TemporaryDirectory(prefix="pllm-final-") as tmp:
        checkpoint = None
        if rank == 0:
            if cfg.lora is not None:
                save_adapter(final, Path(tmp) / ADAPTER_DIR, cfg.lora, job.model.init_from)
                final = merge_lora(final)
            summary["num_parameters"] = final.num_parameters()
            save_pretrained(final, Path(tmp) / "model", tokenizer=tokenizer)
            (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                         checkpoint=checkpoint, checkpoint_dir_name=FINAL_CHECKPOINT)
    log.info("worker %d (pid %d) done at step %d", rank, os.getpid(), trainer.step)
