"""Fine-tuning on one GPU: SFT throughput and memory (full and LoRA, beside the pretraining step of the
same model), an 8B-shape checkpoint loaded shard by shard under FSDP2 and fine-tuned with LoRA, and
what SFT buys: held-out answers of the built-in instruction set before and after fine-tuning.

Parts (`--parts`, default all):
  throughput  the 1B config (pllm/configs/gpu-1b.yaml's model), random weights, rows of seq_len tokens
              (prompt 64-256 tokens, the rest response): tokens/s and peak GPU memory of the
              pretraining step (baseline), full SFT and LoRA SFT (rank 16 on every projection)
  load8b      an SDAR-8B-shape checkpoint (Qwen3-8B layout, random bf16 weights) written here; in a
              process of its own: FSDP2 from the meta device, each rank reading only its rows
              (`pllm.sharded_load`), peak host memory against the float32 model's size; then LoRA SFT
              steps with activation checkpointing (and, with --offload, FSDP2 CPU offload)
  quality     a 125M model pretrained for --pretrain-minutes on the built-in corpus, then fine-tuned
              (task sft, the built-in instruction set) for --sft-minutes; the held-out questions
              answered greedily by the engine before and after (`pllm.instructions.answer_accuracy`)

  python benchmarks/sft.py --device cuda                   # the GPU run
  python benchmarks/sft.py --quick                         # CPU smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig  # noqa: E402
from pllm.config import LoraSettings, ModelConfig  # noqa: E402
from pllm.config_files import load_job_config  # noqa: E402


def sft_rows(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches-to-be: random tokens, a prompt of 64-256 tokens (at most a quarter of the row), the rest response."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = int(torch.randint(min(64, seq_len // 8), max(min(256, seq_len // 4), 2), (1,), generator=g))
        ids = torch.randint(0, vocab - 8, (seq_len,), generator=g)
        rows.append({"input_ids": ids, "response_mask": torch.arange(seq_len) >= prompt,
                     "segment_ids": torch.zeros(seq_len, dtype=torch.long)})
    return rows


def batches(rows: list[dict], batch: int, sft: bool) -> list:
    out = []
    for i in range(0, len(rows) - batch + 1, batch):
        group = {k: torch.stack([r[k] for r in rows[i:i + batch]]) for k in rows[0]}
        out.append(group if sft else group["input_ids"])
    return out


def timed_training(model_cfg: ModelConfig, training: TrainingConfig, data: list, device: str, warmup: int,
                   steps: int) -> dict:
    torch.manual_seed(0)
    model = DiffusionTransformer(model_cfg)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = DistributedTrainer(model, training.replace(num_train_steps=warmup), model_cfg, data, device=device,
                                 show_progress=False)
    trainer.train()  # warm-up: allocation, autotuning
    sync(device)
    t0 = time.perf_counter()
    trainer.cfg = training.replace(num_train_steps=warmup + steps)
    trainer.train()
    sync(device)
    elapsed = time.perf_counter() - t0
    tokens = steps * training.batch_size * training.seq_len
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out = {"tokens_per_s": tokens / elapsed, "step_ms": 1e3 * elapsed / steps, "trainable_params": trainable,
           "loss": trainer.history[-1].get("loss")}
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def part_throughput(args) -> dict:
    job = load_job_config(ROOT / "pllm/configs/gpu-1b.yaml")
    model_cfg = job.model.replace(use_flash_attention=False) if args.quick else job.model
    seq_len, batch = (64, 2) if args.quick else (args.seq_len, args.batch)
    if args.quick:
        model_cfg = model_cfg.replace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=512)
    training = TrainingConfig(batch_size=batch, seq_len=seq_len, learning_rate=1e-4, warmup_steps=1, log_interval=1,
                              eval_interval=10**6, use_fsdp=False, use_torch_compile=False,
                              gradient_checkpointing=True, mixed_precision="bf16", output_dir="/tmp/pllm-sft-bench")
    n = batch * (args.warmup + args.steps)
    rows = sft_rows(n, seq_len, model_cfg.vocab_size)
    results = {"model": "gpu-1b.yaml" if not args.quick else "tiny", "seq_len": seq_len, "batch": batch,
               "torch_compile": False, "gradient_checkpointing": True}
    cases = {"pretrain_step": (training, batches(rows, batch, sft=False)),
             "full_sft": (training, batches(rows, batch, sft=True)),
             "lora_sft": (training.replace(lora=LoraSettings(rank=16)), batches(rows, batch, sft=True))}
    for name, (cfg, data) in cases.items():
        results[name] = timed_training(model_cfg, cfg, data, args.device, args.warmup, args.steps)
        print(name, results[name], flush=True)
    base = results["pretrain_step"]["tokens_per_s"]
    for name in ("full_sft", "lora_sft"):
        results[name]["vs_pretrain_step"] = results[name]["tokens_per_s"] / base
    return results


# -- 8B sharded load ------------------------------------------------------------------------------
def part_load8b(args, out: Path) -> dict:
    from imported_models import write_checkpoint

    folder = Path(args.scratch) / "sdar8b"
    if not (folder / "model.safetensors.index.json").exists():
        print("writing the 8B-shape checkpoint...", flush=True)
        write_checkpoint("sdar8b", folder, args.quick, args.device)
    runs = {}
    for offload in ([False, True] if args.offload else [False]):
        name = "lora_offload" if offload else "lora"
        result = out.with_name(out.name + f"_{name}.json")
        cmd = [sys.executable, __file__, "--child-load8b", str(folder), "--child-out", str(result),
               "--device", args.device, "--seq-len", str(args.seq_len)] + (["--offload"] if offload else []) + (
                   ["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        print(proc.stdout[-2000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
        runs[name] = json.loads(result.read_text()) if result.exists() else {"error": proc.stderr[-2000:]}
    return runs


def child_load8b(args) -> None:
    """One process, one rank: FSDP2 over the meta model, each tensor's rows read from the files."""
    import torch.distributed as dist

    from pllm.hf import plan_import
    from pllm.pipelines.job_stages import initial_model

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    folder = Path(args.child_load8b)
    cfg = plan_import(folder).config
    seq_len = 64 if args.quick else args.seq_len
    training = TrainingConfig(batch_size=1, seq_len=seq_len, learning_rate=1e-4, warmup_steps=1, log_interval=1,
                              eval_interval=10**6, use_fsdp=True, use_torch_compile=False, gradient_checkpointing=True,
                              mixed_precision="bf16", lora=LoraSettings(rank=16), output_dir="/tmp/pllm-sft-bench-8b",
                              **({"fsdp_cpu_offload": True} if args.offload else {}))
    rss0 = peak_rss_gb()
    model = initial_model(cfg, folder, seed=0, on_meta=True)
    data = batches(sft_rows(args.warmup + args.steps, seq_len, cfg.vocab_size), 1, sft=True)
    trainer = DistributedTrainer(model, training.replace(num_train_steps=args.warmup), cfg, data, device=args.device,
                                 show_progress=False)
    anon_before = AnonymousMemoryPeak()._read()
    t0 = time.perf_counter()
    with AnonymousMemoryPeak() as anon:
        trainer.strategy.load_shards(folder)
        sync(args.device)
    load_s = time.perf_counter() - t0
    base_params = sum(p.numel() for n, p in trainer.strategy.module.named_parameters() if "lora_" not in n)
    report = {"checkpoint_params_b": base_params / 1e9, "fp32_model_gb": 4 * base_params / 1e9,
              "bf16_files_gb": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9,
              "load_s": load_s, "peak_host_rss_gb_before_load": rss0, "peak_host_rss_gb_after_load": peak_rss_gb(),
              "anon_memory_gb_before_load": anon_before, "peak_anon_memory_gb_during_load": anon.peak_gb,
              "offload": args.offload, "seq_len": seq_len}
    if args.device == "cuda":
        report["gpu_memory_after_load_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    sync(args.device)
    t0 = time.perf_counter()
    trainer.cfg = training.replace(num_train_steps=args.warmup + args.steps)
    trainer.train()
    sync(args.device)
    elapsed = time.perf_counter() - t0
    report |= {"lora_sft_tokens_per_s": args.steps * seq_len / elapsed, "step_s": elapsed / args.steps,
               "peak_host_rss_gb": peak_rss_gb(), "loss": trainer.history[-1].get("loss"),
               "trainable_params_m": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6}
    if args.device == "cuda":
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.child_out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()


def peak_rss_gb() -> float:
    """Peak resident memory, including the checkpoint files' pages mapped while they are read."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB on Linux


class AnonymousMemoryPeak:
    """Peak anonymous resident memory (RssAnon: what the process allocated, not file pages it has
    mapped), sampled every few milliseconds in a thread while the block runs."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_gb, self._stop = interval, 0.0, None

    def _read(self) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
        return 0.0

    def __enter__(self):
        import threading

        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak_gb = max(self.peak_gb, self._read())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_gb = max(self.peak_gb, self._read())


# -- before / after SFT ---------------------------------------------------------------------------
def part_quality(args) -> dict:
    from pllm.checkpoint import load_model, load_tokenizer
    from pllm.instructions import answer_accuracy, instruction_dataset
    from pllm.pipelines.in_process_job import run_in_process_job

    scratch = Path(args.scratch)
    config = "tiny" if args.quick else ROOT / "pllm/configs/gpu-125m.yaml"
    common = [f"training.max_train_minutes={args.pretrain_minutes}", "training.eval_interval=500",
              "training.save_interval=null"]
    pretrain = load_job_config(config, common + [f"training.output_dir={scratch / 'pretrain'}",
                                                 "training.use_fsdp=false", "training.num_train_steps=100000",
                                                 "data.tokenizer_sample_mb=16"]
                               + (["training.num_train_steps=20"] if args.quick else []))
    t0 = time.perf_counter()
    base = run_in_process_job(pretrain, show_progress=False)
    pretrain_s = time.perf_counter() - t0
    sft = load_job_config(config, [f"training.max_train_minutes={args.sft_minutes}", "training.eval_interval=200",
                                   "training.save_interval=null", f"training.output_dir={scratch / 'sft'}",
                                   "training.use_fsdp=false", "training.num_train_steps=100000",
                                   "training.learning_rate=2e-4", "training.warmup_steps=50",
                                   "training.batch_size=64", "training.use_torch_compile=false",
                                   f"training.seq_len={128 if not args.quick else 64}", "task=sft",
                                   f"model.init_from={base.model_dir}", "data.sft_packing=true"]
                          + (["training.num_train_steps=20"] if args.quick else []))
    t0 = time.perf_counter()
    tuned = run_in_process_job(sft, show_progress=False)
    sft_s = time.perf_counter() - t0
    _, held_out = instruction_dataset()
    if args.quick:
        held_out = held_out[:8]
    tokenizer = load_tokenizer(base.model_dir)
    report = {"model": "tiny" if args.quick else "125M", "pretrain_minutes": args.pretrain_minutes, "sft_minutes": args.sft_minutes, "pretrain_s": pretrain_s,
              "sft_s": sft_s, "pretrain_steps": base.metrics["step"], "sft_steps": tuned.metrics["step"],
              "val_sft_loss": tuned.metrics.get("val_sft_loss"), "held_out": len(held_out)}
    for name, folder in (("before", base.model_dir), ("after", tuned.model_dir)):
        model = load_model(folder, args.device)
        report[name] = answer_accuracy(model, tokenizer, held_out)
        print(name, report[name], flush=True)
        del model
    return report


def table(report: dict) -> str:
    lines = [f"# SFT benchmark ({report['device_name']}, {report['date']})", ""]
    if "throughput" in report:
        t = report["throughput"]
        lines += [f"1B config, batch {t['batch']} x {t['seq_len']}, bf16, activation checkpointing, eager:", "",
                  "| step | tokens/s | vs pretrain step | peak GiB | trainable |", "|---|---:|---:|---:|---:|"]
        for name in ("pretrain_step", "full_sft", "lora_sft"):
            r = t[name]
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r.get('vs_pretrain_step', 1.0):.2f}x | "
                         f"{r.get('peak_memory_gib', float('nan')):.1f} | {r['trainable_params'] / 1e6:,.1f}M |")
        lines.append("")
    for name, r in report.get("load8b", {}).items():
        if "error" in r:
            lines.append(f"8B {name}: failed: {r['error'][-300:]}")
            continue
        lines.append(f"8B-shape ({r['checkpoint_params_b']:.1f}B) FSDP2 sharded load, {name}: {r['load_s']:.1f} s, peak "
                     f"allocated host memory {r['peak_anon_memory_gb_during_load']:.1f} GB (before the load "
                     f"{r['anon_memory_gb_before_load']:.1f} GB), peak RSS with the files' mapped pages "
                     f"{r['peak_host_rss_gb_after_load']:.1f} GB (float32 model {r['fp32_model_gb']:.1f} GB, bf16 files "
                     f"{r['bf16_files_gb']:.1f} GB); LoRA SFT {r['lora_sft_tokens_per_s']:,.0f} tokens/s at seq "
                     f"{r['seq_len']}, peak GPU {r.get('peak_gpu_memory_gib', float('nan')):.1f} GiB")
    if "quality" in report:
        q = report["quality"]
        lines += ["", f"Held-out instruction set ({q['held_out']} questions), {q.get('model', '125M')} model pretrained "
                  f"{q['pretrain_minutes']} min then SFT {q['sft_minutes']} min:", "",
                  "| | exact match | form | arithmetic exact | returns exact |", "|---|---:|---:|---:|---:|"]
        for name in ("before", "after"):
            r = q[name]
            lines.append(f"| {name} | {r['exact_match']:.3f} | {r['form_match']:.3f} | "
                         f"{r.get('arithmetic_exact_match', 0):.3f} | {r.get('returns_exact_match', 0):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="throughput,load8b,quality")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--offload", action="store_true", help="load8b: also with FSDP2 CPU offload")
    parser.add_argument("--pretrain-minutes", type=float, default=4.0)
    parser.add_argument("--sft-minutes", type=float, default=3.0)
    parser.add_argument("--scratch", default="/tmp/pllm-sft-bench")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sft_cuda"))
    parser.add_argument("--child-load8b")
    parser.add_argument("--child-out")
    args = parser.parse_args()
    if args.child_load8b:
        child_load8b(args)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else
              platform.processor() or "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": "python benchmarks/sft.py " + " ".join(sys.argv[1:])}
    parts = args.parts.split(",")
    if "throughput" in parts:
        report["throughput"] = part_throughput(args)
    if "load8b" in parts:
        report["load8b"] = part_load8b(args, out)
    if "quality" in parts:
        report["quality"] = part_quality(args)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
