"""Where an engine step's time goes: CUDA-graph replay alone vs the whole step, and a profiler table.

  python benchmarks/profile_step.py --device cuda --batch 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pllm import DiffusionTransformer, EngineConfig, GenerationConfig, ModelConfig
from pllm.engine import Engine
from pllm.engine.batched_commit import commit_batch
from pllm.kernels.options import GEMM_TILES, SPLIT_TILES, KernelOptions

SHAPES = {
    "1.1b": dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=1024),
}


def timed(fn, n: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def launch_costs(static, B: int, lengths: list[int], n: int = 20) -> None:
    """Host time of one graph launch: with the GPU idle, while the same graph still runs, and while
    another graph (a longer key-length bucket) runs. A launch that waits for the running copy of its
    own graph would stop the engine from queueing a step ahead."""
    first, other = (static.graphs[B, S][0] for S in (lengths[0], lengths[-1]))
    costs = {"idle": [], "same graph in flight": [], "other graph in flight": []}
    for _ in range(n):
        for key, second in (("same graph in flight", first), ("other graph in flight", other)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            first.replay()
            t1 = time.perf_counter()
            second.replay()
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            costs["idle"].append(t1 - t0)
            costs[key].append(t2 - t1)
    for key, values in costs.items():
        print(f"graph launch, host time, {key}: {sorted(values)[len(values) // 2] * 1e3:.3f} ms (median)")


def commit_costs(engine, static, device: str, n: int = 50) -> None:
    """Host time of one step's commits (deferred, then finished, as in a pipelined step), in one
    batched call and request by request, on the last step's logits (the states move on)."""
    engine.step()  # a step of the running states (none finishes: answers are long), then its logits
    states = [r.state for r in engine.scheduler.running]
    assert states and not any(s.finished for s in states), "the answers ended: time fewer steps"
    logits, bs = static.last_logits[:len(states)], static.block

    def one_by_one():
        for i, s in enumerate(states):
            s.advance(logits[i, s.start % bs:s.start % bs + s.end - s.start], defer=True)
        for s in states:
            s.finish_step()

    def batched():
        commit_batch(states, logits, static.to_device, defer=True)
        for s in states:
            s.finish_step()

    for name, fn in (("batched", batched), ("one by one", one_by_one)):
        print(f"commits of one step, {name}: {timed(fn, n, device):.3f} ms")


