"""The README's main job, for real: built-in corpus -> tokenizer -> ~1M-parameter model trained for at
most three minutes on CPU -> validation ELBO below the corpus's unigram entropy -> generated text."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_main_job_beats_the_unigram_entropy_and_generates(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "pllm.cli", "demo", "--no-progress", "--output", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_parameters"] < 5e6
    # "clearly below": at least 0.3 nats/token under a context-free model of the same tokens
    assert metrics["val_elbo_nats"] < metrics["unigram_nats"] - 0.3, metrics
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / "model" / name).is_file()
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert "Validation ELBO" in run.stdout and "Unigram entropy" in run.stdout
    assert "def read_file(path):" in run.stdout

    gen = subprocess.run([sys.executable, "-m", "pllm.cli", "generate", "--model", str(out / "model"),
                          "--prompt", "import os\n", "--max-new-tokens", "16", "--steps", "8"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("import os\n") and len(gen.stdout) > len("import os\n")
    assert "8 forward passes" in gen.stderr
