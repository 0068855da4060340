"""Training throughput and MFU on one GPU: our trainer against an eager HF-Llama baseline.

Per size (~125M, ~350M, ~1B; sequence 2048; bidirectional masked diffusion), in one run:
  ours:     `DistributedTrainer` (bf16 autocast over fp32 weights, torch.compile, the model's own
            attention kernels and LM-head loss) via `training_step` / `strategy.backward` / `.step`;
  baseline: `transformers.LlamaForCausalLM` of the same shape, SDPA, eager, made bidirectional
            (`config.is_causal = False`: no causal mask, SDPA gets is_causal=False), with the same
            objective (mask with probability t, logits at masked rows only, CE weighted 1/t, / B*L),
            AdamW (fused on CUDA), autocast and gradient clipping.
Both run without QK-norm (Llama has none; ours defaults to qk_norm=True): like-for-like architectures
with equal parameter counts. MFU = `ModelConfig.flops_per_token(seq)` * tokens/s over the bf16 matmul
peak measured at start (8192^3), and over the datasheet peak. Needs `transformers` (the dev extra).

  python benchmarks/train_throughput.py                        # GPU: 125m 350m 1b
  python benchmarks/train_throughput.py --quick --device cpu   # CPU smoke run (tiny shape)
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pllm import DiffusionTransformer, DistributedTrainer, ModelConfig, TrainingConfig
from pllm.optim import param_groups, peak_flops
from pllm.kernels.options import KernelOptions

log = logging.getLogger("train_throughput")
ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab; default micro-batch, sequence length
    "125m": (768, 12, 12, 12, 2048, 32768, 16, 2048),
    "350m": (1024, 24, 16, 16, 2816, 32768, 8, 2048),
    "1b": (2048, 22, 32, 4, 5632, 32768, 8, 2048),  # = pllm/configs/gpu-1b.yaml
    "tiny": (64, 2, 4, 2, 128, 512, 4, 64),  # CPU smoke run
}
# --ab: our step again with one part switched off, in the same run: (what runs instead, the
# KernelOptions fields that switch it off; cudnn is PyTorch's own SDPA backend switch)
AB = {"cudnn": ("SDPA's cuDNN backend off (FlashAttention-2)", {}),
      "silu-mul": ("SwiGLU compiled by Inductor (no Triton op)", {"silu_mul": False}),
      "coordinate-descent": ("Inductor's default kernel configs (no coordinate descent)",
                             {"coordinate_descent_tuning": False}),
      "rotate-qkv": ("split, QK-norm and rotary compiled by Inductor (no Triton op)", {"rotate_qkv": False}),
      "add-rms-norm": ("residual add + RMSNorm compiled by Inductor (no Triton op)", {"add_rms_norm": False})}
AB_KEYS = {name: "no_" + name.replace("-", "_") for name in AB}  # JSON field names
MASK_ID, LR, WEIGHT_DECAY, BETAS = 3, 3e-4, 0.1, (0.9, 0.95)  # the TrainingConfig defaults ours runs with


def model_config(size: str) -> ModelConfig:
    d, layers, heads, kv, ffn, vocab, _, seq = SIZES[size]
    return ModelConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=max(seq, 2048),
                       qk_norm=False, tie_word_embeddings=True, noise_schedule="linear", attention_mode="bidirectional")


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def matmul_peak(device: str, n: int = 8192, iters: int = 20) -> float | None:
    """Measured dense bf16 matmul FLOP/s (the MFU denominator actually reachable on this GPU)."""
    if not is_cuda(device):
        return None
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3)


def random_batches(vocab: int, batch: int, seq: int, device: str, count: int = 4) -> list[torch.Tensor]:
    # A few batches made on the device up front: no host-to-device copy (and its sync) inside the timed loop.
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randint(4, vocab, (batch, seq), generator=g, device=device) for _ in range(count)]


def timed(step, warmup: int, steps: int, device: str) -> float:
    sync = torch.cuda.synchronize if is_cuda(device) else (lambda: None)
    for _ in range(warmup):
        step()  # torch.compile and the allocator warm up here
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


# -- ours --------------------------------------------------------------------------------------
def run_ours(cfg: ModelConfig, batch: int, seq: int, device: str, args, kernels: KernelOptions | None = None) -> dict:
    train = TrainingConfig(batch_size=batch, seq_len=seq, learning_rate=LR, weight_decay=WEIGHT_DECAY,
                           adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=1.0, num_train_steps=10**6,
                           warmup_steps=1, eval_interval=10**9, use_fsdp=False, use_cuda_graphs=False,
                           mixed_precision="bf16" if is_cuda(device) else "no", use_torch_compile=is_cuda(device),
                           torch_compile_mode="default", gradient_checkpointing=args.checkpointing,
                           output_dir=tempfile.mkdtemp(prefix="train-throughput-"), kernels=kernels or KernelOptions())
    data = random_batches(cfg.vocab_size, batch, seq, device)
    model = DiffusionTransformer(cfg)
    trainer = DistributedTrainer(model, train, train_dataloader=data, show_progress=False, device=device)
    batches = itertools.cycle(data)

    def step():
        out = trainer.training_step(next(batches))
        trainer.strategy.backward(out.loss)
        trainer.strategy.step()

    seconds = timed(step, args.warmup, args.steps, device)
    if args.profile and is_cuda(device):
        profile_table(step, Path(args.out) / f"train_profile_{cfg.num_hidden_layers}l_{cfg.hidden_size}d.txt")
    return {"tokens_per_s": args.steps * batch * seq / seconds, "params": model.num_parameters()}


def profile_table(step, path: Path, steps: int = 2) -> None:
    """Where a training step's GPU time goes: the kernels by total CUDA time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=120)
    # Every kernel by its own GPU time: the long tail of small elementwise kernels adds up.
    kernels = averages.table(sort_by="self_cuda_time_total", row_limit=120, max_name_column_width=120)
    path.write_text(f"{steps} steps\n{table}\n\nby self CUDA time\n{kernels}\n")
    log.info("profile written to %s", path)


