"""Decoding speed of weight-only quantized models (int8, fp8, int4) against bf16, in one run on one GPU.

  1. kernels: each projection of the ~1.1B shape (`generation_speed.py`'s) at the rows of a batch-1
     step (32: the current block) and of a batch-16 step, our quantized kernel
     against the bf16 matmul (cuBLAS) and, where torchao is installed, torchao's weight-only
     quantized linear of the same format;
  2. the engine's step (fixed-shape, CUDA graphs, pipelined; random weights, static decoding at a
     fixed number of tokens per step, 128-token prompts): median step time at batch 1 and 16 per
     precision, over bf16's, and against the step's floor with weights counted at their stored
     bytes (quantized projections, bf16 LM head), plus end-to-end tokens/s;
  3. optionally (--llada-8b) the 8B LLaDA shape (bidirectional, dual cache) in fp8: step time and
     tokens/s at 4 tokens per forward.

  python benchmarks/quantized_speed.py --device cuda
  python benchmarks/quantized_speed.py --quick          # CPU smoke run (tiny shape)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pllm import DiffusionTransformer, GenerationConfig, ModelConfig
from pllm.kernels.quantized_gemm import quantized_linear
from pllm.quantization import INT4_GROUP, quantize_model, quantize_weight

ROOT = Path(__file__).resolve().parents[1]
QUICK_SHAPE = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, max_position_embeddings=512)  # int4 groups of 128 need inputs of 128
LLADA_8B = dict(vocab_size=126464, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, intermediate_size=12288, max_position_embeddings=4096)


def _generation_speed():
    spec = importlib.util.spec_from_file_location("generation_speed", ROOT / "benchmarks" / "generation_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bytes_per_weight(precision: str) -> float:
    """Stored bytes per projection weight, scales included."""
    return {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / INT4_GROUP}[precision]


def timed_ms(fn, device: str, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()  # replayed: no launch overhead, as inside the step's graphs
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats * 1e3
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torchao_linear(weight: torch.Tensor, precision: str):
    """torchao's weight-only quantized linear of this format (None: not installed or not supported)."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization import Int8WeightOnlyConfig, Float8WeightOnlyConfig, Int4WeightOnlyConfig
    except ImportError:
        return None
    config = {"int8": lambda: Int8WeightOnlyConfig(), "fp8": lambda: Float8WeightOnlyConfig(),
              "int4": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP)}[precision]()
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    try:
        quantize_(layer, config)
        return layer
    except Exception as err:  # noqa: BLE001 - an unsupported format on this GPU: recorded, not fatal
        print(f"torchao {precision}: {type(err).__name__}: {err}"[:200], flush=True)
        return None


def kernel_rows(cfg: ModelConfig, rows_list: list[int], precisions: list[str], device: str) -> list[dict]:
    d, hd, heads, kv, inter = (cfg.hidden_size, cfg.attention_head_size, cfg.num_attention_heads, cfg.kv_heads,
                               cfg.intermediate_size)
    shapes = {"qkv_proj": ((heads + 2 * kv) * hd, d), "o_proj": (d, heads * hd), "gate_up_proj": (2 * inter, d),
              "down_proj": (d, inter)}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = []
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
        for rows in rows_list:
            x = torch.randn(rows, k, device=device).to(dtype)
            row = {"projection": name, "n": n, "k": k, "rows": rows, "bf16_ms": timed_ms(lambda: F.linear(x, w), device)}
            for precision in precisions:
                q, s = (t.to(device) for t in quantize_weight(w, precision))
                row[f"{precision}_ms"] = timed_ms(lambda: quantized_linear(x, q, s, precision), device)
                ao = torchao_linear(w, precision) if device == "cuda" else None
                if ao is not None:
                    try:
                        row[f"torchao_{precision}_ms"] = timed_ms(lambda: ao(x), device)
                    except Exception as err:  # noqa: BLE001
                        print(f"torchao {precision} at {rows} rows: {type(err).__name__}"[:200], flush=True)
            out.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return out


def step_floor(gs, cfg: ModelConfig, batch: int, context: int, bandwidth: float, peak: float, precision: str) -> float:
    """`generation_speed.step_floor` with the projections' weights at their stored bytes."""
    floor = gs.step_floor(cfg, batch, context, bandwidth, peak)
    lm_head = cfg.hidden_size * cfg.vocab_size
    saved = (cfg.num_matmul_params() - lm_head) * (2 - bytes_per_weight(precision))
    memory_ms = floor["memory_floor_ms"] - saved / bandwidth * 1e3
    return max(memory_ms, floor["compute_floor_ms"])


