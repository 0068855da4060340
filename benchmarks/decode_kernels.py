"""The decoding step's kernels at small batch, timed inside CUDA graphs as the step runs them.

1. GEMMs of the ~1.1B model at M = 64 rows (batch 1: a window of two 32-token blocks): cuBLAS
   against `pllm.kernels.skinny_gemm` over a grid of tile shapes and K splits. For the projections
   whose output feeds a residual add + RMSNorm (o_proj, down_proj) the consumer is timed too, so a
   split's partial sums, folded into that kernel, are compared with cuBLAS (and its own split-K
   reduction) plus the same kernel. gate_up is timed with the SiLU * up that follows it (the gated
   kernel does both).
2. The step's attention (64 queries, 32 / 4 heads of 64, an additive block-causal bias) over 256 to
   2,048 cached keys: the plain `bias_attention` kernel, its split-keys path and cuDNN.

Each candidate runs many times back to back in one captured graph, over enough weight copies that
each call reads from HBM, not L2; time per call is the graph's time over its calls. (Timing one
launch at a time measures the host: a Triton launch from Python costs more than these kernels.)

  python benchmarks/decode_kernels.py --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

attention_module = importlib.import_module("pllm.kernels.bias_attention")  # the package exports the function
from pllm.kernels.rms_norm import add_partials_rms_norm
from pllm.kernels.skinny_gemm import silu_mul_linear, skinny_linear
from pllm.engine.step_forward import _add_rms_norm, _silu_mul, compiled_elementwise

ROOT = Path(__file__).resolve().parents[1]
# (name, N, K, rows) of the ~1.1B shape: hidden 2048, 32 / 4 heads of 64, intermediate 5632, vocab 32768
GEMMS = [("qkv_proj", 2560, 2048, 64), ("o_proj", 2048, 2048, 64), ("gate_up_proj", 11264, 2048, 64),
         ("down_proj", 2048, 5632, 64), ("lm_head", 32768, 2048, 32)]
NORMED = {"o_proj", "down_proj"}  # their output goes into add + RMSNorm


def graph_time(make_call, copies: int, calls: int, replays: int = 5) -> float:
    """Seconds per call: `calls` calls of make_call(i % copies) captured in one graph."""
    fns = [make_call(i) for i in range(copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()  # compile / plan outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % copies]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def weight_copies(args, N: int, K: int, dtype) -> tuple[int, int, int, list[torch.Tensor]]:
    """(bytes of one weight, copies, calls per graph, the copies): enough copies of an (N, K) weight
    that calls cycling through them read HBM, not L2."""
    wbytes = N * K * 2
    copies = max(2, -(-args.weight_mb * 2**20 // wbytes))
    return wbytes, copies, max(copies, 24), [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
                                             for _ in range(copies)]


def gemm_rows(args) -> list[dict]:
    dtype, rows = torch.bfloat16, []
    configs = list(itertools.product(args.block_n, args.block_k, args.stages, args.warps))
    for name, N, K, M in GEMMS:
        if args.gemms and name not in args.gemms:
            continue
        wbytes, copies, calls, weights = weight_copies(args, N, K, dtype)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        resid = torch.randn(M, N, device="cuda", dtype=dtype)
        norm_w = torch.ones(N, device="cuda", dtype=dtype)
        ref = F.linear(x.float(), weights[0].float())

        def cublas(i, w=weights):
            if name == "gate_up_proj":
                return lambda: compiled_elementwise(_silu_mul)(*F.linear(x, w[i]).chunk(2, -1))
            if name in NORMED:
                return lambda: compiled_elementwise(_add_rms_norm)(resid, F.linear(x, w[i]), norm_w, 1e-6)
            return lambda: F.linear(x, w[i])

        base = graph_time(cublas, copies, calls)
        rows.append({"gemm": name, "N": N, "K": K, "rows": M, "path": "cuBLAS" + (" + SiLU*up" if name == "gate_up_proj"
                     else " + add&norm" if name in NORMED else ""), "us": base * 1e6, "tb_s": wbytes / base / 1e12})
        print(json.dumps(rows[-1]), flush=True)
        splits = [1] if name in ("gate_up_proj", "lm_head") else args.splits
        for (bn, bk, st, wp), split in itertools.product(configs, splits):
            cfg = (bn, bk, st, wp)
            try:
                if name == "gate_up_proj":
                    gate, up = ref.chunk(2, -1)
                    want, got = F.silu(gate) * up, silu_mul_linear(x, weights[0], config=cfg).float()

                    def make(i, w=weights, cfg=cfg):
                        return lambda: silu_mul_linear(x, w[i], config=cfg)
                else:
                    out = skinny_linear(x, weights[0], split, config=cfg)
                    want, got = ref, (out.sum(0) if split > 1 else out).float()

                    def make(i, w=weights, cfg=cfg, split=split):
                        if name in NORMED:
                            if split > 1:
                                return lambda: add_partials_rms_norm(resid, skinny_linear(x, w[i], split, cfg),
                                                                     norm_w, 1e-6)
                            return lambda: compiled_elementwise(_add_rms_norm)(resid, skinny_linear(x, w[i], 1, cfg), norm_w, 1e-6)
                        return lambda: skinny_linear(x, w[i], split, cfg)
                err = ((got - want).norm() / want.norm()).item()
                t = graph_time(make, copies, calls)
            except Exception as e:  # a tile that does not fit shared memory, say
                print(f"{name} {cfg} split {split}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            rows.append({"gemm": name, "N": N, "K": K, "rows": M, "path": "skinny", "block_n": bn, "block_k": bk,
                         "stages": st, "warps": wp, "split": split, "us": t * 1e6, "tb_s": wbytes / t / 1e12,
                         "rel_err": err,
                         "vs_cublas": base / t})
            print(json.dumps(rows[-1]), flush=True)
        del weights
    return rows


LAYERS = 22  # the attention rows cycle over this many layers' caches, as the step does


def attention_case(B: int, S: int) -> tuple:
    """The step's attention inputs at batch B over S cached keys (64 queries, 32 / 4 heads of 64,
    the block-causal bias), one cache per layer, and the float32 SDPA result on the first."""
    dtype, (H, KV, hd, W, bs) = torch.bfloat16, (32, 4, 64, 64, 32)
    caches = [torch.randn(B, 2, KV, S, hd, device="cuda", dtype=dtype) for _ in range(LAYERS)]
    q = torch.randn(B, H, W, hd, device="cuda", dtype=dtype)
    qpos, kpos = S - W + torch.arange(W, device="cuda"), torch.arange(S, device="cuda")
    visible = kpos[None, :] // bs <= qpos[:, None] // bs
    bias = torch.zeros(B, 1, W, S, device="cuda", dtype=dtype).masked_fill_(~visible, float("-inf"))
    want = F.scaled_dot_product_attention(q.float(), caches[0][:, 0].float(), caches[0][:, 1].float(),
                                          attn_mask=visible, enable_gqa=True)
    return caches, q, bias, want


def time_attention(make, want: torch.Tensor, label: str) -> dict | None:
    """us per call in-graph and relative error of make(i)'s call; None (and a line) if it fails."""
    try:
        got = make(0)().float()
        err = ((got - want).norm() / want.norm()).item()
        t = graph_time(make, LAYERS, LAYERS)
    except Exception as e:
        print(f"attention {label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None
    return {"us": t * 1e6, "rel_err": err}


def attention_rows(args) -> list[dict]:
    rows = []
    for B, S in itertools.product(args.batches, args.key_lengths):
        caches, q, bias, want = attention_case(B, S)
        for path in ("plain kernel", "split keys", "cuDNN"):
            def make(i, path=path):
                k, v = caches[i][:, 0], caches[i][:, 1]
                if path == "cuDNN":
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    def run():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
                    return run
                if path == "plain kernel":
                    return lambda: attention_module._bias_attention_triton(q, k, v, bias)
                splits = max(2, attention_module.key_splits(q, k))
                return lambda: attention_module._split_keys_triton(q, k, v, bias, splits)
            timing = time_attention(make, want, f"{path} B={B} S={S}")
            if timing is None:
                continue
            rows.append({"batch": B, "keys": S, "path": path, **timing,
                         "splits": attention_module.key_splits(q, caches[0][:, 0])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_sweep_rows(args) -> list[dict]:
    """The plain attention kernel's tiles at batch 1: queries per program x keys per iteration,
    stages, warps, in-graph over 22 layers' caches, against the default (`plain_config`)."""
    rows = []
    for S in args.key_lengths:
        caches, q, bias, want = attention_case(1, S)
        configs = [(None, None)] + [(m, (n, st, w)) for m, n, st, w in
                                    itertools.product((16, 32), (64, 128, 256), (2, 3), (4, 8)) if n <= S]
        for block_m, cfg in configs:
            def make(i, block_m=block_m, cfg=cfg):
                return lambda: attention_module._bias_attention_triton(q, caches[i][:, 0], caches[i][:, 1], bias,
                                                                       cfg, block_m)
            timing = time_attention(make, want, f"sweep S={S} {block_m} {cfg}")
            if timing is None:
                continue
            rows.append({"batch": 1, "keys": S, "path": "default" if cfg is None else "plain kernel",
                         "block_m": block_m, "config": cfg, **timing})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def tables(report: dict) -> str:
    lines = ["| GEMM | rows | path | tile n x k, stages, warps | split | us | weight TB/s | vs cuBLAS |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["gemm"] for r in report["gemms"]):
        mine = [r for r in report["gemms"] if r["gemm"] == name]
        base = next(r for r in mine if r["path"].startswith("cuBLAS"))
        best = sorted((r for r in mine if r["path"] == "skinny"), key=lambda r: r["us"])[:3]
        lines.append(f"| {name} | {base['rows']} | {base['path']} | | | {base['us']:.1f} | {base['tb_s']:.2f} | 1.00 |")
        for r in best:
            lines.append(f"| {name} | {r['rows']} | {r['path']} | {r['block_n']} x {r['block_k']}, {r['stages']}, {r.get('warps', 4)} | {r['split']} | "
                         f"{r['us']:.1f} | {r['tb_s']:.2f} | {r['vs_cublas']:.2f} |")
    lines += ["", "| batch | keys | path | queries x keys per iteration, stages, warps | us per layer | rel. error |",
              "|---:|---:|---|---|---:|---:|"]
    attention = report["attention"]
    if any("config" in r for r in attention):  # a sweep: the default and the five fastest per key length
        attention = [r for S in dict.fromkeys(r["keys"] for r in attention)
                     for r in [next(r for r in attention if r["keys"] == S and r["path"] == "default")]
                     + sorted((r for r in attention if r["keys"] == S and r["path"] != "default"),
                              key=lambda r: r["us"])[:5]]
    for r in attention:
        tile = (f"{r['block_m']} x {r['config'][0]}, {r['config'][1]}, {r['config'][2]}" if r.get("config")
                else "")
        lines.append(f"| {r['batch']} | {r['keys']} | {r['path']} | {tile} | {r['us']:.1f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--block-k", type=int, nargs="+", default=[128, 256])
    p.add_argument("--stages", type=int, nargs="+", default=[3, 4, 6])
    p.add_argument("--warps", type=int, nargs="+", default=[4], help="the skinny kernel's warps per program")
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--weight-mb", type=int, default=256, help="weight copies per GEMM, so calls read HBM")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 16])
    p.add_argument("--key-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--skip-gemms", action="store_true")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--gemms", nargs="+", choices=[g[0] for g in GEMMS], help="only these GEMMs")
    p.add_argument("--attention-sweep", action="store_true",
                   help="only the plain attention kernel's tiles at batch 1 (over --key-lengths)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.device != "cuda":
        raise SystemExit("decode_kernels.py times CUDA graphs: run it with --device cuda on a GPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": commit,
              "torch": torch.__version__, "args": vars(args)}
    if args.attention_sweep:
        report["attention"], report["gemms"] = attention_sweep_rows(args), []
    else:
        report["attention"] = [] if args.skip_attention else attention_rows(args)
        report["gemms"] = [] if args.skip_gemms else gemm_rows(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_kernels_attention_sweep_cuda" if args.attention_sweep else "decode_kernels_cuda"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = tables(report)
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
