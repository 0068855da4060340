"""The training job's command line, shared by `pllm train` / `pllm demo` and
`python -m pllm.pipelines.train_job`: the flags, reading the job config, running the job (on Ray,
or in this process with --local) and the summary printed after it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from pllm.config import JobConfig
from pllm.config_files import ConfigFileError, builtin_configs, field_errors, load_job_config
from pllm.pipelines.job_stages import JobResult


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML job config: a path, or a built-in config by name "
                             f"({', '.join(builtin_configs())}); default: tiny, the CPU demo")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set training.num_train_steps=100")
    parser.add_argument("--output", default=None, help="output folder (training.output_dir)")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (tracking.mlflow_uri)")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (cluster.num_workers)")
    parser.add_argument("--local", action="store_true", help="train in this process without Ray or MLflow")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (shown on a terminal only; the log has a line per log_interval)")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def usage_error(message: str) -> SystemExit:
    """A mistake on the command line or in the config: one line naming it, exit status 2 (no traceback)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return SystemExit(2)


def job_from_args(args: argparse.Namespace) -> JobConfig:
    overrides = list(args.set)
    for flag, field in [("output", "training.output_dir"), ("mlflow_uri", "tracking.mlflow_uri"),
                        ("num_workers", "cluster.num_workers")]:
        if getattr(args, flag):
            overrides.append(f"{field}={getattr(args, flag)}")
    try:
        return load_job_config(args.config, overrides)  # a bad config fails here, before Ray starts
    except (ConfigFileError, ValidationError, ValueError, TypeError) as exc:
        raise usage_error(field_errors(exc)) from None


def run_from_args(args: argparse.Namespace) -> tuple[JobConfig, JobResult]:
    """Run the job the flags describe and print its summary."""
    from pllm.hf import CheckpointError

    job = job_from_args(args)
    try:
        if args.local:
            from pllm.pipelines.in_process_job import run_in_process_job

            result = run_in_process_job(job, show_progress=not args.no_progress)
        else:
            from pllm.pipelines.train_job import run_training_job

            result = run_training_job(job, show_progress=not args.no_progress)
    except CheckpointError as exc:  # model.init_from or an override of it: a config error, not a crash
        raise usage_error(str(exc)) from None
    except FileNotFoundError as exc:  # a corpus path or checkpoint that is not there (checked before Ray starts)
        raise usage_error(str(exc)) from None
    print_summary(job, result)
    return job, result


def runnable(command: str) -> str:
    """A console script as a path runnable without an activated environment: the one beside the
    running interpreter when it is there, else the bare name."""
    script = Path(sys.executable).parent / command
    return str(script) if script.exists() else command


def print_summary(job: JobConfig, result: JobResult) -> None:
    m = result.metrics
    print(f"\nTrained {m.get('num_parameters', 0) / 1e6:.2f}M parameters for {m['step']} steps "
          f"({m['tokens_seen'] / 1e6:.2f}M tokens) with {m['strategy']} on {m['world_size']} worker(s).")
    if "val_elbo_nats" in m:
        print(f"Validation ELBO: {m['val_elbo_nats']:.3f} nats/token ({m['val_elbo_bits']:.3f} bits, "
              f"perplexity <= {m['val_ppl_bound']:.1f})")
    if "val_sft_loss" in m:
        print(f"Held-out SFT loss: {m['val_sft_loss']:.3f} nats per response token")
    if "unigram_nats" in m:
        print(f"Unigram baseline: {m['unigram_nats']:.3f} nats/token ({m['unigram_bits']:.3f} bits)")
    print(f"Model saved to {result.model_dir}")
    if result.run_id:
        print(f"MLflow run {result.run_id} at {result.tracking_uri}")
    if result.registry_uri:
        print(f"Registered model: {result.registry_uri}")
    if result.adapter_uri:
        print(f"LoRA adapter (on {job.model.init_from}): {result.adapter_uri}")
    if result.tracking_uri and result.tracking_uri.startswith("sqlite:///"):
        print(f"Browse it: {runnable('mlflow')} ui --backend-store-uri {result.tracking_uri}")
    print(f"\nPrompt ({job.generation.strategy} decoding, {m['generation_nfe']} forward passes):")
    print("-" * 60)
    print(job.prompt + result.generation)
    print("-" * 60)
