"""Generation speed of the engine on a ~1.1B block-diffusion model, against its floors and HF `generate`.

In one run, on one GPU:
  1. floors: the measured HBM bandwidth (a large copy) and bf16 matmul peak (8192^3) of this GPU;
  2. per-step latency of our engine (block diffusion, block 32, exact block cache) at batch 1 and 16,
     with fixed-shape steps replayed from CUDA graphs and, as a baseline, the eager packed path;
     each against the step's floor max(bytes / bandwidth, FLOPs / peak), where bytes are the bf16
     weights of every matmul plus the visible KV cache and FLOPs those of the step's window;
  3. tokens per forward (TPF) of threshold decoding, measured on a small block-diffusion model
     trained here by our trainer (random weights are never confident, so they decode 1 token/step);
  4. end-to-end tokens/s: measured on the 1.1B model with threshold decoding (random weights: TPF 1);
     projected with the trained model's TPF (step cost does not depend on the weights); and measured
     at that TPF, with static decoding committing ceil(block / TPF) steps' worth per block (a fixed
     count per step, so no more tokens per forward than the trained model commits);
  5. HF transformers `generate` (greedy, KV cache, eager) on a Llama of the same shape, batch 1 and 16.

  python benchmarks/generation_speed.py --device cuda                 # the H100 run
  python benchmarks/generation_speed.py --quick                       # CPU smoke run (tiny shapes)
  python benchmarks/generation_speed.py --tpf-from RUN.json           # TPF of an earlier --tpf-only run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pllm import DiffusionTransformer, EngineConfig, GenerationConfig, ModelConfig
from pllm.engine import Engine
from pllm.kernels.options import KernelOptions

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1.1b": dict(vocab_size=32768, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=512),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _load_decoding_benchmark():
    spec = importlib.util.spec_from_file_location("decoding_benchmark", ROOT / "benchmarks" / "decoding.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# -- floors ------------------------------------------------------------------------------------
def measured_bandwidth(device: str) -> float | None:
    """Bytes/s of a 2 GiB device-to-device copy (read + write)."""
    if device != "cuda":
        return None
    a = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * 20 / (time.perf_counter() - t0)


def measured_matmul_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    sync(device)
    return 2 * n**3 * 20 / (time.perf_counter() - t0)


def step_window(cfg: ModelConfig) -> int:
    """Positions a row of the exact block cache's step computes: the current block (with shifted
    logits, and the position before it); one token for autoregressive models. (Rows that
    finalize a finished block, one per block per sequence, come on top.)"""
    return 1 if cfg.block_size == 1 and cfg.logits_shift else cfg.block_size + int(cfg.logits_shift)


def step_floor(cfg: ModelConfig, batch: int, context: int, bandwidth: float, peak: float,
               window: int | None = None) -> dict:
    """The least time a step of `batch` sequences can take: every matmul weight read once in bf16,
    each sequence's visible keys/values read once, the window's FLOPs at the matmul peak (window:
    positions a row computes; default `step_window`)."""
    window = window or step_window(cfg)
    kv_bytes = batch * cfg.num_hidden_layers * 2 * cfg.kv_heads * cfg.attention_head_size * (context + window) * 2
    weight_bytes = cfg.num_matmul_params() * 2
    flops = batch * window * (2 * cfg.num_matmul_params()
                              + 4 * cfg.num_hidden_layers * cfg.hidden_size * (context + window))
    memory_s, compute_s = (weight_bytes + kv_bytes) / bandwidth, flops / peak
    return {"memory_floor_ms": memory_s * 1e3, "compute_floor_ms": compute_s * 1e3,
            "floor_ms": max(memory_s, compute_s) * 1e3}


# -- our engine --------------------------------------------------------------------------------
def time_engine(model, prompts, cfg: GenerationConfig, static_step: bool, device: str, pipeline: bool = True,
                kernels: KernelOptions | None = None, max_model_len: int | None = None) -> dict:
    """Run the prompts to completion in one engine; per-step times (prefill steps excluded).
    max_model_len: the engine's slots' length (default the model's context)."""
    engine = Engine(model, EngineConfig(max_num_seqs=max(len(prompts), 1), max_batched_tokens=1 << 20,
                                        pipeline_steps=pipeline, kernels=kernels or KernelOptions(),
                                        max_model_len=max_model_len),
                    static_step=static_step)
    # Warm-up: the same requests once, so the timed run meets no shape that torch.compile or a graph
    # capture has not seen (a server pays that once at start; a short warm-up left it in the first step).
    engine.generate(prompts, cfg)
    static = engine.runner.static
    ahead_before = (static.num_ahead, static.num_ahead_used) if static else (0, 0)
    ids = [engine.add_request(p, cfg) for p in prompts]
    steps, tokens = [], 0
    sync(device)
    start = time.perf_counter()
    while engine.has_work():
        # No device sync here: each step waits for its own commits, and with pipelining the next
        # step is already running on the device when it returns (a sync would serialize them).
        t0 = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - t0)
        tokens += sum(len(o.new_token_ids) for o in outs)
    sync(device)
    total = time.perf_counter() - start
    assert engine.stats["finished"] == 2 * len(ids)  # and the warm-up's
    body = steps[1:] or steps  # the first step also prefills every prompt
    return {"step_ms_median": statistics.median(body) * 1e3, "step_ms_mean": statistics.fmean(body) * 1e3,
            "first_step_ms": steps[0] * 1e3,
            "steps": len(steps), "tokens": tokens, "tokens_per_s": tokens / total, "seconds": total,
            "tpf": tokens / len(prompts) / max(len(steps), 1), "pipelined": engine.runner.pipeline,
            "steps_launched_ahead": static.num_ahead - ahead_before[0] if static else 0,
            "steps_launched_ahead_used": static.num_ahead_used - ahead_before[1] if static else 0}


