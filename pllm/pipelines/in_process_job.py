"""The main job in one process: corpus -> tokenizer -> model -> train -> save -> generate.

This is the embedded-defaults path (no cluster needed); `pllm.pipelines.train_job` runs the same
steps on a Ray cluster."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import JobConfig
from .data import cache_dir, make_dataloader, nats_to_bits, prepare_corpus, unigram_entropy
from .generator import ParallelGenerator
from .model import DiffusionTransformer
from .plots import plot_loss_curve
from .trainer import DistributedTrainer

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    model_dir: Path
    metrics: dict[str, float]
    generation: str


def run_local_job(job: JobConfig, show_progress: bool = True) -> JobResult:
    out = Path(job.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job_config.json").write_text(job.to_json())
    torch.manual_seed(job.training.seed)

    vocab = job.data.tokenizer_vocab_size or job.model.vocab_size
    corpus = prepare_corpus(job.data, vocab, cache_dir())
    tok = corpus.tokenizer
    if tok.vocab_size > job.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {job.model.vocab_size}")
    model_cfg = job.model.replace(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id)
    cfg = job.training
    train_loader = make_dataloader(corpus.train_tokens, cfg.seq_len, cfg.batch_size, shuffle=True, seed=cfg.seed)
    val_loader = make_dataloader(corpus.val_tokens, cfg.seq_len, cfg.batch_size, shuffle=False,
                                 max_rows=cfg.eval_batches * cfg.batch_size)

    model = DiffusionTransformer(model_cfg)
    log.info("model: %.2fM parameters, %.1f MFLOP/token (train)", model.num_parameters() / 1e6,
             model.flops_per_token(cfg.seq_len) / 1e6)

    def log_metrics(metrics: dict, step: int) -> None:
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))

    trainer = DistributedTrainer(model, cfg, model_cfg, train_loader, val_loader, callbacks=[log_metrics],
                                 show_progress=show_progress)
    metrics = trainer.train()
    unigram = unigram_entropy(corpus.train_tokens, corpus.val_tokens, model_cfg.vocab_size)
    metrics.update(unigram_nats=unigram, unigram_bits=nats_to_bits(unigram), steps=trainer.step,
                   tokens_seen=trainer.tokens_seen, num_parameters=model.num_parameters())

    model_dir = model.save_pretrained(out / "model", tokenizer=tok)
    plot_loss_curve(trainer.history, out / "loss_curve.png")
    generator = ParallelGenerator(model, job.generation, tokenizer=tok)
    text = generator.generate_text(job.prompt)
    metrics["generation_nfe"] = generator.last_output.nfe
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return JobResult(model_dir, metrics, text)
