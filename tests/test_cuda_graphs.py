"""Fixed-shape (CUDA-graph) decoding steps give exactly the packed path's tokens.

On CPU the fixed-shape step runs eagerly (float64 model, so any difference is a logic error, not
rounding); on a GPU the same tests capture and replay CUDA graphs (fp32)."""

import copy

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, EngineConfig, GenerationConfig
from pllm.decoding import DecodeRules, DecodeState
from pllm.decoding.loop import run_states
from pllm.engine import Engine, ModelRunner
from pllm.engine.cuda_graphs import StaticStepRunner
from pllm.engine.step_forward import forward_static, new_static_cache
from test_engine import mixed_requests, run_staggered

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64


@pytest.fixture(scope="module")
def block_model():
    torch.manual_seed(0)
    cfg = tiny_config(attention_mode="block_causal", block_size=8, max_position_embeddings=128)
    return DiffusionTransformer(cfg).to(DEVICE, DTYPE).eval()


def test_fixed_shape_steps_equal_packed_steps_in_a_changing_batch(block_model):
    requests = mixed_requests(16)  # prompts 1-39 tokens, answers 1-47, greedy and sampled, both strategies
    config = EngineConfig(max_num_seqs=6, max_batched_tokens=400)
    packed = run_staggered(Engine(block_model, config, static_step=False), requests)
    engine = Engine(block_model, config, static_step=True)
    fixed = run_staggered(engine, requests)
    assert fixed == packed
    static = engine.runner.static
    assert static.num_steps >= engine.stats["steps"] > 0  # every step ran fixed-shape
    assert (static.num_replays == static.num_steps) == (DEVICE == "cuda")
    assert max(len(a) for a in fixed) > 30
    # Each finished block was recomputed once, beside its successor, never again. (Pipelined, as on a
    # GPU, the counter counts candidate rows: every step of a confidence rule launches one per
    # sequence, and the device makes it padding unless the block ended.)
    assert 0 < static.num_finalize_rows
    if not engine.runner.pipeline:
        assert static.num_finalize_rows < static.num_steps


@pytest.mark.parametrize("shift", [True, False], ids=["shifted", "unshifted"])
def test_autoregressive_models_step_fixed_shape_as_packed(shift):
    """One-token blocks: with logits_shift the window is the last committed token alone (its
    keys/values final at once, its logits the next token's); without, the masked token, and the one
    before it is finalized in a row of its own. Either way the packed path's tokens, in a changing
    batch."""
    torch.manual_seed(0)
    cfg = tiny_config(attention_mode="block_causal", block_size=1, logits_shift=shift, max_position_embeddings=128)
    model = DiffusionTransformer(cfg).to(DEVICE, DTYPE).eval()
    requests = mixed_requests(10)
    config = EngineConfig(max_num_seqs=4, max_batched_tokens=400)
    packed = run_staggered(Engine(model, config, static_step=False), requests)
    engine = Engine(model, config, static_step=True)
    assert run_staggered(engine, requests) == packed
    static = engine.runner.static
    assert static.window == 1
    assert (static.num_finalize_rows == 0) == shift
    assert static.num_steps >= engine.stats["steps"] > 0
    assert max(map(len, packed)) > 20


def test_draft_verify_runs_packed_beside_fixed_shape_requests(block_model):
    prompts = [torch.arange(4, 4 + n) for n in (3, 9, 17, 8)]
    configs = [GenerationConfig(max_new_tokens=24, num_refinement_steps=12, temperature=0.0, strategy=s,
                                use_adaptive_steps=False) for s in ("static", "draft_verify", "threshold", "draft_verify")]
    packed = Engine(block_model, static_step=False).generate(prompts, configs)
    engine = Engine(block_model, static_step=True)
    assert engine.generate(prompts, configs) == packed
    assert engine.runner.static.num_steps > 0


