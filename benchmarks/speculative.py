"""Speculative decoding with a draft model: acceptance, tokens per target forward and tokens/s against
the target alone, on models trained here by our trainer (built-in corpus, one tokenizer).

Four models: an autoregressive target and draft (block-causal, block size 1) and a block-diffusion
target and draft (block 32); each draft is ~15x smaller than its target. On held-out prompts
(top-level functions of validation files), greedy unless stated:

  target alone: static decoding, packed eager passes, and (GPU) CUDA-graph steps;
  speculative, draft_length k: acceptance rate (accepted / checked drafted tokens, or steps for the
      block target: the chance that the target accepts a drafted token), accepted / drafted, tokens per target forward, draft passes, tokens/s, and exact match with the target
      alone (greedy: must be 100%);
  the AR target with the block-diffusion draft, which proposes all k tokens in one pass;
  sampling (temperature 0.8, AR target): acceptance and tokens per target forward.

Decoding runs in float32 (as in benchmarks/decoding.py: same-shape packed passes are bit-identical).
Writes benchmarks/results/speculative_<size>_<device>.{json,md,png}.

  python benchmarks/speculative.py --size tiny --train-seconds 20             # CPU smoke run
  python benchmarks/speculative.py --size small --device cuda --train-seconds 120 --draft-train-seconds 45
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pllm import DiffusionTransformer, GenerationConfig, ModelConfig, TrainingConfig
from pllm.config import DataConfig
from pllm.corpus_files import corpus_files, read_documents, split_files
from pllm.data import cache_dir, make_dataloader, prepare_corpus
from pllm.decoding import DecodeRules, Drafter, decode_with_rules
from pllm.engine import EngineConfig, ModelRunner
from pllm.evaluation import function_prompts
from pllm.trainer import DistributedTrainer

SIZES = {  # target and draft shapes, vocabulary, training rows, prompts, answer length
    "tiny": dict(target=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256),
                 draft=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                 vocab=1024, seq_len=128, batch=16, lr=2e-3, prompts=8, gen=32),
    "small": dict(target=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                              intermediate_size=2048),
                  draft=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=768),
                  vocab=8192, seq_len=512, batch=64, lr=1.5e-3, prompts=32, gen=64),
}
SHAPES = {"ar": dict(attention_mode="block_causal", block_size=1),
          "block": dict(attention_mode="block_causal", block_size=32)}


def train(name: str, shape: dict, kind: str, spec: dict, corpus, device: str, seconds: float) -> DiffusionTransformer:
    tok = corpus.tokenizer
    cfg = ModelConfig(**spec[kind], **SHAPES[shape], vocab_size=spec["vocab"], max_position_embeddings=1024,
                      noise_schedule="linear", use_flash_attention=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id)
    train_cfg = TrainingConfig(batch_size=spec["batch"], seq_len=spec["seq_len"], learning_rate=spec["lr"],
                               num_train_steps=100_000, max_train_minutes=seconds / 60, warmup_steps=100,
                               weight_decay=0.01, eval_interval=10**9, log_interval=10, use_fsdp=False,
                               use_torch_compile=False, gradient_checkpointing=False,
                               mixed_precision="bf16" if device == "cuda" else "no")
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    loader = make_dataloader(corpus.train_tokens, train_cfg.seq_len, train_cfg.batch_size, shuffle=True)
    trainer = DistributedTrainer(model, train_cfg, cfg, loader, None, device=device, show_progress=False)
    metrics = trainer.train()
    loss = metrics.get("loss", float("nan"))
    print(f"[{name}] {model.num_parameters() / 1e6:.1f}M params, {trainer.step} steps, loss {loss:.3f}", flush=True)
    return model.float().eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(label: str, target, prompts, cfg: GenerationConfig, batch: int, device: str, draft=None,
        graphs: bool = False) -> dict:
    rules = DecodeRules.from_config(cfg)
    drafter = Drafter(draft) if draft is not None else None
    runner = ModelRunner(target, EngineConfig(max_num_seqs=batch), static_step=True) if graphs else None
    answers, nfe, draft_nfe, drafted, verified, accepted = [], 0, 0, 0, 0, 0
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out = decode_with_rules(target, chunk, [rules] * len(chunk), runner=runner, drafter=drafter)
        answers += [a.cpu() for a in out.tokens]
        nfe += sum(out.nfe_per_sequence)
        draft_nfe += out.draft_nfe
        drafted += out.drafted
        verified += out.verified
        accepted += out.accepted
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = cfg.max_new_tokens * len(prompts)
    return {"label": label, "batch": batch, "answers": answers, "tokens_per_s": tokens / seconds,
            "target_forwards_per_answer": nfe / len(prompts), "tokens_per_target_forward": tokens / nfe,
            "draft_passes": draft_nfe, "acceptance_rate": accepted / verified if verified else None,
            "accepted_per_drafted": accepted / drafted if drafted else None,
            "draft_length": cfg.draft_length if draft is not None else None, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-seconds", type=float, default=20.0, help="training time of each target")
    p.add_argument("--draft-train-seconds", type=float, default=None, help="... and of each draft")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--draft-lengths", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: the size's)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    spec, device, gen = SIZES[args.size], args.device, SIZES[args.size]["gen"]
    corpus = prepare_corpus(DataConfig(), spec["vocab"], cache_dir())
    models = {}
    for shape in SHAPES:
        models[f"{shape}_target"] = train(f"{shape} target", shape, "target", spec, corpus, device, args.train_seconds)
        models[f"{shape}_draft"] = train(f"{shape} draft", shape, "draft", spec, corpus, device,
                                         args.draft_train_seconds or args.train_seconds / 3)
    _, val_files = split_files(corpus_files(), DataConfig().validation_fraction)
    sources = [doc for f in val_files for doc in read_documents(f)]
    prompts = [torch.tensor(x.prompt) for x in function_prompts(sources, corpus.tokenizer, args.prompts or spec["prompts"],
                                                                context_tokens=96, continuation_tokens=gen)]
    base = GenerationConfig(max_new_tokens=gen, num_refinement_steps=gen, temperature=0.0, use_adaptive_steps=False,
                            kv_cache="auto")
    graphs = device == "cuda"
    run("warm-up", models["ar_target"], prompts[:2], base.replace(max_new_tokens=8, num_refinement_steps=8), 2, device)
    rows = []

    def add(shape: str, row: dict, reference: dict | None) -> None:
        row["target"] = shape
        if reference is not None:
            row["exact_match"] = sum(torch.equal(a, b) for a, b in zip(row["answers"], reference["answers"])) / len(prompts)
            row["speedup_vs_eager"] = row["tokens_per_s"] / reference["tokens_per_s"]
        rows.append(row)
        print(f"{shape:6s} b={row['batch']:<3d} {row['label']:34s} {row['tokens_per_s']:9.0f} tok/s  "
              f"tokens/target fwd {row['tokens_per_target_forward']:5.2f}  accept {row['acceptance_rate']}  "
              f"exact {row.get('exact_match')}", flush=True)

    for batch in args.batches:
        for shape in SHAPES:
            target, draft = models[f"{shape}_target"], models[f"{shape}_draft"]
            alone = run("target alone (eager)", target, prompts, base, batch, device)
            add(shape, alone, None)
            alone["exact_match"], alone["speedup_vs_eager"] = 1.0, 1.0
            if graphs:
                add(shape, run("target alone (CUDA graphs)", target, prompts, base, batch, device, graphs=True), alone)
            add(shape, run("draft alone (eager)", draft, prompts, base, batch, device), alone)
            for k in args.draft_lengths:
                cfg = base.replace(strategy="speculative", draft_length=k)
                add(shape, run(f"speculative k={k}", target, prompts, cfg, batch, device, draft=draft), alone)
            if shape == "ar":
                # A block-diffusion draft proposes all k tokens in one pass (parallel drafting).
                cfg = base.replace(strategy="speculative", draft_length=4)
                add(shape, run("speculative k=4, block-diffusion draft", target, prompts, cfg, batch, device,
                               draft=models["block_draft"]), alone)
                hot = dict(temperature=0.8, seed=0)
                sampled = run("target alone, T=0.8", target, prompts, base.replace(**hot), batch, device)
                add(shape, sampled, None)
                sampled["speedup_vs_eager"] = 1.0
                cfg = base.replace(strategy="speculative", draft_length=4, **hot)
                add(shape, run("speculative k=4, T=0.8", target, prompts, cfg, batch, device, draft=draft), None)
                rows[-1]["speedup_vs_eager"] = rows[-1]["tokens_per_s"] / sampled["tokens_per_s"]
    for r in rows:
        del r["answers"]
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    report = {"size": args.size, "device": device_name, "date": time.strftime("%Y-%m-%d"), "gen_tokens": gen,
              "num_prompts": len(prompts), "train_seconds": args.train_seconds,
              "parameters": {k: m.num_parameters() for k, m in models.items()}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speculative_{args.size}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| target | batch | setting | tokens/s | vs target eager | tokens / target forward | acceptance | "
             "accepted / drafted | draft passes | exact match |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['target']} | {r['batch']} | {r['label']} | {r['tokens_per_s']:,.0f} | "
              f"{fmt(r.get('speedup_vs_eager'), '.2f')}x | {r['tokens_per_target_forward']:.2f} | "
              f"{fmt(r['acceptance_rate'], '.1%')} | {fmt(r['accepted_per_drafted'], '.1%')} | {r['draft_passes']} | "
              f"{fmt(r.get('exact_match'), '.0%')} |"
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, stem.with_suffix(".png"), f"speculative decoding, {args.size} models, {device_name}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, name in ((axes[0], "tokens_per_target_forward", "tokens per target forward"),
                          (axes[1], "tokens_per_s", "tokens/s")):
        labels = [f"{r['target']} b{r['batch']}: {r['label']}" for r in rows]
        ax.barh(range(len(rows)), [r[key] for r in rows],
                color=["tab:orange" if "speculative" in r["label"] else "tab:blue" for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
