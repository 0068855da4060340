"""FP8 training against bf16 on one GPU: tokens/s and the loss after the same steps, in one run.

The 1B shape of `train_throughput.py` (sequence 2048, bidirectional masked diffusion, torch.compile),
trained by `DistributedTrainer` with mixed_precision "bf16", then "fp8" (tensorwise and rowwise
scaling: `pllm.fp8_training`, torchao Float8Linear projections), from the same initial weights on
the same batches (rows that repeat a random motif: learnable, so the loss falls). Reports tokens/s
of the timed steps, the ratio to bf16 (target >= 1.3x), and the mean loss of the last steps
against bf16's.

  python benchmarks/fp8_training.py --device cuda
  python benchmarks/fp8_training.py --quick --device cpu     # smoke run (tiny shape, emulated float8)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]


def _train_throughput():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def motif_batches(vocab: int, batch: int, seq: int, device: str, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (batch, 16), generator=g).repeat(1, seq // 16).to(device) for _ in range(count)]


def run(tt, size: str, precision: str, recipe: str, args) -> dict:
    cfg = tt.model_config(size)
    _, _, _, _, _, _, default_batch, seq = tt.SIZES[size]
    batch = args.batch or default_batch
    cuda = args.device == "cuda"
    train = TrainingConfig(batch_size=batch, seq_len=seq, learning_rate=3e-4, num_train_steps=10**6, warmup_steps=10,
                           eval_interval=10**9, use_fsdp=False, use_cuda_graphs=False, mixed_precision=precision,
                           fp8_recipe=recipe, use_torch_compile=cuda, torch_compile_mode="default",
                           gradient_checkpointing=False, output_dir=tempfile.mkdtemp(prefix="fp8-bench-"))
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    data = motif_batches(cfg.vocab_size, batch, seq, args.device, 8)
    trainer = DistributedTrainer(model, train, train_dataloader=data, show_progress=False, device=args.device)
    batches = itertools.cycle(data)
    losses = []

    def step():
        out = trainer.training_step(next(batches))
        trainer.strategy.backward(out.loss)
        trainer.strategy.step()
        losses.append(out.loss.detach())

    seconds = tt.timed(step, args.warmup, args.steps, args.device)
    tail = [float(x) for x in losses[-args.loss_steps:]]
    row = {"precision": precision if precision == "bf16" else f"fp8 ({recipe})", "tokens_per_s": args.steps * batch * seq / seconds,
           "steps": len(losses), "loss_last": statistics.fmean(tail), "loss_first": float(losses[0]),
           "float8_layers": sum(type(m).__name__ == "Float8Linear" for m in trainer.strategy.module.modules())}
    return row  # (the trainer goes with this frame; main empties the CUDA cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (torch.compile)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--loss-steps", type=int, default=5, help="the loss reported: the mean of the last N steps")
    p.add_argument("--recipes", nargs="+", default=["tensorwise", "rowwise"])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="smoke run: the tiny shape, few steps")
    args = p.parse_args()
    if args.quick:
        args.size, args.warmup, args.steps, args.loss_steps = "tiny", 1, 3, 2
    tt = _train_throughput()
    rows = [run(tt, args.size, "bf16", "tensorwise", args)]
    print(f"bf16: {rows[0]['tokens_per_s']:,.0f} tokens/s, loss {rows[0]['loss_last']:.4f}", flush=True)
    for recipe in args.recipes:
        if args.device == "cuda":
            torch.cuda.empty_cache()
        row = run(tt, args.size, "fp8", recipe, args)
        row.update(over_bf16=row["tokens_per_s"] / rows[0]["tokens_per_s"], loss_delta=row["loss_last"] - rows[0]["loss_last"])
        rows.append(row)
        print(f"{row['precision']}: {row['tokens_per_s']:,.0f} tokens/s ({row['over_bf16']:.2f}x), loss {row['loss_last']:.4f} "
              f"({row['loss_delta']:+.4f})", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__, "size": args.size,
              "command": "python benchmarks/fp8_training.py " + " ".join(sys.argv[1:]), "rows": rows}
    lines = ["| precision | tokens/s | / bf16 | loss (last steps) | delta | float8 layers |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['tokens_per_s']:,.0f} | {r.get('over_bf16', 1.0):.2f} | {r['loss_last']:.4f} | "
                     f"{r.get('loss_delta', 0.0):+.4f} | {r['float8_layers']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fp8_training_{args.size}_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
