"""Collective traffic per optimizer step of the sharded strategies: what FSDP2 and DeepSpeed ZeRO-3
all-gather, reduce-scatter and all-reduce for the same model and batch, and how often ZeRO-3's
prefetch trace is thrown away.

Full sharding must gather every parameter for the forward pass and again for the backward pass
(2x the parameter bytes; with gradient checkpointing the recomputation can reuse the backward's
gather) and reduce-scatter the gradients once (1x). More than that, or many more calls than there
are sharded modules, is time a GPU run waits on the interconnect. ZeRO-3 overlaps its gathers only
while its recorded module trace stays valid; each "Invalidate trace cache" makes it fetch on demand.

Counts come from the torch profiler's c10d ops, which every backend (gloo, NCCL) goes through, over
`--steps` optimizer steps after `--warmup` steps. Step time is also timed against the same job on one
rank (scaling efficiency of the whole step on this machine's interconnect).

  python benchmarks/sharding_traffic.py                          # CPU, 2 gloo ranks, both strategies
  python benchmarks/sharding_traffic.py --device cuda --world 2  # GPUs, NCCL
  python benchmarks/sharding_traffic.py --set zero3:deepspeed_config='{"zero_optimization":{"stage3_prefetch_bucket_size":0}}'
Results: benchmarks/results/sharding_traffic_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "fsdp2": dict(use_fsdp=True, use_deepspeed=False, fsdp_sharding_strategy="full"),
    "zero3": dict(use_fsdp=False, use_deepspeed=True, zero_stage=3),
}
# pllm/configs/gpu-1b.yaml's layout (grouped-query attention, SwiGLU at 2.75x, tied LM head) at a size one
# CPU core trains in about a second a step. `--zero3-like` scales ZeRO-3's element-count settings so
# that this model is sharded, kept and prefetched as the 1B one is with DeepSpeed's defaults.
MODEL = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, max_position_embeddings=512, use_flash_attention=False)
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for the settings counted in elements.
ZERO3_NUMEL_DEFAULTS = {"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                        "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "sub_group_size": 1e9}
GPU_1B_PARAMS = 1.04e9  # pllm/configs/gpu-1b.yaml
DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
               "unsigned char": 1, "signed char": 1, "bool": 1, "c10::Float8_e4m3fn": 1}
# c10d op -> (kind, index of the argument whose size is the traffic: the full, unsharded side)
OPS = {"c10d::_allgather_base_": ("all_gather", 0), "c10d::allgather_": ("all_gather", 0),
       "c10d::allgather_into_tensor_coalesced_": ("all_gather", 0),
       "c10d::_reduce_scatter_base_": ("reduce_scatter", 1), "c10d::reduce_scatter_": ("reduce_scatter", 1),
       "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
       "c10d::allreduce_": ("all_reduce", 0), "c10d::allreduce_coalesced_": ("all_reduce", 0),
       "c10d::broadcast_": ("broadcast", 0)}


def scaled_zero3_defaults(ratio: float) -> dict:
    """DeepSpeed's element-count settings, scaled by `ratio`: a small model then keeps, releases,
    prefetches and buckets the same fractions of itself as a model 1/ratio its size does with the defaults."""
    return {key: max(1, int(default * ratio)) for key, default in ZERO3_NUMEL_DEFAULTS.items()}


def _numel_bytes(dims, dtype) -> int:
    if dims and isinstance(dims[0], list):  # a tensor list: one dtype for all
        return sum(_numel_bytes(d, dtype) for d in dims)
    return math.prod(dims) * DTYPE_BYTES.get(dtype, 4)


def traffic(trace_path: str) -> dict:
    """{kind: {"calls": n, "bytes": b}} from an exported profiler trace."""
    out: dict = defaultdict(lambda: {"calls": 0, "bytes": 0})
    for event in json.loads(Path(trace_path).read_text())["traceEvents"]:
        spec = OPS.get(event.get("name"))
        if spec is None:
            continue
        kind, arg = spec
        args = event.get("args", {})
        out[kind]["calls"] += 1
        out[kind]["bytes"] += _numel_bytes(args["Input Dims"][arg], args["Input type"][arg])
    return dict(out)


def rank_main(rank: int, world: int, port: int, args, strategy: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from torch.profiler import ProfilerActivity, profile

    from pllm import DiffusionTransformer, DistributedTrainer, ModelConfig, TrainingConfig

    invalidations = []
    if strategy == "zero3":
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC

        original = PPC._invalidate_trace

        def counted(self):  # every dropped trace means on-demand, unoverlapped fetches
            invalidations.append(time.perf_counter())
            return original(self)

        PPC._invalidate_trace = counted

    overrides = dict(STRATEGIES[strategy], batch_size=args.batch, seq_len=args.seq_len, num_train_steps=args.warmup,
                     gradient_checkpointing=not args.no_checkpointing, log_interval=10**6, save_interval=10**6,
                     warmup_steps=1, mixed_precision="bf16" if cuda else "no",
                     output_dir=os.path.join(os.path.dirname(result_path), f"run_{strategy}_{rank}"))
    torch.manual_seed(0)
    model = DiffusionTransformer(ModelConfig(**MODEL, dtype="bfloat16" if cuda else "float32"))
    n_params = sum(p.numel() for p in model.parameters())
    if strategy == "zero3" and args.zero3_like:
        overrides["deepspeed_config"] = {"zero_optimization": scaled_zero3_defaults(n_params / args.zero3_like)}
    for item in args.set:
        name, _, kv = item.partition(":")
        if name == strategy:
            key, _, value = kv.partition("=")
            overrides[key] = json.loads(value)
    cfg = TrainingConfig(**overrides)
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(4, MODEL["vocab_size"], (args.batch, args.seq_len), generator=g)
               for _ in range(args.warmup + args.steps)]
    trainer = DistributedTrainer(model, cfg, train_dataloader=batches, device="cuda" if cuda else "cpu",
                                 show_progress=False)
    trainer.train()  # warm-up: ZeRO-3 records its trace on the first steps
    trainer.cfg = cfg.replace(num_train_steps=args.warmup + args.steps)
    warm_invalidations = len(invalidations)
    trace = os.path.join(os.path.dirname(result_path), f"trace_{strategy}_{world}_{rank}.json")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if rank == 0:
        prof.export_chrome_trace(trace)
        per_step = {k: {"calls": v["calls"] / args.steps, "bytes": v["bytes"] / args.steps}
                    for k, v in traffic(trace).items()}
        os.remove(trace)
        coordinator_state = None
        if strategy == "zero3":
            coordinator = trainer.strategy.engine.optimizer.parameter_offload.get_param_coordinator()
            coordinator_state = "complete" if coordinator.is_complete_trace() else (
                "invalid" if coordinator.is_invalid_trace() else "record")
        param_bytes = n_params * (2 if cuda else 4)
        Path(result_path).write_text(json.dumps({
            "strategy": strategy, "world": world, "step_s": elapsed / args.steps, "params": n_params,
            "param_bytes": param_bytes, "per_step": per_step,
            "trace_invalidations_warmup": warm_invalidations,
            "trace_invalidations_measured": len(invalidations) - warm_invalidations,
            "trace_state": coordinator_state}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, strategy: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(world, free_port(), args, strategy, path), nprocs=world, join=True)
        return json.loads(Path(path).read_text())


def table(rows: list[dict]) -> str:
    head = ("| strategy | ranks | step time | scaling eff. | all-gather calls | all-gather / params | "
            "reduce-scatter calls | reduce-scatter / params | all-reduce calls | ZeRO-3 trace (invalidated) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        s = r["per_step"]
        ag, rs, ar = (s.get(k, {"calls": 0, "bytes": 0}) for k in ("all_gather", "reduce_scatter", "all_reduce"))
        trace = (f"{r['trace_state']} ({r['trace_invalidations_measured']} in {r['steps']} steps, "
                 f"{r['trace_invalidations_warmup']} in warm-up)" if r["trace_state"] else "-")
        efficiency = f"{r['efficiency']:.0%}" if "efficiency" in r else "-"
        lines.append(f"| {r['strategy']} | {r['world']} | {r['step_s'] * 1e3:.0f} ms | {efficiency} | "
                     f"{ag['calls']:.0f} | {ag['bytes'] / r['param_bytes']:.2f}x | "
                     f"{rs['calls']:.0f} | {rs['bytes'] / r['param_bytes']:.2f}x | {ar['calls']:.0f} | {trace} |")
    return head + "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, default=2, help="ranks of the sharded runs (1 is also run)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--skip-single", action="store_true", help="no 1-rank run (no scaling efficiency)")
    parser.add_argument("--zero3-like", type=float, default=GPU_1B_PARAMS, metavar="PARAMS",
                        help="scale ZeRO-3's element-count defaults as if the model had PARAMS parameters "
                             "(default: the 1B config's; 0 keeps DeepSpeed's defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="STRATEGY:KEY=JSON",
                        help="a TrainingConfig override for one strategy, e.g. zero3:deepspeed_config='{...}' "
                             "(which replaces the --zero3-like settings)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"--world {args.world} needs that many GPUs; {torch.cuda.device_count()} visible")
    rows = []
    for strategy in args.strategies:
        single = None
        for world in [args.world] if args.skip_single else sorted({1, args.world}):
            row = measure(args, strategy, world)
            row["steps"] = args.steps
            single = single or row
            if single["world"] == 1:  # weak scaling: the same batch per rank
                row["efficiency"] = single["step_s"] / row["step_s"]
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    md = table(rows)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sharding_traffic_{args.device}"
    path.with_suffix(".json").write_text(json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"),
                                                     "torch": torch.__version__, "rows": rows}, indent=2))
    path.with_suffix(".md").write_text(f"`{command}` ({args.device}, {time.strftime('%Y-%m-%d')})\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