def engine_rows(args, gs, shape: dict, features: dict, precisions: list[str], batches: list[int], tps: float,
                device: str, bandwidth, peak) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out, base = [], {}
    for precision in precisions:
        torch.manual_seed(0)
        cfg = ModelConfig(**shape, use_flash_attention=True, **features)
        model = DiffusionTransformer(cfg).to(device, dtype).eval()
        if precision != "bf16":
            quantize_model(model, precision)
        if device == "cuda":
            torch.cuda.empty_cache()
        bs = cfg.block_size if cfg.attention_mode == "block_causal" else args.block_size
        steps = math.ceil(bs / tps) * math.ceil(args.gen / bs)
        gen = GenerationConfig(max_new_tokens=args.gen, num_refinement_steps=steps, temperature=0.0, strategy="static",
                               use_adaptive_steps=False, block_size=bs)
        for batch in batches:
            prompts = [torch.randint(4, cfg.vocab_size, (args.prompt_len,)) for _ in range(batch)]
            timing = gs.time_engine(model, prompts, gen, True, device, pipeline=device == "cuda",
                                    max_model_len=args.prompt_len + args.gen)
            row = {"precision": precision, "batch": batch, "tokens_per_step": round(bs / math.ceil(bs / tps), 2),
                   "attention": cfg.attention_mode, **timing}
            if bandwidth and cfg.attention_mode == "block_causal":
                row["floor_ms"] = step_floor(gs, cfg, batch, args.prompt_len + args.gen // 2, bandwidth, peak, precision)
                row["step_over_floor"] = row["step_ms_median"] / row["floor_ms"]
            if precision == "bf16":
                base[batch] = row["step_ms_median"]
            elif batch in base:
                row["step_over_bf16"] = row["step_ms_median"] / base[batch]
            out.append(row)
            floor = f", floor {row['floor_ms']:.2f} ms" if "floor_ms" in row else ""
            print(f"{precision:5s} batch {batch:3d}: step {row['step_ms_median']:7.2f} ms, "
                  f"{row['tokens_per_s']:8.0f} tok/s{floor}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def table(report: dict) -> str:
    lines = ["| precision | batch | step ms (median) | / bf16 | floor ms | step / floor | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["engine"]:
        lines.append(f"| {r['precision']} | {r['batch']} | {r['step_ms_median']:.2f} | {r.get('step_over_bf16', 1.0):.2f} | "
                     f"{r.get('floor_ms', float('nan')):.2f} | {r.get('step_over_floor', float('nan')):.2f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    if report["kernels"]:
        cols = [k for k in report["kernels"][0] if k.endswith("_ms")]
        lines += ["", "| projection | rows | " + " | ".join(c[:-3] + " ms" for c in cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for r in report["kernels"]:
            lines.append(f"| {r['projection']} ({r['n']}x{r['k']}) | {r['rows']} | "
                         + " | ".join(f"{r[c]:.4f}" if c in r else "-" for c in cols) + " |")
    for r in report.get("llada_8b", []):
        lines.append(f"\nLLaDA-8B shape, {r['precision']}, batch {r['batch']}, {r['tokens_per_step']} tokens/step: "
                     f"step {r['step_ms_median']:.2f} ms, {r['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="1.1b")
    p.add_argument("--precisions", nargs="+", default=["int8", "fp8", "int4"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens-per-step", type=float, default=2.3, help="static decoding's tokens per step (the trained TPF)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--llada-8b", action="store_true", help="also the 8B LLaDA shape in fp8 at 4 tokens per step")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, short answers")
    args = p.parse_args()
    if args.quick:
        args.shape, args.batches, args.gen, args.prompt_len, args.block_size = "tiny", [1, 2], 16, 16, 8
    gs = _generation_speed()
    device = args.device
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__, "shape": args.shape,
              "command": "python benchmarks/quantized_speed.py " + " ".join(sys.argv[1:])}
    try:
        import torchao

        report["torchao"] = torchao.__version__
    except ImportError:
        report["torchao"] = None
    bandwidth, peak = gs.measured_bandwidth(device), gs.measured_matmul_peak(device)
    report.update(bandwidth_gb_s=bandwidth and bandwidth / 1e9, matmul_peak_tflops=peak and peak / 1e12)
    shape = QUICK_SHAPE if args.quick else gs.SHAPES[args.shape]
    block = dict(attention_mode="block_causal", block_size=args.block_size, logits_shift=False)
    cfg = ModelConfig(**shape, **block)
    window = gs.step_window(cfg)
    report["kernels"] = [] if args.skip_kernels else kernel_rows(cfg, [window, 16 * window], args.precisions, device)
    report["engine"] = engine_rows(args, gs, shape, block, ["bf16", *args.precisions], args.batches,
                                   args.tokens_per_step, device, bandwidth, peak)
    if args.llada_8b:
        report["llada_8b"] = engine_rows(args, gs, LLADA_8B, dict(attention_mode="bidirectional"), ["fp8"], [1, 16],
                                         4.0, device, bandwidth, peak)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quantized_speed_{args.shape}_{device}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table(report) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
