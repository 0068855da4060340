"""The continuous-batching engine: batching never changes outputs, requests join and leave at step
boundaries, budgets hold, aborts free slots, static batching waits for the whole batch."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, EngineConfig, GenerationConfig, ParallelGenerator
from pllm.engine import Engine

EOS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiffusionTransformer(tiny_config(max_position_embeddings=256)).eval()


def mixed_requests(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(n):
        prompt = torch.randint(4, 96, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        cfg = GenerationConfig(
            max_new_tokens=int(torch.randint(1, 48, (1,), generator=g)), num_refinement_steps=int(torch.randint(1, 24, (1,), generator=g)),
            block_size=[None, 4, 8, 16][i % 4], strategy=["static", "threshold"][i % 2], confidence_threshold=0.05,
            temperature=[0.0, 0.8][(i // 2) % 2], top_k=[0, 20][i % 2], top_p=[1.0, 0.9][(i // 3) % 2], seed=1000 + i,
            use_adaptive_steps=i % 3 == 0, repetition_penalty=[1.0, 1.3][(i // 4) % 2])
        requests.append((prompt, cfg))
    return requests


def run_staggered(engine: Engine, requests, every: int = 2):
    """Add one request every `every` steps while earlier ones run; collect streamed tokens. A
    decoding bug that stops commits fails here instead of looping forever."""
    answers, ids, pending = {}, [], list(requests)
    step, limit = 0, every * len(requests) + sum(cfg.max_new_tokens for _, cfg in requests) + 100
    while pending or engine.has_work():
        assert step < limit, "the engine stopped making progress"
        if pending and step % every == 0:
            prompt, cfg = pending.pop(0)
            ids.append(engine.add_request(prompt, cfg))
            answers[ids[-1]] = []
        for out in engine.step():
            answers[out.request_id].extend(out.new_token_ids)
        step += 1
    return [answers[i] for i in ids]


def test_batching_never_changes_outputs(model):
    requests = mixed_requests(16)
    alone = [Engine(model).generate([p], cfg)[0] for p, cfg in requests]
    batched = run_staggered(Engine(model, EngineConfig(max_num_seqs=6, max_batched_tokens=300)), requests)
    assert batched == alone
    # ...and the engine agrees with ParallelGenerator (the same decoding state, a fixed batch).
    for (prompt, cfg), answer in zip(requests[:6], alone):
        tokens = ParallelGenerator(model, cfg).generate_batch([prompt])[0].tolist()
        if cfg.use_adaptive_steps and EOS in tokens:
            tokens = tokens[: tokens.index(EOS)]
        assert tokens == answer


def test_requests_join_at_step_boundaries_and_leave_when_done(model):
    engine = Engine(model)
    short = GenerationConfig(max_new_tokens=4, num_refinement_steps=4, temperature=0.0, use_adaptive_steps=False)
    long = short.replace(max_new_tokens=12, num_refinement_steps=12)
    a = engine.add_request(torch.tensor([5, 6, 7]), long)
    engine.step()
    engine.step()
    assert engine.stats["batch_size"] == 1
    b = engine.add_request(torch.tensor([9, 10]), short)
    sizes, finished_at = [], {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = engine.stats["steps"]
        sizes.append(engine.stats["batch_size"])
    assert sizes[:4] == [2, 2, 2, 2], "b joins at the next step and runs its 4 steps beside a"
    assert finished_at == {b: 6, a: 12}
    assert sizes[4:] == [1] * 6, "b left the batch as soon as it finished"


def test_outputs_stream_final_tokens_in_order(model):
    engine = Engine(model)
    cfg = GenerationConfig(max_new_tokens=24, num_refinement_steps=8, block_size=8, temperature=0.0,
                           strategy="static", use_adaptive_steps=False)
    rid = engine.add_request(torch.tensor([4, 5, 6, 7]), cfg)
    chunks, last = [], None
    while engine.has_work():
        for out in engine.step():
            chunks.append(out.new_token_ids)
            last = out
    assert last.finished and last.finish_reason == "length" and last.num_generated == 24
    assert len([c for c in chunks if c]) >= 3, "tokens arrive block by block, not all at the end"
    assert sum(chunks, []) == ParallelGenerator(model, cfg).generate_batch([torch.tensor([4, 5, 6, 7])])[0].tolist()
    assert rid == last.request_id


def test_token_and_sequence_budgets_bound_every_step(model):
    engine = Engine(model, EngineConfig(max_num_seqs=3, max_batched_tokens=100))
    cfg = GenerationConfig(max_new_tokens=20, num_refinement_steps=5, temperature=0.0, use_adaptive_steps=False)
    ids = [engine.add_request(torch.randint(4, 96, (20,)), cfg) for _ in range(7)]  # 40 tokens each
    done, peak_tokens, peak_seqs = set(), 0, 0
    while engine.has_work():
        done |= {o.request_id for o in engine.step() if o.finished}
        peak_tokens, peak_seqs = max(peak_tokens, engine.stats["batch_tokens"]), max(peak_seqs, engine.stats["batch_size"])
    assert done == set(ids)
    assert peak_tokens == 80 and peak_seqs == 2, "two 40-token requests fit in 100 tokens, a third does not"


def test_abort_frees_the_slot_for_a_waiting_request(model):
    engine = Engine(model, EngineConfig(max_num_seqs=1))
    cfg = GenerationConfig(max_new_tokens=32, num_refinement_steps=32, temperature=0.0, use_adaptive_steps=False)
    a = engine.add_request(torch.tensor([5, 6]), cfg)
    b = engine.add_request(torch.tensor([7, 8]), cfg.replace(max_new_tokens=2, num_refinement_steps=2))
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == [a]
    engine.abort(a)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [(a, "abort")]
    assert [r.request_id for r in engine.scheduler.running] == [b]
    engine.abort("no-such-request")  # unknown or already finished ids are ignored
    while engine.has_work():
        engine.step()


def test_static_batching_admits_only_when_the_batch_is_done(model):
    engine = Engine(model, EngineConfig(batching="static"))
    cfg = GenerationConfig(max_new_tokens=6, num_refinement_steps=6, temperature=0.0, use_adaptive_steps=False)
    engine.add_request(torch.tensor([5, 6]), cfg)
    engine.add_request(torch.tensor([5, 6, 7]), cfg.replace(max_new_tokens=2, num_refinement_steps=2))
    engine.step()
    late = engine.add_request(torch.tensor([9]), cfg)
    sizes = []
    while engine.has_work():
        engine.step()
        sizes.append(engine.stats["batch_size"])
    assert sizes == [2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], sizes  # the late one waits for the first batch
    assert late


@pytest.mark.parametrize("prompt_len, max_new, message", [
    (0, 4, "empty"), (250, 10, "exceeds the model's context"), (10, 300, "above this server's limit")])
def test_requests_that_can_never_run_are_rejected_at_once(model, prompt_len, max_new, message):
    engine = Engine(model)
    with pytest.raises(ValueError, match=message):
        engine.add_request(torch.randint(4, 96, (prompt_len,)), GenerationConfig(max_new_tokens=max_new))
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Engine(model, EngineConfig(max_batched_tokens=50)).add_request(torch.ones(40, dtype=torch.long),
                                                                       GenerationConfig(max_new_tokens=20))
    assert not engine.has_work()