def trained_tpf(args, device: str) -> dict:
    """Tokens per forward of threshold decoding on a small block-diffusion model trained here, with
    the answers' agreement with the held-out code (so a higher TPF cannot hide worse answers)."""
    from pllm.config import DataConfig
    from pllm.corpus_files import corpus_files, read_documents, split_files
    from pllm.data import cache_dir, make_dataloader, prepare_corpus
    from pllm.decoding import DecodeRules, decode_with_rules

    t_start = time.perf_counter()
    bench = _load_decoding_benchmark()
    size = "tiny" if args.quick else args.tpf_size
    corpus = prepare_corpus(DataConfig(), bench.SIZES[size]["model"]["vocab_size"], cache_dir())
    _, val_files = split_files(corpus_files(), DataConfig().validation_fraction)
    sources = [doc for f in val_files for doc in read_documents(f)]
    prompts = bench.function_prompts(sources, corpus.tokenizer, args.tpf_prompts, context_tokens=96,
                                     continuation_tokens=args.gen)
    eos = corpus.tokenizer.eos_token_id

    def tpf(model, teacher: list | None = None) -> dict:
        """TPF and answer quality per threshold; teacher: answers to compare with, position by position."""
        out, runner = {}, fixed_shape_steps(model, len(prompts))
        for threshold in args.thresholds:
            cfg = GenerationConfig(max_new_tokens=args.gen, num_refinement_steps=args.gen, temperature=0.0,
                                   strategy="threshold", confidence_threshold=threshold, use_adaptive_steps=False)
            result = decode_with_rules(model, [torch.tensor(p.prompt) for p in prompts],
                                       [DecodeRules.from_config(cfg)] * len(prompts), runner=runner)
            out[f"tpf_threshold_{threshold}"] = args.gen / statistics.fmean(result.nfe_per_sequence)
            # Quality: the share of the reference's tokens matched position by position, and how much
            # of the answers lies after an EOS (tokens there are easy and would inflate the TPF).
            answers = [a.cpu() for a in result.tokens]
            hits = sum(int((a[:len(p.reference)] == torch.tensor(p.reference)).sum()) for a, p in zip(answers, prompts))
            out[f"reference_match_{threshold}"] = hits / sum(len(p.reference) for p in prompts)
            after_eos = [len(a) - (a == eos).nonzero()[0, 0].item() - 1 if (a == eos).any() else 0 for a in answers]
            out[f"after_eos_share_{threshold}"] = sum(after_eos) / (args.gen * len(prompts))
            if teacher is not None:
                out[f"teacher_match_{threshold}"] = float(torch.stack(answers).eq(torch.stack(teacher)).float().mean())
        return out

    curve, t0 = [], time.perf_counter()

    def measure(trainer) -> None:  # TPF as training goes on (the decoding time is not training time)
        nonlocal t0
        trainer.model.eval()
        seconds = time.perf_counter() - t0
        point = {"step": trainer.step, "train_seconds": (curve[-1]["train_seconds"] if curve else 0) + seconds,
                 "loss": next((h["loss"] for h in reversed(trainer.history) if "loss" in h), None),
                 **tpf(trainer.model)}
        curve.append(point)
        print(f"TPF while training: {point}", flush=True)
        trainer.model.train()
        t0 = time.perf_counter()

    # coordinate descent's kernel search would eat a short run's minutes
    model = bench.train_models(size, device, args.train_seconds, 0, Path(args.work_dir) / size, corpus,
                               names=("block32",), on_save=measure if args.tpf_every else None,
                               save_interval=args.tpf_every, steps=args.tpf_steps, validate=True,
                               kernels=KernelOptions(coordinate_descent_tuning=False))["block32"]
    out = {"size": size, "model_parameters": model.num_parameters(), "train_seconds": args.train_seconds,
           "training": getattr(model, "train_metrics", None), **tpf(model)}
    print(f"trained model ({time.perf_counter() - t_start:.0f}s): {out}", flush=True)  # before a fine-tune
    if curve:  # the wall-clock budget included the measurements: the net training time is less
        out["net_train_seconds"] = curve[-1]["train_seconds"] + time.perf_counter() - t0
        out["curve"] = curve
    if args.distill_seconds:
        teacher = tpf_one_per_step(model, prompts, args.gen)
        spec = bench.SIZES[size]  # validation as after pre-training (train_models), so the ELBOs compare
        val = make_dataloader(corpus.val_tokens, spec["seq_len"], spec["batch"], shuffle=False)
        out["certainty_forcing"] = {**certainty_forcing(args, model, corpus, device, val), **tpf(model, teacher)}
        print(f"certainty forcing ({time.perf_counter() - t_start:.0f}s): {out['certainty_forcing']}", flush=True)
    return out


