"""benchmarks/train_throughput.py: the CPU smoke run, and that its eager HF baseline is a fair one
(bidirectional like our denoiser, with exactly our parameter count)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_both_throughputs(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, timeout=300)
    report = json.loads((tmp_path / "train_throughput_cpu.json").read_text())
    (row,) = [r for r in report["rows"] if r["size"] == "tiny"]
    assert row["ours_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
    assert row["params"] == row["baseline_params"]
    assert report["torch"] and report["command"] and (tmp_path / "train_throughput_cpu.md").exists()


def test_baseline_is_bidirectional_with_our_parameter_count():
    bench = load_benchmark()
    from pllm import DiffusionTransformer

    cfg = bench.model_config("tiny")
    assert cfg.qk_norm is False  # like-for-like: Llama has no QK-norm
    torch.manual_seed(0)
    llama = bench.hf_llama(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (1, 16))
    changed = ids.clone()
    changed[0, -1] = 4 + (ids[0, -1] - 4 + 1) % (cfg.vocab_size - 4)
    with torch.no_grad():
        first = llama.model(ids).last_hidden_state[0, 0]
        first_changed = llama.model(changed).last_hidden_state[0, 0]
    assert not torch.allclose(first, first_changed), "position 0 must see the last token"
    assert sum(p.numel() for p in llama.parameters()) == DiffusionTransformer(cfg).num_parameters()
