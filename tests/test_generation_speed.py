"""The generation-speed benchmark runs end to end on CPU (tiny shapes, and the TPF model's
certainty-forcing fine-tune; the GPU figures are in benchmarks/RESULTS.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generation_speed_quick_run_writes_every_row(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/generation_speed.py", "--quick", "--device", "cpu", "--out",
                          str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--train-seconds", "6",
                          "--distill-seconds", "4",
                          "--distill-prompts", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "generation_speed_tiny_cpu.json").read_text())
    assert report["trained"]["model_parameters"] > 0 and report["trained"]["tpf_threshold_0.7"] >= 1.0
    # then the model fine-tuned on its own answers (certainty forcing), with its answers' quality
    distilled = report["trained"]["certainty_forcing"]
    assert distilled["steps"] > 0 and distilled["tpf_threshold_0.7"] >= 1.0 and distilled["val_elbo_nats"] > 0
    assert 0 <= distilled["teacher_match_0.7"] <= 1 and 0 <= distilled["reference_match_0.7"] <= 1
    assert report["projected_with"] == {"tpf": distilled["tpf_threshold_0.7"], "threshold": 0.7,
                                        "model": "certainty forcing"}
    rows = {(r["batch"], r["path"].split(" ")[0], r["path"].endswith("at the trained TPF")) for r in report["rows"]}
    assert rows == {(b, path, at_tpf) for b in (1, 4) for path, at_tpf in
                    [("fixed-shape", True), ("fixed-shape", False), ("eager", False)]}
    for row in report["rows"]:
        # every request decoded all its tokens, one per step (a barely trained model; threshold decoding)
        assert row["tokens"] == row["batch"] * report["gen_tokens"] and row["tokens_per_s"] > 0
        assert row["hf_tokens_per_s"] > 0 and row["step_ms_median"] > 0
    assert (tmp_path / "out" / "generation_speed_tiny_cpu.md").read_text().startswith("| batch |")


def test_generation_speed_measures_the_engine_at_an_earlier_runs_tpf(tmp_path):
    """--tpf-from takes the TPF of an earlier run's JSON (no training here), and the 1.1B-shape rows
    then include one measured at that TPF: static decoding, ceil(block / TPF) steps a block."""
    earlier = {"command": "an earlier --tpf-only run", "date": "2026-01-01", "device": "cpu",
               "trained": {"model_parameters": 1, "tpf_threshold_0.7": 2.5}}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    run = subprocess.run([sys.executable, "benchmarks/generation_speed.py", "--quick", "--device", "cpu", "--out",
                          str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--skip-eager",
                          "--tpf-from", str(tmp_path / "earlier.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "generation_speed_tiny_cpu.json").read_text())
    assert report["trained"]["from"]["file"] == "earlier.json" and report["projected_with"]["tpf"] == 2.5
    for batch in (1, 4):  # --quick's batches
        at_tpf, plain = sorted((r for r in report["rows"] if r["batch"] == batch),
                               key=lambda r: not r["path"].endswith("at the trained TPF"))
        assert at_tpf["path"].endswith("at the trained TPF") and not plain["path"].endswith("at the trained TPF")
        # 32 answer tokens in one block of 32: 13 steps of about 2.46 tokens, never more than the TPF given
        assert at_tpf["tokens"] == plain["tokens"] == batch * report["gen_tokens"]
        assert 32 / 14 <= at_tpf["tpf"] <= 2.5 and plain["tpf"] <= 1.1
