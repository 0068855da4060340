"""Imported checkpoints at their real shapes: import time and memory, engine step time against its
floor, and tokens/s at 2, 4 and 8 tokens per forward pass (random weights saved in each family's
published layout, bf16, one GPU).

Families (shapes from the published configs):
  llada8b   LLaDA-8B: bidirectional; no cache and Fast-dLLM's approximate prefix cache (packed, eager), and
            its dual cache (fixed-shape steps, CUDA graphs)
  sdar8b    SDAR-8B-b32 (Qwen3-8B layout, QK-norm, GQA 32/8): block-causal, exact cache, CUDA graphs
  fastdllm7b  Fast-dLLM v2 7B (Qwen2.5-7B layout, q/k/v biases, GQA 28/4, shifted logits): the same
  qwen7b_ar   the Fast-dLLM v2 folder imported as its autoregressive base (causal, one token per step)

Random weights never become confident, so tokens per forward are set by static decoding (a fixed
count per step); the step's cost does not depend on the weights.

  python benchmarks/imported_models.py --device cuda                    # the H100 run
  python benchmarks/imported_models.py --quick                          # CPU smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from generation_speed import measured_bandwidth, measured_matmul_peak, sync, time_engine  # noqa: E402

from pllm import GenerationConfig  # noqa: E402
from pllm.config import ModelConfig  # noqa: E402
from pllm.hf import import_checkpoint  # noqa: E402
from pllm.hf.families import family_of  # noqa: E402
from pllm.hf.weights import unfused_shapes  # noqa: E402

QWEN_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}


def published_configs(quick: bool) -> dict[str, tuple[dict, dict[int, str]]]:
    """name -> (config.json as published, the tokenizer's special tokens by id)."""
    llada = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_heads": 32, "n_kv_heads": 32,
             "n_layers": 32, "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
             "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "activation_type": "silu", "block_type": "llama",
             "layer_norm_type": "rms", "rope": True, "alibi": False, "scale_logits": False, "input_emb_norm": False,
             "attention_layer_norm": False, "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
             "block_group_size": 1, "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081,
             "pad_token_id": 126081, "torch_dtype": "bfloat16"}
    sdar = {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "rope_theta": 1000000, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
            "attention_bias": False, "block_size": 32, "mask_token_id": 151669, "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    fast = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "bd_size": 32,
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151645,
            "hidden_act": "silu", "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    out = {"llada8b": (llada, {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
                               126348: "<|eot_id|>"}),
           "sdar8b": (sdar, QWEN_SPECIALS | {151669: "<|MASK|>"}),
           "fastdllm7b": (fast, QWEN_SPECIALS | {151665: "|<MASK>|"})}
    if quick:  # the same layouts at tiny widths and vocabularies
        small = {"d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 128,
                 "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16}
        shrink = {}
        for name, (config, specials) in out.items():
            base = min(specials)
            remap = {i - base + 200: t for i, t in specials.items()}
            config = {k: small.get(k, v) for k, v in config.items()}
            for key in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
                if key in config:
                    config[key] = config[key] - base + 200
            for key in ("vocab_size", "embedding_size"):
                if key in config:
                    config[key] = max(remap) + 8
            if name != "sdar8b":
                config.pop("head_dim", None)
            shrink[name] = (config, remap)
        out = shrink
    return out


def write_checkpoint(name: str, folder: Path, quick: bool, device: str) -> dict:
    """Random bf16 weights in the family's layout, about 4 GB per shard, with its config.json and a
    word-level tokenizer holding the family's special tokens at their published ids."""
    config, specials = published_configs(quick)[name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {specials.get(i, f"w{i}"): i for i in range(max(specials) + 1)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    family = family_of(config, folder)
    cfg = ModelConfig.from_dict(family.model_fields(config) | {"mask_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
                                                               "bos_token_id": 1, "vocab_size": config.get(
                                                                   "embedding_size", config["vocab_size"])})
    torch.manual_seed(0)
    shard, shard_bytes, files, weight_map, t0 = {}, 0, 0, {}, time.perf_counter()

    def flush():
        nonlocal shard, shard_bytes, files
        if shard:
            files += 1
            file = f"model-{files:05d}.safetensors"
            save_file({k: v.cpu() for k, v in shard.items()}, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0

    for ours, shape in unfused_shapes(cfg).items():
        t = (torch.ones(shape, device=device) if len(shape) == 1 else torch.randn(shape, device=device) * 0.02)
        shard[family.weight_name(ours)] = t.to(torch.bfloat16)
        shard_bytes += t.numel() * 2
        if shard_bytes > 4e9:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"write_s": time.perf_counter() - t0, "files": files}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB on Linux


def step_floor_ms(cfg: ModelConfig, batch: int, positions: int, bandwidth: float | None, peak: float | None) -> float | None:
    """max(every matmul weight read once in bf16, the step's matmul FLOPs at the measured peak):
    positions = tokens each sequence runs through the model in one step."""
    if not bandwidth:
        return None
    n = cfg.num_matmul_params()
    return max(2 * n / bandwidth, 2 * n * positions * batch / peak) * 1e3


def run_family(name: str, folder: Path, args, device: str, bandwidth, peak, overrides: dict | None = None) -> dict:
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before, t0 = peak_rss_gb(), time.perf_counter()
    model, tokenizer = import_checkpoint(folder, device=device, dtype=torch.bfloat16 if device == "cuda" else None,
                                         max_position_embeddings=args.prompt_len + args.gen + 64, **(overrides or {}))
    sync(device)
    row = {"family": name, "import_s": time.perf_counter() - t0,
           "import_peak_host_gb": peak_rss_gb(), "host_gb_before_import": rss_before,
           "import_peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
           "parameters_b": model.num_parameters() / 1e9, "runs": []}
    cfg = model.config
    print(f"{name}: imported in {row['import_s']:.1f} s, peak host {row['import_peak_host_gb']:.1f} GB, "
          f"peak GPU {row['import_peak_gpu_gb']} GB, {row['parameters_b']:.2f} B parameters", flush=True)
    g = torch.Generator().manual_seed(0)
    block_causal = cfg.attention_mode == "block_causal"
    ar = block_causal and cfg.block_size == 1
    modes = ["block"] if block_causal else args.caches
    per_forward = [1] if ar else args.tokens_per_forward
    for batch in args.batches:
        prompts = [torch.randint(0, min(1000, cfg.mask_token_id), (args.prompt_len,), generator=g) for _ in range(batch)]
        for cache in modes:
            for k in per_forward:
                if batch > 1 and k != per_forward[-1] and not ar:
                    continue  # batch 16: the largest count only (time)
                gen = GenerationConfig(max_new_tokens=args.gen, num_refinement_steps=args.gen // k,
                                       block_size=1 if ar else 32, strategy="static", temperature=0.0,
                                       use_adaptive_steps=False, kv_cache="auto" if block_causal else cache)
                try:
                    # fixed-shape steps (CUDA graphs): the exact block cache, and the dual cache
                    timing = time_engine(model, prompts, gen, static_step=block_causal or cache == "dual", device=device)
                except Exception as exc:  # one failing configuration must not hide the others
                    row["runs"].append({"batch": batch, "cache": cache, "tokens_per_forward": k, "error": repr(exc)[:400]})
                    print(f"  batch {batch} {cache} k={k}: FAILED {exc!r}"[:300], flush=True)
                    continue
                if block_causal:
                    positions = 2 * cfg.block_size
                else:
                    total = args.prompt_len + args.gen
                    positions = {"none": total, "prefix": total - args.prompt_len // 2, "dual": 32}[cache]
                floor = step_floor_ms(cfg, batch, positions, bandwidth, peak)
                run = {"batch": batch, "cache": cache, "tokens_per_forward": k, **timing, "floor_ms": floor,
                       "x_floor": floor and timing["step_ms_median"] / floor}
                row["runs"].append(run)
                print(f"  batch {batch:2d} {cache:6s} k={k}: step {timing['step_ms_median']:.2f} ms "
                      f"(floor {floor and round(floor, 2)} ms), {timing['tokens_per_s']:.0f} tok/s", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def table(report: dict) -> str:
    lines = ["| model | batch | cache | tok/forward | step ms | floor ms | x floor | tok/s |", "|---|---|---|---|---|---|---|---|"]
    for row in report["families"]:
        for r in row["runs"]:
            if "error" in r:
                lines.append(f"| {row['family']} | {r['batch']} | {r['cache']} | {r['tokens_per_forward']} | failed | | | |")
                continue
            floor = f"{r['floor_ms']:.2f}" if r["floor_ms"] else "-"
            ratio = f"{r['x_floor']:.2f}" if r["x_floor"] else "-"
            lines.append(f"| {row['family']} | {r['batch']} | {r['cache']} | {r['tokens_per_forward']} | "
                         f"{r['step_ms_median']:.2f} | {floor} | {ratio} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--families", default="llada8b,sdar8b,fastdllm7b,qwen7b_ar")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens-per-forward", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--caches", nargs="+", default=["none", "prefix", "dual"], help="bidirectional models' caches")
    p.add_argument("--work-dir", default="/tmp/pllm-imported")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--write-only", default=None, help=argparse.SUPPRESS)  # child process: write one checkpoint
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, short answers")
    args = p.parse_args()
    if args.quick:
        args.gen, args.prompt_len, args.batches = 32, 16, [1, 2]
    work = Path(args.work_dir)
    if args.write_only:
        print(json.dumps(write_checkpoint(args.write_only, work / args.write_only, args.quick, args.device)))
        return
    device = args.device
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d"), "commit": commit, "torch": torch.__version__,
              "command": " ".join(sys.argv), "args": vars(args), "families": []}
    bandwidth, peak = measured_bandwidth(device), measured_matmul_peak(device)
    report.update(bandwidth_gb_s=bandwidth and bandwidth / 1e9, matmul_peak_tflops=peak and peak / 1e12)
    wanted = args.families.split(",")
    for name in ["llada8b", "sdar8b", "fastdllm7b"]:
        if name not in wanted and not (name == "fastdllm7b" and "qwen7b_ar" in wanted):
            continue
        # Written by a child process, so this one's peak host memory is the import's alone.
        child = subprocess.run([sys.executable, __file__, "--write-only", name, "--work-dir", str(work), "--device", device]
                               + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
        written = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name}: wrote random weights in {written['write_s']:.0f} s", flush=True)
        if name in wanted:
            report["families"].append(run_family(name, work / name, args, device, bandwidth, peak) | {"written": written})
        if name == "fastdllm7b" and "qwen7b_ar" in wanted:
            ar = dict(attention_mode="block_causal", block_size=1, logits_shift=True)
            report["families"].append(run_family("qwen7b_ar", work / name, args, device, bandwidth, peak, ar))
        shutil.rmtree(work / name)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"imported_models_{device}" + ("_quick" if args.quick else "")
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
