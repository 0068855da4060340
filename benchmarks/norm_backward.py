"""The residual add + RMSNorm op's backward (`pllm.kernels.add_rms_norm`) at the 1B training shape:
our Triton backward at several row-tile heights against Inductor's compiled backward of the PyTorch
definition, in one run, with the memory time (bytes moved / measured copy bandwidth) as the floor.

    python benchmarks/norm_backward.py --device cuda            # on a GPU
    python benchmarks/norm_backward.py --device cpu --quick     # smoke run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def timed(fn, device: str, repeats: int, calls: int = 10) -> float:
    """Seconds per fn() call: the median over `repeats` timings of `calls` back-to-back calls, so the
    host's launch cost of one call hides behind the device's work on the others (as in a step)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=8 * 2048, help="tokens per step (1B: batch 8 x 2048)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small shape, few repeats (CPU smoke run)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.quick:
        args.rows, args.dim, args.repeats, args.tiles = 40, 96, 2, [1, 4]
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from pllm.kernels import add_rms_norm_reference, rms_norm

    device, eps = args.device, 1e-5
    torch.manual_seed(0)
    # As training runs it: an fp32 residual stream, a bf16 branch output and bf16 normed rows.
    h = torch.randn(args.rows, args.dim, device=device)
    weight = 1 + 0.1 * torch.randn(args.dim, device=device)
    grad_h = torch.randn_like(h)
    grad_n = torch.randn(args.rows, args.dim, device=device, dtype=torch.bfloat16)
    moved = h.numel() * (4 + 4 + 2 + 4 + 2)  # reads h, dh, dn; writes dx (fp32) and dy (bf16)
    bandwidth = None
    if device == "cuda":
        a = torch.empty(2**30, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        bandwidth = 2 * a.numel() / timed(lambda: b.copy_(a), device, 20)
        del a, b
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "rows": args.rows, "dim": args.dim, "bytes": moved,
              "bandwidth_gb_s": bandwidth and bandwidth / 1e9, "rows_per_program": rms_norm.ROWS_PER_PROGRAM,
              "results": []}

    def ours(tile: int):
        def run():
            return rms_norm.add_rms_norm_backward(h, weight, eps, grad_h, grad_n, torch.float32, torch.bfloat16,
                                                  tile_rows=tile)
        return run

    x = h.clone().requires_grad_()
    y = torch.zeros_like(h, dtype=torch.bfloat16).requires_grad_()
    w = weight.clone().requires_grad_()

    def reference(a, b, c):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return add_rms_norm_reference(a, b, c, eps)

    compiled = torch.compile(reference) if device == "cuda" else reference

    def baseline():  # forward + backward: Inductor's backward has no separate entry point
        out_h, out_n = compiled(x, y, w)
        torch.autograd.grad([out_h, out_n], [x, y, w], [grad_h, grad_n.to(out_n.dtype)])

    def forward_only():
        with torch.no_grad():
            compiled(x, y, w)

    want = ours(1)()
    for tile in args.tiles:
        got = ours(tile)()
        # tiles change only the order of the weight gradient's sums: fp32 results agree closely, the
        # bf16 copy of the input gradient to within a bf16 rounding
        for g, v, tol in zip(got, want, (1e-4, 1e-2, 1e-4)):
            assert torch.allclose(g.float(), v.float(), rtol=tol, atol=tol), f"tiles of {tile} disagree"
        report["results"].append({"path": f"ours, tiles of {tile} row(s)", "seconds": timed(ours(tile), device,
                                                                                            args.repeats)})
    inductor = timed(baseline, device, args.repeats) - timed(forward_only, device, args.repeats)
    report["results"].append({"path": "Inductor (compiled definition; forward + backward minus forward)",
                              "seconds": inductor})
    lines = ["| path | us | memory time / us | vs Inductor |", "|---|---:|---:|---:|"]
    for row in report["results"]:
        row["memory_fraction"] = moved / bandwidth / row["seconds"] if bandwidth else None
        row["speedup_vs_inductor"] = inductor / row["seconds"]
        frac = f"{row['memory_fraction']:.2f}" if bandwidth else "-"
        lines.append(f"| {row['path']} | {row['seconds'] * 1e6:.1f} | {frac} | {row['speedup_vs_inductor']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"norm_backward_{device}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
