import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, GenerationConfig, ParallelGenerator
from pllm.decoding import commit_mask, decode, filter_top_k_top_p, transfer_schedule
from pllm.decoding.sampling import apply_repetition_penalty

MASK = 3


def trace_decode(model, prompts, **kw):
    states, commits = [], []
    out = decode(model, prompts, on_step=lambda x, c: (states.append(x.clone()), commits.append(c.clone())), **kw)
    return out, states, commits


def test_transfer_schedule_spreads_the_block_over_the_steps():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(8, 8) == [1] * 8
    assert transfer_schedule(3, 10) == [1, 1, 1]  # never more steps than tokens
    assert sum(transfer_schedule(37, 5)) == 37


def test_commit_mask_takes_the_most_confident_masked_positions():
    conf = torch.tensor([[0.9, 0.2, 0.8, 0.95, 0.5]])
    still = torch.tensor([[True, True, True, False, True]])
    assert commit_mask(conf, still, 2).tolist() == [[True, False, True, False, False]]
    assert commit_mask(conf, still, 1, threshold=0.4).tolist() == [[True, False, True, False, True]]
    assert commit_mask(conf, still, 10).sum() == 4  # capped by what is still masked


@pytest.mark.parametrize("block_size, steps", [(None, 8), (4, 8), (5, 16), (16, 4)])
def test_static_commits_exactly_k_per_step_and_never_changes_a_token(tiny_model, block_size, steps):
    prompts = [torch.randint(4, 96, (n,)) for n in (5, 9)]
    out, states, commits = trace_decode(tiny_model, prompts, gen_length=16, num_steps=steps, block_size=block_size)
    bs = block_size or 16
    sizes = [min(bs, 16 - s) for s in range(0, 16, bs)]
    expected = [k for n in sizes for k in transfer_schedule(n, -(-steps // len(sizes)))]
    assert out.nfe == len(expected) == len(states)
    for step, (state, committed) in enumerate(zip(states, commits)):
        assert committed.sum(-1).tolist() == [expected[step]] * 2, f"step {step}"
        if step:
            before = states[step - 1]
            kept = before != MASK
            assert torch.equal(state[kept], before[kept]), "a committed token changed"
            assert torch.equal((before != state), committed), "only the committed positions change"
    P = 9
    for b, p in enumerate(prompts):
        assert torch.equal(states[-1][b, P - p.numel() : P], p), "prompt tokens changed"
        assert not (out.tokens[b] == MASK).any()


def test_semi_autoregressive_blocks_are_finished_left_to_right(tiny_model):
    _, states, commits = trace_decode(tiny_model, [torch.randint(4, 96, (4,))], gen_length=12, num_steps=12, block_size=4)
    for committed in commits[:4]:
        assert committed[0, 4:8].any() or not committed[0, 8:].any()
        assert not committed[0, 8:].any()
    assert (states[3][0, 4:8] != MASK).all() and (states[3][0, 8:] == MASK).all()


def test_greedy_is_deterministic_and_batching_does_not_change_results():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config()).double().eval()
    prompts = [torch.randint(4, 96, (n,)) for n in (3, 11, 7)]
    batch = decode(model, prompts, gen_length=12, num_steps=6, block_size=4).tokens
    again = decode(model, prompts, gen_length=12, num_steps=6, block_size=4).tokens
    for b, p in enumerate(prompts):
        alone = decode(model, [p], gen_length=12, num_steps=6, block_size=4).tokens[0]
        assert torch.equal(batch[b], alone) and torch.equal(batch[b], again[b])


def test_sampling_with_a_seed_is_reproducible_per_row():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config()).double().eval()
    prompts = [torch.randint(4, 96, (n,)) for n in (4, 6)]
    kw = dict(gen_length=10, num_steps=5, temperature=1.0, top_k=20, top_p=0.9)
    a = decode(model, prompts, seed=[7, 8], **kw).tokens
    b = decode(model, prompts, seed=[7, 8], **kw).tokens
    alone = decode(model, [prompts[1]], seed=8, **kw).tokens[0]
    other = decode(model, prompts, seed=[7, 9], **kw).tokens
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a[1], alone)
    assert torch.equal(other[0], a[0]) and not torch.equal(other[1], a[1])


def test_threshold_one_degrades_to_one_token_per_step(tiny_model):
    out, _, commits = trace_decode(tiny_model, [torch.randint(4, 96, (4,))], gen_length=8, num_steps=2,
                                   confidence_threshold=1.0, min_per_step="one")
    assert out.nfe == 8 and all(int(c.sum()) == 1 for c in commits)


def test_threshold_zero_commits_the_whole_block_at_once(tiny_model):
    out = decode(tiny_model, [torch.randint(4, 96, (4,))], gen_length=8, num_steps=8, block_size=4,
                 confidence_threshold=0.0, min_per_step="one")
    assert out.nfe == 2 and out.tokens_per_forward == 4


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[[False, False, True, True]]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[[False, False, True, True]]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.4)).tolist() == [[[False, True, True, True]]]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[[2.0, -1.0, 2.0]]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[[1.0, -2.0, 2.0]]]


def test_eos_stops_the_row_and_fills_it():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config()).eval()
    def favour_eos(module, inputs, logits):  # a model whose top prediction is EOS (id 2) everywhere
        logits[..., 2] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour_eos)
    out = decode(model, [torch.randint(4, 96, (3,))], gen_length=16, num_steps=16, block_size=4, stop_at_eos=True)
    # the first step commits an EOS at the first answer position: the row is final after one pass
    assert out.tokens[0].tolist() == [2] * 16 and out.nfe == 1


def test_an_eos_inside_the_answer_ends_it_and_only_what_precedes_it_is_final():
    from pllm.decoding import DecodeRules, DecodeState

    cfg = tiny_config()
    rules = DecodeRules(gen_length=16, num_steps=16, block_size=4, stop_at_eos=True)  # one commit per step
    state = DecodeState(torch.tensor([5, 6, 7]), rules, cfg, "cpu")
    logits = torch.zeros(4, cfg.vocab_size)
    logits[:, 9] = 10.0
    logits[3, cfg.eos_token_id] = 20.0  # block position 3: the surest, an EOS
    finals = []
    while not state.finished:
        state.advance(logits)
        finals.append(list(state.final_ids))
        assert state.final_ids == state.final_tokens().tolist()
    # EOS first (not final yet: position 0 still masked), then positions 0, 1, 2 one per step.
    assert finals == [[], [9], [9, 9], [9, 9, 9]]
    assert state.answer.tolist() == [9, 9, 9] + [cfg.eos_token_id] * 13 and state.finish_reason == "stop"


def test_parallel_generator_interface(tiny_model):
    gen = ParallelGenerator(tiny_model, GenerationConfig(max_new_tokens=8, num_refinement_steps=4, temperature=0.0))
    single = gen.generate(torch.tensor([[5, 6, 7]]))
    assert single.shape == (1, 8)
    outs = gen.generate_batch([torch.tensor([5, 6, 7]), torch.tensor([9, 10])], max_new_tokens=6)
    assert [o.shape for o in outs] == [(6,), (6,)]
    assert gen.last_output.nfe == 4
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen.generate(torch.ones(1, 125, dtype=torch.long))


def test_generate_parallel_respects_the_step_budget(tiny_model):
    seqs = tiny_model.generate_parallel(batch_size=2, seq_len=12, num_steps=3, confidence_threshold=0.99)
    assert seqs.shape == (2, 12) and not (seqs == MASK).any()
