"""The speculative-decoding, multi-GPU, norm-backward, answer-generation, throughput, quantized-speed and serving benchmarks run end to end
on CPU (tiny shapes, gloo, CPU replicas, Triton's interpreter); their GPU figures are in
benchmarks/RESULTS.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float) -> None:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_speculative_benchmark_is_lossless_and_reports_every_row(tmp_path):
    _run(["benchmarks/speculative.py", "--size", "tiny", "--train-seconds", "6", "--draft-train-seconds", "3",
          "--batches", "3", "--draft-lengths", "2", "--out", str(tmp_path)], 600)
    report = json.loads((tmp_path / "speculative_tiny_cpu.json").read_text())
    rows = {(r["target"], r["label"]): r for r in report["rows"]}
    assert set(rows) == {("ar", "target alone (eager)"), ("ar", "draft alone (eager)"), ("ar", "speculative k=2"),
                         ("ar", "speculative k=4, block-diffusion draft"), ("ar", "target alone, T=0.8"), ("ar", "speculative k=4, T=0.8"),
                         ("block", "target alone (eager)"), ("block", "draft alone (eager)"),
                         ("block", "speculative k=2")}
    for shape in ("ar", "block"):
        spec = rows[(shape, "speculative k=2")]
        assert spec["exact_match"] == 1.0 and spec["draft_passes"] > 0 and 0 <= spec["acceptance_rate"] <= 1
        assert spec["tokens_per_target_forward"] >= rows[(shape, "target alone (eager)")]["tokens_per_target_forward"]
    assert report["parameters"]["ar_draft"] < report["parameters"]["ar_target"]


def test_multi_gpu_serve_benchmark_scales_replicas_up_and_back_down_on_cpu(tmp_path):
    _run(["benchmarks/multi_gpu.py", "serve", "--device", "cpu", "--replicas", "2", "--concurrency", "4",
          "--max-num-seqs", "4", "--max-tokens", "16", "--warmup-s", "3", "--duration-s", "6", "--phase-s", "4",
          "--work", str(tmp_path / "work"), "--out", str(tmp_path)], 900)
    report = json.loads((tmp_path / "multi_gpu_serve_cpu.json").read_text())
    assert [r["replicas"] for r in report["fixed"]] == [1, 2] and all(r["tokens_per_s"] > 0 for r in report["fixed"])
    auto = report["autoscale"]
    assert auto["replicas_during_low"] == 1 and auto["max_replicas_during_high"] == 2 and auto["final_replicas"] == 1


def test_multi_gpu_train_benchmark_runs_each_worker_count_with_the_overrides(tmp_path):
    """1 and 2 workers (gloo) in one run, with a --set override: both jobs train with it, and the
    2-worker row reports its scaling against the 1-worker one."""
    _run(["benchmarks/multi_gpu.py", "train", "--device", "cpu", "--size", "tiny", "--strategies", "fsdp2",
          "--steps", "4", "--log-interval", "2", "--accum", "2", "--cpus-per-worker", "0.5", "--max-files", "40",
          "--gpus", "1", "2", "--set", "training.gradient_accumulation_steps=3",
          "--work", str(tmp_path / "work"), "--out", str(tmp_path)], 900)
    rows = json.loads((tmp_path / "multi_gpu_train_fsdp2_cpu.json").read_text())["rows"]
    assert [r["gpus"] for r in rows] == [1, 2]
    assert rows[1]["tokens_per_s"] > 0 and rows[1]["scaling_efficiency"] > 0
    one, two = (json.loads((tmp_path / "work" / f"train-fsdp2-{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert two["world_size"] == 2 and two["optimizer_steps"] == 4
    assert two["tokens_seen"] == 2 * one["tokens_seen"]  # the same steps and micro-batches on twice the workers
    for n in (1, 2):  # the override, not --accum 2, reached both jobs
        job = json.loads((tmp_path / "work" / f"train-fsdp2-{n}" / "job_config.json").read_text())
        assert job["training"]["gradient_accumulation_steps"] == 3


def test_multi_gpu_comm_benchmark_reports_both_collectives(tmp_path):
    _run(["benchmarks/multi_gpu.py", "comm", "--device", "cpu", "--gpus", "1", "2", "--comm-sizes", "1", "4",
          "--comm-iters", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path)], 300)
    rows = json.loads((tmp_path / "multi_gpu_comm_cpu.json").read_text())["rows"]
    assert [(r["op"], r["gpus"], r["mib"]) for r in rows] == [
        ("all_gather", 2, 1.0), ("reduce_scatter", 2, 1.0), ("all_gather", 2, 4.0), ("reduce_scatter", 2, 4.0)]
    assert all(r["busbw_gbs"] == r["algbw_gbs"] / 2 > 0 for r in rows)


def test_norm_backward_benchmark_reports_every_tile_and_the_baseline(tmp_path):
    pytest.importorskip("triton")  # the Triton kernel runs under the interpreter on CPU
    _run(["benchmarks/norm_backward.py", "--device", "cpu", "--quick", "--out", str(tmp_path)], 300)
    report = json.loads((tmp_path / "norm_backward_cpu.json").read_text())
    paths = [r["path"] for r in report["results"]]
    assert paths[:2] == ["ours, tiles of 1 row(s)", "ours, tiles of 4 row(s)"] and paths[2].startswith("Inductor")
    assert all(r["seconds"] > 0 for r in report["results"]) and report["bytes"] == 40 * 96 * 16


def test_answer_generation_benchmark_times_both_decoding_paths(tmp_path):
    _run(["benchmarks/answer_generation.py", "--device", "cpu", "--quick", "--out", str(tmp_path)], 300)
    report = json.loads((tmp_path / "answer_generation_cpu.json").read_text())
    assert [r["path"] for r in report["rows"]] == ["fixed-shape steps", "packed loop"]
    assert all(r["prompts"] == 4 and r["seconds"] > 0 for r in report["rows"])
    assert report["fixed_over_packed_answers_per_s"] > 0


def test_sharding_traffic_benchmark_counts_what_each_strategy_moves(tmp_path):
    """Two gloo ranks, FSDP2 and ZeRO-3 (settings scaled as for the 1B config): each gathers every
    parameter at least once a step, at most twice, reduce-scatters the gradients exactly once, and
    ZeRO-3's prefetch trace survives gradient checkpointing."""
    _run(["benchmarks/sharding_traffic.py", "--world", "2", "--skip-single", "--seq-len", "64", "--warmup", "2",
          "--steps", "1", "--out", str(tmp_path)], 600)
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "sharding_traffic_cpu.json").read_text())["rows"]}
    assert set(rows) == {"fsdp2", "zero3"}
    for row in rows.values():
        gathered = row["per_step"]["all_gather"]["bytes"] / row["param_bytes"]
        reduced = row["per_step"]["reduce_scatter"]["bytes"] / row["param_bytes"]
        assert 1.0 <= gathered <= 2.0 and reduced == pytest.approx(1.0, abs=0.01), row
    # FSDP2 re-gathers every block for backward but the last one, which it keeps (apply_fsdp).
    assert rows["fsdp2"]["per_step"]["all_gather"]["bytes"] > rows["zero3"]["per_step"]["all_gather"]["bytes"]
    assert rows["zero3"]["trace_state"] == "complete" and rows["zero3"]["trace_invalidations_measured"] == 0


