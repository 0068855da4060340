"""The training job on Ray: `ray job submit --working-dir . -- python -m pllm.pipelines.train_job
--config X.yaml` (or `pllm train --config X.yaml`, which runs it on an in-process local Ray).

Stages: plan the corpus (bad paths fail before Ray starts), resolve model.init_from if set (its
config and tokenizer; bad checkpoints fail before Ray starts), connect to Ray, fit the tokenizer,
build the Ray Data datasets, open an MLflow run and train with Ray Train's TorchTrainer (failed
workers restart from the last checkpoint), register the consolidated model in MLflow as a
text-generating pyfunc under an alias, write the outputs and the loss curve, generate a sample.
The stages shared with the in-process job are in `pllm.pipelines.job_stages`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pllm.config import JobConfig, local_ray_cpus
from pllm.corpus_files import CorpusPlan, plan_corpus, resolve_files
from pllm.pipelines.job_stages import (
    JobResult,
    fit_tokenizer,
    generate_sample,
    resolve_init,
    unigram_baseline,
    write_outputs,
)
from pllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BASELINE_ROWS = 4096  # training rows the unigram baseline counts


@dataclass
class RayDatasets:
    train: object  # ray.data.Dataset, streamed into the workers
    val: object  # ray.data.Dataset of the fixed validation rows
    val_rows: np.ndarray
    baseline_rows: np.ndarray  # the first training rows, for the unigram baseline


@dataclass
class TrainedModel:
    model_dir: Path
    metrics: dict


def connect_ray(job: JobConfig, show_progress: bool) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local Ray with
    more logical CPUs than cores, so data tasks and train workers do not starve each other."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # address="local": a new instance even where a `ray start` cluster runs on this machine
            # (joining one is what RAY_ADDRESS asks for).
            ray.init(address="local", num_cpus=job.cluster.num_cpus or local_ray_cpus(),
                     log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic order for a given seed
    # Bars redraw in place: in a log file each redraw is a line. Rank 0 logs a line per log_interval.
    ctx.enable_progress_bars = show_progress and sys.stderr.isatty()


def ray_documents(files: list[str], text_field: str):
    from pllm.pipelines.token_dataset import round_documents

    return round_documents(files, text_field)


def build_datasets(plan: CorpusPlan, tokenizer: Tokenizer, job: JobConfig) -> RayDatasets:
    import ray.data

    from pllm.pipelines.token_dataset import first_rows, shuffled_files, token_rows

    cfg, workers = job.training, job.cluster.num_workers
    train = token_rows(plan.train_files, tokenizer, cfg.seq_len, job.data.text_field, seed=cfg.seed)
    # Validation rows are few: fix them here so every evaluation (and the baseline) sees the same rows.
    val_rows = first_rows(plan.val_files, tokenizer, cfg.seq_len, job.data.text_field,
                          cfg.eval_batches * cfg.batch_size * workers)
    if len(val_rows) < cfg.batch_size * workers:
        raise ValueError(f"validation files give {len(val_rows)} rows of {cfg.seq_len} tokens, fewer than one "
                         f"batch per worker ({cfg.batch_size} x {workers})")
    baseline_rows = first_rows(shuffled_files(plan.train_files, cfg.seed), tokenizer, cfg.seq_len,
                               job.data.text_field, BASELINE_ROWS)
    val = ray.data.from_numpy(val_rows).rename_columns({"data": "input_ids"})
    return RayDatasets(train, val, val_rows, baseline_rows)


def build_sft_datasets(job: JobConfig, tokenizer: Tokenizer, files: list | None) -> RayDatasets:
    """task "sft": the rows of `files` (data.paths resolved; None: the built-in instruction set)
    tokenized by Ray Data into rows with response masks (`pllm.pipelines.sft_dataset`)."""
    from pllm.pipelines.sft_dataset import builtin_rows, raw_rows, sft_datasets

    cfg, workers = job.training, job.cluster.num_workers
    raw = raw_rows(files) if files else builtin_rows()
    data = sft_datasets(raw, tokenizer, cfg.seq_len, job.data.sft_packing, job.data.validation_fraction,
                        cfg.eval_batches * cfg.batch_size * workers)
    if data.val.count() < cfg.batch_size * workers:
        raise ValueError(f"the held-out SFT examples give {data.val.count()} rows, fewer than one batch per worker "
                         f"({cfg.batch_size} x {workers}): raise data.validation_fraction or lower batch_size")
    empty = np.zeros((0, cfg.seq_len), dtype=np.int32)
    return RayDatasets(data.train, data.val, empty, empty)


def train_on_ray(job: JobConfig, tokenizer: Tokenizer, data: RayDatasets, run_id: str, tracking_uri: str,
                 init_folder: Path | None = None) -> TrainedModel:
    """Ray Train's TorchTrainer over the workers; the final checkpoint's model and summary land in
    training.output_dir. init_folder: model.init_from resolved on this machine."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pllm.actors.train_loop import ADAPTER_DIR, train_loop_per_worker

    cluster, out = job.cluster, Path(job.training.output_dir).resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "tokenizer_json": tokenizer.to_json(), "run_id": run_id,
                           "tracking_uri": tracking_uri, "init_folder": str(init_folder) if init_folder else None},
        scaling_config=ray.train.ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                               resources_per_worker={"CPU": cluster.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"{out.name}-{run_id[:8]}", storage_path=cluster.storage_path or str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cluster.checkpoints_to_keep)),
        datasets={"train": data.train, "val": data.val},
        # Explicit: the options are resolved in Ray Train's controller, not in this driver's context.
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a final checkpoint (error: {result.error})")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    with result.checkpoint.as_directory() as final:
        for part in ("model", ADAPTER_DIR):  # the adapter folder only from a LoRA run
            shutil.rmtree(out / part, ignore_errors=True)
            if (Path(final) / part).exists():
                shutil.copytree(Path(final) / part, out / part)
        metrics = json.loads((Path(final) / "summary.json").read_text())
    return TrainedModel(model_dir, metrics)


