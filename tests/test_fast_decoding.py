"""Fast parallel decoding: the strategies, the KV caches and block-diffusion training."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, GenerationConfig, ParallelGenerator
from pllm.decoding import CreditTrace, DecodeRules, decode, decode_with_rules, factor_commit_mask
from pllm.diffusion import diffusion_loss, get_schedule
from pllm.engine import Engine
from pllm.kv_cache import KVCache, Segment

MASK = 3
STRATEGIES = ["static", "threshold", "factor", "credit", "draft_verify"]


def model_of(seed=0, scale=1.0, **overrides):
    """A random model in float64 (exact comparisons); `scale` sharpens its predictions."""
    torch.manual_seed(seed)
    model = DiffusionTransformer(tiny_config(**overrides)).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 96, (n,), generator=g) for n in lengths]


# -- commit rules ------------------------------------------------------------------------------
def test_factor_rule_commits_the_leading_run_that_passes():
    still = torch.ones(1, 5, dtype=torch.bool)
    # sorted: 0.99 (n=1 >= 1 - 1/2), 0.8 (n=2 >= 1 - 1/3 = 0.667), 0.7 (n=3 < 1 - 1/4 = 0.75) -> 2
    conf = torch.tensor([[0.7, 0.99, 0.1, 0.8, 0.69]])
    assert factor_commit_mask(conf, still, 1.0).tolist() == [[False, True, False, True, False]]
    # nothing passes beyond the first: still commits one; a huge factor commits everything masked
    assert factor_commit_mask(torch.full((1, 5), 0.01), still, 0.01).sum() == 1
    half = torch.tensor([[True, False, True, False, True]])
    assert factor_commit_mask(conf, half, 100.0).tolist() == half.tolist()


def test_credit_accumulates_on_a_repeated_top_token_and_decays():
    trace = CreditTrace(2, 4, alpha=0.7, beta=0.8, gamma=0.2, device="cpu")
    logits = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    still = torch.tensor([True, False])
    fused1 = trace.fuse(logits, still)
    fused2 = trace.fuse(logits, still)
    assert trace.credit[0, 0] == pytest.approx(0.6 ** 0.2 * 1.8)  # gain, decay 0.8, gain again
    assert trace.credit[1].sum() == 0  # committed positions gain nothing
    p1, p2 = fused1.softmax(-1)[0, 0], fused2.softmax(-1)[0, 0]
    assert 0.6 < p1 < p2  # the consistently top token gets more confident step after step


# -- every strategy ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_batches_prompts_of_different_lengths_and_keeps_prompts(strategy):
    model = model_of(scale=10.0)
    cfg = GenerationConfig(max_new_tokens=20, num_refinement_steps=10, block_size=8, temperature=0.0,
                           strategy=strategy, confidence_threshold=0.7, parallel_factor=2.0)
    prompts = prompts_of([2, 9, 15, 5])
    rules = DecodeRules.from_config(cfg)
    seen = []
    out = decode_with_rules(model, prompts, [rules] * 4, on_step=lambda x, c: seen.append(x.clone()))
    P = 15
    for b, p in enumerate(prompts):
        for state in seen:
            assert torch.equal(state[b, P - p.numel():P], p), "a prompt token changed"
        assert not (out.tokens[b] == MASK).any()
        alone = decode_with_rules(model, [p], [rules])
        assert torch.equal(alone.tokens[0], out.tokens[b]), f"{strategy}: batching changed row {b}"
    assert out.nfe >= 1 and out.tokens_per_forward > 0


def test_threshold_one_commits_one_token_per_step_through_the_config():
    model = model_of(scale=30.0)
    gen = ParallelGenerator(model, GenerationConfig(max_new_tokens=12, strategy="threshold", confidence_threshold=1.0,
                                                    temperature=0.0, use_adaptive_steps=False))
    gen.generate_batch(prompts_of([4, 6]))
    assert gen.last_output.nfe == 12 and gen.last_output.tokens_per_forward == 1.0


def test_parallel_strategies_take_fewer_steps_on_a_confident_model():
    model = model_of(scale=100.0)
    base = dict(max_new_tokens=24, num_refinement_steps=24, block_size=8, temperature=0.0, use_adaptive_steps=False)
    nfe = {}
    for strategy in ["static", "threshold", "factor", "credit"]:
        gen = ParallelGenerator(model, GenerationConfig(strategy=strategy, confidence_threshold=0.8, **base))
        gen.generate_batch(prompts_of([5]))
        nfe[strategy] = gen.last_output.nfe
    assert nfe["static"] == 24
    assert all(nfe[s] < 24 for s in ["threshold", "factor", "credit"]), nfe
    assert nfe["credit"] <= nfe["threshold"], nfe


# -- lossless draft-and-verify -----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_draft_verify_equals_static_exactly_with_no_more_forward_passes(seed):
    g = torch.Generator().manual_seed(seed)
    model = model_of(seed, scale=float(torch.randint(1, 40, (1,), generator=g)))
    lengths = torch.randint(1, 20, (3,), generator=g).tolist()
    gen_length = int(torch.randint(4, 33, (1,), generator=g))
    block = [None, 4, 8][seed % 3]
    steps = int(torch.randint(1, gen_length + 1, (1,), generator=g))
    sampled = seed % 2 == 1
    kw = dict(gen_length=gen_length, num_steps=steps, block_size=block, temperature=0.8 if sampled else 0.0,
              top_k=20 if sampled else 0, seed=[seed, seed + 100, seed + 200],
              confidence_threshold=0.9 if seed % 3 == 2 else None)
    prompts = prompts_of(lengths, seed)
    static = decode(model, prompts, **kw)
    for draft_length in (1, 3, 6):
        fast = decode(model, prompts, draft_length=draft_length, **kw)
        for a, b in zip(static.tokens, fast.tokens):
            assert torch.equal(a, b), f"draft_length={draft_length}: output differs from static"
        assert fast.nfe <= static.nfe
        assert fast.steps == static.steps  # the same denoising steps, several per forward pass


def test_draft_verify_saves_forward_passes_and_streams_through_the_engine():
    model = model_of(scale=30.0)
    cfg = GenerationConfig(max_new_tokens=24, num_refinement_steps=24, block_size=8, temperature=0.0,
                           use_adaptive_steps=False)
    prompts = prompts_of([3, 8, 11])
    static = ParallelGenerator(model, cfg)
    expected = static.generate_batch(prompts)
    fast = ParallelGenerator(model, cfg.replace(strategy="draft_verify", draft_length=4))
    assert [t.tolist() for t in fast.generate_batch(prompts)] == [t.tolist() for t in expected]
    assert fast.last_output.nfe < static.last_output.nfe
    engine = Engine(model)
    answers = engine.generate(prompts, cfg.replace(strategy="draft_verify", draft_length=4))
    assert answers == [t.tolist() for t in expected]


# -- KV caches ---------------------------------------------------------------------------------
def test_cached_block_logits_equal_uncached_for_a_block_causal_model():
    model = model_of(attention_mode="block_causal", block_size=4)
    seq = prompts_of([23])[0]
    full = model.forward_packed([seq], [torch.arange(23)])[0]
    cache = KVCache(model.config.num_hidden_layers)
    first = model.forward_segments([Segment(seq, torch.arange(0, 12), (0, 12), cache, (0, 8))])[0]
    assert cache.length == 8  # only finished blocks are kept
    rest = model.forward_segments([Segment(seq, torch.arange(8, 23), (8, 23), cache, None)])[0]
    # logits come back in float32 from a float64 model
    torch.testing.assert_close(first, full[:12], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rest, full[8:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_block_cache_decodes_like_no_cache_on_a_block_causal_model(strategy):
    model = model_of(scale=10.0, attention_mode="block_causal", block_size=4)
    cfg = GenerationConfig(max_new_tokens=18, num_refinement_steps=18, temperature=0.0, strategy=strategy,
                           confidence_threshold=0.7)
    prompts = prompts_of([3, 8, 13])
    cached = decode_with_rules(model, prompts, [DecodeRules.from_config(cfg.replace(kv_cache="block"))] * 3)
    plain = decode_with_rules(model, prompts, [DecodeRules.from_config(cfg.replace(kv_cache="none"))] * 3)
    assert [t.tolist() for t in cached.tokens] == [t.tolist() for t in plain.tokens]
    assert cached.nfe == plain.nfe


def test_block_causal_decoding_follows_the_model_blocks_and_computes_one_block_per_step():
    model = model_of(attention_mode="block_causal", block_size=4)
    from pllm.decoding import DecodeState

    state = DecodeState(prompts_of([6])[0], DecodeRules(gen_length=10, num_steps=10, cache="block"),
                        model.config, "cpu")
    assert state.blocks == [(6, 8), (8, 12), (12, 16)]  # the first block holds the prompt's tail
    computed = []
    while not state.finished:
        seg = state.segments()[0]
        computed.append(seg.span())
        state.advance(model.forward_segments([seg])[0])
    # first pass: prompt + first block; later passes: at most the finished block + the current one
    assert computed[0] == (0, 8) and all(b - a <= 8 for a, b in computed[1:])
    assert computed[-1] == (12, 16)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_approximate_caches_on_a_bidirectional_model(mode):
    model = model_of(scale=10.0)
    cfg = GenerationConfig(max_new_tokens=16, num_refinement_steps=16, block_size=4, temperature=0.0,
                           use_adaptive_steps=False)
    prompts = prompts_of([5, 9])
    exact = decode_with_rules(model, prompts, [DecodeRules.from_config(cfg)] * 2)
    approx = decode_with_rules(model, prompts, [DecodeRules.from_config(cfg.replace(kv_cache=mode))] * 2)
    assert approx.nfe == exact.nfe
    agree = sum(int((a == b).sum()) for a, b in zip(approx.tokens, exact.tokens)) / 32
    assert agree > 0.5  # approximate: most tokens agree, none is left masked
    assert all(not (t == MASK).any() for t in approx.tokens)
    with pytest.raises(ValueError, match="block-causal"):
        decode_with_rules(model, prompts, [DecodeRules.from_config(cfg.replace(kv_cache="block"))] * 2)


# -- block-diffusion training ------------------------------------------------------------------
def test_block_diffusion_training_sees_clean_earlier_blocks_only():
    model = model_of(attention_mode="block_causal", block_size=4)
    clean = prompts_of([12])[0][None]
    noisy = clean.clone()
    noisy[0, [1, 5, 6, 9]] = MASK
    base = model(noisy, clean_input_ids=clean)
    # changing block 1's clean copy changes block 2's logits, not blocks 0 or 1
    other = clean.clone()
    other[0, 5] = (other[0, 5] + 1) % 90 + 4
    changed = model(noisy, clean_input_ids=other)
    diff = (changed - base).abs().amax(-1)[0]
    assert diff[:8].max() == 0 and diff[8:].min() > 0
    # a noisy block equals decoding after finished blocks: plain block-causal pass over [clean | noisy block]
    decoding = torch.cat([clean[0, :4], noisy[0, 4:8]])[None]
    torch.testing.assert_close(base[0, 4:8], model(decoding)[0, 4:8], rtol=1e-6, atol=1e-6)


def test_block_size_one_loss_is_the_autoregressive_cross_entropy():
    model = model_of(attention_mode="block_causal", block_size=1)
    x = prompts_of([10])[0][None]
    out = diffusion_loss(model, x, get_schedule("cosine"), MASK, block_size=1)
    logits = torch.stack([model(torch.cat([x[0, :i], torch.tensor([MASK])])[None])[0, -1] for i in range(10)])
    ce = torch.nn.functional.cross_entropy(logits, x[0])
    assert out.num_masked == 10
    assert float(out.loss.detach()) == pytest.approx(float(ce.detach()), rel=1e-6)


def test_block_diffusion_loss_samples_a_noise_level_per_block():
    model = model_of(attention_mode="block_causal", block_size=4)
    x = prompts_of([16])[0][None].repeat(64, 1)
    t = torch.rand(64, 4)
    t[:, 0], t[:, 1:] = 0.999, 0.001  # first block almost all masked, the others almost clean
    g = torch.Generator().manual_seed(0)
    out = diffusion_loss(model, x, get_schedule("linear"), MASK, t=t, generator=g, block_size=4)
    assert out.num_masked > 0.9 * 64 * 4 and out.num_masked < 64 * 4 + 0.05 * 64 * 12
