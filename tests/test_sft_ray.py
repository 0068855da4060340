"""Instruction fine-tuning as a Ray job: rows read and tokenized by Ray Data, 2 gloo workers under
FSDP2 (full SFT) and DeepSpeed ZeRO-2 (LoRA, packed rows), the model registered in MLflow and
served over HTTP answering a chat request; the LoRA run's checkpoints hold the adapters only and
its adapter is logged naming its base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_fixtures import REGULAR, cases, reference_model, write_checkpoint

CASE = cases()["sdar"]  # a block-diffusion dLLM with a chat template
TRAINING = dict(batch_size=4, seq_len=32, learning_rate=3e-3, warmup_steps=2, num_train_steps=8, eval_interval=4,
                eval_batches=1, log_interval=4, use_torch_compile=False, gradient_checkpointing=False,
                mixed_precision="no", weight_decay=0.0)
GENERATION = dict(max_new_tokens=8, num_refinement_steps=8, block_size=4, temperature=0.0)


def rows(n: int = 160) -> list[dict]:
    """Learnable chat rows (the answer is the question's words reversed), and four that are skipped."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        words = [f"w{int(i)}" for i in torch.randint(4, REGULAR, (3,), generator=g)]
        out.append({"messages": [{"role": "user", "content": " ".join(words)},
                                 {"role": "assistant", "content": " ".join(reversed(words))}]})
    return out + [{"prompt": "w1", "response": " "}, {"prompt": "w1 " * 40, "response": "w2"},
                  {"text": "w1 w2"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_checkpoint(CASE, reference_model(CASE), tmp_path_factory.mktemp("hf") / "sdar")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The rows split over a jsonl file (with a line that is not JSON) and a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("sft")
    chat, bad = [r for r in rows() if "messages" in r], [r for r in rows() if "messages" not in r]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in chat[::2] + bad) + "\nnot json\n")
    pq.write_table(pa.Table.from_pylist(chat[1::2]), folder / "b.parquet")
    return folder


def run_job(tmp_path: Path, job: dict, name: str) -> tuple[subprocess.CompletedProcess, str]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(job))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "pllm.pipelines.train_job", "--config", str(config),
                           "--mlflow-uri", uri], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc, uri


def sft_job(base: Path, data: Path, out: Path, **training) -> dict:
    return {"task": "sft", "model": {"init_from": str(base)},
            "data": {"paths": [str(data)], "validation_fraction": 0.15},
            "training": {**TRAINING, "output_dir": str(out), **training},
            "cluster": {"num_workers": 2, "cpus_per_worker": 1.0}, "generation": GENERATION, "prompt": "w1 w2"}


@pytest.mark.slow
def test_fsdp2_sft_job_registers_a_model_that_answers_chat_over_http(base, data, tmp_path):
    job = sft_job(base, data, tmp_path / "run", use_fsdp=True)
    job["tracking"] = {"registered_model": "pllm-sft", "alias": "champion"}
    proc, uri = run_job(tmp_path, job, "fsdp2")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["step"], metrics["strategy"], metrics["world_size"]) == (8, "fsdp2", 2)
    assert metrics["val_sft_loss"] > 0 and "unigram_nats" not in metrics
    log = proc.stdout + proc.stderr
    # Skipped rows are counted by reason, in the Ray Data tasks, and logged by the driver.
    for reason in ("empty response", "prompt too long", "not a JSON object", "no 'messages' nor"):
        assert reason in log, reason
    assert "Registered model: models:/pllm-sft@champion" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("pllm-sft", "champion")
    assert version.tags["pllm.base_model"] == str(base)
    assert client.get_run(version.run_id).data.tags["pllm.task"] == "sft"
    assert [m.value for m in client.get_metric_history(version.run_id, "val_sft_loss")]

    # Served from the registry: the chat request renders the checkpoint's template.
    import ray
    import requests
    from ray import serve

    from pllm.actors.serve_app import ServeArgs, build_app
    from serve_fixtures import free_port

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeArgs(model="models:/pllm-sft@champion", mlflow_uri=uri, min_replicas=1,
                                      max_replicas=1)), name="sft", route_prefix="/")
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": "w5 w6 w7"}], "max_tokens": 4,
                                "temperature": 0})
        assert r.status_code == 200, r.text
        result = r.json()
        answer = result["choices"][0]["message"]["content"].split()
        assert len(answer) <= result["usage"]["completion_tokens"] <= 4 and all(w.startswith("w") for w in answer)
        assert result["choices"][0]["finish_reason"] in ("stop", "length")
        from pllm.checkpoint import load_tokenizer

        templated = load_tokenizer(base).apply_chat_template([{"role": "user", "content": "w5 w6 w7"}], tokenize=True)
        assert result["usage"]["prompt_tokens"] == len(templated)  # the checkpoint's chat template, kept
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_zero2_lora_sft_job_keeps_adapters_only_and_logs_the_adapter_on_its_base(base, data, tmp_path):
    job = sft_job(base, data, tmp_path / "run", use_fsdp=False, use_deepspeed=True, zero_stage=2,
                  save_interval=4, lora={"rank": 4, "target_modules": ["qkv_proj", "gate_up_proj"]})
    job["data"]["sft_packing"] = True
    job["tracking"] = {"registered_model": "pllm-lora", "alias": "champion"}
    proc, uri = run_job(tmp_path, job, "zero2")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["step"], metrics["strategy"], metrics["world_size"]) == (8, "deepspeed", 2)

    # The training checkpoints hold adapter weights only (a resume reads the base from init_from).
    model_files = list((tmp_path / "run" / "ray").rglob("*model_states.pt"))
    assert model_files
    for f in model_files:
        state = torch.load(f, map_location="cpu", weights_only=False)["module"]
        assert state and all("lora_" in k for k in state), sorted(state)[:4]

    from mlflow.tracking import MlflowClient

    from pllm import load_model
    from pllm.hf import import_checkpoint
    from pllm.registry import resolve_model_source

    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("pllm-lora", "champion")
    adapter, _ = resolve_model_source(f"runs:/{version.run_id}/adapter", uri)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == 4
    merged = load_model(tmp_path / "run" / "model").state_dict()
    from_adapter = load_model(adapter).state_dict()  # the base with the logged adapter merged on load
    start = import_checkpoint(base)[0].state_dict()
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed and all("qkv_proj" in k or "gate_up_proj" in k for k in changed)
    assert all(torch.allclose(from_adapter[k], merged[k], atol=1e-6) for k in merged)


@pytest.mark.parametrize("change, message", [
    ({"training": {"lora": {"target_modules": ["q_proj"]}}}, "training.lora.target_modules: ['q_proj'] match no"),
    ({"data": {"paths": ["no/such/rows.jsonl"]}}, "no/such/rows.jsonl"),
], ids=["lora-target", "data-path"])
def test_bad_sft_inputs_fail_naming_them_before_ray_starts(base, data, tmp_path, change, message):
    import ray

    from pllm.config import JobConfig
    from pllm.pipelines.train_job import run_training_job

    job = sft_job(base, data, tmp_path / "run")
    for section, fields in change.items():
        job[section] |= fields
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("]", r"\]")):
        run_training_job(JobConfig.from_dict(job))
    assert not ray.is_initialized()
