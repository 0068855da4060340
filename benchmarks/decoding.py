"""Decoding strategies side by side: forward passes, tokens per forward, speed and quality.

Trains (with our trainer, on the built-in corpus) a bidirectional masked-diffusion model, a
block-diffusion model (block 32) and the same architecture with block size 1, an autoregressive LM
that serves as the AR baseline and as the evaluator. Then, on the same held-out prompts (top-level
functions of validation files), every strategy reports:

  NFE (forward passes per answer), TPF (tokens per forward), tokens/s;
  (a) exact match: share of answers identical to static decoding of the same model;
  (b) infilling accuracy: share of masked tokens recovered in held-out code spans (bidirectional);
  (c) parse rate: share of completions that parse as Python (`pllm.evaluation.parses_as_python`);
  (d) generative perplexity of the completions under the AR model.

Writes benchmarks/results/decoding_<size>_<device>.{json,md,png} and logs them to MLflow.

  python benchmarks/decoding.py --size tiny --train-seconds 60            # CPU smoke run
  python benchmarks/decoding.py --size small --device cuda --train-seconds 100
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pllm import DiffusionTransformer, GenerationConfig, ModelConfig, TrainingConfig, load_model, save_pretrained
from pllm.config import DataConfig
from pllm.corpus_files import corpus_files, read_documents, split_files
from pllm.data import cache_dir, make_dataloader, prepare_corpus
from pllm.decoding import DecodeRules, decode_with_rules
from pllm.kernels.options import KernelOptions
from pllm.evaluation import autoregressive_nll, function_prompts, infill_tasks, parses_as_python, perplexity
from pllm.trainer import DistributedTrainer

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # model shape, training rows, prompts and answer length
    "tiny": dict(model=dict(vocab_size=1024, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=256), seq_len=128, batch=16, lr=2e-3, prompts=16, gen=32, infill=16),
    "small": dict(model=dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, intermediate_size=1536), seq_len=512, batch=64, lr=1.5e-3,
                  prompts=128, gen=64, infill=128),
    # For tokens-per-forward on a GPU (generation_speed.py --tpf-size medium): larger, compiled
    # (Inductor's default mode: max-autotune's GEMM search would take minutes of a short run).
    "medium": dict(model=dict(vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              num_key_value_heads=4, intermediate_size=2048), seq_len=512, batch=64, lr=1e-3,
                   prompts=128, gen=64, infill=128, compile="default"),
}
MODELS = {"bidirectional": dict(attention_mode="bidirectional"),
          "block32": dict(attention_mode="block_causal", block_size=32),
          "ar": dict(attention_mode="block_causal", block_size=1)}


@dataclass
class Setting:
    model: str
    label: str
    config: dict  # GenerationConfig fields
    infill: bool = True  # also run the infilling task (bidirectional models)


def settings(gen: int) -> list[Setting]:
    base = dict(num_refinement_steps=gen, block_size=32, temperature=0.0, use_adaptive_steps=False, kv_cache="none")
    out = []
    for model in ("bidirectional", "block32"):
        cache = "auto" if model == "block32" else "none"
        b = {**base, "kv_cache": cache}
        out += [
            Setting(model, "static", {**b, "strategy": "static"}),
            Setting(model, "static, 1/2 steps", {**b, "strategy": "static", "num_refinement_steps": gen // 2}),
            Setting(model, "static, 1/4 steps", {**b, "strategy": "static", "num_refinement_steps": gen // 4}),
            Setting(model, "draft_verify k=4", {**b, "strategy": "draft_verify", "draft_length": 4}),
            Setting(model, "threshold 0.9", {**b, "strategy": "threshold", "confidence_threshold": 0.9}),
            Setting(model, "threshold 0.7", {**b, "strategy": "threshold", "confidence_threshold": 0.7}),
            Setting(model, "factor 1", {**b, "strategy": "factor", "parallel_factor": 1.0}),
            Setting(model, "credit 0.9", {**b, "strategy": "credit", "confidence_threshold": 0.9}),
            Setting(model, "credit 0.7", {**b, "strategy": "credit", "confidence_threshold": 0.7}),
        ]
    out += [
        Setting("bidirectional", "threshold 0.9 + prefix cache (approx.)",
                {**base, "strategy": "threshold", "confidence_threshold": 0.9, "kv_cache": "prefix"}),
        Setting("bidirectional", "threshold 0.9 + dual cache (approx.)",
                {**base, "strategy": "threshold", "confidence_threshold": 0.9, "kv_cache": "dual"}),
        Setting("block32", "static, no cache", {**base, "strategy": "static", "kv_cache": "none"}),
        Setting("ar", "autoregressive (static, block 1)", {**base, "strategy": "static", "kv_cache": "auto"}),
    ]
    return out


QUICK = {"static", "draft_verify k=4", "threshold 0.7", "autoregressive (static, block 1)"}


# -- training ----------------------------------------------------------------------------------
def train_models(size: str, device: str, seconds: float, ar_seconds: float, out: Path, corpus,
                 names=tuple(MODELS), on_save=None, save_interval: int = 0, steps: int = 100_000,
                 validate: bool = False, kernels: KernelOptions | None = None) -> dict[str, DiffusionTransformer]:
    """on_save(trainer), every save_interval steps: e.g. measure the model while it trains.
    kernels: the training's kernel options (default: `KernelOptions()`).
    steps: the LR schedule's length (training stops there or at the time budget, whichever is first);
    validate: finish with the validation ELBO on the held-out tokens (in `model.train_metrics`)."""
    spec, tok = SIZES[size], corpus.tokenizer
    models = {}
    for name, shape in ((n, MODELS[n]) for n in names):
        path = out / "models" / name
        if (path / "config.json").exists():
            models[name] = load_model(path, device=device)
            print(f"[{name}] loaded from {path}", flush=True)
            continue
        cfg = ModelConfig(**spec["model"], **shape, max_position_embeddings=1024, noise_schedule="linear",
                          use_flash_attention=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id)
        train = TrainingConfig(batch_size=spec["batch"], seq_len=spec["seq_len"], learning_rate=spec["lr"],
                               num_train_steps=steps, max_train_minutes=(ar_seconds if name == "ar" else seconds) / 60, warmup_steps=100,
                               weight_decay=0.01, eval_interval=10**9, log_interval=50, use_fsdp=False,
                               **({"save_interval": save_interval} if on_save else {}),
                               use_torch_compile="compile" in spec and device == "cuda",
                               **({"torch_compile_mode": spec["compile"]} if "compile" in spec else {}),
                               use_cuda_graphs=False, gradient_checkpointing=False, kernels=kernels or KernelOptions(),
                               mixed_precision="bf16" if device == "cuda" else "no", output_dir=str(path))
        torch.manual_seed(0)
        model = DiffusionTransformer(cfg)
        loader = make_dataloader(corpus.train_tokens, train.seq_len, train.batch_size, shuffle=True)
        val = make_dataloader(corpus.val_tokens, train.seq_len, train.batch_size, shuffle=False) if validate else None
        trainer = DistributedTrainer(model, train, cfg, loader, val, device=device, show_progress=False,
                                     on_save=on_save)
        t0 = time.perf_counter()
        metrics = trainer.train()
        print(f"[{name}] {model.num_parameters() / 1e6:.1f}M params, {trainer.step} steps in "
              f"{time.perf_counter() - t0:.0f}s, final loss {metrics.get('loss', float('nan')):.3f}", flush=True)
        save_pretrained(model, path, tokenizer=tok)
        model.train_metrics = {"steps": trainer.step, **metrics}
        models[name] = model.eval()
    # Decoding runs in float32: the packed forward is then bit-identical whatever shares the batch,
    # which lossless draft-and-verify relies on (bf16 GEMMs of other shapes may round differently).
    return {name: model.float().eval() for name, model in models.items()}


# -- one setting -------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_setting(setting: Setting, model, prompts, gen: int, batch: int, device: str, infill=None) -> dict:
    cfg = GenerationConfig(max_new_tokens=gen, **setting.config)
    rules = DecodeRules.from_config(cfg)
    answers, nfe = [], []
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = [torch.tensor(p.prompt) for p in prompts[i:i + batch]]
        out = decode_with_rules(model, chunk, [rules] * len(chunk))
        answers += [a.cpu() for a in out.tokens]
        nfe += out.nfe_per_sequence
    sync(device)
    seconds = time.perf_counter() - t0
    result = {"answers": answers, "nfe": sum(nfe) / len(nfe), "tokens_per_s": gen * len(prompts) / seconds,
              "seconds": seconds}
    result["tpf"] = gen / result["nfe"]
    if infill is not None and setting.infill and model.config.attention_mode == "bidirectional":
        span = len(infill[0].span)  # the same tokens per step as the completion setting
        icfg = cfg.replace(max_new_tokens=span, block_size=None,
                           num_refinement_steps=max(1, round(span * cfg.num_refinement_steps / gen)))
        irules = DecodeRules.from_config(icfg)
        correct = total = 0
        for i in range(0, len(infill), batch):
            tasks = infill[i:i + batch]
            out = decode_with_rules(model, [torch.tensor(t.prefix) for t in tasks], [irules] * len(tasks),
                                    suffixes=[torch.tensor(t.suffix) for t in tasks])
            for t, a in zip(tasks, out.tokens):
                correct += int((a.cpu() == torch.tensor(t.span)).sum())
                total += len(t.span)
        result["infill_accuracy"] = correct / total
    return result


def quality(result: dict, prompts, tokenizer, ar_model, eos: int) -> dict:
    parsed, nll, count = 0, 0.0, 0
    for p, answer in zip(prompts, result["answers"]):
        ids = answer.tolist()
        ids = ids[: ids.index(eos)] if eos in ids else ids
        parsed += parses_as_python(p.head + tokenizer.decode(ids))
        n, c = autoregressive_nll(ar_model, torch.tensor(p.prompt), torch.tensor(ids, dtype=torch.long))
        nll, count = nll + n, count + c
    return {"parse_rate": parsed / len(prompts), "gen_ppl": perplexity(nll, count)}


# -- report ------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| model | strategy | NFE | TPF | static NFE / NFE | tokens/s | exact match (a) | infill acc. (b) | "
             "parse rate (c) | gen. PPL (d) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        infill = f"{r['infill_accuracy'] * 100:.1f}%" if "infill_accuracy" in r else "n/a"
        exact = f"{r['exact_match'] * 100:.1f}%" if r.get("exact_match") is not None else "n/a"
        lines.append(f"| {r['model']} | {r['strategy']} | {r['nfe']:.1f} | {r['tpf']:.2f} | "
                     f"{r['nfe_ratio']:.2f}x | {r['tokens_per_s']:,.0f} | {exact} | {infill} | "
                     f"{r['parse_rate'] * 100:.1f}% | {r['gen_ppl']:.2f} |")
    return "\n".join(lines)


def family(label: str) -> str:
    """Settings that differ only in a number (threshold, steps, k) form one line of the plot."""
    if "cache" in label:
        return " ".join(w for w in label.split() if not w[0].isdigit())
    return label.split(" ")[0].rstrip(",")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    metrics = [("parse_rate", "parse rate (c)"), ("infill_accuracy", "infilling accuracy (b)"),
               ("gen_ppl", "generative perplexity (d, lower is better)")]
    lines = sorted({(r["model"], family(r["strategy"])) for r in rows})
    colors = {line: plt.cm.tab20(i % 20) for i, line in enumerate(lines)}  # one colour per line, every panel
    for ax, (key, label) in zip(axes, metrics):
        for model, fam in lines:
            pts = sorted((r["tpf"], r[key]) for r in rows
                         if r["model"] == model and family(r["strategy"]) == fam and key in r)
            if pts:
                ax.plot(*zip(*pts), "o-" if model == "bidirectional" else "s--", color=colors[(model, fam)],
                        label=f"{model}: {fam}")
        ax.set(xlabel="tokens per forward (TPF)", ylabel=label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=120)


def log_to_mlflow(rows: list[dict], files: list[Path], params: dict, uri: str | None) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri or f"sqlite:///{ROOT / 'mlflow.db'}")
    mlflow.set_experiment("pllm-decoding-benchmark")
    with mlflow.start_run(run_name=f"decoding-{params['size']}-{params['device']}"):
        mlflow.log_params(params)
        for i, r in enumerate(rows):
            key = f"{r['model']}/{r['strategy']}".replace(" ", "_").replace(",", "").replace("+", "").replace("(", "").replace(")", "").replace("=", "").replace(".", "p")
            for m in ("nfe", "tpf", "tokens_per_s", "exact_match", "infill_accuracy", "parse_rate", "gen_ppl"):
                if r.get(m) is not None:
                    mlflow.log_metric(f"{key}/{m}", r[m])
        for f in files:
            mlflow.log_artifact(str(f))


def write_report(rows, args, models, prompts, infill, gen):
    """JSON + markdown table of the rows so far (written after every setting)."""
    static_nfe = {r["model"]: r["nfe"] for r in rows if r["strategy"] == "static"}
    for r in rows:
        r["nfe_ratio"] = static_nfe.get(r["model"], gen) / r["nfe"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"size": args.size, "device": device_name, "date": time.strftime("%Y-%m-%d"), "gen_tokens": gen,
              "num_prompts": len(prompts), "num_infill": len(infill), "train_seconds_per_model": args.train_seconds,
              "parameters": {k: m.num_parameters() for k, m in models.items()}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decoding_{args.size}_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(table(rows) + "\n")
    return out, stem, device_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-seconds", type=float, default=60.0, help="training time per diffusion model")
    p.add_argument("--ar-train-seconds", type=float, default=None, help="training time of the AR model")
    p.add_argument("--batch", type=int, default=32, help="prompts decoded together")
    p.add_argument("--work-dir", default="runs/decoding-bench", help="models are trained here (reused if present)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--quick", action="store_true", help="a few settings and prompts (a smoke test)")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts and infilling spans")
    args = p.parse_args()
    spec, device, gen = SIZES[args.size], args.device, SIZES[args.size]["gen"]

    data = DataConfig()
    t0 = time.perf_counter()
    corpus = prepare_corpus(data, spec["model"]["vocab_size"], cache_dir())
    print(f"corpus and tokenizer ready in {time.perf_counter() - t0:.0f}s", flush=True)
    tok = corpus.tokenizer
    work = Path(args.work_dir) / args.size
    models = train_models(args.size, device, args.train_seconds, args.ar_train_seconds or args.train_seconds, work,
                          corpus)

    _, val_files = split_files(corpus_files(), data.validation_fraction)
    sources = [doc for f in val_files for doc in read_documents(f)]
    num_prompts, num_infill = (8, 8) if args.quick else (spec["prompts"], spec["infill"])
    if args.prompts:
        num_prompts = num_infill = args.prompts
    prompts = function_prompts(sources, tok, num_prompts, context_tokens=96, continuation_tokens=gen)
    rows_tokens = [corpus.val_tokens[i:i + 256].tolist() for i in range(0, len(corpus.val_tokens) - 256, 256)]
    infill = infill_tasks(rows_tokens, num_infill, span=16, context=48)
    print(f"{len(prompts)} held-out prompts, {len(infill)} infilling spans, {gen} new tokens each", flush=True)

    # warm-up (CUDA kernels, allocator)
    decode_with_rules(models["bidirectional"], [torch.tensor(prompts[0].prompt)],
                      [DecodeRules.from_config(GenerationConfig(max_new_tokens=8, num_refinement_steps=2))])
    rows, static_answers = [], {}
    chosen = [s for s in settings(gen) if not args.quick or s.label in QUICK]
    for s in chosen:
        r = run_setting(s, models[s.model], prompts, gen, args.batch, device, infill)
        r.update(quality(r, prompts, tok, models["ar"], tok.eos_token_id))
        if s.label == "static":
            static_answers[s.model] = r["answers"]
        ref = static_answers.get(s.model)
        r["exact_match"] = (sum(torch.equal(a, b) for a, b in zip(r["answers"], ref)) / len(ref)) if ref else None
        r.update(model=s.model, strategy=s.label, config=s.config)
        del r["answers"]
        rows.append(r)
        write_report(rows, args, models, prompts, infill, gen)
        print(f"{s.model:13s} {s.label:40s} NFE {r['nfe']:6.1f}  TPF {r['tpf']:5.2f}  {r['tokens_per_s']:8.0f} tok/s  "
              f"exact {r['exact_match'] if r['exact_match'] is None else round(r['exact_match'], 3)}  "
              f"infill {r.get('infill_accuracy', float('nan')):.3f}  parse {r['parse_rate']:.3f}  ppl {r['gen_ppl']:.2f}",
              flush=True)
    out, stem, device_name = write_report(rows, args, models, prompts, infill, gen)
    print((out / f"{stem}.md").read_text())
    plot(rows, out / f"{stem}.png", f"decoding strategies, {args.size} models, {device_name}")
    log_to_mlflow(rows, [out / f"{stem}.{e}" for e in ("json", "md", "png")],
                  {"size": args.size, "device": device, "gen_tokens": gen, "train_seconds": args.train_seconds},
                  args.mlflow_uri)


if __name__ == "__main__":
    main()
