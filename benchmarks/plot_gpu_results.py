"""Plots of the GPU benchmark JSONs: training tokens/s and MFU per size (ours vs eager HF), and
generation step time per path against the floor. Writes PNGs next to the JSONs.

  python benchmarks/plot_gpu_results.py benchmarks/results/train_throughput_cuda.json \
      benchmarks/results/generation_speed_1.1b_cuda.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(report: dict, path: Path) -> None:
    rows = [r for r in report["rows"] if r.get("ours_tokens_per_s")]
    sizes = [r["size"] for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar([i - 0.2 for i in x], [r["ours_tokens_per_s"] for r in rows], 0.4, label="ours (compile, fused loss)")
    ax1.bar([i + 0.2 for i in x], [r["baseline_tokens_per_s"] or 0 for r in rows], 0.4, label="eager HF Llama")
    ax1.set(xticks=list(x), xticklabels=sizes, ylabel="tokens/s", yscale="log", title="training throughput, seq 2048")
    ax1.legend()
    ax2.bar([i - 0.2 for i in x], [100 * r["ours_mfu"] for r in rows], 0.4, label="ours")
    ax2.bar([i + 0.2 for i in x], [100 * (r["baseline_mfu"] or 0) for r in rows], 0.4, label="eager HF Llama")
    ax2.axhline(45, color="grey", linestyle="--", label="45% target")
    ax2.set(xticks=list(x), xticklabels=sizes, ylabel="MFU % of measured bf16 peak", title="MFU")
    ax2.legend()
    fig.suptitle(report["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_generation(report: dict, path: Path) -> None:
    rows = report["rows"]
    batches = sorted({r["batch"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(paths) + 1)
    for j, name in enumerate(paths):
        values = [next((r["step_ms_median"] for r in rows if r["batch"] == b and r["path"] == name), 0) for b in batches]
        ax.bar([i + j * width for i in range(len(batches))], values, width, label=name)
    floors = [next(r["floor_ms"] for r in rows if r["batch"] == b) for b in batches]
    ax.bar([i + len(paths) * width for i in range(len(batches))], floors, width, label="floor (bandwidth / compute)")
    ax.set(xticks=[i + width for i in range(len(batches))], xticklabels=[f"batch {b}" for b in batches],
           ylabel="ms per denoising step", yscale="log",
           title=f"{report['shape']} block diffusion step, {report['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        report = json.loads(path.read_text())
        (plot_generation if "generation" in path.stem else plot_training)(report, path.with_suffix(".png"))
        print(path.with_suffix(".png"))
