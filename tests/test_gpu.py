"""GPU path of the core library; skipped without CUDA. Run on a GPU machine with `pytest -m gpu`."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, DistributedTrainer, GenerationConfig, ParallelGenerator, load_model, save_pretrained
from test_trainer import loader, small_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("compile_model", [False, True])
def test_bf16_training_on_cuda_lowers_the_elbo(compile_model):
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config())
    cfg = small_training(num_train_steps=150, mixed_precision="bf16", use_torch_compile=compile_model,
                         torch_compile_mode="default")
    trainer = DistributedTrainer(model, cfg, train_dataloader=loader(), eval_dataloader=loader(2, seed=1),
                                 show_progress=False)
    assert trainer.device.type == "cuda"
    before = trainer.evaluate()["val_elbo_nats"]
    final = trainer.train()
    assert final["val_elbo_nats"] < before - 1.0, (before, final)


@pytest.mark.parametrize("compile_model", [False, True])
@pytest.mark.parametrize("hidden", [32, 256])  # head_dim 8 and 64
def test_bf16_training_gradients_match_fp32(hidden, compile_model):
    """The training attention (cuDNN on Hopper, chosen outside the compiled graph) gives the fp32
    model's gradients, compiled or not."""
    import copy
    import torch.nn.functional as F
    from pllm.kernels import prepare_attention

    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(hidden_size=hidden, max_position_embeddings=256,
                                             use_flash_attention=True)).cuda().train()
    reference = copy.deepcopy(model)
    x = torch.randint(4, 96, (4, 256), device="cuda")
    noisy = torch.where(torch.rand(x.shape, device="cuda") < 0.5, 3, x)
    prepare_attention("cuda")
    run = torch.compile(model) if compile_model else model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        F.cross_entropy(run(noisy).float().flatten(0, 1), x.flatten()).backward()
    F.cross_entropy(reference(noisy).flatten(0, 1), x.flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        err = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert err < 0.05, (name, err)


@pytest.mark.parametrize("compile_model", [False, True])
def test_a_training_step_never_waits_for_the_gpu(compile_model):
    """A training step (noise, masking, forward, fused loss, backward, clipping, AdamW) only queues
    work: the masked positions are chosen on the host and the loss and gradient norm stay on the
    device. A synchronizing call (a boolean-mask index, `.item()`, a pageable copy) would let the
    GPU run dry while the host prepares the next step; sync debug mode makes any such call an error."""
    torch.manual_seed(0)
    cfg = small_training(mixed_precision="bf16", use_torch_compile=compile_model, torch_compile_mode="default")
    trainer = DistributedTrainer(DiffusionTransformer(tiny_config()), cfg, train_dataloader=loader(),
                                 show_progress=False)
    batches = loader()

    def step(i):
        out = trainer.training_step(batches[i % len(batches)])
        trainer.strategy.backward(out.loss)
        return out, trainer.strategy.step()

    for i in range(3):  # compilation, cuDNN plans and the allocator warm up here (they may sync)
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(i) for i in range(3, 6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out, grad_norm = results[-1]
    assert out.num_masked > 0 and torch.isfinite(out.loss) and float(grad_norm) > 0
    assert trainer.strategy.optimizer_steps() == 6


def test_bf16_inference_matches_fp32_greedy_on_a_trained_model(tmp_path):
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(dtype="bfloat16"))
    DistributedTrainer(model, small_training(num_train_steps=150, use_torch_compile=False), train_dataloader=loader(),
                       show_progress=False).train()
    save_pretrained(model, tmp_path)
    gpu = load_model(tmp_path, device="cuda")
    assert gpu.embed_tokens.weight.dtype == torch.bfloat16 and gpu.rope_cos.dtype == torch.float32
    x = loader(1, seed=2)[0].cuda()
    x = torch.where(torch.rand(x.shape, device="cuda") < 0.3, 3, x)  # a partly masked input
    ref = model.float().cuda().eval()(x)
    low = gpu(x)
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    assert (low.softmax(-1) - ref.softmax(-1)).abs().max() < 0.05
    cfg = GenerationConfig(max_new_tokens=16, num_refinement_steps=8, block_size=8, temperature=0.0)
    out = ParallelGenerator(gpu, cfg).generate_batch([torch.tensor([10, 17, 24]), torch.tensor([50, 57])])
    assert [o.shape for o in out] == [(16,), (16,)] and all((o != 3).all() for o in out)


def test_engine_on_cuda_matches_single_requests_in_fp32():
    from pllm.engine import Engine
    from test_engine import mixed_requests, run_staggered

    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(max_position_embeddings=256)).cuda().eval()
    requests = mixed_requests(16)
    alone = [Engine(model).generate([p], cfg)[0] for p, cfg in requests]
    batched = run_staggered(Engine(model), requests)
    assert batched == alone


