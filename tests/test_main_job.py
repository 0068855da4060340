"""The README's main job, for real: built-in corpus -> Ray Data -> 2 Ray Train workers with FSDP2 ->
~1M-parameter model trained for a few minutes on CPU -> validation ELBO below the unigram baseline ->
model registered in a local MLflow store -> generated text -> served over HTTP by Ray Serve."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_main_job_beats_the_unigram_baseline_registers_and_generates(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "pllm.cli", "demo", "--output", str(out)],
                         capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_parameters"] < 5e6
    assert (metrics["strategy"], metrics["world_size"]) == ("fsdp2", 2)
    # "clearly below": at least 0.3 nats/token under a context-free model of the same tokens
    assert metrics["val_elbo_nats"] < metrics["unigram_nats"] - 0.3, metrics
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / "model" / name).is_file()
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert "Validation ELBO" in run.stdout and "Unigram baseline" in run.stdout
    assert "Registered model: models:/pllm-tiny@champion" in run.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in run.stdout
    assert "def read_file(path):" in run.stdout
    # ...and the last stage serves the registered model on Ray Serve and answers one HTTP request
    assert "Serving models:/pllm-tiny@champion at http://127.0.0.1:8000/v1" in run.stdout
    served = run.stdout.split("One completion request:")[1]
    assert served.split("-" * 60)[1].strip().startswith("def read_file(path):")
    assert "'completion_tokens': " in served and "finish_reason: " in served
    # A log that reads clean: no ERROR lines, no progress-bar redraws; hints runnable as printed.
    output = run.stdout + run.stderr
    assert not [line for line in output.splitlines() if "ERROR" in line], output[-5000:]
    assert "\r" not in output
    for hint, script in [("Browse it: ", "mlflow"), ("Serve it again: ", "pllm")]:
        line = next(line for line in run.stdout.splitlines() if line.startswith(hint))
        assert line.split()[len(hint.split())] == str(Path(sys.executable).parent / script)

    gen = subprocess.run([sys.executable, "-m", "pllm.cli", "generate", "--model", str(out / "model"),
                          "--prompt", "import os\n", "--max-new-tokens", "16", "--steps", "8"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("import os\n")
    assert "8 forward passes" in gen.stderr
