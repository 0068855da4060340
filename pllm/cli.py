"""The `pllm` command: demo (the main job on embedded defaults), train (on Ray, or --local), import (a
Hugging Face checkpoint into MLflow), serve, generate, cluster (a Ray head with an MLflow tracking server)."""

from __future__ import annotations

import argparse
import sys

from pllm.config import GenerationConfig, JobConfig
from pllm.pipelines.job_cli import add_train_arguments, run_from_args, runnable, setup_logging
from pllm.pipelines.job_stages import JobResult


def _cmd_train(args: argparse.Namespace) -> int:
    job, result = run_from_args(args)
    if args.command == "demo" and result.registry_uri:
        _serve_demo(job, result, keep_serving=args.keep_serving)
    return 0


def _serve_demo(job: JobConfig, result: JobResult, keep_serving: bool) -> None:
    """The demo's last stage: serve the registered model over HTTP and send it one request."""
    from pllm.actors.launch import complete, serve_until_interrupted, start_server
    from pllm.actors.serve_app import ServeArgs

    args = ServeArgs(model=result.registry_uri, mlflow_uri=result.tracking_uri, max_replicas=1)
    url = start_server(args)
    answer = complete(url, job.prompt, max_tokens=48, temperature=0.0, model=args.served_name())
    print(f"\nServing {result.registry_uri} at {url}/v1 (OpenAI-compatible). One completion request:")
    print("-" * 60)
    print(job.prompt + answer["choices"][0]["text"])
    print("-" * 60)
    print(f"usage: {answer['usage']}, finish_reason: {answer['choices'][0]['finish_reason']}")
    if keep_serving:
        print(f"Serving until Ctrl-C. Try: curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"import os\\n\", \"max_tokens\": 32}}'")
        serve_until_interrupted()
    else:
        print(f"Serve it again: {runnable('pllm')} serve --model {result.registry_uri} "
              f"--mlflow-uri {result.tracking_uri}")


