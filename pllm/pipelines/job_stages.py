"""The stages both training jobs share, each taking and returning plain values.

A job is: plan the corpus -> fit the tokenizer -> build the datasets -> train -> (register) ->
baseline, outputs and plot -> a generated sample. The Ray job (`pllm.pipelines.train_job`) and the
in-process job (`pllm.pipelines.in_process_job`) differ only in how they read the data, train and
track (Ray Data + Ray Train + MLflow against a DataLoader + DistributedTrainer); the stages here
are the rest, so both give the same folder: model/, metrics.json, job_config.json, loss_curve.png."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pllm.config import JobConfig
from pllm.corpus_files import CorpusPlan, documents_until
from pllm.data import cache_dir, nats_to_bits, unigram_entropy
from pllm.generator import ParallelGenerator
from pllm.plots import plot_loss_curve
from pllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Reads the documents of some corpus files (names, text field), in order and lazily: the tokenizer's sample.
DocumentReader = Callable[[list[str], str], Iterable[str]]


@dataclass
class JobResult:
    """What a training job leaves: the saved model, its metrics, a generated sample and, for the Ray
    job, where MLflow tracks and registers it."""

    model_dir: Path
    metrics: dict
    generation: str
    run_id: str | None = None
    tracking_uri: str | None = None
    registry_uri: str | None = None
    model_uri: str | None = None


def fit_tokenizer(plan: CorpusPlan, job: JobConfig, read_documents: DocumentReader) -> tuple[Tokenizer, JobConfig]:
    """Train the BPE tokenizer on up to data.tokenizer_sample_mb of training documents (cached per
    file set and vocabulary size); returns it and the job with the model's special token ids set."""
    vocab = job.data.tokenizer_vocab_size or job.model.vocab_size
    cache = cache_dir() / f"tokenizer-{plan.key}-{vocab}" / "tokenizer.json"
    if cache.exists():
        log.info("using cached tokenizer %s", cache)
        tokenizer = Tokenizer.load(cache)
    else:
        log.info("training a %d-token BPE tokenizer on up to %.0f MB of training documents", vocab,
                 job.data.tokenizer_sample_mb)
        budget = int(job.data.tokenizer_sample_mb * 2**20)
        sample = documents_until(read_documents(plan.train_files, job.data.text_field), budget)
        tokenizer = Tokenizer.train(sample, vocab)
        tokenizer.save(cache)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {job.model.vocab_size}")
    model = job.model.replace(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id)
    return tokenizer, job.replace(model=model)


def unigram_baseline(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    """What a model that ignores context achieves on the validation tokens (nats and bits per token)."""
    nats = unigram_entropy(train_tokens.ravel(), val_tokens.ravel(), vocab_size)
    return {"unigram_nats": nats, "unigram_bits": nats_to_bits(nats)}


def write_outputs(out: Path, job: JobConfig, metrics: dict, history: list[dict[str, float]]) -> None:
    """metrics.json, job_config.json and loss_curve.png (training loss and validation ELBO by step)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "job_config.json").write_text(job.to_json())
    plot_loss_curve(sorted(history, key=lambda h: h["step"]), out / "loss_curve.png")


def generate_sample(model: torch.nn.Module, tokenizer: Tokenizer, job: JobConfig) -> tuple[str, int]:
    """The job's prompt continued by the trained model: (text, forward passes)."""
    generator = ParallelGenerator(model, job.generation, tokenizer=tokenizer)
    text = generator.generate_text(job.prompt)
    return text, generator.last_output.nfe
