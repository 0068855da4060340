"""What weight-only quantization (int8, fp8, int4) costs a trained model: validation ELBO and greedy answers.

Trains (with our trainer, on the built-in corpus; reused if present) the decoding benchmark's
block-diffusion model (block 32) at a size whose projections int4's groups of 128 divide, then for
each precision quantizes a copy (`pllm.quantization.quantize_model`) and reports, against the
unquantized model:
  - the validation NELBO per token on held-out rows, with the same noise draws for every precision
    (a paired comparison: the delta is the quantization's, not sampling noise);
  - greedy-answer agreement on held-out prompts (static decoding, temperature 0): the share of
    answers identical to the unquantized model's, and the share of answer tokens that agree;
targets: ELBO delta <= 0.02 nats for int8 and fp8, <= 0.1 for int4. Writes
benchmarks/results/quantized_quality_<size>_<device>.{json,md} and logs them to MLflow.

  python benchmarks/quantized_quality.py                              # CPU: the 'quant' size, 5 minutes of training
  python benchmarks/quantized_quality.py --size small --device cuda --train-seconds 300
  python benchmarks/quantized_quality.py --quick                      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pllm import GenerationConfig
from pllm.config import DataConfig
from pllm.corpus_files import corpus_files, read_documents, split_files
from pllm.data import cache_dir, make_dataloader, prepare_corpus
from pllm.decoding import DecodeRules, decode_with_rules
from pllm.diffusion import evaluate_elbo, get_schedule
from pllm.evaluation import function_prompts
from pllm.quantization import quantize_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"int8": 0.02, "fp8": 0.02, "int4": 0.1}
# A CPU-trainable shape whose projections' inputs (256, 768) are whole int4 groups of 128.
QUANT_SIZE = dict(model=dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=768), seq_len=128, batch=16, lr=2e-3, prompts=32, gen=32, infill=0)


def _decoding_benchmark():
    spec = importlib.util.spec_from_file_location("decoding_benchmark", ROOT / "benchmarks" / "decoding.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    module.SIZES.setdefault("quant", QUANT_SIZE)
    return module


def greedy_answers(model, prompts, gen: int, batch: int) -> list[torch.Tensor]:
    rules = DecodeRules.from_config(GenerationConfig(max_new_tokens=gen, num_refinement_steps=gen, block_size=32,
                                                     temperature=0.0, strategy="static", use_adaptive_steps=False))
    answers = []
    for i in range(0, len(prompts), batch):
        chunk = [torch.tensor(p.prompt) for p in prompts[i:i + batch]]
        answers += [a.cpu() for a in decode_with_rules(model, chunk, [rules] * len(chunk)).tokens]
    return answers


def table(report: dict) -> str:
    lines = ["| precision | val NELBO (nats/token) | delta | target | met | answers identical | answer tokens agreeing |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in report["rows"]:
        target = TARGETS.get(r["precision"])
        lines.append(f"| {r['precision']} | {r['nelbo']:.4f} | {r['delta']:+.4f} | {target if target else '-'} | "
                     f"{'-' if target is None else ('yes' if abs(r['delta']) <= target else 'no')} | "
                     f"{r['answers_identical']:.3f} | {r['tokens_agreeing']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="quant", help="a size of benchmarks/decoding.py, or 'quant' (CPU-trainable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-seconds", type=float, default=300.0)
    p.add_argument("--val-batches", type=int, default=32, help="held-out batches of the ELBO")
    p.add_argument("--elbo-samples", type=int, default=4, help="noise draws per batch")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--batch", type=int, default=16, help="prompts decoded together")
    p.add_argument("--work-dir", default="runs/quantized-quality")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--quick", action="store_true", help="a few seconds of training, few batches and prompts")
    args = p.parse_args()
    if args.quick:
        args.train_seconds, args.val_batches, args.elbo_samples, args.prompts = 10.0, 2, 1, 4
    dec = _decoding_benchmark()
    spec, device = dec.SIZES[args.size], args.device
    corpus = prepare_corpus(DataConfig(), spec["model"]["vocab_size"], cache_dir())
    tok = corpus.tokenizer
    model = dec.train_models(args.size, device, args.train_seconds, args.train_seconds, Path(args.work_dir) / args.size,
                             corpus, names=("block32",))["block32"]
    cfg = model.config
    val = make_dataloader(corpus.val_tokens, spec["seq_len"], spec["batch"], shuffle=False)
    val_batches = [b for _, b in zip(range(args.val_batches), val)]
    schedule = get_schedule(cfg.noise_schedule)
    _, val_files = split_files(corpus_files(), DataConfig().validation_fraction)
    sources = [doc for f in val_files for doc in read_documents(f)]
    gen = spec["gen"]
    prompts = function_prompts(sources, tok, args.prompts or spec["prompts"], context_tokens=96, continuation_tokens=gen)

    rows, reference = [], None
    for precision in ("none", "int8", "fp8", "int4"):
        candidate = model if precision == "none" else quantize_model(copy.deepcopy(model), precision)
        t0 = time.perf_counter()
        elbo = evaluate_elbo(candidate, val_batches, schedule, cfg.mask_token_id, num_samples=args.elbo_samples,
                             seed=1234, block_size=cfg.block_size if cfg.attention_mode == "block_causal" else None)
        answers = greedy_answers(candidate, prompts, gen, args.batch)
        if reference is None:
            reference = {"nelbo": elbo.nelbo_per_token, "answers": answers}
        same = sum(torch.equal(a, b) for a, b in zip(answers, reference["answers"])) / len(answers)
        agree = sum(int((a == b).sum()) for a, b in zip(answers, reference["answers"])) / sum(len(b) for b in reference["answers"])
        rows.append({"precision": precision, "nelbo": elbo.nelbo_per_token, "delta": elbo.nelbo_per_token - reference["nelbo"],
                     "answers_identical": same, "tokens_agreeing": agree, "seconds": time.perf_counter() - t0})
        print(f"{precision:5s} NELBO {elbo.nelbo_per_token:.4f} ({rows[-1]['delta']:+.4f})  identical {same:.3f}  "
              f"tokens agreeing {agree:.3f}", flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    report = {"size": args.size, "device": device_name, "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/quantized_quality.py " + " ".join(sys.argv[1:]),
              "parameters": model.num_parameters(), "train": getattr(model, "train_metrics", None),
              "val_tokens": elbo.num_tokens, "elbo_samples": args.elbo_samples, "prompts": len(prompts), "gen_tokens": gen,
              "targets_nats": TARGETS, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quantized_quality_{args.size}_{device}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table(report) + "\n")
    print(table(report))
    import mlflow

    mlflow.set_tracking_uri(args.mlflow_uri or f"sqlite:///{ROOT / 'mlflow.db'}")
    mlflow.set_experiment("pllm-quantization-benchmark")
    with mlflow.start_run(run_name=f"quantized-quality-{args.size}-{device}"):
        mlflow.log_params({"size": args.size, "device": device, "train_seconds": args.train_seconds,
                           "elbo_samples": args.elbo_samples, "val_batches": args.val_batches})
        for r in rows:
            for m in ("nelbo", "delta", "answers_identical", "tokens_agreeing"):
                mlflow.log_metric(f"{r['precision']}/{m}", r[m])
        for ext in ("json", "md"):
            mlflow.log_artifact(str(out / f"{stem}.{ext}"))


if __name__ == "__main__":
    main()