# -- eager HF Llama baseline -------------------------------------------------------------------
def hf_llama(cfg: ModelConfig):
    """`LlamaForCausalLM` of our shape (tied LM head), bidirectional, SDPA attention, no cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True, use_cache=False)
    # transformers 5.x: config.is_causal=False makes the model build a bidirectional mask (None without
    # padding, so SDPA can still pick flash attention) and pass is_causal=False to every attention call.
    config.is_causal = False
    llama = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    for layer in llama.model.layers:
        layer.self_attn.is_causal = False  # what SDPA reads when no is_causal kwarg comes (older versions)
    return llama


def hf_loss(llama, input_ids: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Masked-diffusion NELBO (linear schedule) the plain way: LM head on the masked rows, 1/t weights."""
    B, L = input_ids.shape
    t = eps + (1 - eps) * torch.rand(B, 1, device=input_ids.device)
    masked = torch.rand(B, L, device=input_ids.device) < t
    hidden = llama.model(torch.where(masked, MASK_ID, input_ids), use_cache=False).last_hidden_state
    logits = llama.lm_head(hidden[masked])
    ce = F.cross_entropy(logits.float(), input_ids[masked], reduction="none")
    return (ce / t.expand(B, L)[masked]).sum() / (B * L)


def run_baseline(cfg: ModelConfig, batch: int, seq: int, device: str, args) -> dict:
    llama = hf_llama(cfg).to(device).train()  # fp32 master weights
    optimizer = torch.optim.AdamW(param_groups(llama, WEIGHT_DECAY), lr=LR, betas=BETAS,
                                  fused=True if is_cuda(device) else None)
    batches = itertools.cycle(random_batches(cfg.vocab_size, batch, seq, device))

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=is_cuda(device)):
            loss = hf_loss(llama, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, device)
    return {"tokens_per_s": args.steps * batch * seq / seconds, "params": sum(p.numel() for p in llama.parameters())}