def logged_history(run_id: str, tracking_uri: str) -> list[dict[str, float]]:
    """The run's training loss and validation ELBO, as the workers logged them to MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return [{"step": m.step, key: m.value} for key in ("loss", "val_elbo_nats", "val_sft_loss")
            for m in client.get_metric_history(run_id, key)]


def validation_set_id(job: JobConfig) -> str:
    """Names the held-out rows a job's validation ELBO is measured on: the same data section, task,
    sequence length and vocabulary give the same rows, so ELBOs under equal ids compare."""
    import hashlib
    import json

    what = {"data": job.data.to_dict(), "task": job.task, "seq_len": job.training.seq_len,
            "vocab_size": job.model.vocab_size, "init_from": job.model.init_from}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def register(job: JobConfig, trained: TrainedModel, run_id: str, tracking_uri: str) -> dict:
    """Attach the loss curve and baseline to the MLflow run, log the model as a pyfunc, register it
    under the job's alias and close the run."""
    from mlflow.tracking import MlflowClient

    from pllm.actors.train_loop import ADAPTER_DIR
    from pllm.registry import log_generator_model

    client = MlflowClient(tracking_uri)
    client.log_artifact(run_id, str(trained.model_dir.parent / "loss_curve.png"))
    if "unigram_nats" in trained.metrics:
        client.log_metric(run_id, "unigram_nats", trained.metrics["unigram_nats"])
    client.set_tag(run_id, "pllm.task", job.task)
    if job.model.init_from:
        client.set_tag(run_id, "pllm.base_model", job.model.init_from)
    adapter = trained.model_dir.parent / ADAPTER_DIR
    if adapter.exists():  # LoRA: the adapter alone beside the merged model, naming its base
        client.log_artifacts(run_id, str(adapter), ADAPTER_DIR)
    registered = log_generator_model(run_id, tracking_uri, trained.model_dir, job.generation,
                                     job.tracking.registered_model, alias=None)
    if registered["version"]:  # the alias moves only to a better model (`champion_decision`)
        from pllm.registry import champion_decision

        name, alias = job.tracking.registered_model, job.tracking.alias
        rows = validation_set_id(job)
        client.set_tag(run_id, "pllm.validation_set", rows)
        take, reason = champion_decision(client, name, alias, run_id, trained.metrics.get("val_elbo_nats"), rows,
                                         job.tracking.force_alias)
        if take:
            client.set_registered_model_alias(name, alias, registered["version"])
            registered["registry_uri"] = f"models:/{name}@{alias}"
        client.set_tag(run_id, "pllm.alias_decision", reason)
        client.set_model_version_tag(name, registered["version"], "pllm.alias_decision", reason)
        log.info("registry: %s", reason)
        registered["alias_decision"] = reason
    if registered["version"] and job.model.init_from:
        client.set_model_version_tag(job.tracking.registered_model, registered["version"], "pllm.base_model",
                                     job.model.init_from)
    if adapter.exists():
        registered["adapter_uri"] = f"runs:/{run_id}/{ADAPTER_DIR}"
    client.set_terminated(run_id)
    return registered


