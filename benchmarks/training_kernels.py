"""The training step's elementwise pieces on the GPU: Inductor's kernels against ours and the memory floor.

Pieces of the 1B model's layer (micro-batch 8 x 2048 tokens), forward + backward each, as the
compiled training step runs them:
  swiglu:  silu(gate) * up from the fused gate | up output;
  rotary:  the fused QKV output split into heads, (QK-norm,) rotary on queries and keys, the
           (B, H, L, hd) views attention reads; the backward writes the QKV gradient.
Variants: torch.compile default, torch.compile with coordinate-descent tuning of Inductor's kernels,
and (swiglu) our Triton op `pllm.kernels.silu_mul`. The floor is the bytes each piece must read and
write at the measured copy bandwidth of the same GPU.

  python benchmarks/training_kernels.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pllm.kernels import apply_rotary, silu_mul, silu_mul_reference
from pllm.model import rotary_tables

ROOT = Path(__file__).resolve().parents[1]


def bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / (cuda_ms(lambda: b.copy_(a)) / 1e3)


def cuda_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def swiglu_case(tokens: int, width: int):
    gate_up = torch.randn(tokens, 2 * width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * tokens * width * (3 + 5)  # forward: read 2F, write F; backward: read 2F + F, write 2F
    return (gate_up,), grad, nbytes


def rotary_case(tokens: int, heads: int, kv_heads: int, head_dim: int, seq: int, qk_norm: bool):
    B, L = tokens // seq, seq
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(B, L, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t[:L].cuda()[None, :, None] for t in rotary_tables(head_dim, L, 10000.0))  # (1, L, 1, hd)
    weights = [torch.ones(head_dim, device="cuda", requires_grad=True) for _ in "qk"] if qk_norm else [None, None]
    # attention's gradients come back in its inputs' memory layout, (B, L, H, hd)
    grads = [torch.randn(B, L, h, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
             for h in (heads, kv_heads, kv_heads)]
    nbytes = 2 * tokens * (width + (heads + kv_heads) * head_dim) + 2 * tokens * 2 * width

    def prep(qkv, *weights):
        weights = weights or (None, None)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        out = []
        for x, h, w in ((q, heads, weights[0]), (k, kv_heads, weights[1])):
            x = x.view(B, L, h, head_dim)
            if w is not None:
                x = F.rms_norm(x, (head_dim,), w, 1e-6)
            out.append(apply_rotary(x, cos, sin).transpose(1, 2))
        return out[0], out[1], v.view(B, L, kv_heads, head_dim).transpose(1, 2)

    inputs = (qkv, *[w for w in weights if w is not None])
    return prep, inputs, grads, nbytes


def time_forward_backward(fn, inputs, grads) -> float:
    grads = grads if isinstance(grads, (list, tuple)) else [grads]

    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        torch.autograd.backward(outs, grads)

    return cuda_ms(step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.manual_seed(0)
    bw = bandwidth()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "torch": torch.__version__, "tokens": args.tokens, "bandwidth_gb_s": bw / 1e9, "rows": []}
    default = lambda fn: torch.compile(fn)  # noqa: E731
    tuned = lambda fn: torch.compile(fn, options={"coordinate_descent_tuning": True})  # noqa: E731

    inputs, grad, nbytes = swiglu_case(args.tokens, 5632)
    # each variant compiles its own function object (one compiled code per function)
    pieces = [("swiglu", "torch.compile", default(lambda t: silu_mul_reference(t)), inputs, grad, nbytes),
              ("swiglu", "torch.compile, coordinate descent", tuned(lambda t: silu_mul_reference(t)), inputs, grad,
               nbytes),
              ("swiglu", "Triton op (pllm.kernels.silu_mul)", silu_mul, inputs, grad, nbytes)]
    for qk_norm in (False, True):
        name = "rotary + QK-norm" if qk_norm else "rotary"
        for variant, compile_fn in (("torch.compile", default), ("torch.compile, coordinate descent", tuned)):
            prep, inputs, grads, nbytes = rotary_case(args.tokens, 32, 4, 64, 2048, qk_norm)
            pieces.append((name, variant, compile_fn(prep), inputs, grads, nbytes))
    for piece, variant, fn, inputs, grads, nbytes in pieces:
        ms = time_forward_backward(fn, inputs, grads)
        row = {"piece": piece, "variant": variant, "ms": ms, "floor_ms": nbytes / bw * 1e3}
        row["over_floor"] = row["ms"] / row["floor_ms"]
        report["rows"].append(row)
        print(f"{piece:18s} {variant:36s} {ms * 1e3:8.1f} us  floor {row['floor_ms'] * 1e3:7.1f} us  "
              f"x{row['over_floor']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_kernels_cuda.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Forward + backward per layer, {report['device']}, {args.tokens} tokens, torch {report['torch']}, "
             f"commit {commit}, {report['date']} (copy bandwidth {bw / 1e9:.0f} GB/s)", "",
             "| piece | variant | us | floor us | / floor |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['piece']} | {r['variant']} | {r['ms'] * 1e3:.1f} | {r['floor_ms'] * 1e3:.1f} | "
              f"{r['over_floor']:.2f} |" for r in report["rows"]]
    (out / "training_kernels_cuda.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
