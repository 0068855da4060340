"""Speculative decoding with a draft model: lossless for autoregressive and block-diffusion targets,
batched with mixed acceptance, no stale cache, and the target's sampling distribution (chi-square)."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny_config
from pllm import DiffusionTransformer, GenerationConfig, ParallelGenerator
from pllm.decoding import DecodeRules, DecodeState, Drafter, decode, run_states
from pllm.engine import Engine
from pllm.kv_cache import KVCache, Segment

AR = dict(attention_mode="block_causal", block_size=1)
BLOCK = dict(attention_mode="block_causal", block_size=4)
SIGNIFICANCE = 1e-3  # chi-square tests: reject "same distribution" below this p-value


def model_of(seed, scale=4.0, like=None, noise=0.0, **overrides):
    """A random float64 model; with `like`, a copy of that model with relative weight noise (a draft
    that often agrees with it). `scale` sharpens the predictions."""
    torch.manual_seed(seed)
    model = DiffusionTransformer(tiny_config(**overrides)).double().eval()
    with torch.no_grad():
        if like is not None:
            model.load_state_dict(like.state_dict())
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(noise * p.std() * torch.randn_like(p))
        else:
            model.lm_head.weight.mul_(scale)
            # No mask embedding: a masked query reads only its context, so answers vary with it
            # (a random model otherwise tends to repeat one token).
            model.embed_tokens.weight[model.config.mask_token_id] = 0
    return model


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 96, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_speculative_equals_the_autoregressive_targets_greedy_output(seed):
    target = model_of(seed, **AR)
    draft = model_of(100 + seed, like=target, noise=0.01, **AR)
    prompts = prompts_of([1, 5, 9, 14, 3, 20, 7], seed)
    common = dict(gen_length=24, num_steps=24, temperature=0.0)
    reference = decode(target, prompts, **common)
    for draft_length in (1, 3, 6):
        spec = decode(target, prompts, **common, draft_length=draft_length, speculative=True, draft_model=draft)
        for i, (a, b) in enumerate(zip(reference.tokens, spec.tokens)):
            assert torch.equal(a, b), f"seed {seed}, draft_length {draft_length}, sequence {i}"
        assert 0 < spec.accepted < spec.drafted  # some drafts accepted, some rejected
        assert sum(spec.nfe_per_sequence) < sum(reference.nfe_per_sequence)
        assert len(set(spec.nfe_per_sequence)) > 1  # the batch's sequences accepted different numbers


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_block_diffusion_target_equals_its_static_decoding(seed, temperature):
    target = model_of(seed, **BLOCK)
    draft = model_of(100 + seed, like=target, noise=0.01, **BLOCK)
    prompts = prompts_of([2, 6, 11, 4], seed)
    common = dict(gen_length=20, num_steps=20, temperature=temperature, seed=[7 * seed + i for i in range(4)])
    reference = decode(target, prompts, **common)
    spec = decode(target, prompts, **common, draft_length=3, speculative=True, draft_model=draft)
    for a, b in zip(reference.tokens, spec.tokens):
        assert torch.equal(a, b)
    if temperature == 0:
        assert spec.accepted > 0 and sum(spec.nfe_per_sequence) < sum(reference.nfe_per_sequence)


def _fresh_keys(model, tokens: torch.Tensor, length: int) -> KVCache:
    kv = KVCache(model.config.num_hidden_layers)
    model.forward_segments([Segment(tokens[:length], torch.empty(0, dtype=torch.long), (0, length), kv, (0, length))])
    return kv


@pytest.mark.parametrize("shape", [AR, BLOCK], ids=["autoregressive", "block"])
def test_rejected_drafts_leave_no_stale_cache_entries(shape):
    """After every pass, the target's and the draft's caches hold exactly the keys/values that the
    committed tokens give when computed from scratch: nothing from a rejected draft survives."""
    target = model_of(3, **shape)
    draft = model_of(4, like=target, noise=0.05, **shape)
    rules = DecodeRules(gen_length=16, num_steps=16, draft_length=4, speculative=True, cache="block")
    states = [DecodeState(p, rules, target.config, "cpu") for p in prompts_of([3, 8], 5)]
    drafter = Drafter(draft)
    rejected = 0
    while active := [s for s in states if not s.finished]:
        drafter.propose(active)
        for state, logits in zip(active, run_states(target, active)):
            before = state.accepted
            state.advance(logits)
            rejected += state.accepted - before < max(len(logits) - 1, 1)
        for state in states:
            for kv, model in ((state.kv, target), (state.draft_kv, draft)):
                if kv is None or kv.length == 0:
                    continue
                assert not (state.tokens[:kv.length] == target.config.mask_token_id).any()
                fresh = _fresh_keys(model, state.tokens, kv.length)
                for layer in range(model.config.num_hidden_layers):
                    torch.testing.assert_close(kv.keys[layer], fresh.keys[layer], rtol=1e-10, atol=1e-10)
                    torch.testing.assert_close(kv.values[layer], fresh.values[layer], rtol=1e-10, atol=1e-10)
    assert rejected > 0


def _target_joint(model, prompt: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exact p(x1, x2 | prompt) of an autoregressive model at temperature 1 (mask and pad banned)."""
    cfg = model.config
    banned = [cfg.mask_token_id, cfg.pad_token_id]

    def next_probs(context: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([context, torch.tensor([cfg.mask_token_id])])
        logits = model.forward_segments([Segment(tokens, torch.tensor([tokens.numel() - 1]))])[0][0].double()
        logits[banned] = float("-inf")
        return logits.softmax(-1)

    first = next_probs(prompt)
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for x1 in range(vocab):
        if first[x1] > 0:
            joint[x1] = first[x1] * next_probs(torch.cat([prompt, torch.tensor([x1])]))
    return joint


def test_speculative_sampling_follows_the_targets_distribution():
    """On a 10-token vocabulary, 4000 two-token samples of speculative sampling (a draft that often
    disagrees) against the target's exact joint distribution: a chi-square goodness-of-fit test at
    significance 0.001 must not reject, while the same test does reject samples of the draft alone."""
    vocab, n = 10, 4000
    target = model_of(11, scale=6.0, vocab_size=vocab, **AR)
    draft = model_of(12, scale=6.0, vocab_size=vocab, **AR)
    prompt = torch.tensor([4, 7, 5])
    joint = _target_joint(target, prompt, vocab).flatten()
    support = joint > 0
    common = dict(gen_length=2, num_steps=2, temperature=1.0, seed=list(range(n)))

    def p_value(model, **extra) -> float:
        out = decode(model, [prompt] * n, **common, **extra)
        pairs = torch.stack(out.tokens)
        counts = torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab).double()
        assert counts[~support].sum() == 0
        return chisquare(counts[support].numpy(), (joint[support] * n).numpy()).pvalue, out

    p, out = p_value(target, draft_length=2, speculative=True, draft_model=draft)
    assert 0.2 < out.acceptance_rate < 0.9  # both acceptance and residual sampling exercised
    assert p > SIGNIFICANCE, f"speculative samples differ from the target's distribution (p={p:.2e})"
    p_draft, _ = p_value(draft)
    assert p_draft < SIGNIFICANCE, "the test cannot tell the draft's distribution from the target's"