def run_training_job(job: JobConfig, show_progress: bool = False) -> JobResult:
    import torch

    from pllm.checkpoint import load_model, load_tokenizer
    from pllm.lora import check_lora_targets
    from pllm.registry import resolve_tracking_uri, start_run

    # Bad paths, checkpoints, overrides and LoRA targets fail here, before Ray starts.
    plan = plan_corpus(job.data) if job.task != "sft" else None
    sft_files = resolve_files(job.data.paths) if job.task == "sft" and job.data.paths else None
    tracking_uri = resolve_tracking_uri(job.tracking.mlflow_uri)
    init = None
    if job.model.init_from:
        init, job = resolve_init(job, tracking_uri)
    if job.training.lora is not None:
        check_lora_targets(job.model, job.training.lora)
    connect_ray(job, show_progress)
    tokenizer, job = (init.tokenizer, job) if init else fit_tokenizer(plan, job, ray_documents)
    data = (build_sft_datasets(job, tokenizer, sft_files) if job.task == "sft" else
            build_datasets(plan, tokenizer, job))
    run_id = start_run(job, tracking_uri, run_name=Path(job.training.output_dir).resolve().name)
    log.info("MLflow run %s at %s", run_id, tracking_uri)
    trained = train_on_ray(job, tokenizer, data, run_id, tracking_uri, init.folder if init else None)
    if job.task != "sft":
        trained.metrics.update(unigram_baseline(data.baseline_rows, data.val_rows, job.model.vocab_size))
    write_outputs(trained.model_dir.parent, job, trained.metrics, logged_history(run_id, tracking_uri))
    registered = register(job, trained, run_id, tracking_uri)
    # From the saved folder, as a user would load it; a 1B sample on CPU takes minutes, so the GPU if any.
    model = load_model(trained.model_dir, "cuda" if torch.cuda.is_available() else "cpu")
    text, nfe = generate_sample(model, load_tokenizer(trained.model_dir), job)
    trained.metrics["generation_nfe"] = nfe
    return JobResult(trained.model_dir, trained.metrics, text, run_id, tracking_uri, registered["registry_uri"],
                     registered["model_uri"], registered.get("adapter_uri"))


def main(argv: list[str] | None = None) -> int:
    """`python -m pllm.pipelines.train_job`: the same flags as `pllm train`."""
    import argparse

    from pllm.pipelines.job_cli import add_train_arguments, run_from_args, setup_logging

    parser = argparse.ArgumentParser(prog="python -m pllm.pipelines.train_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
