"""`bias_attention`: attention of a decoding step's window over a cached prefix, under an additive
bias (the step's block-causal mask), for grouped-query heads.

A plain flash-attention forward: one program per (query tile of up to 64, query head), an online
softmax over tiles of 64 keys. It reads keys and values in place from the cache slice (any strides), maps
query head h to key/value head h // (H / KV), and writes its output in (B, Lq, H, hd) memory, so
the `transpose(1, 2).reshape(B, Lq, H * hd)` that feeds the output projection is a view. With
cuDNN that reshape was a copy kernel per layer. On an H200, in the 1.1B model's step
(benchmarks/RESULTS.md), the kernel takes 57 us per layer at batch 16 over 512 keys (cuDNN: 68),
and the graph replays 8% faster at batch 1 (256 keys) and batch 16. `fused_attention` runs it where
it was measured to pay. `bias_attention_reference` (SDPA) is what it is tested against and what
runs elsewhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton

FILL_SMS = True  # smaller query tiles while the programs do not fill the GPU (False: always 64; A/B)


def bias_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """query (B, H, Lq, hd); key/value (B, KV, Lk, hd) with KV dividing H; bias (B, 1, Lq, Lk)
    additive (0 or -inf), every query seeing at least one key. Returns (B, H, Lq, hd)."""
    if not _shapes_fit(query, key, value, bias):
        raise ValueError(f"bias_attention: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, bias {tuple(bias.shape)} {bias.dtype} (needs key/value (B, KV, Lk, "
                         "hd) with KV | H and an additive (B, 1, Lq, Lk) bias)")
    if runs_kernel(query, key, value, bias):
        return _bias_attention_triton(query, key, value, bias)
    return bias_attention_reference(query, key, value, bias)


def _shapes_fit(query, key, value, bias) -> bool:
    B, H, Lq, hd = query.shape
    return (key.dim() == 4 and value.shape == key.shape and key.shape[0] == B and key.shape[3] == hd
            and 0 < key.shape[1] and H % key.shape[1] == 0 and bias.dtype != torch.bool and bias.dim() == 4
            and bias.shape[0] in (1, B) and bias.shape[1:] == (1, Lq, key.shape[2]))


def runs_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether `bias_attention` would run the Triton kernel for these inputs."""
    return _shapes_fit(query, key, value, bias) and use_triton(query, key, value, bias) and triton_fits(query, key, value)


def triton_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Half-precision inputs (a float32 dot would run in TF32), head sizes the tiles take,
    contiguous head dimensions, and no gradients (the kernel has no backward pass). Triton's CPU
    interpreter gets bfloat16 dots wrong (it multiplies the raw 16-bit patterns), so there only
    float16 takes the kernel."""
    dtypes = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return False
    return (query.shape[-1] in (16, 32, 64, 128) and query.dtype in dtypes
            and key.dtype == value.dtype == query.dtype and all(t.stride(-1) == 1 for t in (query, key, value)))


def query_tile(batch: int, heads: int, queries: int, sms: int | None) -> int:
    """Queries per program: 64, or (FILL_SMS, on a GPU of `sms` SMs) fewer, down to 16, while the
    programs would not give every SM one. At batch 1, 32 heads x one 64-query tile are 32 programs
    on an H200's 132 SMs; with tiles of 16, 128 programs share the work, each with its own pass over
    the keys (the same length: smaller tiles do not shorten that pass)."""
    tile = 64 if queries > 32 else max(16, 1 << (queries - 1).bit_length())
    while FILL_SMS and sms and tile > 16 and batch * heads * -(-queries // tile) < sms:
        tile //= 2
    return tile


def bias_attention_reference(query, key, value, bias) -> torch.Tensor:
    """The PyTorch definition (SDPA, grouped-query heads)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype),
                                          enable_gqa=key.shape[1] != query.shape[1])


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bias_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, Lq, Lk, H, scale,
                               s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_bb, s_bm, s_bn,
                               s_ob, s_om, s_oh, GROUPS: tl.constexpr, HD: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # 64-bit offsets: large caches
        b, h = bh // H, bh % H
        kv = h // GROUPS
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HD)
        m_ok = m < Lq
        q = tl.load(q_ptr + b * s_qb + h * s_qh + m[:, None] * s_qm + d[None, :], mask=m_ok[:, None], other=0.0)
        k_base = k_ptr + b * s_kb + kv * s_kh
        v_base = v_ptr + b * s_vb + kv * s_vh
        bias_base = bias_ptr + b * s_bb + m[:, None] * s_bm
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        for start in range(0, Lk, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < Lk
            k = tl.load(k_base + n[None, :] * s_kn + d[:, None], mask=n_ok[None, :], other=0.0)  # (HD, BLOCK_N)
            s = tl.dot(q, k) * scale
            s += tl.load(bias_base + n[None, :] * s_bn, mask=m_ok[:, None] & n_ok[None, :],
                         other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen no key yet
            p = tl.exp(s - safe[:, None])
            correction = tl.exp(row_max - safe)
            row_sum = row_sum * correction + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * s_vn + d[None, :], mask=n_ok[:, None], other=0.0)  # (BLOCK_N, HD)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
            row_max = new_max
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(o_ptr + b * s_ob + m[:, None] * s_om + h * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None])


def _bias_attention_triton(query, key, value, bias) -> torch.Tensor:
    B, H, Lq, hd = query.shape
    Lk = key.shape[2]
    out = torch.empty(B, Lq, H, hd, dtype=query.dtype, device=query.device)  # returned as (B, H, Lq, hd)
    bias = bias.expand(B, 1, Lq, Lk)
    block_m = query_tile(B, H, Lq, torch.cuda.get_device_properties(query.device).multi_processor_count
                         if query.is_cuda else None)
    grid = (triton.cdiv(Lq, block_m), B * H)
    _bias_attention_kernel[grid](
        query, key, value, bias, out, Lq, Lk, H, hd ** -0.5,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), bias.stride(0), bias.stride(2), bias.stride(3),
        out.stride(0), out.stride(1), out.stride(2), GROUPS=H // key.shape[1], HD=hd, BLOCK_M=block_m,
        BLOCK_N=64, num_warps=4, num_stages=2)
    return out.transpose(1, 2)