def fixed_shape_steps(model, max_num_seqs: int):
    """On a GPU, the engine's fixed-shape steps (CUDA graphs) for TPF decoding, as the engine
    decodes: the packed loop runs attention sequence by sequence, and its launches set its pace
    (`benchmarks/answer_generation.py`). None (the packed loop) elsewhere."""
    from pllm.engine import EngineConfig, ModelRunner

    if model.device.type != "cuda":
        return None
    return ModelRunner(model, EngineConfig(max_num_seqs=max_num_seqs, compile_step=False), static_step=True)


def tpf_one_per_step(model, prompts, gen: int) -> list:
    """The model's answers decoded one token per forward pass (the distillation's teacher)."""
    from pllm.certainty_forcing import one_token_per_forward
    from pllm.decoding import DecodeRules, decode_with_rules

    rules = DecodeRules.from_config(one_token_per_forward(gen, model.config.block_size or 1))
    result = decode_with_rules(model, [torch.tensor(p.prompt) for p in prompts], [rules] * len(prompts),
                               runner=fixed_shape_steps(model, len(prompts)))
    return [a.cpu() for a in result.tokens]


def certainty_forcing(args, model, corpus, device: str, val) -> dict:
    """Fine-tune `model` in place on its own answers (pllm.certainty_forcing) to prompts cut from the
    training tokens (one block's worth of lengths, so answers start anywhere in a block, as the
    held-out prompts' do); then its validation ELBO on `val`."""
    from pllm import TrainingConfig
    from pllm.certainty_forcing import CertaintyForcingTrainer, self_generated_answers
    from pllm.data import make_dataloader

    block, start = model.config.block_size, time.perf_counter()
    longest = max(block, args.prompt_len)
    rng = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(corpus.train_tokens) - longest, (args.distill_prompts,), generator=rng)
    cuts = torch.randint(0, block, (args.distill_prompts,), generator=rng)
    tokens = torch.from_numpy(corpus.train_tokens.astype("int64"))
    prompts = [tokens[i + cut:i + longest] for i, cut in zip(starts.tolist(), cuts.tolist())]
    data = self_generated_answers(model, prompts, longest + args.gen, batch_size=256 if device == "cuda" else 8)
    generate_seconds = time.perf_counter() - start
    cfg = TrainingConfig(batch_size=min(32, len(data)), seq_len=longest + args.gen, learning_rate=args.distill_lr,
                         num_train_steps=args.distill_steps, max_train_minutes=args.distill_seconds / 60,
                         warmup_steps=20, eval_interval=10**9, log_interval=50, use_fsdp=False,
                         use_torch_compile=False, gradient_checkpointing=False,
                         mixed_precision="bf16" if device == "cuda" else "no",
                         output_dir=str(Path(args.work_dir) / "certainty-forcing"))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    replay = None
    if args.distill_replay_weight:  # corpus rows of pre-training's length, as many per step as answers
        replay = make_dataloader(corpus.train_tokens, val.dataset.seq_len, cfg.batch_size, shuffle=True)
    trainer = CertaintyForcingTrainer(model, cfg, model.config, loader, val, device=device, show_progress=False,
                                      on_save=lambda trainer: None, entropy_weight=args.distill_entropy_weight,
                                      pretrain_dataloader=replay, pretrain_weight=args.distill_replay_weight)
    metrics = trainer.train()
    model.eval()
    print(f"certainty forcing: {len(data)} answers in {generate_seconds:.0f}s, {trainer.step} steps, "
          f"loss {metrics.get('loss', float('nan')):.3f}", flush=True)
    return {"prompts": len(data), "prompt_lengths": [longest - block + 1, longest], "generate_seconds": generate_seconds,
            "steps": trainer.step, "entropy_weight": args.distill_entropy_weight, "lr": args.distill_lr,
            "replay_weight": args.distill_replay_weight,
            "seconds": time.perf_counter() - start, "final_loss": metrics.get("loss"),
            "val_elbo_nats": metrics.get("val_elbo_nats")}