def test_engine_on_cuda_bf16_completes_mixed_requests():
    from pllm import EngineConfig
    from pllm.engine import Engine
    from test_engine import mixed_requests

    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(max_position_embeddings=256)).cuda().to(torch.bfloat16).eval()
    requests = mixed_requests(24)
    answers = Engine(model, EngineConfig(max_num_seqs=8)).generate([p for p, _ in requests], [c for _, c in requests])
    for answer, (_, cfg) in zip(answers, requests):
        assert len(answer) == cfg.max_new_tokens or cfg.use_adaptive_steps


def test_bf16_step_graphs_replay_in_any_order_at_batch_16():
    """The bf16 fixed-shape step (cuDNN attention on Hopper) at batch 16: every captured graph
    replays in any order (shorter key lengths after longer ones, as when new requests join) and
    gives the eager step's logits, and a staggered batch decodes to the end with pipelined steps.
    (Every bucket here covers the batch's positions: a shorter one would scatter keys/values past
    its slice, which is what crashed `benchmarks/profile_step.py --batch 16` on an H200.)"""
    from pllm import EngineConfig
    from pllm.engine import Engine

    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attention_mode="block_causal", block_size=32, use_flash_attention=True)
    model = DiffusionTransformer(cfg).cuda().to(torch.bfloat16).eval()
    engine = Engine(model, EngineConfig(max_num_seqs=16))
    static = engine.runner.static
    assert engine.runner.pipeline and len(static.graphs) == len(static.buckets) * len(static.lengths)
    gen = GenerationConfig(max_new_tokens=96, num_refinement_steps=96, temperature=0.0, strategy="threshold",
                           use_adaptive_steps=False)
    ids = [engine.add_request(torch.randint(4, 96, (20 + 9 * i,)), gen) for i in range(16)]
    for _ in range(5):
        engine.step()
    shapes = sorted(static.graphs, key=lambda shape: shape[1], reverse=True)
    for B, S in shapes + shapes[::-1]:
        static.graphs[B, S][0].replay()
    torch.cuda.synchronize()
    B, S = 16, static.lengths[0]
    graph, out = static.graphs[B, S]
    graph.replay()
    replayed = out.clone()
    torch.testing.assert_close(static._step(B, S), replayed, rtol=0.05, atol=0.05)
    while engine.has_work():
        engine.step()
    assert engine.stats["finished"] == len(ids)
    assert static.num_ahead_used >= static.num_ahead - len(ids)  # only answers ending drop a step


def test_launching_a_step_ahead_never_waits_for_the_gpu(monkeypatch):
    """`run_ahead` and the batched commit before it must only queue work: a synchronizing call
    there (a copy from pageable memory, `.item()`) makes the host wait for the step in flight and
    undoes the pipelining. CUDA's sync debug mode turns any such call into an error."""
    import pllm.engine.model_runner as runner_module
    from pllm import EngineConfig
    from pllm.engine import Engine

    def strict(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attention_mode="block_causal", block_size=32, use_flash_attention=True)
    engine = Engine(DiffusionTransformer(cfg).cuda().to(torch.bfloat16).eval(), EngineConfig(max_num_seqs=4))
    static, calls = engine.runner.static, []
    static.run_ahead = strict(static.run_ahead)
    monkeypatch.setattr(runner_module, "commit_batch", strict(runner_module.commit_batch))
    gen = GenerationConfig(max_new_tokens=64, num_refinement_steps=64, temperature=0.0, strategy="threshold",
                           use_adaptive_steps=False)
    engine.generate([torch.randint(4, 96, (20 + 9 * i,)) for i in range(4)], gen)
    assert engine.stats["finished"] == 4 and static.num_ahead > 50
    assert calls.count("commit_batch") > 50


