"""MLflow: tracking store, run parameters and metrics, the trained model as a text-generating pyfunc,
and registered versions with an alias (`models:/NAME@ALIAS`).

The embedded default is a sqlite store `mlflow.db` (artifacts in `mlartifacts/` beside it) in the
current folder; `mlflow ui --backend-store-uri sqlite:///mlflow.db` browses it. Any tracking server
URI works instead."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import pllm

from .checkpoint import ADAPTER_CONFIG, CONFIG_FILE, is_model_folder
from .config import GenerationConfig, JobConfig, ModelConfig

log = logging.getLogger(__name__)

REQUIREMENTS = ["torch", "tokenizers", "safetensors", "pydantic>=2", "numpy", "pyyaml", "tqdm"]


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None) -> str:
    """None -> $MLFLOW_TRACKING_URI (set on a `pllm cluster` head, so jobs share its server), else the
    embedded sqlite store; relative sqlite paths become absolute (Ray workers and `ray job submit`
    drivers run in other folders)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Get or create the experiment; with a sqlite store its artifacts go next to the database."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(job: JobConfig, tracking_uri: str, run_name: str | None = None) -> str:
    """Create a run with the job's config as flat parameters; returns its id."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, job.tracking.experiment, tracking_uri), run_name=run_name,
                            tags={"pllm.version": pllm.__version__})
    params = flatten(job.to_dict())
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, job.to_json(), "job_config.json")
    return run.info.run_id


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class MetricsLogger:
    """A trainer callback that logs metrics to one MLflow run (called on the main rank only)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=batch)


# -- the model as a pyfunc ------------------------------------------------------------------------
class TextGenerator(mlflow.pyfunc.PythonModel):
    """`predict(prompts)` -> completions. Input: a list of strings, a string, or a DataFrame with a
    `prompt` column; optional params override the logged GenerationConfig (max_new_tokens, ...)."""

    def load_context(self, context) -> None:
        import torch

        from .checkpoint import load_model, load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(context.artifacts["model"], device=device)
        self.tokenizer = load_tokenizer(context.artifacts["model"])
        self.generation = GenerationConfig.from_dict((context.model_config or {}).get("generation", {}))

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (signature given at logging)
        from .generator import ParallelGenerator

        if hasattr(model_input, "columns"):  # pandas DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        else:
            prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        overrides = {k: v for k, v in (params or {}).items() if v is not None}
        cfg = self.generation.replace(**overrides) if overrides else self.generation
        generator = ParallelGenerator(self.model, cfg, tokenizer=self.tokenizer)
        return [generator.generate_text(p) for p in prompts]


def log_generator_model(run_id: str, tracking_uri: str, model_dir: str | Path, generation: GenerationConfig,
                        registered_model: str | None = None, alias: str | None = None) -> dict[str, Any]:
    """Log the saved model folder as a pyfunc in the run; register a version and point the alias at
    it. Returns {"model_uri", "version", "registry_uri"}."""
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    params = {"max_new_tokens": generation.max_new_tokens, "num_refinement_steps": generation.num_refinement_steps,
              "temperature": float(generation.temperature), "strategy": generation.strategy}
    signature = infer_signature(["def f(x):\n"], ["    return x\n"], params=params)
    entry = Path(__file__).with_name("mlflow_model.py")  # models-from-code: nothing pickled
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(entry), artifacts={"model": str(model_dir)},
            code_paths=[str(Path(pllm.__file__).parent)], pip_requirements=REQUIREMENTS, signature=signature,
            model_config={"generation": generation.to_dict()}, registered_model_name=registered_model)
    out = {"model_uri": info.model_uri, "version": None, "registry_uri": None}
    if registered_model:
        version = str(info.registered_model_version)
        client = MlflowClient(tracking_uri)
        if alias:
            client.set_registered_model_alias(registered_model, alias, version)
        out.update(version=version, registry_uri=f"models:/{registered_model}@{alias}" if alias else
                   f"models:/{registered_model}/{version}")
    return out


def log_imported_model(path: str | Path, family: str, config: ModelConfig, tracking_uri: str | None,
                       experiment: str = "pllm", registered_model: str | None = None,
                       alias: str | None = None) -> dict[str, Any]:
    """Log an imported checkpoint folder (checked by `pllm.hf.plan_import`) as a run of its own, with
    the model's config as parameters and the folder as the pyfunc's model, and register it. The
    serving defaults suit the family: threshold decoding in the model's own blocks."""
    params = {f"model.{k}": v for k, v in flatten(config.to_dict()).items()} | {"family": family}
    block = config.block_size if config.attention_mode == "block_causal" else 32
    generation = GenerationConfig(max_new_tokens=256, num_refinement_steps=256, temperature=0.0, strategy="threshold",
                                  block_size=block)
    return log_model_folder(path, f"import-{Path(path).name}", params, {"pllm.family": family, "pllm.source": str(path)},
                            generation, tracking_uri, experiment, registered_model, alias)


