"""Kernels against their PyTorch references (`pllm.kernels`).

On CPU the public functions run the references, checked here against the plain definitions
(softmax + argmax + `commit_mask`, `F.cross_entropy`, explicit-softmax attention). The Triton kernels
themselves run on a GPU (`pytest -m gpu`-free: every test here runs there on CUDA tensors) and, on
CPU, under Triton's interpreter (`test_triton_kernels_under_the_interpreter` reruns this file with
TRITON_INTERPRET=1), so CI executes the kernel code too. Tolerances scale with the dtype's epsilon.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pllm.decoding.commit import commit_mask
from pllm.kernels.bias_attention import gather_pages
from pllm.kernels import (add_rms_norm, bias_attention, block_causal_mask, cross_entropy_rows, cross_entropy_rows_reference, fused_attention,
                          linear_cross_entropy, parallel_decode, rotate_into_cache, rotate_qkv, silu_mul, use_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def tolerance(dtype: torch.dtype, factor: float = 8.0) -> float:
    """Relative error bound: a few units of the dtype's rounding for reductions over the vocabulary."""
    return factor * torch.finfo(dtype).eps


@pytest.mark.parametrize("seed", range(6))
def test_parallel_decode_matches_softmax_argmax_and_commit_rule(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, V = [(1, 32, 4096), (3, 20, 300), (4, 64, 1000), (2, 7, 50), (5, 32, 777), (1, 1, 64)][seed]
    logits = (torch.randn(B, L, V, generator=g) * (1 + seed)).to(DEVICE)
    masked = (torch.rand(B, L, generator=g) < 0.7).to(DEVICE)
    min_count = torch.randint(0, 4, (B,), generator=g).to(DEVICE)
    threshold = [None, 0.1, 0.5, 0.9, 0.01, None][seed]
    out = parallel_decode(logits, min_count, threshold, masked, banned_ids=(3, 0))

    x = logits.clone()
    x[..., [3, 0]] = float("-inf")
    probs = x.softmax(-1)
    assert torch.equal(out.tokens, x.argmax(-1))
    expected_conf = probs.gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.confidence, expected_conf, rtol=tolerance(torch.float32, 64), atol=1e-7)
    # The selection applied to the kernel's own confidences is exactly commit_mask's rule.
    assert torch.equal(out.commit, commit_mask(out.confidence, masked, min_count, threshold))
    assert not (out.commit & ~masked).any()


@pytest.mark.parametrize("seed", range(4))
def test_parallel_decode_commit_in_place_equals_decode_then_commit(seed):
    """`commit_in_place` (the engine's greedy step: masks read from the block, tokens written into
    it) commits exactly what `parallel_decode` on the block's mask positions picks, and leaves
    every other position as it was."""
    from pllm.kernels.parallel_decode import commit_in_place

    g = torch.Generator().manual_seed(seed)
    L, V, mask, min_count = [(32, 4096, 7, 1), (20, 300, 3, 2), (32, 777, 3, 0), (9, 64, 5, 4)][seed]
    logits = (torch.randn(L, V, generator=g) * (1 + seed)).to(DEVICE)
    block = torch.randint(10, V, (L,), generator=g)
    block[torch.rand(L, generator=g) < 0.6] = mask
    block = block.to(DEVICE)
    threshold = [0.9, None, 0.05, 0.5][seed]
    before = block.clone()
    out = commit_in_place(logits, block, min_count, threshold, mask, banned_ids=(mask, 0))
    want = parallel_decode(logits, min_count, threshold, before == mask, banned_ids=(mask, 0))
    assert torch.equal(out.tokens, want.tokens) and torch.equal(out.commit, want.commit)
    assert bool(out.commit.any()) == bool((before == mask).any()) and not (out.commit & (before != mask)).any()
    assert torch.equal(block, torch.where(want.commit, want.tokens, before))
    with pytest.raises(ValueError, match="do not fit"):
        commit_in_place(logits[:-1], block, min_count, threshold, mask)


