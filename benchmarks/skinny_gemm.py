"""The decoding step's GEMMs at batch 1 (M = 64 rows: a window of two 32-token blocks): cuBLAS
(`F.linear`) against Inductor's max-autotune and our Triton skinny GEMM, as weight-read bandwidth.

  python benchmarks/skinny_gemm.py --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

# (name, N, K) of the 1.1B config (hidden 2048, 32 / 4 heads of 64, intermediate 5632, vocab 32768)
SHAPES = [("qkv_proj", 3072, 2048), ("o_proj", 2048, 2048), ("gate_up_proj", 11264, 2048),
          ("down_proj", 2048, 5632), ("lm_head (32 rows)", 32768, 2048)]


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200)  # ms, L2 flushed between calls


def main() -> None:
    from kernels.skinny_gemm import skinny_linear

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    p.add_argument("--autotune", action="store_true", help="also Inductor max-autotune (slow to compile)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    dtype = torch.bfloat16
    rows = []
    compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False) if args.autotune else None
    for M in args.rows:
        for name, N, K in SHAPES:
            m = 32 if name.startswith("lm_head") else M
            x = torch.randn(m, K, device=args.device, dtype=dtype)
            w = torch.randn(N, K, device=args.device, dtype=dtype) / K**0.5
            ref = F.linear(x, w)
            out = skinny_linear(x, w)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row = {"rows": m, "gemm": name, "N": N, "K": K, "weight_mb": N * K * 2 / 1e6, "max_rel_err": err,
                   "cublas_ms": bench(lambda: F.linear(x, w)), "triton_ms": bench(lambda: skinny_linear(x, w)),
                   "triton_split2_ms": bench(lambda: skinny_linear(x, w, split_k=2)),
                   "triton_split4_ms": bench(lambda: skinny_linear(x, w, split_k=4))}
            for split in (2, 4):
                split_err = (skinny_linear(x, w, split_k=split).float() - ref.float()).abs().max() / ref.float().abs().max()
                row["max_rel_err"] = max(row["max_rel_err"], split_err.item())
            if compiled is not None:
                compiled(x, w)
                row["inductor_ms"] = bench(lambda: compiled(x, w))
            for key in [k for k in row if k.endswith("_ms")]:
                row[key.replace("_ms", "_tb_s")] = N * K * 2 / (row[key] / 1e3) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["cublas", "triton", "triton_split2", "triton_split4"] + (["inductor"] if compiled is not None else [])
    lines = ["| rows | GEMM | weights MB | " + " | ".join(f"{c} us (TB/s)" for c in cols) + " | triton / cuBLAS time |",
             "|---|---|---:|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        cells = " | ".join(f"{r[c + '_ms'] * 1e3:.1f} ({r[c + '_tb_s']:.2f})" for c in cols)
        lines.append(f"| {r['rows']} | {r['gemm']} | {r['weight_mb']:.1f} | {cells} | {r['triton_ms'] / r['cublas_ms']:.2f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skinny_gemm_cuda.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    (out / "skinny_gemm_cuda.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