def log_quantized_model(path: str | Path, source: str, quantization: dict, generation: GenerationConfig | None,
                        tracking_uri: str | None, experiment: str = "pllm", registered_model: str | None = None,
                        alias: str | None = None, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Log a quantized model folder (`pllm quantize`) as a run of its own: the source model and the
    quantization section as parameters, sizes as metrics; the serving defaults are the source's
    (an MLflow source's logged GenerationConfig), else the generation defaults."""
    params = {"source": source} | {f"quantization.{k}": v for k, v in quantization.items()}
    return log_model_folder(path, f"quantize-{quantization['precision']}-{Path(path).name}", params,
                            {"pllm.source": source, "pllm.quantization": quantization["precision"]},
                            generation or GenerationConfig(), tracking_uri, experiment, registered_model, alias, metrics)


def log_model_folder(path: str | Path, run_name: str, params: dict, tags: dict, generation: GenerationConfig,
                     tracking_uri: str | None, experiment: str = "pllm", registered_model: str | None = None,
                     alias: str | None = None, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """A run of its own holding a model folder as the pyfunc's model, with these params, tags and
    metrics; registered under `registered_model` (the alias moved to it) when given."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id(client, experiment, tracking_uri), run_name=run_name,
                            tags={"pllm.version": pllm.__version__} | tags)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()],
                     metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])
    out = log_generator_model(run.info.run_id, tracking_uri, path, generation, registered_model, alias)
    client.set_terminated(run.info.run_id)
    return out | {"run_id": run.info.run_id}


def champion_decision(client: MlflowClient, name: str, alias: str, run_id: str, val_elbo: float | None,
                      validation_set: str, force: bool = False) -> tuple[bool, str]:
    """Whether a newly registered version of `name` (from run `run_id`) takes `alias`, and why: when
    forced, when no version holds it, or when its validation ELBO is lower than the holder's on the
    same held-out rows (the same `validation_set`). Otherwise the holder keeps it."""
    if force:
        return True, f"{alias} moved to run {run_id}: forced (tracking.force_alias)"
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return True, f"{alias} given to run {run_id}: no version of {name} held it"
    if val_elbo is None:
        return False, (f"{alias} stays with version {holder.version}: run {run_id} has no validation ELBO to "
                       "compare (set training.eval_interval, or force with tracking.force_alias)")
    held = client.get_run(holder.run_id).data
    held_elbo, held_set = held.metrics.get("val_elbo_nats"), held.tags.get("pllm.validation_set")
    if held_elbo is None or held_set != validation_set:
        return False, (f"{alias} stays with version {holder.version}: its validation ELBO is not on the same "
                       f"held-out rows as run {run_id}'s ({val_elbo:.4f} nats); force with tracking.force_alias")
    if val_elbo < held_elbo:
        return True, (f"{alias} moved from version {holder.version} to run {run_id}: validation ELBO "
                      f"{val_elbo:.4f} < {held_elbo:.4f} nats")
    return False, (f"{alias} stays with version {holder.version}: validation ELBO {held_elbo:.4f} <= run {run_id}'s "
                   f"{val_elbo:.4f} nats")


# -- models for serving ---------------------------------------------------------------------------
@contextlib.contextmanager
def _registry_env(uri: str):
    """MLflow resolves a models:/ URI's name and version in the process's default registry, whatever
    registry_uri download_artifacts is given: point the default at `uri` meanwhile (a serving replica
    has no MLFLOW_TRACKING_URI of the driver's)."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_URI")}
    os.environ["MLFLOW_REGISTRY_URI"] = uri
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resolve_model_source(source: str, tracking_uri: str | None = None) -> tuple[Path, GenerationConfig | None]:
    """A model to serve: a saved model folder, or an MLflow model URI (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/ID/model`) logged by `log_generator_model`. Returns the local folder
    holding the model (ours: model.safetensors + config.json + tokenizer.json; or a Hugging Face
    checkpoint) and, for MLflow models, the logged GenerationConfig (the serving defaults)."""
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        path = Path(source)
        if not is_model_folder(path):
            raise FileNotFoundError(f"{source} is not a model folder (config.json with model.safetensors or "
                                    f"model.safetensors.index.json)")
        return path, None
    uri = resolve_tracking_uri(tracking_uri)  # models:/ URIs resolve in this store's registry too
    with _registry_env(uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri, registry_uri=uri))
    found = sorted(p.parent for name in (CONFIG_FILE, ADAPTER_CONFIG) for p in local.rglob(name)
                   if is_model_folder(p.parent))
    if not found:
        raise FileNotFoundError(f"{source} holds no model (no config.json with safetensors weights, nor a LoRA "
                                "adapter, in its artifacts)")
    generation = None
    if (local / "MLmodel").exists():
        flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
        logged = flavor.get("config") or flavor.get("model_config") or {}
        if "generation" in logged:
            generation = GenerationConfig.from_dict(logged["generation"])
    return found[0], generation