def test_parallel_decode_seed_api_and_ties_go_to_the_lower_index():
    logits = torch.zeros(1, 8, 16, device=DEVICE)
    logits[0, :, 5] = 4.0  # every position equally confident in token 5
    out = parallel_decode(logits, num_parallel=3)
    assert out.tokens.tolist() == [[5] * 8]
    assert out.commit.tolist() == [[True, True, True] + [False] * 5]
    single = parallel_decode(logits[0], num_parallel=64)  # (L, V) in, (L,) out, capped at L
    assert single.tokens.shape == (8,) and bool(single.commit.all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_rows_loss_and_gradient(dtype):
    g = torch.Generator().manual_seed(1)
    N, V = 37, 5000
    logits = (torch.randn(N, V, generator=g) * 3).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    weights = torch.rand(N, generator=g).to(DEVICE) * 5
    loss, grad = cross_entropy_rows(logits.clone(), targets, weights)
    leaf = logits.float().requires_grad_()
    expected = weights * F.cross_entropy(leaf, targets, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=tolerance(torch.float32, 64), atol=1e-5)
    torch.testing.assert_close(grad.float(), leaf.grad, rtol=tolerance(dtype), atol=tolerance(dtype) * weights.max())
    ref_loss, _ = cross_entropy_rows_reference(logits, targets, weights, compute_grad=False)
    torch.testing.assert_close(loss, ref_loss, rtol=tolerance(torch.float32, 64), atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(chunk_rows):
    g = torch.Generator().manual_seed(2)
    N, D, V = 50, 32, 3000
    hidden = torch.randn(N, D, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.2).to(DEVICE).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    weights = torch.rand(N, generator=g).to(DEVICE) + 0.5
    loss = linear_cross_entropy(hidden, weight, targets, weights, chunk_rows=chunk_rows)
    (2.0 * loss).backward()  # the incoming gradient scales the precomputed ones
    fused = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    ref = (weights * F.cross_entropy(hidden @ weight.t(), targets, reduction="none")).sum()
    (2.0 * ref).backward()
    tol = tolerance(torch.float32, 256)
    torch.testing.assert_close(fused[0], ref.detach(), rtol=tol, atol=1e-4)
    torch.testing.assert_close(fused[1], hidden.grad, rtol=tol, atol=1e-5)
    torch.testing.assert_close(fused[2], weight.grad, rtol=tol, atol=1e-5)
    with torch.no_grad():  # evaluation: no gradient work, same loss
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, weights), fused[0], rtol=tol, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast path of the fused loss needs CUDA")
def test_linear_cross_entropy_under_bf16_autocast():
    torch.manual_seed(3)
    hidden = torch.randn(300, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(32768, 256, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, 32768, (300,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=128)
        loss.backward()
        fused = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
        hidden.grad = weight.grad = None
        ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
        ref.backward()
    assert weight.grad.dtype == torch.float32
    tol = tolerance(torch.bfloat16, 4)
    torch.testing.assert_close(fused[0], ref.detach(), rtol=tol, atol=0)
    for got, want in [(fused[1], hidden.grad), (fused[2], weight.grad)]:
        assert (got - want).norm() / want.norm() < tol


def _attention_by_definition(q, k, v, mask=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_fused_attention_bidirectional_block_causal_and_cached_block():
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 8, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    torch.testing.assert_close(fused_attention(q, k, v), _attention_by_definition(q, k, v), rtol=1e-5, atol=1e-5)
    mask = block_causal_mask(24, 24, 8)
    full = fused_attention(q, k, v, block_size=8)
    torch.testing.assert_close(full, _attention_by_definition(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, fused_attention(q, k, v))  # the mask matters
    # Cached block: queries of the last block only, over every key, equal the full pass's rows.
    tail = fused_attention(q[:, :, 16:], k, v, block_size=8, query_offset=16)
    torch.testing.assert_close(tail, full[:, :, 16:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_shape_grouped_query_attention_with_a_mask_equals_the_definition(dtype):
    # The decoding step's call: 4 query heads per key/value head, a per-row additive mask. On CPU (and
    # fp32) the query heads of a key/value head run as one head of 4 x 12 queries; on a Hopper GPU in
    # bf16 this is cuDNN attention.
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, h, n, 16, device=DEVICE) for h, n in ((8, 12), (2, 40), (2, 40)))
    mask = torch.rand(2, 1, 12, 40, device=DEVICE) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    bias = torch.zeros(mask.shape, dtype=dtype, device=DEVICE).masked_fill_(~mask, float("-inf"))
    got = fused_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=bias, fixed_shape=True)
    want = _attention_by_definition(q, k, v, mask)
    assert got.shape == want.shape
    assert (got.float() - want).norm() / want.norm() < tolerance(dtype, 4)
    y = got.transpose(1, 2).reshape(2, 12, 8 * 16)  # what o_proj reads
    torch.testing.assert_close(y.float(), want.transpose(1, 2).reshape(2, 12, 128), rtol=tolerance(dtype, 64),
                               atol=tolerance(dtype, 64))
    # block_size still applies on this path: the block-causal rule is combined with the given mask.
    block = block_causal_mask(12, 40, 8, query_offset=20)
    got = fused_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask=mask, block_size=8, query_offset=20,
                          fixed_shape=True)
    want = _attention_by_definition(q, k, v, mask & block.to(DEVICE))
    assert (got.float() - want).norm() / want.norm() < tolerance(dtype, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_shape_unmasked_attention_forward_and_gradients_equal_the_definition(dtype):
    # The training call (fixed_shape, no mask, grouped-query): cuDNN attention on a Hopper GPU in
    # bf16, SDPA elsewhere. Its backward pass must give the definition's gradients too.
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, h, 256, 64, device=DEVICE) for h in (8, 2, 2))
    grad_out = torch.randn(2, 8, 256, 64, device=DEVICE)
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    got = fused_attention(*leaves, fixed_shape=True)
    (got.float() * grad_out).sum().backward()
    refs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = _attention_by_definition(*refs)
    (want * grad_out).sum().backward()
    assert (got.float() - want).norm() / want.norm() < tolerance(dtype, 4)
    for leaf, ref in zip(leaves, refs):
        assert (leaf.grad.float() - ref.grad).norm() / ref.grad.norm() < tolerance(dtype, 8)


@pytest.mark.skipif(DEVICE != "cuda", reason="flash/efficient SDPA backends need CUDA")
def test_fused_attention_bf16_on_gpu_matches_fp32_definition():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 16, 512, 64, device="cuda") for _ in range(3))
    for kwargs in [{}, {"block_size": 32}]:
        mask = block_causal_mask(512, 512, 32, device="cuda") if kwargs else None
        want = _attention_by_definition(q, k, v, mask)
        got = fused_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kwargs).float()
        assert (got - want).norm() / want.norm() < tolerance(torch.bfloat16, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queries, key_length, bias_batch", [(64, 40, 2), (64, 200, 1), (5, 70, 2), (100, 130, 2),
                                                             (1, 90, 2)])
