"""Continuous versus static batching on the same engine under a Poisson arrival load, for models of
one shape with different attention: bidirectional (packed steps, or Fast-dLLM's dual cache),
block diffusion (block 32, exact block cache) and autoregressive (block 1, shifted logits).

Requests (random prompt ids of 16-128 tokens, answers of 16-128 tokens, mixed; optionally all
starting with one shared prefix, a system prompt) arrive at exponential gaps; the engine loop
admits them as they come. For each model and arrival rate both batching policies run the same
request list, and we report generated tokens/s, time to first token and p50/p99 latency (arrival
to last token) and the mean batch size. Weights are random (step cost does not depend on them) and
EOS is ignored, so every request produces exactly its answer length.

  python benchmarks/serving.py --size tiny --rates 4 8 16               # CPU
  python benchmarks/serving.py --size 125m --device cuda --rates 20 40 80  # GPU, bf16
  python benchmarks/serving.py --size 125m --device cuda --models ar block dual --rates 30 --shared-prefix 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pllm import DiffusionTransformer, EngineConfig, GenerationConfig, ModelConfig
from pllm.engine import Engine

SIZES = {"tiny": "pllm/configs/tiny.yaml", "125m": "pllm/configs/gpu-125m.yaml"}
ROOT = Path(__file__).resolve().parents[1]


# Attention of each model kind (the shape is the size's), and the cache its requests use.
MODELS = {"bidirectional": ({}, "none"), "dual": ({}, "dual"),
          "block": (dict(attention_mode="block_causal", block_size=32), "block"),
          "ar": (dict(attention_mode="block_causal", block_size=1, logits_shift=True), "block")}


def build_model(size: str, device: str, kind: str = "bidirectional", context: int = 1024) -> DiffusionTransformer:
    cfg = yaml.safe_load((ROOT / SIZES[size]).read_text())["model"]
    cfg.update(use_flash_attention=False, max_position_embeddings=context, **MODELS[kind][0])
    torch.manual_seed(0)
    model = DiffusionTransformer(ModelConfig.from_dict(cfg)).eval()
    return model.to(device=device, dtype=model.config.dtype if device == "cuda" else torch.float32)


def workload(n: int, rate: float, vocab: int, seed: int, kv_cache: str = "none", shared_prefix: int = 0):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    prefix = torch.from_numpy(np.random.default_rng(seed + 1).integers(4, vocab, shared_prefix))
    requests = []
    for _ in range(n):
        prompt = torch.cat([prefix, torch.from_numpy(rng.integers(4, vocab, int(rng.integers(16, 129))))])
        answer = int(rng.choice([16, 32, 64, 128]))
        cfg = GenerationConfig(max_new_tokens=answer, num_refinement_steps=answer // 2, block_size=16,
                               temperature=0.0, top_k=0, top_p=1.0, use_adaptive_steps=False, kv_cache=kv_cache)
        requests.append((prompt, cfg))
    return arrivals, requests


def run(model, batching: str, arrivals, requests, max_num_seqs: int, prefix_caching: bool = True) -> dict:
    engine = Engine(model, EngineConfig(max_num_seqs=max_num_seqs, max_batched_tokens=1 << 20, batching=batching,
                                        prefix_caching=prefix_caching))
    arrival_of, first_of, finish_of, batch_sizes = {}, {}, {}, []
    start, i, tokens = time.perf_counter(), 0, 0
    while len(finish_of) < len(requests):
        now = time.perf_counter() - start
        while i < len(requests) and arrivals[i] <= now:
            rid = engine.add_request(*requests[i])
            arrival_of[rid] = arrivals[i]
            i += 1
        if not engine.has_work():
            time.sleep(max(0.0, arrivals[i] - now))
            continue
        outputs = engine.step()
        done = time.perf_counter() - start
        batch_sizes.append(engine.stats["batch_size"])
        for out in outputs:
            tokens += len(out.new_token_ids)
            if out.new_token_ids:
                first_of.setdefault(out.request_id, done)
            if out.finished:
                finish_of[out.request_id] = done
    latency = np.array([finish_of[r] - arrival_of[r] for r in finish_of])
    ttft = np.array([first_of[r] - arrival_of[r] for r in first_of])
    makespan = max(finish_of.values()) - arrivals[0]
    return {"batching": batching, "tokens_per_s": tokens / makespan, "requests_per_s": len(finish_of) / makespan,
            "p50_ttft_s": float(np.percentile(ttft, 50)), "p50_latency_s": float(np.percentile(latency, 50)),
            "p99_latency_s": float(np.percentile(latency, 99)), "mean_batch_size": float(np.mean(batch_sizes)),
            "steps": len(batch_sizes), "generated_tokens": tokens, "fixed_shape_steps": engine.runner.max_batch is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 16.0], help="arrivals per second")
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["bidirectional"],
                   help="model kinds of the size's shape (see MODELS)")
    p.add_argument("--shared-prefix", type=int, default=0, help="every prompt starts with the same N tokens")
    p.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prefixes (A/B)")
    p.add_argument("--batching", nargs="+", choices=["continuous", "static"], default=["continuous", "static"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    results, params = [], {}
    for kind in args.models:
        model = build_model(args.size, args.device, kind, context=max(1024, args.shared_prefix + 512))
        params[kind] = model.num_parameters()
        cache = MODELS[kind][1]
        warm_arrivals, warm_requests = workload(8, 1000.0, model.config.vocab_size, 999, cache, args.shared_prefix)
        run(model, "continuous", warm_arrivals - warm_arrivals[0], warm_requests, args.max_num_seqs)  # warm-up
        for rate in args.rates:
            arrivals, requests = workload(args.num_requests, rate, model.config.vocab_size, args.seed, cache,
                                          args.shared_prefix)
            for batching in args.batching:
                r = run(model, batching, arrivals, requests, args.max_num_seqs, not args.no_prefix_caching)
                results.append({"model": kind, "rate": rate, **r})
                print(f"{kind:13s} rate {rate:6.1f}/s  {batching:10s}  {r['tokens_per_s']:9.1f} tok/s  TTFT p50 "
                      f"{r['p50_ttft_s']:7.2f}s  p50 {r['p50_latency_s']:7.2f}s  p99 {r['p99_latency_s']:7.2f}s  "
                      f"mean batch {r['mean_batch_size']:5.1f}", flush=True)
        del model

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"size": args.size, "parameters": params, "device": device, "date": time.strftime("%Y-%m-%d"),
              "num_requests": args.num_requests, "max_num_seqs": args.max_num_seqs, "shared_prefix": args.shared_prefix,
              "prefix_caching": not args.no_prefix_caching,
              "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serving_{args.size}_{args.device}" + ("" if args.models == ["bidirectional"] else "_" + "_".join(args.models))
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = ["| model | rate (req/s) | batching | tokens/s | requests/s | TTFT p50 (s) | p50 latency (s) | "
             "p99 latency (s) | mean batch |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['rate']:g} | {r['batching']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['requests_per_s']:.2f} | {r['p50_ttft_s']:.2f} | {r['p50_latency_s']:.2f} | "
                     f"{r['p99_latency_s']:.2f} | {r['mean_batch_size']:.1f} |")
    for kind in args.models:
        for rate in args.rates if len(args.batching) == 2 else []:
            c, s = [r for r in results if r["rate"] == rate and r["model"] == kind]
            lines.append(f"| {kind} | {rate:g} | continuous / static | {c['tokens_per_s'] / s['tokens_per_s']:.2f}x | | "
                         f"| {c['p50_latency_s'] / s['p50_latency_s']:.2f}x | {c['p99_latency_s'] / s['p99_latency_s']:.2f}x | |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, args.rates, out / f"{stem}.png", f"{args.size} shape, {device}")


def plot(results: list[dict], rates: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for (model, batching), style in zip(dict.fromkeys((r["model"], r["batching"]) for r in results),
                                        ("o-", "s--", "^-", "v--", "D-", "x--", "*-", "+--")):
        rows = [r for r in results if (r["model"], r["batching"]) == (model, batching)]
        a.plot(rates, [r["tokens_per_s"] for r in rows], style, label=f"{model}, {batching}")
        b.plot(rates, [r["p50_latency_s"] for r in rows], style, label=f"{model}, {batching} p50")
        b.plot(rates, [r["p99_latency_s"] for r in rows], style, alpha=0.5, label=f"{model}, {batching} p99")
    a.set(xlabel="arrival rate (requests/s)", ylabel="generated tokens/s", title="throughput")
    b.set(xlabel="arrival rate (requests/s)", ylabel="latency (s)", title="latency", yscale="log")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