def test_throughput_vs_batch_benchmark_compares_every_path_with_the_ar_one(tmp_path):
    _run(["benchmarks/throughput_vs_batch.py", "--quick", "--tokens-per-step", "4",
          "--out", str(tmp_path)], 300)
    report = json.loads((tmp_path / "throughput_vs_batch_tiny_cpu.json").read_text())
    rows = {(r["path"], r["batch"]): r for r in report["rows"]}
    assert {(path.split(" ")[0], batch) for path, batch in rows} == {("AR", 1), ("AR", 4), ("block", 1), ("block", 4)}
    for (path, batch), row in rows.items():
        assert row["tokens"] == batch * report["gen_tokens"] and row["tokens_per_s"] > 0
        assert row["window"] == (1 if path.startswith("AR") else 8)  # the one-token window; a block of 8
        assert path.startswith("AR") or row["over_ar"] > 0
    assert (tmp_path / "throughput_vs_batch_tiny_cpu.png").stat().st_size > 0


def test_serving_benchmark_reports_each_model_kind_with_time_to_first_token(tmp_path):
    _run(["benchmarks/serving.py", "--size", "tiny", "--models", "ar", "dual", "--rates", "20", "--num-requests", "4",
          "--batching", "continuous", "--shared-prefix", "32", "--out", str(tmp_path)], 300)
    report = json.loads((tmp_path / "serving_tiny_cpu_ar_dual.json").read_text())
    assert [(r["model"], r["batching"]) for r in report["results"]] == [("ar", "continuous"), ("dual", "continuous")]
    for r in report["results"]:
        assert 0 < r["p50_ttft_s"] <= r["p50_latency_s"] <= r["p99_latency_s"] and r["requests_per_s"] > 0
    assert report["parameters"]["ar"] == report["parameters"]["dual"]  # one shape, two attentions


def test_quantized_speed_benchmark_reports_every_precision_against_bf16(tmp_path):
    _run(["benchmarks/quantized_speed.py", "--quick", "--out", str(tmp_path)], 300)
    report = json.loads((tmp_path / "quantized_speed_tiny_cpu.json").read_text())
    assert [(r["precision"], r["batch"]) for r in report["engine"]] == [
        (p, b) for p in ("bf16", "int8", "fp8", "int4") for b in (1, 2)]
    assert all(r["tokens"] == 16 * r["batch"] for r in report["engine"])  # every answer whole (--quick: 16 tokens)
    assert all(r["step_over_bf16"] > 0 for r in report["engine"] if r["precision"] != "bf16")
    assert {r["projection"] for r in report["kernels"]} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert all(r[f"{p}_ms"] > 0 for r in report["kernels"] for p in ("bf16", "int8", "fp8", "int4"))
