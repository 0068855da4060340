"""Training throughput and MFU on one GPU: our trainer against an eager HF-Llama baseline.

For each size (~125M, ~350M, ~1B, sequence 2048, bidirectional masked diffusion), in one run:
  ours:     `DistributedTrainer` (bf16 autocast over fp32 master weights, torch.compile, flash
            attention through `kernels.fused_attention`, the fused LM-head cross-entropy);
  baseline: HF transformers' Llama blocks of the same shape made bidirectional (`is_causal=False`,
            SDPA attention), eager PyTorch, the same objective (mask with probability t, logits
            at masked positions, cross-entropy weighted 1/t), same optimizer and autocast.
Both run without QK-norm (Llama has none), so parameter counts match. MFU = FLOPs per token
(6 * matmul parameters + attention, `ModelConfig.flops_per_token`) * tokens/s over the bf16 matmul
peak measured in the same run (8192^3), and over the datasheet peak for reference.

  python benchmarks/train_throughput.py --device cuda          # the H100 run (125m 350m 1b)
  python benchmarks/train_throughput.py --quick                # CPU smoke run (tiny shape)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pllm import DiffusionTransformer, DistributedTrainer, ModelConfig, TrainingConfig
from pllm.optim import peak_flops

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # shape, micro-batch, sequence length
    "125m": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=2048), 16, 2048),
    "350m": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816), 8, 2048),
    "1b": (dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632), 8, 2048),
    "tiny": (dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128), 4, 64),
}
MASK_ID = 3


def model_config(size: str) -> ModelConfig:
    shape, _, seq = SIZES[size]
    return ModelConfig(**{"vocab_size": 32768, **shape}, max_position_embeddings=max(seq, 64), qk_norm=False,
                       tie_word_embeddings=True, noise_schedule="linear", attention_mode="bidirectional")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 2 * 8192**3 * 20 / (time.perf_counter() - t0)


def batches(cfg: ModelConfig, batch: int, seq: int, device: str):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(4, cfg.vocab_size, (batch, seq), generator=g).to(device)


def timed_steps(step, warmup: int, steps: int, device: str) -> float:
    for _ in range(warmup):
        step()  # compilation and allocator warm-up happen here
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


# -- ours --------------------------------------------------------------------------------------
def run_ours(cfg: ModelConfig, batch: int, seq: int, device: str, args) -> float:
    train = TrainingConfig(batch_size=batch, seq_len=seq, num_train_steps=10**6, warmup_steps=1, use_fsdp=False,
                           mixed_precision="bf16" if device == "cuda" else "no", use_torch_compile=device == "cuda",
                           torch_compile_mode="default", gradient_checkpointing=args.checkpointing,
                           eval_interval=10**9, output_dir="/tmp/train-throughput")
    trainer = DistributedTrainer(DiffusionTransformer(cfg), train, train_dataloader=[None], device=device,
                                 show_progress=False)
    data = batches(cfg, batch, seq, device)

    def step():
        out = trainer.training_step(next(data))
        trainer.strategy.backward(out.loss)
        trainer.strategy.step()

    seconds = timed_steps(step, args.warmup, args.steps, device)
    return args.steps * batch * seq / seconds


# -- eager HF Llama baseline -------------------------------------------------------------------
def hf_llama(cfg: ModelConfig):
    """HF Llama blocks of our shape, bidirectional: (LlamaModel, tied lm_head weight)."""
    from transformers import LlamaConfig, LlamaModel

    llama = LlamaModel(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, attn_implementation="sdpa"))
    for layer in llama.layers:
        layer.self_attn.is_causal = False  # a denoiser attends both ways
    return llama


def hf_loss(llama, input_ids: torch.Tensor) -> torch.Tensor:
    """The masked-diffusion loss (linear schedule) computed the plain way: full logits at masked rows."""
    B, L = input_ids.shape
    t = torch.rand(B, 1, device=input_ids.device).clamp_min(1e-3)
    masked = torch.rand(B, L, device=input_ids.device) < t
    hidden = llama(torch.where(masked, MASK_ID, input_ids)).last_hidden_state
    logits = hidden[masked] @ llama.embed_tokens.weight.t()  # tied LM head
    ce = F.cross_entropy(logits.float(), input_ids[masked], reduction="none")
    return (ce / t.expand(B, L)[masked]).sum() / (B * L)


def run_baseline(cfg: ModelConfig, batch: int, seq: int, device: str, args) -> float:
    llama = hf_llama(cfg).to(device).train()
    optimizer = torch.optim.AdamW(llama.parameters(), lr=3e-4, fused=device == "cuda")
    data = batches(cfg, batch, seq, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = hf_loss(llama, next(data))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, args.warmup, args.steps, device)
    return args.steps * batch * seq / seconds


# -- report ------------------------------------------------------------------------------------
def measure(run, *a) -> tuple[float | None, float | None, str | None]:
    """(tokens/s, peak GiB, error) of one run; an out-of-memory run is recorded, not fatal."""
    device = a[3]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        tokens_per_s, error = run(*a), None
    except torch.OutOfMemoryError:
        tokens_per_s, error = None, "oom"
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return tokens_per_s, memory, error


def table(rows: list[dict]) -> str:
    lines = ["| size | params | batch x seq | ours tok/s | ours MFU | eager HF tok/s | HF MFU | ours / HF |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['batch']} x {r['seq_len']} | "
                     f"{fmt(r['ours_tokens_per_s'], ',.0f')} | {fmt(r['ours_mfu'], '.1%')} | "
                     f"{fmt(r['baseline_tokens_per_s'], ',.0f')} | {fmt(r['baseline_mfu'], '.1%')} | "
                     f"{fmt(r['speedup'], '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=["125m", "350m", "1b"], choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: per size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in our trainer")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: the tiny shape")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = args.device
    if args.quick:
        args.sizes = ["tiny"]
    args.steps = args.steps or (10 if device == "cuda" else 2)
    args.warmup = args.warmup or (3 if device == "cuda" else 1)
    peak = matmul_peak(device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__,
              "measured_bf16_peak_tflops": peak and peak / 1e12,
              "datasheet_bf16_peak_tflops": (peak_flops(torch.device(device)) or 0) / 1e12 or None, "rows": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput_{device}"
    for size in args.sizes:
        cfg = model_config(size)
        _, batch, seq = SIZES[size]
        batch = args.batch or batch
        flops = cfg.flops_per_token(seq)
        ours, ours_mem, ours_err = measure(run_ours, cfg, batch, seq, device, args)
        base, base_mem, base_err = (None, None, "skipped") if args.skip_baseline else measure(
            run_baseline, cfg, batch, seq, device, args)
        mfu = lambda tps: tps * flops / peak if (tps and peak) else None  # noqa: E731
        row = {"size": size, "params": DiffusionTransformer(cfg).num_parameters(), "batch": batch, "seq_len": seq,
               "flops_per_token": flops, "ours_tokens_per_s": ours, "ours_mfu": mfu(ours),
               "ours_mfu_datasheet": ours * flops / report["datasheet_bf16_peak_tflops"] / 1e12
               if (ours and report["datasheet_bf16_peak_tflops"]) else None,
               "baseline_tokens_per_s": base, "baseline_mfu": mfu(base),
               "speedup": ours / base if (ours and base) else None, "ours_peak_mem_gb": ours_mem,
               "baseline_peak_mem_gb": base_mem, "errors": [e for e in (ours_err, base_err) if e]}
        report["rows"].append(row)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{stem}.md").write_text(table(report["rows"]) + "\n")
        print(f"{size}: ours {ours} tok/s (MFU {row['ours_mfu']}), eager HF {base} tok/s, errors {row['errors']}",
              flush=True)
    print(table(report["rows"]))


if __name__ == "__main__":
    main()