# -- report ------------------------------------------------------------------------------------
def measure(run, cfg, batch, seq, device, args, *options) -> dict:
    """One run's result plus peak memory; out-of-memory is recorded as "oom" instead of ending the benchmark."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
    try:
        result = run(cfg, batch, seq, device, args, *options)
    except RuntimeError as e:  # torch.OutOfMemoryError, or one wrapped by torch.compile
        if "out of memory" not in str(e).lower():
            raise
        result = {"tokens_per_s": None, "error": "oom"}
    if is_cuda(device):
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    torch._dynamo.reset()  # compiled graphs keep the model alive; the next size starts clean
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    return result


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = "size | params | batch x seq | ours tok/s | ours MFU | eager HF tok/s | HF MFU | ours / HF | peak GB ours / HF"
    lines = [f"| {header} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours, base = (fmt(r[f"{w}_tokens_per_s"], ",.0f", r.get(f"{w}_error", "n/a")) for w in ("ours", "baseline"))
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq_len']} | {ours} | "
                     f"{fmt(r['ours_mfu'], '.1%')} | {base} | {fmt(r['baseline_mfu'], '.1%')} | "
                     f"{fmt(r['speedup'], '.2f')}x | "
                     f"{fmt(r['ours_peak_mem_gb'], '.1f')} / {fmt(r['baseline_peak_mem_gb'], '.1f')} |")
    return "\n".join(lines)


def ab_lines(rows: list[dict]) -> str:
    lines = [f"\n{r['size']}: ours with {AB[name][0]}: {fmt(r[f'ours_{key}_tokens_per_s'], ',.0f')} tok/s "
             f"(MFU {fmt(r[f'ours_{key}_mfu'], '.1%')}); the default is {fmt(r[f'{key}_speedup'], '.3f')}x that\n"
             for r in rows for name, key in AB_KEYS.items() if f"{key}_speedup" in r]
    return "".join(lines)


def provenance(device: str, args) -> dict:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    hf_version = importlib.util.find_spec("transformers") and importlib.metadata.version("transformers")
    return {"device": torch.cuda.get_device_name(device) if is_cuda(device) else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": hf_version, "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join([sys.executable, *sys.argv]),
            "steps": args.steps, "warmup": args.warmup, "checkpointing": args.checkpointing,
            "ours": "DistributedTrainer, " + ("torch.compile default, bf16 autocast" if is_cuda(device) else "eager fp32"),
            "baseline": "transformers LlamaForCausalLM, sdpa, eager, bidirectional", "qk_norm": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["125m", "350m", "1b"], choices=list(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default: per size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in our trainer")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--ab", nargs="+", default=[], choices=list(AB),
                   help="also time ours with one part switched off: " + "; ".join(f"{k}: {v[0]}" for k, v in AB.items()))
    p.add_argument("--attention-ab", action="store_true", help="= --ab cudnn")
    p.add_argument("--quick", action="store_true", help="smoke run: the tiny shape only")
    p.add_argument("--profile", action="store_true", help="GPU: also write a kernel table of our training step")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device, gpu = args.device, is_cuda(args.device)
    if args.quick:
        args.sizes = ["tiny"]
    if args.attention_ab and "cudnn" not in args.ab:
        args.ab.append("cudnn")
    args.steps = args.steps if args.steps is not None else (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)

    peak = matmul_peak(device)
    datasheet = peak_flops(torch.device(device))
    report = {**provenance(device, args), "measured_bf16_peak_tflops": peak and peak / 1e12,
              "datasheet_bf16_peak_tflops": datasheet and datasheet / 1e12, "rows": []}
    log.info("device %s, measured bf16 matmul peak %s TFLOP/s", report["device"],
             f"{peak / 1e12:.0f}" if peak else "n/a")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_throughput_{torch.device(device).type}"
    for size in args.sizes:
        cfg = model_config(size)
        *_, batch, seq = SIZES[size]
        batch, flops = args.batch or batch, cfg.flops_per_token(seq)
        log.info("%s: ours (batch %d x %d, warm-up %d steps incl. compile, %d timed)", size, batch, seq,
                 args.warmup, args.steps)
        ours = measure(run_ours, cfg, batch, seq, device, args)
        ab = {}
        for name in args.ab:
            log.info("%s: ours with %s", size, AB[name][0])
            torch.backends.cuda.enable_cudnn_sdp(name != "cudnn")
            no_profile = argparse.Namespace(**{**vars(args), "profile": False})  # the profile is of the default
            ab[name] = measure(run_ours, cfg, batch, seq, device, no_profile, KernelOptions(**AB[name][1]))
            torch.backends.cuda.enable_cudnn_sdp(True)
        log.info("%s: eager HF baseline", size)
        base = {"tokens_per_s": None, "error": "skipped"} if args.skip_baseline else measure(
            run_baseline, cfg, batch, seq, device, args)
        with torch.device("meta"):  # shapes only: the count without allocating weights (also after an OOM)
            params = DiffusionTransformer(cfg).num_parameters()
        row = {"size": size, "params": params,
               "baseline_params": base.get("params"), "batch": batch, "seq_len": seq, "flops_per_token": flops}
        for who, r in (("ours", ours), ("baseline", base)):
            tps = r["tokens_per_s"]
            row.update({f"{who}_tokens_per_s": tps, f"{who}_peak_mem_gb": r.get("peak_mem_gb"),
                        f"{who}_mfu": tps * flops / peak if (tps and peak) else None,
                        f"{who}_mfu_datasheet": tps * flops / datasheet if (tps and datasheet) else None})
            if "error" in r:
                row[f"{who}_error"] = r["error"]
        o, b = ours["tokens_per_s"], base["tokens_per_s"]
        row["speedup"] = o / b if (o and b) else None
        for name, result in ab.items():
            key, f = AB_KEYS[name], result["tokens_per_s"]
            row.update({f"ours_{key}_tokens_per_s": f, f"ours_{key}_mfu": f and peak and f * flops / peak,
                        f"ours_{key}_peak_mem_gb": result.get("peak_mem_gb"), f"{key}_speedup": o / f if (o and f) else None})
        report["rows"].append(row)
        # written after every size: a GPU job cut off by its time limit keeps the sizes it finished
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{stem}.md").write_text(
            f"Training throughput, {report['device']} (measured bf16 peak {fmt(peak and peak / 1e12, '.0f')} "
            f"TFLOP/s), torch {report['torch']}, commit {report['commit'][:10]}, {report['date']}\n\n"
            + table(report["rows"]) + "\n" + ab_lines(report["rows"]))
        log.info("%s: ours %s tok/s, eager HF %s tok/s", size, o and f"{o:,.0f}", b and f"{b:,.0f}")
    print(table(report["rows"]))


if __name__ == "__main__":
    main()