# -- HF generate baseline ----------------------------------------------------------------------
def hf_generate(shape: dict, batch: int, prompt_len: int, new_tokens: int, device: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                      num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
                      max_position_embeddings=shape["max_position_embeddings"], tie_word_embeddings=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    ids = torch.randint(4, shape["vocab_size"], (batch, prompt_len), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync(device)
    seconds = time.perf_counter() - t0
    generated = out.shape[1] - prompt_len
    del model
    return {"tokens_per_s": batch * generated / seconds, "ms_per_token_step": seconds / generated * 1e3}


# -- report ------------------------------------------------------------------------------------
def table(report: dict) -> str:
    lines = ["| batch | path | step ms (median) | floor ms | step / floor | TPF | measured tok/s | "
             "projected tok/s (trained TPF) | HF generate tok/s | measured / HF | projected / HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['batch']} | {row['path']} | {row['step_ms_median']:.2f} | {row.get('floor_ms', float('nan')):.2f} | "
                     f"{row.get('step_over_floor', float('nan')):.2f} | {row['tpf']:.2f} | {row['tokens_per_s']:.0f} | "
                     f"{row.get('projected_tokens_per_s', float('nan')):.0f} | {row.get('hf_tokens_per_s', float('nan')):.1f} | "
                     f"{row.get('measured_over_hf', float('nan')):.1f} | {row.get('projected_over_hf', float('nan')):.1f} |")
    return "\n".join(lines)


def write(report: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table(report) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=256, help="new tokens per request")
    p.add_argument("--stagger", type=int, default=0, help="prompt i has prompt_len + i * stagger tokens")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7])
    p.add_argument("--train-seconds", type=float, default=120.0, help="training of the small model for TPF")
    p.add_argument("--tpf-prompts", type=int, default=32)
    p.add_argument("--tpf-size", choices=["tiny", "small", "medium"], default="small",
                   help="the trained model for TPF (benchmarks/decoding.py SIZES; medium is compiled on CUDA)")
    p.add_argument("--tpf-steps", type=int, default=100_000,
                   help="its LR schedule's length in steps (training also stops at --train-seconds)")
    p.add_argument("--tpf-every", type=int, default=0, help="also measure TPF every N training steps (a curve)")
    p.add_argument("--distill-seconds", type=float, default=0.0,
                   help="then fine-tune the TPF model on its own answers (certainty forcing) for this long")
    p.add_argument("--distill-prompts", type=int, default=1024, help="prompts it answers for that fine-tune")
    p.add_argument("--distill-steps", type=int, default=500, help="the fine-tune's LR schedule length")
    p.add_argument("--distill-lr", type=float, default=2e-4)
    p.add_argument("--distill-entropy-weight", type=float, default=2.0)
    p.add_argument("--distill-replay-weight", type=float, default=0.0,
                   help="also train on corpus rows with the pre-training loss, at this weight (replay)")
    p.add_argument("--hf-tokens", type=int, default=64, help="new tokens per HF generate call")
    p.add_argument("--skip-eager", action="store_true", help="skip the eager packed-path baseline")
    p.add_argument("--baseline-kernels", action="store_true",
                   help="the step without the skinny GEMMs and split-keys attention (cuBLAS, plain kernel; A/B)")
    p.add_argument("--tpf-only", action="store_true", help="only train the small model and measure its TPF")
    p.add_argument("--tpf-from", default=None,
                   help="take the trained model's TPF from an earlier run's JSON (its --tpf-only run) instead of training")
    p.add_argument("--work-dir", default="runs/generation-bench")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, short answers")
    args = p.parse_args()
    if args.quick:
        args.shape, args.gen, args.prompt_len, args.batches = "tiny", 32, 16, [1, 4]
        args.train_seconds, args.tpf_prompts, args.hf_tokens, args.thresholds = min(args.train_seconds, 20.0), 4, 8, [0.7]
    device = args.device
    stem = f"generation_speed_{args.shape}_{device}" + ("_baseline_kernels" if args.baseline_kernels else "")
    # --baseline-kernels: cuBLAS GEMMs and the plain attention kernel in the step
    kernels = KernelOptions(skinny_gemm=False, attention_split_keys=False) if args.baseline_kernels else KernelOptions()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__, "shape": args.shape,
              "prompt_len": args.prompt_len, "stagger": args.stagger, "gen_tokens": args.gen, "args": vars(args),
              "command": " ".join(sys.argv), "rows": []}
    out = Path(args.out)

    bandwidth, peak = measured_bandwidth(device), measured_matmul_peak(device)
    report.update(bandwidth_gb_s=bandwidth and bandwidth / 1e9, matmul_peak_tflops=peak and peak / 1e12)
    print(f"bandwidth {report['bandwidth_gb_s']} GB/s, bf16 matmul peak {report['matmul_peak_tflops']} TFLOP/s",
          flush=True)

    if args.tpf_from:
        earlier = json.loads(Path(args.tpf_from).read_text())
        report["trained"] = {**earlier["trained"], "from": {"file": Path(args.tpf_from).name, "command": earlier["command"],
                                                            "date": earlier["date"], "device": earlier["device"]}}
    else:
        report["trained"] = trained_tpf(args, device)
    trained = report["trained"].get("certainty_forcing", report["trained"])  # the fine-tuned model's, if any
    tpf = trained[f"tpf_threshold_{args.thresholds[0]}"]
    report["projected_with"] = {"tpf": tpf, "threshold": args.thresholds[0],
                                "model": "certainty forcing" if trained is not report["trained"] else "trained"}
    print(f"trained small model: {report['trained']}", flush=True)
    write(report, out, stem)
    if args.tpf_only:
        return

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[args.shape], attention_mode="block_causal", block_size=32, use_flash_attention=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = DiffusionTransformer(cfg).to(device, dtype).eval()
    report["parameters"] = model.num_parameters()
    gen_cfg = GenerationConfig(max_new_tokens=args.gen, num_refinement_steps=args.gen, temperature=0.0,
                               strategy="threshold", confidence_threshold=args.thresholds[0], use_adaptive_steps=False)
    # The trained model's commit rate on these weights: a fixed count per step, at most its TPF.
    steps_per_block = math.ceil(cfg.block_size / tpf)
    at_tpf_cfg = GenerationConfig(max_new_tokens=args.gen, temperature=0.0, strategy="static", use_adaptive_steps=False,
                                  num_refinement_steps=steps_per_block * math.ceil(args.gen / cfg.block_size))
    for batch in args.batches:
        # --stagger: prompts of different lengths, so rows finish their blocks at different steps
        prompts = [torch.randint(4, cfg.vocab_size, (args.prompt_len + args.stagger * i,)) for i in range(batch)]
        hf = hf_generate(SHAPES[args.shape], batch, args.prompt_len, args.hf_tokens, device)
        graphs = " + CUDA graphs" if device == "cuda" else ""
        ahead = device == "cuda"  # pipelining is for CUDA graphs (on CPU it would only add dropped steps)
        for path, static, pipeline, run_cfg in [
                (f"fixed-shape steps{graphs}{', pipelined' if ahead else ''}, at the trained TPF", True, ahead, at_tpf_cfg),
                (f"fixed-shape steps{graphs}, pipelined", True, True, gen_cfg),
                (f"fixed-shape steps{graphs}", True, False, gen_cfg),
                ("eager packed (baseline)", False, False, gen_cfg)]:
            if (not static and args.skip_eager) or (pipeline and device != "cuda"):
                continue
            row = {"batch": batch, "path": path, **time_engine(model, prompts, run_cfg, static, device, pipeline, kernels)}
            if bandwidth:
                context = args.prompt_len + args.gen // 2  # the average visible context over the answer
                row.update(step_floor(cfg, batch, context, bandwidth, peak))
                row["step_over_floor"] = row["step_ms_median"] / row["floor_ms"]
            row["projected_tokens_per_s"] = batch * tpf / (row["step_ms_median"] / 1e3)
            row["hf_tokens_per_s"] = hf["tokens_per_s"]
            row["projected_over_hf"] = row["projected_tokens_per_s"] / hf["tokens_per_s"]
            row["measured_over_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
            report["rows"].append(row)
            write(report, out, stem)
            print(f"batch {batch:3d} {path:32s} step {row['step_ms_median']:7.2f} ms  floor "
                  f"{row.get('floor_ms', float('nan')):6.2f} ms  measured {row['tokens_per_s']:8.0f} tok/s  projected "
                  f"{row['projected_tokens_per_s']:8.0f} tok/s  HF {hf['tokens_per_s']:7.1f} tok/s", flush=True)
    print(table(report))


if __name__ == "__main__":
    main()