def test_block_cache_is_exact_when_the_prompt_ends_inside_a_block(block_model):
    """The prompt's last block is shared with the answer's first tokens: its keys are not final
    until that block is decoded, so the cache must not keep them earlier (a regression)."""
    rules = DecodeRules(gen_length=20, num_steps=10, cache="block")
    state = DecodeState(torch.arange(4, 15), rules, block_model.config, block_model.device)  # 11 tokens
    runner = StaticStepRunner(block_model, 1, capture=False)
    while not state.finished:
        uncached = copy.deepcopy(state)
        uncached.kv = None
        uncached.cache_mode = "none"
        want = run_states(block_model, [uncached])[0][0]
        got_packed = run_states(block_model, [state])[0][0]
        got_fixed = runner.run([state])[0][0]
        tol = 1e-5 if DEVICE == "cuda" else 1e-10
        torch.testing.assert_close(got_packed, want, rtol=tol, atol=tol)
        torch.testing.assert_close(got_fixed, want, rtol=tol, atol=tol)
        state.advance([got_packed])


def test_fixed_shape_steps_need_a_block_causal_model():
    model = DiffusionTransformer(tiny_config())
    with pytest.raises(ValueError, match="block-causal"):
        StaticStepRunner(model, 4, capture=False)


def test_parallel_generator_with_cuda_graphs_equals_the_packed_path(block_model):
    from pllm import ParallelGenerator
    from pllm.decoding import decode_with_rules

    prompts = [torch.arange(4, 4 + n) for n in (1, 6, 13, 30)]
    cfg = GenerationConfig(max_new_tokens=40, num_refinement_steps=20, temperature=0.0, strategy="threshold",
                           confidence_threshold=0.05)
    packed = ParallelGenerator(block_model, cfg, use_cuda_graphs=False).generate_batch(prompts)
    rules = [DecodeRules.from_config(cfg)] * len(prompts)
    runner = ModelRunner(block_model, EngineConfig(max_num_seqs=len(prompts)), static_step=True)
    fixed = decode_with_rules(block_model, prompts, rules, runner=runner).tokens
    assert [t.cpu().tolist() for t in fixed] == [t.tolist() for t in packed]
    assert runner.static.num_steps > 0
    generator = ParallelGenerator(block_model, cfg, use_cuda_graphs=True)
    assert [t.tolist() for t in generator.generate_batch(prompts)] == [t.tolist() for t in packed]
    assert (generator._runner is not None) == (DEVICE == "cuda")  # graphs only on a GPU


def test_compiled_step_ops_give_the_eager_logits(block_model):
    """The compiled step (residual adds fused with the following norm, QK-norm + rotary, SiLU * up)
    computes the eager step's logits, with every norm weight away from 1 so that each one counts."""
    model = copy.deepcopy(block_model).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    B, W = 2, 2 * model.config.block_size
    tokens = torch.randint(4, model.config.vocab_size, (B, W), device=DEVICE)
    positions = torch.tensor([[0], [8]], device=DEVICE) + torch.arange(W, device=DEVICE)
    limits = torch.tensor([13, 20], device=DEVICE)
    eager, compiled = (forward_static(model, tokens, positions, limits, new_static_cache(model, B), slice(0, B), 8,
                                      compile_ops=c) for c in (False, True))
    assert compiled.shape == (B, 8, model.config.vocab_size)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_step_ops_decode_the_same_tokens(block_model):
    """torch.compile'd elementwise chains (QK-norm + rotary, add + RMSNorm, SiLU * up) in the
    fixed-shape step: the same answers as the eager ops."""
    from pllm.decoding import decode_with_rules

    prompts = [torch.arange(4, 4 + n) for n in (1, 6, 13, 30)]
    cfg = GenerationConfig(max_new_tokens=40, num_refinement_steps=20, temperature=0.0, strategy="threshold",
                           confidence_threshold=0.05)
    rules = [DecodeRules.from_config(cfg)] * len(prompts)
    model = block_model.float()  # the compiled path is for the GPU dtypes; float64 is not its case
    config = EngineConfig(max_num_seqs=4)
    plain = decode_with_rules(model, prompts, rules, runner=ModelRunner(model, config.replace(compile_step=False),
                                                                        static_step=True))
    runner = ModelRunner(model, config, static_step=True)
    runner.static.compile_ops = True  # compiled on CPU too (the runner compiles only on a GPU)
    compiled = decode_with_rules(model, prompts, rules, runner=runner)
    same = sum(int((a == b).sum()) for a, b in zip(plain.tokens, compiled.tokens))
    assert same >= 0.95 * sum(t.numel() for t in plain.tokens)
    block_model.to(DTYPE)


