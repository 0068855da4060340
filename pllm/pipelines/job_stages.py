"""The stages both training jobs share, each taking and returning plain values.

A job is: plan the corpus -> fit the tokenizer (or, with model.init_from, take the checkpoint's
config and tokenizer) -> build the datasets -> train -> (register) -> baseline, outputs and plot ->
a generated sample. The Ray job (`pllm.pipelines.train_job`) and the
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

from pllm.adaptation import adapted_model_config
from pllm.config import JobConfig, ModelConfig
from pllm.corpus_files import CorpusPlan, documents_until
from pllm.data import cache_dir, nats_to_bits, unigram_entropy
from pllm.generator import ParallelGenerator
from pllm.hf import CheckpointError
from pllm.model import DiffusionTransformer
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
    adapter_uri: str | None = None  # a LoRA run's adapter alone (runs:/ID/adapter), naming its base


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


# Fields a checkpoint fixes: they set tensor shapes, or the token ids its tokenizer and embedding agree on.
CHECKPOINT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "head_dim", "tie_word_embeddings", "qk_norm", "attention_bias",
                     "attention_out_bias", "pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")


@dataclass
class InitCheckpoint:
    """model.init_from resolved: the local folder holding it and its tokenizer."""

    folder: Path
    tokenizer: Tokenizer


def init_folder(source: str, tracking_uri: str | None) -> Path:
    """The local folder of model.init_from: a path, or an MLflow URI downloaded here."""
    from pllm.checkpoint import is_model_folder
    from pllm.hf import is_hf_checkpoint, plan_import

    where = f"model.init_from={source!r}"
    if source.startswith(("models:/", "runs:/")) or "://" in source:
        from pllm.registry import resolve_model_source

        try:
            return resolve_model_source(source, tracking_uri)[0]
        except Exception as exc:  # MLflow's own errors (no such model, alias, run or store)
            raise CheckpointError(f"{where}: {exc}") from None
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{where}: no such file or folder")
    if is_hf_checkpoint(path):
        try:
            plan_import(path)  # every check, naming the file and the field, before a tensor is read
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    elif not is_model_folder(path):
        raise CheckpointError(f"{where}: not a model folder (config.json with model.safetensors, or a Hugging Face "
                              "checkpoint with safetensors weights)")
    return path


def resolve_init(job: JobConfig, tracking_uri: str | None = None) -> tuple[InitCheckpoint, JobConfig]:
    """model.init_from -> its folder and tokenizer, and the job whose model config is the checkpoint's
    with the model fields the job gave explicitly (`ModelConfig.given_fields`: its YAML section and
    --set overrides) over it. Fields the checkpoint fixes (CHECKPOINT_FIELDS) may be given only with
    the checkpoint's value. MLflow URIs resolve against tracking_uri (default: tracking.mlflow_uri's).
    Runs in the driver before Ray starts; errors are `CheckpointError`s naming model.init_from, or the field.
    task "adapt": the checkpoint (autoregressive) gets the attention job.adapt chooses
    (`pllm.adaptation.adapted_model_config`), which model.attention_mode / model.block_size may not
    override (a job gives adapt.attention / adapt.block_size instead)."""
    from pllm.checkpoint import load_config, load_tokenizer

    source = job.model.init_from
    if source is None:
        raise ValueError("resolve_init needs model.init_from")
    folder = init_folder(source, tracking_uri or job.tracking.mlflow_uri)
    where = f"model.init_from={source!r}"
    try:
        base, tokenizer = load_config(folder), load_tokenizer(folder)
    except (OSError, ValueError) as exc:  # our own folder: missing tokenizer.json, a bad config.json
        raise CheckpointError(f"{where}: {exc}") from None
    given = sorted(job.model.given_fields - {"init_from"})
    if job.task == "adapt":
        clash = [name for name in ("attention_mode", "block_size") if name in given]
        if clash:
            raise CheckpointError(f"model.{clash[0]} cannot be set with task 'adapt': adapt.attention and "
                                  "adapt.block_size choose the adapted model's attention; remove the override")
    for name in given:
        if name in CHECKPOINT_FIELDS and getattr(job.model, name) != getattr(base, name):
            raise CheckpointError(f"model.{name}={getattr(job.model, name)!r} cannot be set with {where}: the "
                                  f"checkpoint has {name}={getattr(base, name)!r} (it fixes tensor shapes and "
                                  "token ids); remove the override")
    try:
        model = ModelConfig.from_dict({**base.to_dict(), **{k: job.model.to_dict()[k] for k in given},
                                       "init_from": source})
    except ValueError as exc:
        raise CheckpointError(f"{where}: the checkpoint's config with the job's model fields {given} is "
                              f"invalid: {exc}") from None
    if job.task == "adapt":
        try:
            model = adapted_model_config(model, job.adapt)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        log.info("adapting %s: attention %s%s, logits shift %s, attention annealed over %d steps", source,
                 model.attention_mode, f" (blocks of {model.block_size})" if model.attention_mode == "block_causal"
                 else "", model.logits_shift, job.adapt.mask_anneal_steps)
    if tokenizer.vocab_size > model.vocab_size or tokenizer.special_token_ids != {
            k: getattr(model, k) for k in tokenizer.special_token_ids}:
        raise CheckpointError(f"{where}: its tokenizer ({tokenizer.vocab_size} tokens, special ids "
                              f"{tokenizer.special_token_ids}) does not fit its config (vocab_size {model.vocab_size})")
    log.info("starting from %s (%s): %d layers, hidden size %d; model fields from the job: %s", source, folder,
             model.num_hidden_layers, model.hidden_size, given or "none")
    return InitCheckpoint(folder, tokenizer), job.replace(model=model)


def initial_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as our state dict, float32 on the CPU (the trainer's master weights)."""
    from pllm.checkpoint import load_model

    return load_model(folder, "cpu").state_dict()


def initial_model(config: ModelConfig, folder: str | Path | None, seed: int, on_meta: bool = False) -> DiffusionTransformer:
    """The model training starts from: freshly initialised from `seed` (the same on every rank), the
    weights of `folder` (model.init_from resolved) under this config (which may change no shape,
    `resolve_init`), or, on_meta, the checkpoint's model without storage, for a strategy that fills it
    shard by shard (`Strategy.loads_shards`)."""
    if folder is None:
        torch.manual_seed(seed)
        return DiffusionTransformer(config)
    if on_meta:
        with torch.device("meta"):
            return DiffusionTransformer(config)
    from pllm.hf.weights import build_model

    return build_model(config, initial_weights(folder).items(), torch.device("cpu")).train()


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
