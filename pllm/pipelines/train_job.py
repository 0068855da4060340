"""The training job: `ray job submit --working-dir . -- python -m pllm.pipelines.train_job --config X.yaml`
(or `pllm train --config X.yaml`, which runs it on an in-process local Ray).

Driver steps: validate the config and resolve the corpus (fails before Ray starts), connect to Ray,
fit the tokenizer, build the Ray Data pipelines, open an MLflow run, run Ray Train's TorchTrainer
(restarting failed workers from the last checkpoint), then log the consolidated model to MLflow as
a text-generating pyfunc, register it under an alias, and plot the loss curve."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pllm.config import JobConfig
from pllm.data import cache_dir, nats_to_bits, unigram_entropy
from pllm.pipelines.corpus import CorpusPlan, fit_tokenizer, plan_corpus, token_rows

log = logging.getLogger(__name__)


@dataclass
class TrainJobResult:
    model_dir: Path
    metrics: dict
    run_id: str
    tracking_uri: str
    registry_uri: str | None
    model_uri: str
    generation: str


def connect_ray(job: JobConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local Ray with
    more logical CPUs than cores, so data tasks and train workers do not starve each other."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        num_cpus = job.cluster.num_cpus or max(8, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=num_cpus, log_to_driver=True)


def _rows(ds, limit: int) -> np.ndarray:
    batches = [b["input_ids"] for b in ds.limit(limit).iter_batches(batch_size=1024, batch_format="numpy")]
    return np.concatenate(batches) if batches else np.zeros((0, 0), dtype=np.int32)


def run_training_job(job: JobConfig, show_progress: bool = False) -> TrainJobResult:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pllm.actors.train_loop import train_loop_per_worker
    from pllm.checkpoint import load_model, load_tokenizer
    from pllm.generator import ParallelGenerator
    from pllm.plots import plot_loss_curve
    from pllm.registry import log_generator_model, resolve_tracking_uri, start_run

    cfg, cluster = job.training, job.cluster
    out = Path(cfg.output_dir).resolve()
    plan: CorpusPlan = plan_corpus(job.data)  # bad paths fail here, before Ray starts
    tracking_uri = resolve_tracking_uri(job.tracking.mlflow_uri)
    connect_ray(job)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic order for a given seed
    ctx.enable_progress_bars = show_progress

    vocab = job.data.tokenizer_vocab_size or job.model.vocab_size
    tokenizer = fit_tokenizer(plan, job.data, vocab, cache_dir())
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {job.model.vocab_size}")
    job = job.replace(model=job.model.replace(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id))

    train_ds = token_rows(plan.train_files, tokenizer, cfg.seq_len, job.data.text_field, seed=cfg.seed)
    # Validation rows are few: fix them here so every evaluation (and the baseline) sees the same rows.
    val_rows = _rows(token_rows(plan.val_files, tokenizer, cfg.seq_len, job.data.text_field),
                     cfg.eval_batches * cfg.batch_size * cluster.num_workers)
    if len(val_rows) < cfg.batch_size * cluster.num_workers:
        raise ValueError(f"validation files give {len(val_rows)} rows of {cfg.seq_len} tokens, fewer than one "
                         f"batch per worker ({cfg.batch_size} x {cluster.num_workers})")
    # The baseline's unigram comes from the first 4096 rows (files in shuffled order; `limit` stops early).
    baseline = unigram_entropy(_rows(train_ds, 4096).ravel(), val_rows.ravel(), job.model.vocab_size)
    val_ds = ray.data.from_numpy(val_rows).rename_columns({"data": "input_ids"})

    run_id = start_run(job, tracking_uri, run_name=out.name)
    log.info("MLflow run %s at %s", run_id, tracking_uri)
    storage = cluster.storage_path or str(out / "ray")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "tokenizer_json": tokenizer.to_json(), "run_id": run_id,
                           "tracking_uri": tracking_uri},
        scaling_config=ray.train.ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                               resources_per_worker={"CPU": cluster.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"{out.name}-{run_id[:8]}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cluster.checkpoints_to_keep)),
        datasets={"train": train_ds, "val": val_ds},
        # Explicit: the options are resolved in Ray Train's controller, not in this driver's context.
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a final checkpoint (error: {result.error})")

    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as final:
        model_dir = out / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(Path(final) / "model", model_dir)
        metrics = json.loads((Path(final) / "summary.json").read_text())
    metrics.update(unigram_nats=baseline, unigram_bits=nats_to_bits(baseline))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "job_config.json").write_text(job.to_json())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    history = [{"step": m.step, "loss": m.value} for m in client.get_metric_history(run_id, "loss")]
    history += [{"step": m.step, "val_elbo_nats": m.value} for m in client.get_metric_history(run_id, "val_elbo_nats")]
    plot_loss_curve(sorted(history, key=lambda h: h["step"]), out / "loss_curve.png")
    client.log_artifact(run_id, str(out / "loss_curve.png"))
    client.log_metric(run_id, "unigram_nats", baseline)
    registered = log_generator_model(run_id, tracking_uri, model_dir, job.generation,
                                     job.tracking.registered_model, job.tracking.alias)
    client.set_terminated(run_id)

    import torch

    model = load_model(model_dir, "cuda" if torch.cuda.is_available() else "cpu")  # a 1B sample on CPU takes minutes
    generator = ParallelGenerator(model, job.generation, tokenizer=load_tokenizer(model_dir))
    text = generator.generate_text(job.prompt)
    metrics["generation_nfe"] = generator.last_output.nfe
    return TrainJobResult(model_dir, metrics, run_id, tracking_uri, registered["registry_uri"],
                          registered["model_uri"], text)


def print_summary(job: JobConfig, result: TrainJobResult) -> None:
    m = result.metrics
    print(f"\nTrained {m.get('num_parameters', 0) / 1e6:.2f}M parameters for {m['step']} steps "
          f"({m['tokens_seen'] / 1e6:.2f}M tokens) with {m['strategy']} on {m['world_size']} worker(s).")
    if "val_elbo_nats" in m:
        print(f"Validation ELBO: {m['val_elbo_nats']:.3f} nats/token ({m['val_elbo_bits']:.3f} bits, "
              f"perplexity <= {m['val_ppl_bound']:.1f})")
    print(f"Unigram baseline: {m['unigram_nats']:.3f} nats/token ({m['unigram_bits']:.3f} bits)")
    print(f"Model saved to {result.model_dir}")
    print(f"MLflow run {result.run_id} at {result.tracking_uri}")
    if result.registry_uri:
        print(f"Registered model: {result.registry_uri}")
    if result.tracking_uri.startswith("sqlite:///"):
        print(f"Browse it: mlflow ui --backend-store-uri {result.tracking_uri}")
    print(f"\nPrompt ({job.generation.strategy} decoding, {m['generation_nfe']} forward passes):")
    print("-" * 60)
    print(job.prompt + result.generation)
    print("-" * 60)


def main(argv: list[str] | None = None) -> int:
    """Same flags as `pllm train` (--config, --set, --output, --mlflow-uri, --num-workers, ...)."""
    from pllm.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
