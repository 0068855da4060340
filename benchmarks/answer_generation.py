"""Certainty forcing's data generation (`pllm.certainty_forcing.self_generated_answers`: answers
decoded one token per forward pass) through the engine's fixed-shape steps against the packed
decoding loop, in one run, on a block-32 model of the TPF benchmark's shape (random weights: with
one token per forward, the number of steps does not depend on them).

    python benchmarks/answer_generation.py --device cuda
    python benchmarks/answer_generation.py --device cpu --quick     # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pllm import DiffusionTransformer, ModelConfig
from pllm.certainty_forcing import self_generated_answers

MEDIUM = dict(vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
              intermediate_size=2048)  # benchmarks/decoding.py's "medium" (generation_speed.py --tpf-size medium)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, nargs=2, default=[256, 32], metavar=("FIXED", "PACKED"),
                   help="prompts answered through fixed-shape steps, and through the packed loop")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="tiny model, short answers")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.prompt_len, args.gen = [4, 4], 40, 32
    torch.manual_seed(0)
    cfg = ModelConfig(**(TINY if args.quick else MEDIUM), max_position_embeddings=1024, attention_mode="block_causal",
                      block_size=32)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = DiffusionTransformer(cfg).to(args.device, dtype).eval()
    # Prompts of one block's worth of lengths, as generation_speed.py's fine-tune draws them.
    prompts = [torch.randint(5, cfg.vocab_size, (args.prompt_len - i % 32,)) for i in range(max(args.prompts))]
    rows = []
    for name, count, fixed in (("fixed-shape steps", args.prompts[0], True), ("packed loop", args.prompts[1], False)):
        chunk = prompts[:count]
        t0 = time.perf_counter()
        self_generated_answers(model, chunk, args.prompt_len + args.gen, batch_size=count, fixed_shape_steps=fixed)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"path": name, "prompts": count, "seconds": seconds, "answers_per_s": count / seconds})
        print(f"{name}: {count} answers of {args.gen} tokens in {seconds:.1f}s ({count / seconds:.2f}/s)", flush=True)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "gen": args.gen,
              "prompt_len": args.prompt_len, "rows": rows,
              "fixed_over_packed_answers_per_s": rows[0]["answers_per_s"] / rows[1]["answers_per_s"]}
    print(f"fixed-shape / packed, answers per second: {report['fixed_over_packed_answers_per_s']:.1f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"answer_generation_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = ["| path | prompts | seconds | answers/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['prompts']} | {r['seconds']:.1f} | {r['answers_per_s']:.2f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