def test_engine_mixes_speculative_and_other_requests_continuously():
    target = model_of(21, **AR)
    draft = model_of(22, like=target, noise=0.01, **AR)
    prompts = prompts_of([2, 9, 5, 13, 1, 7], 21)
    base = GenerationConfig(max_new_tokens=12, num_refinement_steps=12, temperature=0.0, use_adaptive_steps=False)
    configs = [base.replace(strategy=s, draft_length=k) for s, k in
               itertools.islice(itertools.cycle([("speculative", 3), ("static", 4), ("speculative", 5)]), len(prompts))]
    engine = Engine(target, draft_model=draft)
    answers = {}

    def step():
        for out in engine.step():
            answers[out.request_id] += out.new_token_ids

    ids = []
    for i, (p, c) in enumerate(zip(prompts, configs)):  # arrivals staggered over the first steps
        ids.append(engine.add_request(p, c))
        answers[ids[-1]] = []
        if i % 2:
            step()
    while engine.has_work():
        step()
    expected = decode(target, prompts, gen_length=12, num_steps=12, temperature=0.0).tokens
    for rid, exp in zip(ids, expected):
        assert answers[rid] == exp.tolist()
    assert engine.stats["draft_passes"] > 0 and engine.stats["accepted_draft_tokens"] > 0
    with pytest.raises(ValueError, match="draft model"):
        Engine(target).add_request(prompts[0], configs[0])


def test_parallel_generator_with_a_draft_model():
    target = model_of(31, **BLOCK)
    draft = model_of(32, like=target, noise=0.01, **BLOCK)
    cfg = GenerationConfig(max_new_tokens=16, num_refinement_steps=16, temperature=0.0, strategy="speculative",
                           draft_length=3, use_adaptive_steps=False)
    generator = ParallelGenerator(target, cfg, draft_model=draft)
    prompts = prompts_of([4, 10], 31)
    spec = generator.generate_batch(prompts)
    static = ParallelGenerator(target, cfg.replace(strategy="static")).generate_batch(prompts)
    assert all(torch.equal(a, b) for a, b in zip(spec, static))
    assert generator.last_output.draft_nfe > 0
    with pytest.raises(ValueError, match="tokenizer"):
        ParallelGenerator(target, cfg, draft_model=model_of(33, vocab_size=64, **BLOCK))


@pytest.mark.parametrize("shape", [AR, BLOCK], ids=["autoregressive", "block"])
def test_adaptive_draft_length_stays_exact_and_drafts_less_after_rejections(shape):
    target = model_of(41, **shape)
    draft = model_of(42, like=target, noise=0.02, **shape)
    prompts = prompts_of([3, 8, 12, 5], 41)
    common = dict(gen_length=24, num_steps=24, temperature=0.0, draft_length=6, speculative=True, draft_model=draft)
    reference = decode(target, prompts, gen_length=24, num_steps=24, temperature=0.0)
    fixed = decode(target, prompts, **common)
    adaptive = decode(target, prompts, **common, adaptive_draft=True)
    assert all(torch.equal(a, b) for a, b in zip(reference.tokens, adaptive.tokens))
    # Shorter drafts after rejections: fewer drafted (wasted) tokens, a higher acceptance rate.
    assert adaptive.drafted < fixed.drafted and adaptive.accepted_per_drafted > fixed.accepted_per_drafted