def test_steps_launched_ahead_change_no_token(block_model):
    """The pipelined loop (each step launched before the host reads the last one's commits; on by
    default with CUDA graphs, forced here on CPU) decodes the plain loop's tokens: in a changing
    batch, and in a steady one whose rows finish their blocks at different steps, where the device
    moves each finished row to its next block, so only an answer's end drops a step."""
    requests = mixed_requests(16)
    config = EngineConfig(max_num_seqs=6, max_batched_tokens=400, pipeline_steps=False)
    plain = run_staggered(Engine(block_model, config, static_step=True), requests)
    engine = Engine(block_model, config, static_step=True)
    engine.runner.pipeline = True
    assert run_staggered(engine, requests) == plain
    assert engine.runner.static.num_ahead_used > 0

    prompts = [torch.arange(4, 4 + n) for n in (5, 11, 19, 26)]  # blocks of 8 end at different steps
    # A rule that may end a block at any step (every row gets a finalize row, padding unless its
    # block ended), and static decoding, whose rows get one only at a block's last step.
    for cfg in (GenerationConfig(max_new_tokens=40, num_refinement_steps=40, temperature=0.0, strategy="threshold",
                                 confidence_threshold=0.05, use_adaptive_steps=False),
                GenerationConfig(max_new_tokens=40, num_refinement_steps=15, temperature=0.0, strategy="static",
                                 use_adaptive_steps=False)):
        expected = Engine(block_model, config, static_step=False).generate(prompts, cfg)
        engine = Engine(block_model, config, static_step=True)
        engine.runner.pipeline = True
        assert engine.generate(prompts, cfg) == expected
        static = engine.runner.static
        assert static.num_ahead == engine.stats["steps"] > 3 * 40 // 8  # every step launched its successor
        assert static.num_ahead - len(prompts) <= static.num_ahead_used < static.num_ahead
        if cfg.strategy == "static":  # 40 tokens span at most 6 blocks: 5 finalize rows per answer (+ dropped steps')
            dropped = static.num_ahead - static.num_ahead_used
            assert 0 < static.num_finalize_rows <= 5 * len(prompts) + len(prompts) * dropped