def test_serve_app_on_a_gpu_replica(tmp_path):
    import ray
    import requests
    from ray import serve

    from pllm.actors.serve_app import ServeArgs, build_app
    from serve_fixtures import free_port, make_model_dir

    model_dir = make_model_dir(tmp_path / "model")
    port = free_port()
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeArgs(model=str(model_dir), max_replicas=1, num_gpus_per_replica=1)), name="pllm",
                  route_prefix="/")
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                          json={"prompt": "import os\n", "max_tokens": 16, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
        stats = serve.get_deployment_handle("Generator", app_name="pllm").stats.remote().result()
        assert stats["generated_tokens"] >= 16
        info = serve.get_deployment_handle("Generator", app_name="pllm").info.remote().result()
        assert info["context_length"] == 256
    finally:
        serve.shutdown()
        ray.shutdown()


# The layer shapes of the imported families (two layers each), hidden 1,024-8,192: head size 128,
# MHA and GQA, q/k/v biases, QK-norm, shifted logits, vocabularies of 126k-152k.
BIG_SHAPES = {
    "llada-8b": dict(vocab_size=126464, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=12288, qk_norm=False, tie_word_embeddings=False, rope_theta=5e5),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, qk_norm=False, attention_bias=True, logits_shift=True,
                       tie_word_embeddings=False, rope_theta=1e6),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=12288, tie_word_embeddings=False, rope_theta=1e6),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       intermediate_size=3072, rope_theta=1e6),
    "llama-70b": dict(vocab_size=128256, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=28672, qk_norm=False, tie_word_embeddings=False, rope_theta=5e5),
}


@pytest.mark.parametrize("shape", list(BIG_SHAPES))
def test_step_kernels_at_imported_family_shapes(shape):
    """The bf16 fixed-shape step with our kernels at each family's widths: logits as the step with
    every kernel off (cuBLAS, SDPA), and CUDA-graph decoding at batch 1 and 16 runs to the end."""
    from pllm import EngineConfig, ModelConfig
    from pllm.engine import Engine
    from pllm.engine.step_forward import forward_static, new_static_cache
    from pllm.kernels.options import KernelOptions

    torch.manual_seed(0)
    cfg = ModelConfig(**BIG_SHAPES[shape], num_hidden_layers=2, attention_mode="block_causal", block_size=32,
                      max_position_embeddings=512)
    with torch.device("cuda"):
        model = DiffusionTransformer(cfg).to(torch.bfloat16).eval()
    plain = KernelOptions(skinny_gemm=False, bias_attention=False, step_bias=False, rotate_qkv=False,
                          add_rms_norm=False, silu_mul=False)
    for B in (1, 16):
        tokens = torch.randint(0, 30000, (B, 64), device="cuda")
        positions = torch.arange(64, device="cuda").expand(B, 64).contiguous()
        limits = torch.full((B,), 64, device="cuda")
        logits = [forward_static(model, tokens, positions, limits, new_static_cache(model, B), slice(0, B), 32,
                                 kernels=k) for k in (KernelOptions(), plain)]
        assert (logits[0] - logits[1]).abs().max() <= 0.05 * logits[1].abs().max()
        prompts = [torch.randint(0, 30000, (100,)) for _ in range(B)]
        gen = GenerationConfig(max_new_tokens=64, num_refinement_steps=16, block_size=32, temperature=0.0,
                               use_adaptive_steps=False)
        engine = Engine(model, EngineConfig(max_num_seqs=B))
        assert [len(a) for a in engine.generate(prompts, gen)] == [64] * B
        assert engine.runner.static.num_replays > 0


def test_import_streams_a_checkpoint_onto_the_gpu(tmp_path):
    from hf_fixtures import cases, reference_model, write_checkpoint
    from pllm.hf import import_checkpoint

    case = cases()["sdar"]
    folder = write_checkpoint(case, reference_model(case), tmp_path / "sdar")
    cpu, _ = import_checkpoint(folder)
    gpu, _ = import_checkpoint(folder, device="cuda")  # the checkpoint's bf16 on a GPU
    assert gpu.lm_head.weight.dtype == torch.bfloat16 and gpu.lm_head.weight.is_cuda and gpu.rope_cos.is_cuda
    ids = torch.randint(0, 240, (1, 24))
    assert (gpu(ids.cuda()).cpu() - cpu(ids)).abs().max() <= 0.05 * cpu(ids).abs().max()