def test_bias_attention_equals_the_definition(queries, key_length, bias_batch, dtype):
    # The decoding step's call: a window of queries per row over a slice of the static cache (keys
    # and values read in place, strided), 4 query heads per key/value head, an additive bias (also
    # one broadcast over the batch); query counts that fill one tile, part of one, and part of two;
    # and few queries (5, 1: an autoregressive step), where a key/value head's query heads share a program.
    torch.manual_seed(9)
    B, H, KV, hd = 2, 8, 2, 32
    q = torch.randn(B, H, queries, hd, device=DEVICE).to(dtype)
    cache = torch.randn(3, 2, KV, 256, hd, device=DEVICE).to(dtype)  # (slots, keys | values, KV, S, hd)
    k, v = cache[1:, 0, :, :key_length], cache[1:, 1, :, :key_length]
    mask = torch.rand(bias_batch, 1, queries, key_length, device=DEVICE) < 0.4
    mask[..., 5] = True  # every query sees at least one key
    bias = torch.zeros(mask.shape, device=DEVICE).masked_fill_(~mask, float("-inf")).to(dtype)
    got = bias_attention(q, k, v, bias)
    want = _attention_by_definition(q.float(), k.float(), v.float(), mask)
    assert got.shape == (B, H, queries, hd) and got.dtype == dtype
    assert (got.float() - want).norm() / want.norm() < tolerance(dtype, 4)
    kernel_ran = use_triton(q) and not (INTERPRETED and dtype == torch.bfloat16)
    if kernel_ran:  # it writes (B, Lq, H, hd) memory: the output projection's input is then a view
        assert got.transpose(1, 2).is_contiguous()
    # The step's dispatch: fused_attention with fixed shapes and the bias gives the same result.
    via_dispatch = fused_attention(q, k, v, mask=bias, fixed_shape=True)
    assert (via_dispatch.float() - want).norm() / want.norm() < tolerance(dtype, 4)
    # Paged keys/values read in place through each row's page table (pages of 16 in a shuffled pool).
    pages_k, pages_v = (torch.randn(2 * B * 17, KV, 16, hd, device=DEVICE).to(dtype) for _ in "kv")
    table = torch.randperm(2 * B * 17, device=DEVICE)[:B * 17].view(B, 17)
    paged_k, paged_v = (gather_pages(t, table, key_length) for t in (pages_k, pages_v))
    j = 37 if key_length > 37 else key_length - 1  # a key's place: page table[b, j // 16], entry j % 16
    assert torch.equal(paged_k[1, :, j], pages_k[table[1, j // 16], :, j % 16])
    want_paged = _attention_by_definition(q.float(), paged_k.float(), paged_v.float(), mask)
    for got_paged in (bias_attention(q, pages_k, pages_v, bias, kv_pages=table),
                      fused_attention(q, pages_k, pages_v, mask=bias, fixed_shape=True, kv_pages=table)):
        assert (got_paged.float() - want_paged).norm() / want_paged.norm() < tolerance(dtype, 4)
    with pytest.raises(ValueError, match="kv_pages"):
        bias_attention(q, pages_k, pages_v, bias, kv_pages=table[:, :1])
    with pytest.raises(ValueError, match="additive"):
        bias_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="additive"):
        bias_attention(q, k, v[..., :16], bias)


def _norm_rotate_by_definition(x, weight, eps, cos, sin):
    """x (..., hd) float32: RMS norm with weight (None: none), then rotate-half rotary."""
    if weight is not None:
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_rotate_into_cache_equals_norm_rotary_and_store(dtype, qk_norm):
    # The decoding step's work between the QKV matmul and attention, on a slice of a larger cache (as
    # the model passes it): rows at different positions, 4 query heads per key/value head (3 key/value
    # heads: not a power of two).
    from pllm.model import rotary_tables

    torch.manual_seed(8)
    B, W, H, KV, hd, eps = 3, 5, 12, 3, 16, 1e-6
    qkv = torch.randn(B, W, (H + 2 * KV) * hd, device=DEVICE).to(dtype)
    q_weight, k_weight = ((1 + 0.5 * torch.randn(hd, device=DEVICE)).to(dtype) if qk_norm else None for _ in "qk")
    index = torch.tensor([[s + w for w in range(W)] for s in (0, 7, 19)], device=DEVICE)
    cos, sin = (t.to(DEVICE)[index] for t in rotary_tables(hd, 64, 10000.0))
    full = torch.randn(2, 5, 2, KV, 40, hd, device=DEVICE).to(dtype)  # (layers, slots, 2, KV, S, hd)
    before = full.clone()
    got = rotate_into_cache(qkv, H, KV, q_weight, k_weight, eps, cos, sin, full[1, 1:4, :, :, :32], index)

    x = qkv.float().view(B, W, H + 2 * KV, hd)
    c, s = cos[:, :, None], sin[:, :, None]
    want_q = _norm_rotate_by_definition(x[:, :, :H], q_weight, eps, c, s).transpose(1, 2)
    want_k = _norm_rotate_by_definition(x[:, :, H:H + KV], k_weight, eps, c, s)  # (B, W, KV, hd)
    assert got.shape == (B, H, W, hd) and got.is_contiguous() and got.dtype == dtype
    assert (got.float() - want_q).norm() / want_q.norm() < tolerance(dtype, 4)
    written = full[1, 1:4, :, :, :32].float()
    rows = torch.arange(B, device=DEVICE)[:, None]
    got_k = written[:, 0].permute(0, 2, 1, 3)[rows, index]  # (B, W, KV, hd)
    assert (got_k - want_k).norm() / want_k.norm() < tolerance(dtype, 4)
    torch.testing.assert_close(written[:, 1].permute(0, 2, 1, 3)[rows, index], x[:, :, H + KV:], rtol=0, atol=0)
    untouched = torch.ones_like(full, dtype=torch.bool)
    untouched[1, 1:4].permute(0, 3, 1, 2, 4)[rows, index] = False  # (B, W) entries of every kv/head/dim
    assert torch.equal(full[untouched], before[untouched])  # nothing else in the cache changed
    with pytest.raises(ValueError, match="do not fit"):
        rotate_into_cache(qkv, H, KV, q_weight, k_weight, eps, cos, sin, full[1, 1:3, :, :, :32], index)

    # One cache for all rows (the step's slots end to end): the same keys/values at flat entries.
    shared = torch.zeros(1, 2, KV, 3 * 40, hd, device=DEVICE, dtype=dtype)
    entries = index + torch.tensor([[2 * 40], [0], [40]], device=DEVICE)  # rows 0, 1, 2 -> slots 2, 0, 1
    got = rotate_into_cache(qkv, H, KV, q_weight, k_weight, eps, cos, sin, shared, entries)
    assert (got.float() - want_q).norm() / want_q.norm() < tolerance(dtype, 4)
    got_k = shared[0, 0].permute(1, 0, 2)[entries]  # (B, W, KV, hd)
    assert (got_k.float() - want_k).norm() / want_k.norm() < tolerance(dtype, 4)
    torch.testing.assert_close(shared[0, 1].permute(1, 0, 2)[entries].float(), x[:, :, H + KV:], rtol=0, atol=0)
    assert int((shared != 0).any(-1).sum()) == 2 * KV * B * W  # nothing else written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_forward_and_backward_equal_the_definition(dtype):
    # SwiGLU's elementwise step on the fused gate | up output: a width of 1,500 fills one column tile
    # and part of a second one.
    torch.manual_seed(10)
    width = 1500
    gate_up = (3 * torch.randn(2, 7, 2 * width, device=DEVICE)).to(dtype).requires_grad_()
    grad = torch.randn(2, 7, width, device=DEVICE).to(dtype)
    got = silu_mul(gate_up)
    (got_grad,) = torch.autograd.grad(got, gate_up, grad)

    x = gate_up.detach().float().requires_grad_()
    want = F.silu(x[..., :width]) * x[..., width:]
    (want_grad,) = torch.autograd.grad(want, x, grad.float())
    assert got.shape == (2, 7, width) and got.dtype == dtype and got_grad.dtype == dtype
    assert (got.float() - want).norm() / want.norm() < tolerance(dtype, 2)
    assert (got_grad.float() - want_grad).norm() / want_grad.norm() < tolerance(dtype, 2)
    if use_triton(gate_up):  # the op's registration (fake tensors, autograd, schema), also on a strided input
        for x in (gate_up, gate_up.transpose(0, 1)):
            torch.library.opcheck(torch.ops.pllm.silu_mul.default, (x.detach().requires_grad_(),))
            torch.library.opcheck(torch.ops.pllm.silu_mul_backward.default, (x.detach(), silu_mul(x).detach()))
    strided = gate_up.transpose(0, 1)  # not contiguous: the op copies it first
    torch.testing.assert_close(silu_mul(strided), got.transpose(0, 1))
    if DEVICE == "cuda":  # compiled graphs call the op, forward and backward
        compiled = torch.compile(lambda t: silu_mul(t).square().sum())
        (compiled_grad,) = torch.autograd.grad(compiled(gate_up), gate_up)
        (eager_grad,) = torch.autograd.grad(silu_mul(gate_up).square().sum(), gate_up)
        assert (compiled_grad.float() - eager_grad.float()).norm() / eager_grad.float().norm() < tolerance(dtype, 2)
    with pytest.raises(ValueError, match="odd"):
        silu_mul(gate_up[..., 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["none", "qk", "k-only"])
def test_rotate_qkv_forward_and_backward_equal_the_definition(dtype, norm):
    # The training pass's split -> QK-norm -> rotary: outputs, and the gradients of qkv and of the norm
    # weights, against the plain definition in float64. 6 query and 3 key/value heads leave padded
    # head rows, and 6 tokens a partial last program (4 tokens each), in the backward. Without the
    # norm cos/sin are broadcast over the batch, with it each row has its own positions; one case
    # norms the keys only, with a weight in the activations' dtype (as FSDP2 and DeepSpeed hold it).
    torch.manual_seed(11)
    B, L, H, KV, hd = 2, 3, 6, 3, 16
    qkv = (2 * torch.randn(B, L, (H + 2 * KV) * hd, device=DEVICE)).to(dtype).requires_grad_()
    angles = torch.rand(1 if norm == "none" else B, L, hd // 2, device=DEVICE) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    weight_dtypes = {"none": (None, None), "qk": (torch.float32,) * 2, "k-only": (None, dtype)}[norm]
    weights = [(1 + torch.randn(hd, device=DEVICE)).to(wd).requires_grad_() if wd else None for wd in weight_dtypes]
    grads = [torch.randn(B, heads, L, hd, device=DEVICE).to(dtype) for heads in (H, KV, KV)]

    got = rotate_qkv(qkv, cos, sin, H, KV, *weights, eps=1e-5)
    # Gradients arrive through (B, heads, L, hd) views, as attention returns them: strided.
    leaves = [qkv] + [w for w in weights if w is not None]
    got_grads = torch.autograd.grad([t.transpose(1, 2) for t in got], leaves, grads)

    x = qkv.detach().double().view(B, L, H + 2 * KV, hd).requires_grad_()
    ws = [w.detach().double().requires_grad_() if w is not None else None for w in weights]
    c, s = cos.double()[:, :, None], sin.double()[:, :, None]

    def norm_rotate(t, w):
        if w is not None:
            t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5) * w
        return t * c + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * s

    want = (norm_rotate(x[:, :, :H], ws[0]), norm_rotate(x[:, :, H:H + KV], ws[1]), x[:, :, H + KV:])
    want_grads = torch.autograd.grad([t.transpose(1, 2) for t in want], [x] + [w for w in ws if w is not None],
                                     [g.double() for g in grads])
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert (a.double() - b).norm() / b.norm() < tolerance(dtype, 2)
    for a, b, leaf in zip(got_grads, want_grads, leaves):
        coarser = max(tolerance(dtype, 4), tolerance(leaf.dtype, 4))  # a bf16 weight's gradient is rounded
        assert a.dtype == leaf.dtype and (a.double() - b.reshape(a.shape)).norm() / b.norm() < coarser
    if use_triton(qkv):  # the op's registration (fake tensors, autograd, schema)
        torch.library.opcheck(torch.ops.pllm.rotate_qkv.default, (qkv, cos, sin, *weights, H, KV, 1e-5))
    empty = rotate_qkv(qkv[:, :0], cos[:, :0], sin[:, :0], H, KV, *weights, eps=1e-5)  # no tokens
    assert [t.shape for t in empty] == [(B, 0, H, hd), (B, 0, KV, hd), (B, 0, KV, hd)]
    if weights[1] is not None:
        assert torch.equal(torch.autograd.grad(sum(t.sum() for t in empty), weights[1])[0], torch.zeros_like(weights[1]))
    if DEVICE == "cuda":  # compiled graphs call the op, forward and backward
        def loss(t):
            return sum((o.float() * torch.arange(o.numel(), device=DEVICE).view(o.shape).sin()).sum()
                       for o in rotate_qkv(t, cos, sin, H, KV, *weights, eps=1e-5))
        (compiled_grad,) = torch.autograd.grad(torch.compile(loss)(qkv), qkv)
        (eager_grad,) = torch.autograd.grad(loss(qkv), qkv)
        assert (compiled_grad.float() - eager_grad.float()).norm() / eager_grad.float().norm() < tolerance(dtype, 2)
    with pytest.raises(ValueError, match="heads"):
        rotate_qkv(qkv[..., 1:], cos, sin, H, KV)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float32),
                                    (torch.float32, torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
def test_add_rms_norm_forward_and_backward_equal_the_definition(dtypes, monkeypatch):
    # Residual add + RMSNorm as training runs it: an fp32 residual stream plus a bf16 branch output
    # (autocast), or all one dtype. 37 rows leave a partial last backward program (16 rows each); a
    # width of 96 leaves masked columns in the 128-wide tile.
    torch.manual_seed(12)
    x_dtype, y_dtype, w_dtype = dtypes  # all bf16: FSDP2's and DeepSpeed's mixed precision
    x = torch.randn(37, 96, device=DEVICE).to(x_dtype).requires_grad_()
    y = (2 * torch.randn(37, 96, device=DEVICE)).to(y_dtype).requires_grad_()
    weight = (1 + torch.randn(96, device=DEVICE)).to(w_dtype).requires_grad_()
    grad_h, grad_n = torch.randn(37, 96, device=DEVICE).to(x_dtype), torch.randn(37, 96, device=DEVICE)
    h, normed = add_rms_norm(x, y, weight, 1e-5)
    grad_n = grad_n.to(normed.dtype)
    got_grads = torch.autograd.grad([h, normed], [x, y, weight], [grad_h, grad_n])

    xd, yd, wd = (t.detach().double().requires_grad_() for t in (x, y, weight))
    hd = xd + yd
    nd = hd * torch.rsqrt(hd.square().mean(-1, keepdim=True) + 1e-5) * wd
    want_grads = torch.autograd.grad([hd, nd], [xd, yd, wd], [grad_h.double(), grad_n.double()])
    dtype = torch.promote_types(x_dtype, y_dtype)
    assert h.dtype == dtype and normed.dtype == dtype
    assert (h.double() - hd).norm() / hd.norm() < tolerance(dtype, 2)
    assert (normed.double() - nd).norm() / nd.norm() < tolerance(dtype, 2)
    for got, want, t in zip(got_grads, want_grads, (x, y, weight)):
        assert got.dtype == t.dtype
        # y's gradient is x's, rounded to y's dtype
        assert (got.double() - want).norm() / want.norm() < max(tolerance(dtype, 4), tolerance(t.dtype, 2))
    if use_triton(x):  # the op's registration (fake tensors, autograd, schema)
        torch.library.opcheck(torch.ops.pllm.add_rms_norm.default, (x, y, weight, 1e-5, dtype))
        # The backward's row tiles where they do not divide a program's rows (6 = 4 + a half-masked 4)
        from pllm.kernels import rms_norm
        h = add_rms_norm(x, y, weight, 1e-5)[0].detach()
        tiled = rms_norm.add_rms_norm_backward(h, weight, 1e-5, grad_h, grad_n, x.dtype, y.dtype, rows_per_program=6)
        for got, want in zip(tiled, want_grads):
            assert (got.double() - want).norm() / want.norm() < max(tolerance(dtype, 4), tolerance(got.dtype, 2))
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):  # normed in the dtype the matmul reads
        assert add_rms_norm(x, y, weight, 1e-5)[1].dtype == torch.bfloat16
    if DEVICE == "cuda":  # compiled graphs call the op, forward and backward, under autocast
        def loss(a, b):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out_h, out_n = add_rms_norm(a, b, weight, 1e-5)
                return out_h.float().square().sum() + (out_n.float() * torch.arange(96, device=DEVICE).sin()).sum()
        compiled = torch.autograd.grad(torch.compile(loss)(x, y), [x, y])
        eager = torch.autograd.grad(loss(x, y), [x, y])
        for a, b in zip(compiled, eager):
            assert (a.float() - b.float()).norm() / b.float().norm() < tolerance(torch.bfloat16, 2)
    h, normed = add_rms_norm(x[:0], y[:0], weight, 1e-5)  # no rows: empty outputs, a zero weight gradient
    assert h.shape == normed.shape == (0, 96)
    assert torch.equal(torch.autograd.grad(h.sum() + normed.sum(), weight)[0], torch.zeros_like(weight))
    with pytest.raises(ValueError, match="do not fit"):
        add_rms_norm(x, y[:, 1:], weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_add_rms_norm_of_partial_sums_equals_the_definition(dtype):
    # y as a K-split matmul's float32 partial sums (3 of them), summed inside the add + norm kernel.
    # 37 rows of width 96 leave masked columns in the 128-wide tile.
    from pllm.kernels.rms_norm import add_partials_rms_norm

    torch.manual_seed(13)
    x = torch.randn(37, 96, device=DEVICE).to(dtype)
    parts = 2 * torch.randn(3, 37, 96, device=DEVICE)
    weight = (1 + torch.randn(96, device=DEVICE)).to(dtype)
    h, normed = add_partials_rms_norm(x, parts, weight, 1e-5)
    hd = x.double() + parts.double().sum(0)
    nd = hd * torch.rsqrt(hd.square().mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert h.dtype == normed.dtype == dtype and h.shape == normed.shape == x.shape
    assert (h.double() - hd).norm() / hd.norm() < tolerance(dtype, 2)
    assert (normed.double() - nd).norm() / nd.norm() < tolerance(dtype, 2)
    one = add_partials_rms_norm(x, parts[:1], weight, 1e-5)[0]  # one part: plain x + y
    assert (one.double() - (x.double() + parts[0].double())).norm() / hd.norm() < tolerance(dtype, 2)
    with pytest.raises(ValueError, match="do not fit"):
        add_partials_rms_norm(x, parts[:, :, 1:], weight, 1e-5)


def test_skinny_split_decoding_step_equals_the_model_definition(monkeypatch):
    # The fixed-shape step with o_proj and down_proj split over K (one of o_proj's two splits gets
    # no K of its own) and their partial sums added in the add + norm kernel, against the eager
    # blocks. The elementwise chains the step compiles run eagerly here (the kernels are under test).
    from pllm.engine import step_forward
    from pllm.kernels import rms_norm, skinny_gemm
    from pllm.kernels.options import KernelOptions

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    model, tokens, positions, limits = tiny_step_model(14, dtype)
    monkeypatch.setattr(step_forward, "compiled_elementwise", lambda fn: fn)
    kernels = KernelOptions(split_tiles=(((64, 64), (16, 64, 2, 2)),  # o_proj
                                         ((64, 128), (32, 64, 2, 2, 8))),  # down_proj, 8 warps
                            gemm_tiles=(((256, 64, 1, True), (16, 64, 2)),))  # gate | up
    split_calls = []

    def counted(*args):
        split_calls.append(args[1].shape)
        return rms_norm.add_partials_rms_norm(*args)

    def no_fallback(*args):
        raise AssertionError("the split step fell back to a PyTorch reference")

    monkeypatch.setattr(skinny_gemm, "add_partials_rms_norm", counted)
    runs = skinny_gemm.runs_kernel(model.embed_tokens(tokens), model.layers[0].attn.o_proj.weight)
    logits, caches = [], []
    for compile_ops in (True, False):
        cache = step_forward.new_static_cache(model, 1)
        with monkeypatch.context() as patch:
            if compile_ops and runs:
                patch.setattr(rms_norm, "add_partials_rms_norm_reference", no_fallback)
            logits.append(step_forward.forward_static(model, tokens, positions, limits, cache, slice(0, 1), 32,
                                                      compile_ops=compile_ops, kernels=kernels))
        caches.append(cache.keys_values.float())
    # where the kernels run, both projections of both layers took the split path
    assert split_calls == ([(2, 1, 64, 64)] * 4 if runs else [])
    assert logits[0].shape == logits[1].shape == (1, 32, 256)
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < tolerance(dtype, 4)
    assert (caches[0] - caches[1]).norm() / caches[1].norm() < tolerance(dtype, 4)


@pytest.mark.skipif(not use_triton(torch.empty(1, device=DEVICE)), reason="the ops run here only under the "
                    "interpreter (test_triton_kernels_under_the_interpreter) or on a GPU")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_through_rotate_qkv_and_add_rms_norm_ops_equals_the_reference_path(checkpointing):
    from conftest import tiny_config
    from pllm import DiffusionTransformer
    from pllm.kernels.options import KernelOptions

    torch.manual_seed(13)
    model = DiffusionTransformer(tiny_config(qk_norm=True)).to(DEVICE).train()
    model.gradient_checkpointing_enable(checkpointing)
    tokens = torch.randint(4, 96, (2, 24), device=DEVICE)

    def run():
        model.zero_grad()
        logits = model(tokens)
        (logits.square().mean()).backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    ops = run()
    model.use_kernels(KernelOptions(rotate_qkv=False, add_rms_norm=False))
    reference = run()
    assert len(ops) == len(reference)
    for a, b in zip(ops, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows, n, k, split", [(64, 96, 256, 1), (5, 80, 192, 2), (64, 64, 512, 4), (17, 48, 128, 3),
                                                (64, 32, 128, 4)])
def test_skinny_linear_and_its_gated_form_equal_the_definition(rows, n, k, split):
    # Partial sums over K slices add up to the product (a split may get no K slice of its own:
    # 128 = 2 tiles over 4 splits); the gated form is silu(x @ gate.T) * (x @ up.T).
    from pllm.kernels.skinny_gemm import runs_kernel, silu_mul_linear, skinny_linear

    torch.manual_seed(rows + split)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    x = torch.randn(2, rows // 2 or 1, k, device=DEVICE).to(dtype) if rows % 2 == 0 else torch.randn(rows, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    want = x.float() @ w.float().T
    for config in [None, (16, 64, 2), (32, 128, 3), (32, 64, 3, 8)]:  # the last with 8 warps
        out = skinny_linear(x, w, split, config)
        assert out.shape == ((split,) if split > 1 else ()) + (*x.shape[:-1], n)
        assert out.dtype == (torch.float32 if split > 1 else dtype)
        got = out.float().sum(0) if split > 1 else out.float()
        assert (got - want).norm() / want.norm() < tolerance(dtype, 2)
        gate, up = want.chunk(2, -1)
        gated = silu_mul_linear(x, w, config)
        assert gated.shape == (*x.shape[:-1], n // 2) and gated.dtype == dtype
        assert (gated.float() - F.silu(gate) * up).norm() / (F.silu(gate) * up).norm() < tolerance(dtype, 2)
    assert runs_kernel(x, w) == (use_triton(x) and (DEVICE == "cuda" or dtype == torch.float16))
    assert not runs_kernel(torch.randn(65, k, device=DEVICE).to(dtype), w)  # more rows than one tile: cuBLAS
    with pytest.raises(ValueError, match="split"):
        skinny_linear(x, w, 0)


@pytest.mark.parametrize("precision, group", [("int8", None), ("fp8", None), ("int4", 128), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 33, 130])
def test_quantized_linear_equals_dequantize_and_matmul(precision, group, rows):
    # The kernel widens the stored weight in registers; the reference dequantizes it first. Rows
    # beyond one tile (130) run the many-row tiles of the larger-batch step.
    from pllm.kernels.quantized_gemm import quantized_linear, quantized_linear_reference, runs_kernel
    from pllm.quantization import quantize_weight

    if precision == "fp8" and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    torch.manual_seed(rows)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    n, k = 96, 256
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    q, scale = quantize_weight(torch.randn(n, k) / k**0.5, precision, *([group] if group else []))
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    want = quantized_linear_reference(x.float(), q, scale, precision, bias.float())
    out = quantized_linear(x, q, scale, precision, bias)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert (out.float() - want).norm() / want.norm() < tolerance(dtype, 2)
    assert runs_kernel(x, q, scale, precision) == (use_triton(x) and (DEVICE == "cuda" or dtype == torch.float16))
    with pytest.raises(ValueError, match="precision must be one of"):
        quantized_linear(x, q, scale, "int2")


def test_the_step_takes_skinny_kernels_only_for_measured_shapes(monkeypatch):
    from pllm.kernels import skinny_gemm
    from pllm.kernels.options import KernelOptions

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    x = torch.randn(64, 128, device=DEVICE).to(dtype)
    w = (torch.randn(96, 128, device=DEVICE) / 128**0.5).to(dtype)
    calls = []
    def launch(x, w, split, gated, config):  # records which kernel the step asked for
        calls.append(gated)
        return F.linear(x, w)[:, :w.shape[0] // 2] if gated else F.linear(x, w)

    monkeypatch.setattr(skinny_gemm, "_launch", launch)
    skinny_gemm.step_linear(x, w)
    skinny_gemm.step_silu_mul_linear(x, w, lambda g, u: F.silu(g) * u)
    assert calls == []  # an unmeasured shape stays on cuBLAS
    kernels = KernelOptions(gemm_tiles=(((96, 128, 1, False), (16, 64, 2)), ((96, 128, 1, True), (16, 64, 2))))
    skinny_gemm.step_linear(x, w, kernels)
    skinny_gemm.step_silu_mul_linear(x, w, lambda g, u: F.silu(g) * u, kernels)
    assert calls == ([False, True] if skinny_gemm.runs_kernel(x, w) else [])
    skinny_gemm.step_linear(x, w, kernels.replace(skinny_gemm=False))
    assert len(calls) == (2 if skinny_gemm.runs_kernel(x, w) else 0)


def tiny_step_model(seed: int, dtype: torch.dtype):
    """A 2-layer block-causal model with norm weights away from 1 (so a norm that is left out
    shows), and a batch-1 step's window: (model, tokens, positions, limits)."""
    from pllm import DiffusionTransformer, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                      attention_mode="block_causal", block_size=32)
    model = DiffusionTransformer(cfg).to(DEVICE, dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    tokens = torch.randint(4, 256, (1, 64), device=DEVICE)
    positions = torch.arange(64, 128, device=DEVICE)[None]
    limits = torch.tensor([128], device=DEVICE)
    return model, tokens, positions, limits


@pytest.mark.parametrize("queries", [64, 5])
def test_bias_attention_split_over_keys_equals_the_definition(queries):
    # Long enough for the split-keys path (flash-decoding: key slices merged by their softmax
    # statistics), with key slices that see no key for some queries.
    module = importlib.import_module("pllm.kernels.bias_attention")
    torch.manual_seed(10)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    B, H, KV, hd, Lk = 2, 8, 2, 32, 600
    q = torch.randn(B, H, queries, hd, device=DEVICE).to(dtype)
    cache = torch.randn(B, 2, KV, 640, hd, device=DEVICE).to(dtype)
    k, v = cache[:, 0, :, :Lk], cache[:, 1, :, :Lk]
    mask = torch.rand(B, 1, queries, Lk, device=DEVICE) < 0.3
    mask[..., 400:] = False  # the last slices see nothing
    mask[..., 7] = True
    bias = torch.zeros(mask.shape, device=DEVICE).masked_fill_(~mask, float("-inf")).to(dtype)
    assert module.key_splits(q, k, sms=132) > 1
    assert module.key_splits(q[:, :, :, :], k[:, :, :256], sms=132) == 1  # short: the plain kernel
    want = _attention_by_definition(q.float(), k.float(), v.float(), mask)
    got = bias_attention(q, k, v, bias)
    assert (got.float() - want).norm() / want.norm() < tolerance(dtype, 4)
    if use_triton(q):
        assert got.transpose(1, 2).is_contiguous()
        plain = module._bias_attention_triton(q, k, v, bias)
        assert (plain.float() - want).norm() / want.norm() < tolerance(dtype, 4)
    # Paged: both rows read the second row's keys through one page table (pages of 64).
    pages = cache[1].unflatten(2, (10, 64)).permute(2, 0, 1, 3, 4)  # (10 pages, 2, KV, 64, hd)
    table = torch.arange(10, device=DEVICE).repeat(B, 1)
    want_paged = _attention_by_definition(q.float(), k[[1, 1]].float(), v[[1, 1]].float(), mask)
    got_paged = bias_attention(q, pages[:, 0], pages[:, 1], bias, kv_pages=table)
    assert (got_paged.float() - want_paged).norm() / want_paged.norm() < tolerance(dtype, 4)


@pytest.mark.skipif(DEVICE != "cuda", reason="the 1.1B shapes' kernels run on a GPU")
def test_decoding_step_with_skinny_kernels_equals_cublas():
    # The shapes the table sends to the skinny kernels, through the model's fixed-shape step.
    from pllm import DiffusionTransformer, ModelConfig
    from pllm.engine.step_forward import forward_static, new_static_cache
    from pllm.kernels.options import KernelOptions

    torch.manual_seed(11)
    cfg = ModelConfig(vocab_size=4096, hidden_size=2048, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=512,
                      attention_mode="block_causal", block_size=32)
    model = DiffusionTransformer(cfg).to("cuda", torch.bfloat16).eval()
    tokens = torch.randint(4, 4096, (1, 64), device="cuda")
    positions = torch.arange(64, 128, device="cuda")[None]
    limits = torch.tensor([128], device="cuda")
    logits = []
    for use in (True, False):  # skinny GEMMs, cuBLAS
        cache = new_static_cache(model, 1)
        logits.append(forward_static(model, tokens, positions, limits, cache, slice(0, 1), 32, compile_ops=True,
                                     kernels=KernelOptions(skinny_gemm=use)))
    assert (logits[0] - logits[1]).norm() / logits[1].norm() < 2e-2


def test_bias_attention_groups_query_heads_for_few_queries_at_large_batch():
    module = importlib.import_module("pllm.kernels.bias_attention")
    key = torch.empty(64, 4, 384, 64)  # 4 key/value heads
    one = torch.empty(64, 32, 1, 64)  # an AR step at batch 64: 256 programs of 8 query heads
    assert module.groups_few_queries(one, key, sms=132)
    assert not module.groups_few_queries(one[:1], key[:1], sms=132)  # batch 1: 4 programs; the plain kernel's 32
    assert not module.groups_few_queries(torch.empty(64, 32, 33, 64), key, sms=132)  # a block's window
    assert not module.groups_few_queries(torch.empty(64, 4, 1, 64), key, sms=132)  # no grouped-query heads


def test_bias_attention_query_tiles_shrink_until_the_programs_fill_the_gpu():
    module = importlib.import_module("pllm.kernels.bias_attention")  # the package exports a function of that name
    tile = module.query_tile
    assert tile(16, 32, 64, sms=132) == 64  # 512 programs already
    assert tile(3, 32, 64, sms=132) == 32  # 96 programs -> 192
    assert tile(1, 32, 64, sms=132) == 16  # 32 -> 64 -> 128: no tile below 16
    assert tile(1, 32, 5, sms=132) == 16 and tile(1, 32, 64, sms=None) == 64  # CPU: no SM count
    assert tile(1, 32, 64, sms=132, fill_sms=False) == 64


@pytest.mark.parametrize("shift", [0, 1])
def test_next_windows_pick_each_rows_next_step_window(shift):
    """Per plain row: the current block's window while it has masks, the next block's once it has
    none (not after the last block), starting `shift` positions before the block; a finalize row:
    its sequence's current block once that has no mask left (limit: the block's end), else
    padding; tokens outside the sequence are padding; rows past n are padding at scratch positions."""
    from pllm.kernels.step_windows import next_windows

    bs, B, mask, pad = 4, 12, 3, 0
    W = bs + shift
    torch.manual_seed(0)
    # (length, current block start, end, next block's end or -1, masks left in the current block)
    seqs_rows = [(20, 8, 12, 16, 2), (20, 8, 12, 16, 0), (20, 16, 20, -1, 0), (14, 5, 8, 12, 0), (9, 1, 4, 8, 1),
                 (6, 2, 4, -1, 0)]
    seqs = []
    for size, start, end, after, masks in seqs_rows:
        seq = torch.randint(4, 50, (size,))
        seq[end:] = mask  # later blocks are all masked
        seq[end - masks:end] = mask
        seqs.append(seq)
    flat = torch.cat(seqs).to(DEVICE)
    sizes = [len(s) for s in seqs]
    starts = [sum(sizes[:i]) for i in range(len(seqs))]
    rows = list(range(len(seqs))) + [0, 1, 3]  # plain rows, then finalize rows of sequences 0, 1 and 3
    finalize = [0] * len(seqs) + [1, 1, 1]
    columns = [starts, sizes] + [[r[k] for r in seqs_rows] for k in (1, 2, 3)] + [[10 + i for i in range(len(seqs))]]
    table = torch.tensor([[c[i] for i in rows] for c in columns] + [finalize], device=DEVICE)
    tokens = torch.full((B, W), -7, dtype=torch.long, device=DEVICE)
    positions, limits = torch.full_like(tokens, -7), torch.full((B,), -7, dtype=torch.long, device=DEVICE)
    slots = torch.full_like(limits, -7)
    next_windows(flat, table, tokens, positions, limits, slots, bs, shift, mask, pad)
    scratch = list(range(-W, 0))
    for r, (i, fin) in enumerate(zip(rows, finalize)):
        (size, start, end, after, masks), seq = seqs_rows[i], seqs[i]
        move = masks == 0 and after >= 0
        assert slots[r].item() == 10 + i, r
        if fin and not move:
            assert positions[r].tolist() == scratch and limits[r].item() == 0 and (tokens[r] == pad).all(), r
            continue
        lo = ((end if move and not fin else start) // bs) * bs - shift
        want = [int(seq[p]) if 0 <= p < size else pad for p in range(lo, lo + W)]
        assert tokens[r].tolist() == want, r
        assert positions[r].tolist() == list(range(lo, lo + W)), r
        assert limits[r].item() == (after if move and not fin else end), r
    n = len(rows)
    assert (tokens[n:] == pad).all() and (limits[n:] == 0).all() and (slots[n:] == 0).all()
    assert (positions[n:] == torch.tensor(scratch, device=DEVICE)).all()
    with pytest.raises(ValueError, match="do not fit"):
        next_windows(flat, table, tokens[:, :3], positions, limits, slots, bs, shift, mask, pad)

    # One-token blocks with shift (autoregressive models): the token before the current one, or the
    # current one once it is committed.
    seq = torch.tensor([5, 6, 7, mask, mask, 8, 9, mask], device=DEVICE)
    # (current block start, next block's end or -1): masked -> stay; committed -> move; last block -> stay
    one = [(3, 5), (5, 7), (7, -1), (6, 8)]
    flat = seq.repeat(len(one))
    table = torch.tensor([[8 * i for i in range(len(one))], [8] * len(one), [r[0] for r in one],
                          [r[0] + 1 for r in one], [r[1] for r in one], [0] * len(one), [0] * len(one)], device=DEVICE)
    tokens = torch.full((6, 1), -7, dtype=torch.long, device=DEVICE)
    positions, limits = torch.full_like(tokens, -7), torch.full((6,), -7, dtype=torch.long, device=DEVICE)
    next_windows(flat, table, tokens, positions, limits, torch.zeros_like(limits), 1, 1, mask, pad)
    assert positions[:, 0].tolist() == [2, 5, 6, 6, -1, -1]
    assert tokens[:, 0].tolist() == [7, 8, 9, 9, pad, pad]
    assert limits.tolist() == [4, 7, 8, 8, 0, 0]


def test_step_bias_is_the_block_causal_rule_over_the_cache():
    """Query (b, w) at position p reads cache entry s (key position s - offset) iff the key lies
    below the row's limit, in a block up to p's, or is p itself (padding rows sit at negative
    positions and see only their own scratch entry)."""
    from pllm.kernels.step_bias import step_bias

    bs, offset, S = 4, 4, 300  # more keys than one program's tile
    positions = torch.tensor([[4, 5, 6, 7, 8, 9, 10, 11], [-4, -3, -2, -1, 0, 1, 2, 3],
                              [-4, -3, -2, -1, 0, 1, 2, 3], [200, 201, 202, 203, 204, 205, 206, 207]])
    limits = torch.tensor([10, 3, 0, 207])
    bias = step_bias(positions.to(DEVICE), limits.to(DEVICE), S, offset, bs, torch.bfloat16).cpu()
    assert bias.shape == (4, 1, 8, S) and bias.dtype == torch.bfloat16
    for b in range(4):
        for w in range(8):
            p = int(positions[b, w])
            want = [(0 <= s - offset < int(limits[b]) and p >= 0 and (s - offset) // bs <= p // bs) or s - offset == p
                    for s in range(S)]
            assert ((bias[b, 0, w] == 0) == torch.tensor(want)).all(), (b, w)
            assert ((bias[b, 0, w] == 0) | (bias[b, 0, w] == float("-inf"))).all()
    with pytest.raises(ValueError, match="do not fit"):
        step_bias(positions.to(DEVICE), limits[:2].to(DEVICE), S, offset, bs, torch.bfloat16)


def test_kernels_take_the_triton_path_where_they_should():
    on = use_triton(torch.empty(1, device=DEVICE))
    assert on == (DEVICE == "cuda" or INTERPRETED)


@pytest.mark.skipif(INTERPRETED or DEVICE == "cuda", reason="already running the Triton kernels")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "parallel_decode or cross_entropy or rotate_into_cache or rotate_qkv or add_rms_norm or attention or silu_mul or skinny or quantized or next_windows or step_bias or triton_path"],
                         env=env, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_seed_readme_kernel_snippet_runs():
    """The seed README's "Custom Kernels" snippet, under the distribution's import name."""
    from parallel_llm.kernels import flash_attention, fused_attention, parallel_decode

    query = key = value = torch.randn(2, 4, 32, 16, device=DEVICE)
    output = fused_attention(query, key, value, use_flash=True)
    assert output.shape == query.shape
    assert torch.allclose(flash_attention(query, key, value), output, atol=1e-5)
    tokens = parallel_decode(torch.randn(2, 32, 100, device=DEVICE), num_parallel=64).tokens
    assert tokens.shape == (2, 32)