@pytest.mark.parametrize("threshold", [0.5, 0.999])  # thresholds that fire often, and almost never
def test_batched_commits_equal_per_request_commits(block_model, monkeypatch, threshold):
    """Greedy requests of one fixed-shape step commit in one call (`batched_commit`) and decode the
    tokens, with the same forward passes per request, of committing request by request: static
    schedules (several positions per step) beside threshold rules that fire, prompts ending inside
    a block, requests joining and leaving. Different thresholds in one step fall back to one by one."""
    import pllm.engine.model_runner as runner_module
    from pllm.engine.batched_commit import batchable, commit_batch

    model = copy.deepcopy(block_model)
    model.lm_head.weight.data *= 25  # tied with the embeddings: confident logits, so thresholds fire
    g = torch.Generator().manual_seed(3)
    requests = []
    for i in range(12):
        prompt = torch.randint(4, 96, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        requests.append((prompt, GenerationConfig(
            max_new_tokens=int(torch.randint(8, 40, (1,), generator=g)), num_refinement_steps=[4, 8, 40][i % 3],
            temperature=0.0, strategy=["static", "threshold"][i % 2], confidence_threshold=threshold,
            use_adaptive_steps=True)))

    def run(engine):
        answers, nfe, pending, step = {}, {}, list(requests), 0
        while pending or engine.has_work():
            assert step < 1000, "the engine stopped making progress"
            if pending and step % 2 == 0:
                answers[engine.add_request(*pending.pop(0))] = []
            for out in engine.step():
                answers[out.request_id].extend(out.new_token_ids)
                nfe[out.request_id] = out.nfe
            step += 1
        return list(answers.values()), list(nfe.values())

    config = EngineConfig(max_num_seqs=6, max_batched_tokens=400)
    one_by_one = Engine(model, config.replace(min_batched_commits=1000), static_step=True)
    expected, expected_nfe = run(one_by_one)
    if threshold < 0.9:
        assert sum(expected_nfe) < sum(map(len, expected)) / 1.5  # the rules commit several tokens per pass
    calls = []
    monkeypatch.setattr(runner_module, "commit_batch",
                        lambda *a, **k: (calls.append(len(a[0])), commit_batch(*a, **k)))
    engine = Engine(model, config, static_step=True)
    assert run(engine) == (expected, expected_nfe)
    assert len(calls) > engine.stats["steps"] // 2 and min(calls) >= 3 and max(calls) == 6

    states = [DecodeState(torch.arange(4, 9), DecodeRules.from_config(cfg), model.config, DEVICE)
              for _, cfg in requests[:4]]
    assert batchable(states)
    other = GenerationConfig(max_new_tokens=8, temperature=0.0, strategy="threshold", confidence_threshold=0.6)
    assert not batchable(states + [DecodeState(torch.arange(4, 9), DecodeRules.from_config(other), model.config,
                                               DEVICE)])


def test_a_runner_takes_batches_up_to_its_largest_bucket(block_model):
    # ParallelGenerator keeps its runner while a batch fits this bound and builds a larger one past it.
    assert ModelRunner(block_model, EngineConfig(max_num_seqs=3), static_step=True).max_batch == 4
    assert ModelRunner(block_model, EngineConfig(max_num_seqs=3), static_step=False).max_batch is None


@pytest.mark.parametrize("features", [
    dict(attention_bias=True, qk_norm=False, logits_shift=True),  # Qwen2 / Fast-dLLM v2
    dict(head_dim=16, qk_norm=True),  # Qwen3 / SDAR: heads wider than hidden_size / heads
    dict(attention_bias=True, attention_out_bias=True, qk_norm=False, logits_shift=True,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}),
], ids=["qwen2", "qwen3", "llama-biased"])
def test_imported_layouts_step_fixed_shape_as_packed(features):
    """Every feature an imported family needs gives the fixed-shape step the packed path's tokens."""
    torch.manual_seed(0)
    cfg = tiny_config(attention_mode="block_causal", block_size=8, max_position_embeddings=128).to_dict() | features
    model = DiffusionTransformer(type(tiny_config()).from_dict(cfg)).to(DEVICE, DTYPE).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    requests = mixed_requests(8)
    config = EngineConfig(max_num_seqs=4, max_batched_tokens=400)
    packed = run_staggered(Engine(model, config, static_step=False), requests)
    engine = Engine(model, config, static_step=True)
    assert run_staggered(engine, requests) == packed
    assert engine.runner.static.num_steps > 0


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
def test_dual_cache_fixed_shape_steps_equal_packed_dual_cache(shift):
    """Bidirectional models: dual-cache steps through the fixed-shape runner (a block's first step
    refreshes the slot, later steps replay) give the packed dual cache's tokens, in a changing batch."""
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(block_size=8, max_position_embeddings=128, logits_shift=shift)
                                 ).to(DEVICE, DTYPE).eval()
    requests = [(prompt, cfg.replace(kv_cache="dual", block_size=[4, 8][i % 2], strategy="static"))
                for i, (prompt, cfg) in enumerate(mixed_requests(10))]
    config = EngineConfig(max_num_seqs=4, max_batched_tokens=400)
    packed = run_staggered(Engine(model, config, static_step=False), requests)
    engine = Engine(model, config, static_step=True)
    assert run_staggered(engine, requests) == packed
    dual = engine.runner.dual
    assert dual.num_steps > 0 and dual.num_refreshes > 0
    assert (dual.num_replays == dual.num_steps) == (DEVICE == "cuda")


def test_max_model_len_sizes_the_slots_and_bounds_requests(block_model):
    engine = Engine(block_model, EngineConfig(max_num_seqs=2, max_model_len=48), static_step=True)
    cache = engine.runner.static.cache  # scratch pages, then 48 positions in whole pages
    assert cache.offset > block_model.config.block_size and 48 <= cache.length - cache.offset < 48 + cache.page_size
    with pytest.raises(ValueError, match="exceeds the engine's context of 48 tokens"):
        engine.add_request(torch.arange(4, 40), GenerationConfig(max_new_tokens=16))
    prompt = torch.arange(4, 20)
    cfg = GenerationConfig(max_new_tokens=24, num_refinement_steps=12, temperature=0.0)
    assert engine.generate([prompt], cfg) == Engine(block_model, static_step=False).generate([prompt], cfg)