def device_timeline(engine, steps: int = 20) -> None:
    """The GPU's timeline over pipelined engine steps (profiler trace): busy share, and the idle
    gaps between device operations with the operations on either side, largest first. The
    profiler slows the host, so gaps that the host causes come out larger than without it."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    ops = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda t: t[0])
    if not ops:
        print("device timeline: no device events recorded")
        return
    gaps, end, last = [], ops[0][1], ops[0][2]
    busy = ops[0][1] - ops[0][0]
    for start, stop, name in ops[1:]:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    span = end - ops[0][0]
    print(f"device timeline over {steps} steps: {span / steps:.1f} us a step, busy {busy / span:.1%}, "
          f"idle {sum(g[0] for g in gaps) / steps:.1f} us a step in {len(gaps)} gaps")
    by_pair: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in gaps:
        by_pair.setdefault((before[:60], after[:60]), []).append(gap)
    for (before, after), values in sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"  idle {sum(values) / steps:6.1f} us a step ({len(values)} gaps) between {before} -> {after}")
    outside = {}
    for start, stop, name in ops:
        outside.setdefault(name[:80], []).append(stop - start)
    print("  device operations by total time a step:")
    for name, values in sorted(outside.items(), key=lambda kv: -sum(kv[1]))[:40]:
        print(f"    {sum(values) / steps:7.1f} us  x{len(values) / steps:.1f}  {name}")


def step_kernels(args, shape: dict, error) -> KernelOptions:
    """The step's kernel options from the A/B flags (the defaults where none is given)."""
    weight_shapes = {"o_proj": (shape["hidden_size"],) * 2,
                     "down_proj": (shape["hidden_size"], shape["intermediate_size"])}
    baseline = args.baseline_kernels
    gemm_tiles, split_tiles = dict(GEMM_TILES), {} if args.no_split else dict(SPLIT_TILES)
    for name, *tile in args.split_config:
        if name not in weight_shapes or len(tile) not in (4, 5):
            error(f"--split-config {name} {' '.join(tile)}: want o_proj|down_proj BLOCK_N BLOCK_K STAGES SPLIT [WARPS]")
        split_tiles[weight_shapes[name]] = tuple(int(t) for t in tile)
    if args.gate_up_config:
        if len(args.gate_up_config) not in (3, 4):
            error("--gate-up-config: want BLOCK_N BLOCK_K STAGES [WARPS]")
        gemm_tiles[(2 * shape["intermediate_size"], shape["hidden_size"], 1, True)] = tuple(args.gate_up_config)
    if args.cublas_down:
        gemm_tiles.pop((*weight_shapes["down_proj"], 1, False), None)
    return KernelOptions(
        skinny_gemm=not baseline, gemm_tiles=tuple(gemm_tiles.items()), split_tiles=tuple(split_tiles.items()),
        bias_attention=not args.cudnn_step_attention, attention_fill_sms=not args.query_tile_64,
        attention_split_keys=not baseline,
        attention_tile=tuple(args.attention_config) if args.attention_config else None,  # for every query tile
        attention_block_m=args.attention_block_m, step_bias=not (args.bias_reference or baseline),
        next_windows=not (args.window_reference or baseline), commit_in_place=not (args.commit_reference or baseline))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    p.add_argument("--no-cudnn", action="store_true", help="keep SDPA's cuDNN backend out of the step (A/B)")
    p.add_argument("--cudnn-step-attention", action="store_true",
                   help="the step's masked attention on cuDNN instead of our Triton kernel (A/B)")
    p.add_argument("--query-tile-64", action="store_true",
                   help="our step attention kernel with 64-query tiles always, not smaller ones that fill the SMs (A/B)")
    p.add_argument("--baseline-kernels", action="store_true",
                   help="cuBLAS GEMMs, Inductor's add + RMSNorm, no split-keys attention (A/B)")
    p.add_argument("--attention-config", type=int, nargs=3, metavar=("KEYS", "STAGES", "WARPS"),
                   help="the plain step attention kernel's keys per iteration, stages and warps")
    p.add_argument("--attention-block-m", type=int, help="the plain step attention kernel's queries per program")
    p.add_argument("--block-size", type=int, default=32,
                   help="the model's block size (the step's window is a block: its rows at batch 1)")
    p.add_argument("--logits-shift", action="store_true",
                   help="each position's logits from the one before (with --block-size 1: the AR one-token window)")
    p.add_argument("--window-reference", action="store_true",
                   help="steps launched ahead pick their windows with PyTorch ops, not the next_windows kernel (A/B)")
    p.add_argument("--commit-reference", action="store_true",
                   help="a request's greedy commit as parallel_decode + compare, where and copy (A/B)")
    p.add_argument("--bias-reference", action="store_true",
                   help="the step's attention bias from PyTorch ops, not the step_bias kernel (A/B)")
    p.add_argument("--cublas-down", action="store_true", help="down_proj on cuBLAS, not the skinny kernel (A/B)")
    p.add_argument("--split-config", nargs="+", action="append", default=[],
                   metavar="GEMM BLOCK_N BLOCK_K STAGES SPLIT [WARPS]",
                   help="o_proj or down_proj through the K-split skinny kernel + add_partials_rms_norm with this tile "
                        "(repeatable; overrides KernelOptions.split_tiles)")
    p.add_argument("--gate-up-config", type=int, nargs="+", metavar="BLOCK_N BLOCK_K STAGES [WARPS]",
                   help="gate_up's tile (overrides KernelOptions.gemm_tiles)")
    p.add_argument("--no-split", action="store_true",
                   help="o_proj and down_proj unsplit, their add + norm compiled by Inductor (A/B)")
    p.add_argument("--timeline", action="store_true",
                   help="with --quick: also the GPU's idle gaps over pipelined steps (profiler trace)")
    p.add_argument("--quick", action="store_true", help="graph replay and the whole pipelined step only (no profiles)")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    kernels = step_kernels(args, shape, p.error)
    print(f"K-split configs: {dict(kernels.split_tiles)}; tiles: {dict(kernels.gemm_tiles)}")
    if args.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = args.device
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[args.shape], attention_mode="block_causal", block_size=args.block_size,
                      logits_shift=args.logits_shift)
    model = DiffusionTransformer(cfg).to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    engine = Engine(model, EngineConfig(max_num_seqs=args.batch, max_batched_tokens=1 << 20, kernels=kernels),
                    static_step=True)
    gen = GenerationConfig(max_new_tokens=512, num_refinement_steps=512, temperature=0.0, strategy="threshold",
                           use_adaptive_steps=False)
    for i in range(args.batch):  # staggered prompt lengths: rows finish their blocks at different steps
        engine.add_request(torch.randint(4, cfg.vocab_size, (128 + 7 * i,)), gen)
    for _ in range(5):
        engine.step()
    static = engine.runner.static
    B = next(b for b in static.buckets if b >= args.batch)
    # Only buckets that cover the batch's positions: a shorter one would write keys/values out of
    # its bounds (unchecked inside a graph: memory corruption, then a crash).
    lengths = [S for S in static.lengths if S >= static.last_length]
    for S in lengths:
        if (B, S) in static.graphs:
            print(f"graph replay alone, key length {S}: {timed(static.graphs[B, S][0].replay, 50, device):.3f} ms")
    if args.quick:
        print(f"whole engine step, pipelined, batched commits: {timed(engine.step, 50, device):.3f} ms")
        if args.timeline and device == "cuda":
            device_timeline(engine)
        return
    if device == "cuda":
        launch_costs(static, B, lengths)
    S = lengths[0]
    print(f"forward_static eager, key length {S}: {timed(lambda: static._step(B, S), 20, device):.3f} ms")
    pipelined = engine.runner.pipeline
    for pipeline in (True, False) if pipelined else (False,):
        engine.runner.pipeline = pipeline
        before = (static.num_ahead, static.num_ahead_used)
        ms = timed(engine.step, 50, device)
        ahead = f", {static.num_ahead_used - before[1]}/{static.num_ahead - before[0]} steps launched ahead used"
        print(f"whole engine step{', pipelined' if pipeline else ''}, batched commits: {ms:.3f} ms"
              f"{ahead if pipeline else ''}")
    engine.runner.pipeline = pipelined  # the default again, for the profiles
    commit_costs(engine, static, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(10):
            engine.step()
        if device == "cuda":
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    if device == "cuda":
        S = next(S for S in static.lengths if S >= static.last_length)  # the rows have moved on since
        with profile(activities=activities) as prof:
            for _ in range(5):
                static._step(B, S)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=120))
        graph = static.graphs[B, S][0]
        with profile(activities=activities) as prof:  # the kernels as the graph runs them
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        print(f"graph replay, key length {S}, 5 replays:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=120))


if __name__ == "__main__":
    main()