def serve_args(args: argparse.Namespace):
    """`pllm serve`'s flags as the app's arguments (`ServeArgs`, its `engine` an EngineConfig dict)."""
    from pllm.actors.serve_app import ServeArgs

    engine = {"max_num_seqs": args.max_num_seqs, "max_batched_tokens": args.max_batched_tokens,
              "kv_cache_pages": args.kv_cache_pages, "prefix_caching": not args.no_prefix_caching}
    limits = {"max_prompt_tokens": args.max_prompt_tokens, "max_tokens": args.max_tokens_limit,
              "request_timeout_s": args.request_timeout}
    return ServeArgs(model=args.model, draft_model=args.draft_model, model_name=args.name,
                     mlflow_uri=args.mlflow_uri, device=args.device, quantize=args.quantize,
                     api_key=args.api_key, api_key_file=args.api_key_file,
                     limits={k: v for k, v in limits.items() if v is not None},
                     max_queued_requests=args.max_queued_requests,
                     engine=engine, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                     num_gpus_per_replica=args.num_gpus_per_replica)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pllm.actors.launch import serve_until_interrupted, start_server

    app_args = serve_args(args)
    url = start_server(app_args, host=args.host, port=args.port)
    print(f"Serving {args.model} as '{app_args.served_name()}' at {url}/v1 (Ctrl-C stops)", flush=True)
    serve_until_interrupted()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pllm.checkpoint import load_model, load_tokenizer
    from pllm.generator import ParallelGenerator

    tok = load_tokenizer(args.model)
    prompt = args.prompt
    if args.chat:
        if tok.chat_template is None:
            print(f"pllm generate --chat: {args.model} has no chat template", file=sys.stderr)
            return 2
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    model = load_model(args.model, device=args.device, quantize=args.quantize)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, num_refinement_steps=args.steps,
                           temperature=args.temperature, strategy=args.strategy, block_size=args.block_size,
                           confidence_threshold=args.threshold, seed=args.seed)
    gen = ParallelGenerator(model, cfg, tokenizer=tok)
    answer = gen.generate_text(prompt)
    # A chat prompt is the template's markup: show only the answer.
    print(answer if args.chat else args.prompt + answer)
    print(f"[{gen.last_output.nfe} forward passes]", file=sys.stderr)
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    """Check a Hugging Face checkpoint folder (no tensor is read), then log and register it."""
    from pllm.hf import plan_import

    plan = plan_import(args.path)
    cfg = plan.config
    print(f"{args.path}: {plan.family.name} ({plan.family.description or cfg.attention_mode}), "
          f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{cfg.attention_mode}{f' blocks of {cfg.block_size}' if cfg.attention_mode == 'block_causal' else ''}, "
          f"mask id {cfg.mask_token_id}, eos {cfg.eos_token_id}, stops {list(cfg.stop_token_ids)}, "
          f"logits shift {cfg.logits_shift}, chat template {'yes' if plan.tokenizer and plan.tokenizer.chat_template else 'no'}")
    if args.check:
        return 0
    from pllm.registry import log_imported_model

    out = log_imported_model(args.path, plan.family.name, cfg, args.mlflow_uri, experiment=args.experiment,
                             registered_model=args.register, alias=args.alias if args.register else None)
    print(f"logged as {out['model_uri']}" + (f", registered as {out['registry_uri']}" if out["registry_uri"] else ""))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    """A model's projections quantized (weight-only) and saved as a model folder; optionally logged
    and registered in MLflow."""
    from pllm.checkpoint import load_model, load_tokenizer, save_pretrained
    from pllm.quantization import quantization_config
    from pllm.registry import log_quantized_model, resolve_model_source

    folder, generation = resolve_model_source(args.model, args.mlflow_uri)
    model = load_model(folder, quantize=args.precision)
    model.to(model.config.dtype)  # the unquantized tensors (embedding, norms, LM head) in the model's dtype
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError):  # a model saved without its tokenizer
        tokenizer = None
    out = save_pretrained(model, args.output, tokenizer)
    section = quantization_config(model)
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    print(f"quantized {args.model} to {args.precision} ({', '.join(section['modules'])}): {size_mb:.1f} MB, saved to {out}")
    if args.register or args.log:
        logged = log_quantized_model(out, args.model, section, generation, args.mlflow_uri, args.experiment,
                                     args.register, args.alias if args.register else None, {"size_mb": size_mb})
        print(f"logged as {logged['model_uri']}" + (f", registered as {logged['registry_uri']}" if logged["registry_uri"] else ""))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """A model (folder, LoRA adapter folder or MLflow URI) as a Hugging Face checkpoint folder."""
    from pllm.checkpoint import load_model, load_tokenizer
    from pllm.hf import export_checkpoint
    from pllm.registry import resolve_model_source

    folder, _ = resolve_model_source(args.model, args.mlflow_uri)
    model = load_model(folder)  # an adapter folder loads as its base with the adapter merged
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError):  # a model saved without its tokenizer: the weights and config alone
        tokenizer = None
    out = export_checkpoint(model.to(model.config.dtype), args.output, tokenizer, max_shard_size=args.max_shard_size)
    print(f"exported {args.model} ({model.num_parameters() / 1e6:.1f}M parameters, {model.config.dtype}"
          f"{'' if tokenizer else ', no tokenizer'}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pllm", description="Train and serve masked-diffusion language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in [("demo", "the main job on embedded defaults: Ray Data corpus, Ray Train (FSDP2, "
                                     "2 workers), MLflow registry, generate"),
                            ("train", "train from a YAML job config on Ray (in-process local Ray unless "
                                      "RAY_ADDRESS names a cluster)")]:
        p = sub.add_parser(name, help=help_text)
        add_train_arguments(p)
        if name == "demo":
            p.add_argument("--keep-serving", action="store_true", help="keep the HTTP endpoint up until Ctrl-C")
        p.set_defaults(func=_cmd_train)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API on Ray Serve")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a saved "
                                                  "model or a Hugging Face checkpoint folder")
    s.add_argument("--draft-model", default=None,
                   help="a small model with the same tokenizer, same forms as --model, for strategy 'speculative'")
    s.add_argument("--name", default=None, help="model id for clients (default: the registered name)")
    s.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="auto")
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--max-replicas", type=int, default=2)
    s.add_argument("--num-gpus-per-replica", type=float, default=0)
    s.add_argument("--max-num-seqs", type=int, default=32, help="sequences per forward pass")
    s.add_argument("--max-batched-tokens", type=int, default=8192, help="tokens per forward pass")
    s.add_argument("--quantize", default=None, choices=["int8", "fp8", "int4"],
                   help="quantize the model's projection weights at load (weight-only; activations stay 16-bit)")
    s.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY' (default: "
                                                   "$PLLM_API_KEY; prefer --api-key-file: a flag shows in ps)")
    s.add_argument("--api-key-file", default=None, help="a file of accepted keys, one per line")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt a request may send")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="most new tokens a request may ask for")
    s.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is stopped (504)")
    s.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for a free replica (each takes max_ongoing_requests); more are answered 429")
    s.add_argument("--kv-cache-pages", type=int, default=None,
                   help="pages of the GPU steps' KV cache pool (default: max-num-seqs sequences of the model's context)")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the KV cache pages of common prompt prefixes between requests")
    s.set_defaults(func=_cmd_serve)

    i = sub.add_parser("import", help="check a Hugging Face checkpoint folder (LLaDA, Dream, Fast-dLLM v2, SDAR, "
                                      "Llama/Qwen) and log it to MLflow, optionally registered")
    i.add_argument("path", help="the checkpoint folder (config.json, safetensors weights, tokenizer.json)")
    i.add_argument("--register", default=None, metavar="NAME", help="register it as this MLflow model")
    i.add_argument("--alias", default="champion", help="alias of the registered version (with --register)")
    i.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                      "else sqlite:///mlflow.db here)")
    i.add_argument("--experiment", default="pllm")
    i.add_argument("--check", action="store_true", help="only check the folder; log nothing")
    i.set_defaults(func=_cmd_import)

    q = sub.add_parser("quantize", help="quantize a model's projection weights (int8, fp8 or int4, weight-only) and "
                                        "save it; optionally log and register it in MLflow")
    q.add_argument("model", help="a saved model or Hugging Face folder, or models:/NAME@ALIAS, runs:/ID/...")
    q.add_argument("output", help="the folder to write")
    q.add_argument("--precision", required=True, choices=["int8", "fp8", "int4"])
    q.add_argument("--register", default=None, metavar="NAME", help="log it and register it as this MLflow model")
    q.add_argument("--alias", default="quantized", help="alias of the registered version (with --register)")
    q.add_argument("--log", action="store_true", help="log it to MLflow without registering it")
    q.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                                      "else sqlite:///mlflow.db here)")
    q.add_argument("--experiment", default="pllm")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("export", help="write a model as a Hugging Face checkpoint folder (Llama / Qwen2 / Qwen3 "
                                      "layout) that transformers loads; a LoRA adapter is merged into its base")
    e.add_argument("model", help="a saved model, LoRA adapter or Hugging Face folder, or models:/NAME@ALIAS, runs:/ID/...")
    e.add_argument("output", help="the folder to write")
    e.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ sources")
    e.add_argument("--max-shard-size", default="5GB")
    e.set_defaults(func=_cmd_export)

    g = sub.add_parser("generate", help="generate text from a saved model")
    g.add_argument("--model", required=True, help="a saved model or Hugging Face checkpoint folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="send the prompt as one user message through the model's "
                                                       "chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--steps", type=int, default=64, help="total denoising steps")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--strategy", default="static", choices=["static", "threshold"])
    g.add_argument("--threshold", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--quantize", default=None, choices=["int8", "fp8", "int4"],
                   help="quantize the model's projection weights at load")
    g.set_defaults(func=_cmd_generate)

    from pllm.cluster.cli import add_cluster_commands

    add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
