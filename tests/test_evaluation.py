"""Quality measures of the decoding benchmark, and the benchmark itself on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config
from pllm import DiffusionTransformer
from pllm.evaluation import autoregressive_nll, function_prompts, infill_tasks, parses_as_python, perplexity

ROOT = Path(__file__).resolve().parents[1]


def test_parse_rate_accepts_truncated_code_and_rejects_garbage():
    assert parses_as_python("def f(x):\n    y = x + 1\n    return y\n")
    assert parses_as_python("def f(x):\n    if x:\n")  # an open block at the cut is closed
    assert parses_as_python("def f(x):\n    y = x + 1\n    retu")  # cut to whole lines
    assert not parses_as_python("def f(x):\n    y = = x\n")
    assert not parses_as_python("def f(x:\n    ) ) (\n")
    assert not parses_as_python("")


def test_autoregressive_nll_matches_step_by_step_prediction():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(attention_mode="block_causal", block_size=1)).double().eval()
    prompt, completion = torch.randint(4, 96, (5,)), torch.randint(4, 96, (4,))
    nll, n = autoregressive_nll(model, prompt, completion)
    expected = 0.0
    with torch.no_grad():
        for i in range(4):
            x = torch.cat([prompt, completion[:i], torch.tensor([3])])[None]
            expected -= float(model(x)[0, -1].log_softmax(-1)[completion[i]])
    assert n == 4 and abs(nll - expected) < 1e-4
    assert perplexity(nll, n) > 1.0


def test_prompts_and_infill_tasks_come_from_held_out_code():
    from pllm.tokenizer import Tokenizer

    src = "import os\n\n" + "".join(f"def f{i}(a, b):\n    x = a + b\n    y = x * 2\n    z = y - 1\n    return z\n\n"
                                  for i in range(5))
    tok = Tokenizer.train([src] * 20, 300)
    prompts = function_prompts([src], tok, count=3, context_tokens=8, continuation_tokens=6)
    assert len(prompts) == 3
    for p in prompts:
        assert p.head.startswith("def f") and tok.decode(p.prompt).endswith(p.head)
        assert 0 < len(p.reference) <= 6
    tasks = infill_tasks([list(range(100))], count=4, span=5, context=10)
    for t in tasks:
        assert len(t.prefix) == len(t.suffix) == 10 and len(t.span) == 5
        assert t.prefix[-1] + 1 == t.span[0] and t.span[-1] + 1 == t.suffix[0]


def test_decoding_benchmark_runs_end_to_end(tmp_path):
    """The harness on a tiny model trained for a few seconds: every row is reported, the lossless
    strategy equals static exactly with fewer forward passes, and the outputs are written."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decoding.py"), "--size", "tiny", "--train-seconds", "4",
           "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "decoding_tiny_cpu.json").read_text())
    rows = {(r["model"], r["strategy"]): r for r in report["rows"]}
    for model in ("bidirectional", "block32"):
        static, lossless = rows[(model, "static")], rows[(model, "draft_verify k=4")]
        assert lossless["exact_match"] == 1.0 and lossless["nfe"] < static["nfe"]
        assert rows[(model, "threshold 0.7")]["tpf"] >= 1.0
    assert 0.0 <= rows[("bidirectional", "static")]["infill_accuracy"] <= 1.0
    assert all(0.0 <= r["parse_rate"] <= 1.0 and r["gen_ppl"] > 1.0 for r in rows.values())
    assert (tmp_path / "out" / "decoding_tiny_cpu.png").stat().st_size > 0
    assert "| block32 | draft_verify k=4 |" in (tmp_path / "out" / "decoding_tiny_cpu.md").read_text()
