"""The fixed-shape step's paged KV cache: sequences hold pages for their own length, common prompt
prefixes share their pages, requests wait while the pool is short, and none of it changes a token
(the packed path is the reference; float64 on CPU, float32 on a GPU)."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, EngineConfig, GenerationConfig
from pllm.engine import Engine
from pllm.engine.page_pool import PagePool, prefix_keys
from test_engine import mixed_requests, run_staggered

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64


@pytest.fixture(scope="module", params=[False, True], ids=["unshifted", "shifted"])
def model(request):
    torch.manual_seed(0)
    cfg = tiny_config(attention_mode="block_causal", block_size=8, max_position_embeddings=160,
                      logits_shift=request.param)
    return DiffusionTransformer(cfg).to(DEVICE, DTYPE).eval()


def shared_prefix_requests(n: int, prefix_len: int = 45):
    """Requests whose prompts start with one long common prefix (a system prompt) and end apart."""
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(4, 96, (prefix_len,), generator=g)
    requests = []
    for i, (prompt, cfg) in enumerate(mixed_requests(n)):
        requests.append((torch.cat([prefix, prompt[:1 + i % 7]]), cfg.replace(max_new_tokens=min(cfg.max_new_tokens, 24))))
    return requests


def test_shared_prompt_prefixes_are_computed_once_and_change_no_token(model):
    requests = shared_prefix_requests(8)
    config = EngineConfig(max_num_seqs=4, max_batched_tokens=400)
    packed = run_staggered(Engine(model, config, static_step=False), requests)
    unshared = Engine(model, config.replace(prefix_caching=False), static_step=True)
    assert run_staggered(unshared, requests) == packed
    shared = Engine(model, config, static_step=True)
    assert run_staggered(shared, requests) == packed
    a, b = unshared.runner.static, shared.runner.static
    # The 45-token prefix holds 2 whole pages of 16 before any request's first window: every request
    # after the first takes them from the pool (or recomputes one when the pool's memory was reused).
    assert a.pool.num_shared == 0 and b.pool.num_shared >= 2 * (len(requests) - 1)
    assert b.num_prefilled <= a.num_prefilled - 32 * (len(requests) - 1)


def test_requests_wait_for_pages_while_the_pool_is_short(model):
    """A pool of 6 pages (16 positions each) holds two or three of these sequences at once, not six:
    the rest wait their turn (back-pressure), and every answer is the packed path's."""
    requests = [(prompt[:20], cfg.replace(max_new_tokens=min(cfg.max_new_tokens, 20)))
                for prompt, cfg in mixed_requests(8)]
    config = EngineConfig(max_num_seqs=6, max_batched_tokens=400, kv_cache_pages=6, prefix_caching=False)
    packed = run_staggered(Engine(model, config, static_step=False), requests, every=1)
    engine = Engine(model, config, static_step=True)
    assert run_staggered(engine, requests, every=1) == packed
    static = engine.runner.static
    assert static.cache.num_pages == 6 + static.cache.scratch_pages
    assert engine.stats["peak_batch_size"] <= 3 < len(requests)
    assert static.pool.available() == 6  # every page back
    assert not static.slot_of and not static.final_end  # and nothing kept of the finished requests
    with pytest.raises(ValueError, match="KV cache pool of 96 positions"):
        engine.add_request(torch.arange(4, 80), GenerationConfig(max_new_tokens=32))


def test_page_pool_counts_holders_and_forgets_the_oldest_unused_prefix_first():
    pool = PagePool(8, first_page=2)  # pages 2..7
    keys = prefix_keys(list(range(40)), 16, 2)
    assert keys[1][0] == keys[0]  # chained: page 1's key holds page 0's
    a = pool.allocate(3)
    pool.remember(keys, a[:2])
    assert pool.lookup(prefix_keys(list(range(32)) + [99] * 8, 16, 2)) == [a[0], a[1]]  # same first 32 tokens
    assert pool.lookup(prefix_keys([7] + list(range(1, 40)), 16, 2)) == []  # differs in its first page
    pool.release(a)  # the first holder leaves; the second still holds the two prefix pages
    assert pool.available() == 3 + 1 and pool.refs[a[0]] == 1
    pool.release(a[:2])  # now nobody does: remembered, unused, still available
    assert pool.available() == 6 and pool.lookup(keys[:1]) == [a[0]]
    pool.release([a[0]])
    taken = pool.allocate(6)  # takes the free pages, then forgets the remembered ones, oldest first
    assert sorted(taken) == list(range(2, 8)) and taken[-2:] == [a[1], a[0]]
    assert pool.lookup(keys) == [] and pool.available() == 0
    with pytest.raises(RuntimeError, match="0 pages available, 1 needed"):
        pool.allocate(1)


def test_dual_cache_steps_take_pages_from_the_pool_too():
    """Bidirectional models (Fast-dLLM's dual cache): each sequence holds pages for its length from
    the same kind of pool, a short pool makes requests wait, and the answers are the packed path's."""
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(block_size=8, max_position_embeddings=128)).to(DEVICE, DTYPE).eval()
    requests = [(prompt[:16], cfg.replace(kv_cache="dual", block_size=8, strategy="static",
                                          max_new_tokens=min(cfg.max_new_tokens, 16)))
                for prompt, cfg in mixed_requests(6)]
    config = EngineConfig(max_num_seqs=4, max_batched_tokens=400, kv_cache_pages=5)
    packed = run_staggered(Engine(model, config, static_step=False), requests, every=1)
    engine = Engine(model, config, static_step=True)
    assert run_staggered(engine, requests, every=1) == packed
    dual = engine.runner.dual
    assert dual.num_steps > 0 and engine.stats["peak_batch_size"] <= 2  # 5 pages of 16: two sequences of <= 32
    assert dual.pool.available() == 5
