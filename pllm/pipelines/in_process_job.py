"""The training job in this process (`pllm train --local`): no Ray, no MLflow, no cluster.

The same stages as the Ray job (`pllm.pipelines.train_job`) where they are the same (corpus plan,
tokenizer, baseline, outputs and plot, generated sample); the data is tokenized in this process
(cached) and served by a DataLoader, and `DistributedTrainer` trains on this machine's device. With
model.init_from, training starts from that checkpoint's weights with its tokenizer; task "adapt" trains
an autoregressive one on the corpus as pretrain does, under the attention job.adapt chooses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pllm.checkpoint import save_pretrained
from pllm.config import JobConfig
from pllm.corpus_files import CorpusPlan, iter_documents, plan_corpus
from pllm.data import cache_dir, make_dataloader, tokenize_files
from pllm.pipelines.job_stages import (
    JobResult,
    fit_tokenizer,
    generate_sample,
    initial_model,
    resolve_init,
    unigram_baseline,
    write_outputs,
)
from pllm.tokenizer import Tokenizer
from pllm.trainer import DistributedTrainer, log_progress_line

log = logging.getLogger(__name__)


@dataclass
class LocalData:
    train_tokens: np.ndarray  # 1-D, documents joined with EOS
    val_tokens: np.ndarray
    train: DataLoader
    val: DataLoader


def build_loaders(plan: CorpusPlan, tokenizer: Tokenizer, job: JobConfig) -> LocalData:
    if any("://" in f for f in plan.train_files + plan.val_files):
        raise ValueError("the in-process job reads local files only; remote corpus URIs need the Ray job")
    cfg = job.training
    train_tokens = tokenize_files(plan.train_files, tokenizer, job.data.text_field, cache_dir())
    val_tokens = tokenize_files(plan.val_files, tokenizer, job.data.text_field, cache_dir())
    log.info("corpus: %d train tokens, %d validation tokens", train_tokens.size, val_tokens.size)
    train = make_dataloader(train_tokens, cfg.seq_len, cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = make_dataloader(val_tokens, cfg.seq_len, cfg.batch_size, shuffle=False,
                          max_rows=cfg.eval_batches * cfg.batch_size)
    return LocalData(train_tokens, val_tokens, train, val)


def build_sft_loaders(job: JobConfig, tokenizer: Tokenizer) -> LocalData:
    """task "sft": data.paths' rows (or the built-in instruction set) as SFT rows of seq_len tokens,
    split by a hash of each row; skipped rows are counted in the log."""
    from pllm.corpus_files import resolve_files
    from pllm.instructions import instruction_dataset
    from pllm.sft import encode_examples, pack_examples, read_rows, sft_dataloader, split_rows

    cfg = job.training
    if job.data.paths:
        rows = read_rows(resolve_files(job.data.paths))
    else:
        train, held = instruction_dataset()
        rows = [{"messages": e.messages()} for e in train + held]
    train_rows, val_rows = split_rows(rows, job.data.validation_fraction)
    pad = not job.data.sft_packing  # LLaDA's recipe: one example a row, padded with eos
    encoded = []
    for name, part in (("training", train_rows), ("held-out", val_rows)):
        kept, skipped = encode_examples(tokenizer, part, cfg.seq_len, pad=pad)
        if skipped:
            log.info("SFT %s rows skipped: %s", name, dict(skipped))
        if not kept:
            raise ValueError(f"no {name} SFT row fits training.seq_len={cfg.seq_len} ({dict(skipped)})")
        encoded.append(kept if pad else pack_examples(kept, cfg.seq_len, tokenizer.pad_token_id))
    log.info("SFT: %d training rows, %d held-out rows", len(encoded[0]), len(encoded[1]))
    train = sft_dataloader(encoded[0], cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = sft_dataloader(encoded[1][:cfg.eval_batches * cfg.batch_size], cfg.batch_size, shuffle=False)
    return LocalData(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), train, val)


def train_in_process(job: JobConfig, data: LocalData, show_progress: bool,
                     init_folder: Path | None = None) -> tuple[torch.nn.Module, dict, list]:
    """(trained model, metrics, history) with the same metric names as the Ray job's summary;
    init_folder: model.init_from resolved, the weights to start from (None: a fresh model)."""
    cfg = job.training
    model = initial_model(job.model, init_folder, cfg.seed)
    log.info("model: %.2fM parameters, %.1f MFLOP/token (train)", model.num_parameters() / 1e6,
             model.flops_per_token(cfg.seq_len) / 1e6)
    anneal = job.adapt.mask_anneal_steps if job.task == "adapt" else 0
    trainer = DistributedTrainer(model, cfg, job.model, data.train, data.val, show_progress=show_progress,
                                 attention_anneal_steps=anneal)
    if not trainer.log_progress:  # a line per log_interval even beside a bar or without one, as the Ray job logs
        trainer.callbacks.append(lambda m, step: log_progress_line(m, step, cfg.num_train_steps))
    metrics = trainer.train()
    metrics.update(step=trainer.step, tokens_seen=trainer.tokens_seen, num_parameters=model.num_parameters(),
                   strategy=trainer.strategy.name, world_size=trainer.strategy.world_size)
    if cfg.lora is not None:  # a plain model with the adapters merged (this one carries them)
        if job.model.init_from:  # and the adapters alone, naming their base
            from pllm.lora import save_adapter

            save_adapter(trainer.model, Path(cfg.output_dir) / "adapter", cfg.lora, job.model.init_from)
        model = trainer.consolidated_model()
    return model, metrics, trainer.history


def run_in_process_job(job: JobConfig, show_progress: bool = True) -> JobResult:
    out = Path(job.training.output_dir)
    plan = None if job.task == "sft" else plan_corpus(job.data)  # pretrain and adapt train on the corpus
    init_folder = None
    if job.model.init_from:
        init, job = resolve_init(job)
        tokenizer, init_folder = init.tokenizer, init.folder
    else:
        tokenizer, job = fit_tokenizer(plan, job, iter_documents)
    if job.training.lora is not None:
        from pllm.lora import check_lora_targets

        check_lora_targets(job.model, job.training.lora)
    data = build_sft_loaders(job, tokenizer) if job.task == "sft" else build_loaders(plan, tokenizer, job)
    model, metrics, history = train_in_process(job, data, show_progress, init_folder)
    if job.task != "sft":
        metrics.update(unigram_baseline(data.train_tokens, data.val_tokens, job.model.vocab_size))
    model_dir = save_pretrained(model, out / "model", tokenizer)
    text, metrics["generation_nfe"] = generate_sample(model, tokenizer, job)
    write_outputs(out, job, metrics, history)
    return JobResult(Path(model_dir), metrics, text)
