"""Decoding throughput under load: the autoregressive path against block diffusion, batch 1 to 128.

In one run, on one GPU, on the ~1.1B shape `generation_speed.py` uses (random weights, bf16, the
engine's fixed-shape steps with CUDA graphs and pipelining, 128-token prompts, 256 new tokens):
  - the autoregressive path: a block-size-1 model with shifted logits, one token per step (the
    one-token window: the last committed token's keys/values and the next token's logits);
  - block diffusion (block 32, exact block cache: a step computes the current block, and each
    block once more after its last commit) at 2.3, 4 and 8 tokens per step: static
    decoding committing a fixed count per step (random weights are never confident, so a
    confidence rule would commit one);
each with tokens/s, the median step time and the step against its floor (max of weights + visible
keys/values over the measured bandwidth, window FLOPs over the measured matmul peak), and the
block-diffusion rows' tokens/s over the AR path's at the same batch. A table, JSON and a plot.

  python benchmarks/throughput_vs_batch.py --device cuda
  python benchmarks/throughput_vs_batch.py --quick          # CPU smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from pllm import DiffusionTransformer, GenerationConfig, ModelConfig
from pllm.kernels.options import KernelOptions

ROOT = Path(__file__).resolve().parents[1]


def _generation_speed():
    spec = importlib.util.spec_from_file_location("generation_speed", ROOT / "benchmarks" / "generation_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paths(block_size: int, tokens_per_step: list[float]) -> list[tuple[str, dict, float]]:
    """(name, model features, tokens per step) of every path in the table."""
    rows = [("AR (block 1, one-token window)", dict(block_size=1, logits_shift=True), 1.0)]
    for tps in tokens_per_step:
        steps = math.ceil(block_size / tps)  # steps per block: a fixed count committed per step
        rows.append((f"block {block_size}, {block_size / steps:.1f} tokens/step", dict(block_size=block_size), tps))
    return rows


def table(report: dict) -> str:
    lines = ["| batch | path | tokens/s | step ms (median) | floor ms | step / floor | tokens/s / AR |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['path']} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.2f} | "
                     f"{r.get('floor_ms', float('nan')):.2f} | {r.get('step_over_floor', float('nan')):.2f} | "
                     f"{r.get('over_ar', float('nan')):.2f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in dict.fromkeys(r["path"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["path"] == name]
        ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch (concurrent sequences)", ylabel="tokens/s",
           title=f"{report['shape']} shape, {report['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="1.1b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    p.add_argument("--tokens-per-step", type=float, nargs="+", default=[2.3, 4, 8])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=256, help="new tokens per request")
    p.add_argument("--only", default=None, help="run only the paths whose name contains this (AR: the AR path)")
    p.add_argument("--plain-attention", action="store_true",
                   help="the step attention's plain kernel for few queries too, not the grouped-heads one (A/B)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, short answers")
    args = p.parse_args()
    if args.quick:
        args.shape, args.batches, args.gen, args.prompt_len, args.block_size = "tiny", [1, 4], 16, 16, 8
    gs = _generation_speed()
    device = args.device
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__, "shape": args.shape,
              "prompt_len": args.prompt_len, "gen_tokens": args.gen,
              "command": "python benchmarks/throughput_vs_batch.py " + " ".join(sys.argv[1:]), "rows": []}
    bandwidth, peak = gs.measured_bandwidth(device), gs.measured_matmul_peak(device)
    report.update(bandwidth_gb_s=bandwidth and bandwidth / 1e9, matmul_peak_tflops=peak and peak / 1e12)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"throughput_vs_batch_{args.shape}_{device}" + ("_plain_attention" if args.plain_attention else "")
    kernels = KernelOptions(attention_group_heads=False) if args.plain_attention else KernelOptions()
    ar_tokens_per_s: dict[int, float] = {}
    for name, features, tps in paths(args.block_size, args.tokens_per_step):
        if args.only and args.only not in name:
            continue
        torch.manual_seed(0)
        cfg = ModelConfig(**gs.SHAPES[args.shape], attention_mode="block_causal", use_flash_attention=True, **features)
        model = DiffusionTransformer(cfg).to(device, dtype).eval()
        bs = cfg.block_size
        steps = math.ceil(bs / tps) * math.ceil(args.gen / bs)
        gen = GenerationConfig(max_new_tokens=args.gen, num_refinement_steps=steps, temperature=0.0,
                               strategy="static", use_adaptive_steps=False)
        window = gs.step_window(cfg)
        for batch in args.batches:
            prompts = [torch.randint(4, cfg.vocab_size, (args.prompt_len,)) for _ in range(batch)]
            timing = gs.time_engine(model, prompts, gen, True, device, pipeline=device == "cuda", kernels=kernels,
                                    max_model_len=args.prompt_len + args.gen)
            row = {"batch": batch, "path": name, "block_size": bs, "window": window, **timing}
            if bandwidth:
                row.update(gs.step_floor(cfg, batch, args.prompt_len + args.gen // 2, bandwidth, peak, window))
                row["step_over_floor"] = row["step_ms_median"] / row["floor_ms"]
            if bs == 1:
                ar_tokens_per_s[batch] = row["tokens_per_s"]
            elif batch in ar_tokens_per_s:
                row["over_ar"] = row["tokens_per_s"] / ar_tokens_per_s[batch]
            report["rows"].append(row)
            (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
            print(f"batch {batch:4d}  {name:36s} {row['tokens_per_s']:9.0f} tok/s  step {row['step_ms_median']:7.2f} ms"
                  f"  floor {row.get('floor_ms', float('nan')):6.2f} ms", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    (out / f"{stem}.md").write_text(table(report) + "\n")
    plot(report, out / f"{stem}.png")
    print(table(report))


if __name__ == "__main__":
    main()
