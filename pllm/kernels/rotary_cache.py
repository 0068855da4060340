"""`rotate_into_cache`: a decoding step's fused-QKV output -> rotated queries, and keys/values stored
in the static KV cache.

Per window token, the work between the QKV matmul and attention: split the row into query, key and
value heads, RMS-normalise queries and keys (QK-norm, when the model has it), rotate them (rotary
embeddings, "rotate half" layout), write the queries out as (B, H, W, hd) and store keys and values
at the token's cache index. At batch 1 these are a few microseconds of data but, as separate ops,
several kernels per layer (norm + rotary for queries, the same for keys, a stack, a scatter), each
paying launch and tail latency; the Triton kernel is one launch per layer, one program per token.
`rotate_into_cache_reference` is the PyTorch definition it is tested against and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, "rotate half" layout. x (..., hd), e.g. (B, H, L, hd) with cos/sin (B, 1, L,
    hd) float32, or (B, L, H, hd) with cos/sin (B, L, 1, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def rotate_into_cache(qkv: torch.Tensor, heads: int, kv_heads: int, q_weight: torch.Tensor | None,
                      k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """qkv (B, W, (heads + 2 kv_heads) hd): rows of query | key | value heads; q_weight/k_weight (hd,)
    the QK-norm weights (None: no norm); cos/sin (B, W, hd) float32 at each token's position;
    cache (B, 2, kv_heads, S, hd): keys beside values, each row's own; or (1, 2, kv_heads, S, hd),
    one cache all rows write into; index (B, W): the cache entry of each token.
    Stores the normed, rotated keys and the values into `cache`; returns the normed, rotated queries,
    (B, heads, W, hd) contiguous."""
    B, W, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    if width != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv width {width} is not (heads {heads} + 2 x kv_heads {kv_heads}) x an even head size")
    if cache.shape[1:] != (2, kv_heads, cache.shape[3], head_dim) or cache.shape[0] not in (1, B) or index.shape != (B, W):
        raise ValueError(f"cache {tuple(cache.shape)} / index {tuple(index.shape)} do not fit qkv {tuple(qkv.shape)}")
    # The kernel computes in float32: float64 (exactness tests) takes the reference.
    if use_triton(qkv, cache) and head_dim & (head_dim - 1) == 0 and qkv.dtype != torch.float64:
        return _rotate_into_cache_triton(qkv, heads, kv_heads, q_weight, k_weight, eps, cos, sin, cache, index)
    return rotate_into_cache_reference(qkv, heads, kv_heads, q_weight, k_weight, eps, cos, sin, cache, index)


def rotate_into_cache_reference(qkv, heads, kv_heads, q_weight, k_weight, eps, cos, sin, cache, index) -> torch.Tensor:
    """The PyTorch definition: F.rms_norm, then `apply_rotary`, then one scatter for keys and values."""
    B, W, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.view(B, W, -1, head_dim).transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
    cos, sin = cos[:, None], sin[:, None]

    def norm_rotate(x, weight):
        if weight is not None:
            x = F.rms_norm(x, (head_dim,), weight, eps)
        return apply_rotary(x, cos, sin)

    kv = torch.stack([norm_rotate(k, k_weight), v], dim=1).to(cache.dtype)  # (B, 2, KV, W, hd)
    if cache.shape[0] == B:
        cache.scatter_(3, index[:, None, None, :, None].expand_as(kv), kv)
    else:  # one cache for every row: index holds entries of it
        cache[0].index_copy_(2, index.flatten(), kv.permute(1, 2, 0, 3, 4).flatten(2, 3))
    return norm_rotate(q, q_weight).contiguous()


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_rotate(x1, x2, w_ptr, eps, cos1, cos2, sin1, sin2, NORM: tl.constexpr, HALF: tl.constexpr):
        """Heads (rows) of one token, as their two halves in float32: RMS norm (rounded to the weight's
        dtype, the model's, as F.rms_norm returns it), then rotation."""
        if NORM:
            d = tl.arange(0, HALF)[None, :]
            r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
            x1 = (x1 * r * tl.load(w_ptr + d).to(tl.float32)).to(w_ptr.dtype.element_ty).to(tl.float32)
            x2 = (x2 * r * tl.load(w_ptr + HALF + d).to(tl.float32)).to(w_ptr.dtype.element_ty).to(tl.float32)
        return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2

    @triton.jit
    def _trig(cos_ptr, sin_ptr, b, l, s_cs_b, s_cs_l, HALF: tl.constexpr):
        """cos and sin at one token (batch row b, position l) as their two halves in float32, (1, HALF) each."""
        at = b * s_cs_b + l * s_cs_l + tl.arange(0, HALF)[None, :]
        return (tl.load(cos_ptr + at).to(tl.float32), tl.load(cos_ptr + at + HALF).to(tl.float32),
                tl.load(sin_ptr + at).to(tl.float32), tl.load(sin_ptr + at + HALF).to(tl.float32))

    @triton.jit
    def _load_norm_rotate(heads_ptr, w_ptr, eps, cos1, cos2, sin1, sin2, HEADS: tl.constexpr,
                          BLOCK: tl.constexpr, NORM: tl.constexpr, HALF: tl.constexpr):
        """HEADS heads of one token stored one after another from heads_ptr, loaded in float32 and
        normed and rotated (`_norm_rotate`); returns their halves, head rows h (BLOCK, 1) and mask."""
        h = tl.arange(0, BLOCK)[:, None]
        d = tl.arange(0, HALF)[None, :]
        ok = h < HEADS
        x1 = tl.load(heads_ptr + h * 2 * HALF + d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(heads_ptr + h * 2 * HALF + HALF + d, mask=ok, other=0.0).to(tl.float32)
        y1, y2 = _norm_rotate(x1, x2, w_ptr, eps, cos1, cos2, sin1, sin2, NORM, HALF)
        return y1, y2, h, ok

    @triton.jit
    def _rotate_into_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, cache_ptr, index_ptr, W, eps,
                                  s_qkv_b, s_qkv_w, s_cs_b, s_cs_w, s_c_b, s_c_kv, s_c_h, s_c_s, s_i_b, s_i_w,
                                  H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                                  BLOCK_KV: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr):
        """One program per token: all its query, key and value heads."""
        token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a large cache passes 2**31 elements
        b, w = token // W, token % W
        row = qkv_ptr + b * s_qkv_b + w * s_qkv_w
        d = tl.arange(0, HALF)[None, :]
        cos1, cos2, sin1, sin2 = _trig(cos_ptr, sin_ptr, b, w, s_cs_b, s_cs_w, HALF)
        out_dtype = q_ptr.dtype.element_ty

        y1, y2, h, ok = _load_norm_rotate(row, qw_ptr, eps, cos1, cos2, sin1, sin2, H, BLOCK_H, Q_NORM, HALF)
        q_out = q_ptr + ((b * H + h) * W + w) * 2 * HALF + d
        tl.store(q_out, y1.to(out_dtype), mask=ok)
        tl.store(q_out + HALF, y2.to(out_dtype), mask=ok)

        k1, k2, kh, ok = _load_norm_rotate(row + H * 2 * HALF, kw_ptr, eps, cos1, cos2, sin1, sin2, KV, BLOCK_KV,
                                           K_NORM, HALF)
        entry = tl.load(index_ptr + b * s_i_b + w * s_i_w)
        dst = cache_ptr + b * s_c_b + kh * s_c_h + entry * s_c_s + d
        cache_dtype = cache_ptr.dtype.element_ty
        tl.store(dst, k1.to(out_dtype).to(cache_dtype), mask=ok)
        tl.store(dst + HALF, k2.to(out_dtype).to(cache_dtype), mask=ok)
        v_row = row + (H + KV + kh) * 2 * HALF + d
        tl.store(dst + s_c_kv, tl.load(v_row, mask=ok, other=0.0).to(cache_dtype), mask=ok)
        tl.store(dst + s_c_kv + HALF, tl.load(v_row + HALF, mask=ok, other=0.0).to(cache_dtype), mask=ok)


def _rotate_into_cache_triton(qkv, heads, kv_heads, q_weight, k_weight, eps, cos, sin, cache, index) -> torch.Tensor:
    B, W, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # no copies for the model's tables
    if cache.stride(-1) != 1:
        raise ValueError("rotate_into_cache needs a cache whose head dimension is contiguous")
    q = torch.empty(B, heads, W, head_dim, dtype=qkv.dtype, device=qkv.device)
    q_weight_arg = q_weight if q_weight is not None else q  # any pointer: never read without the norm
    k_weight_arg = k_weight if k_weight is not None else q
    _rotate_into_cache_kernel[(B * W,)](
        qkv, cos, sin, q_weight_arg, k_weight_arg, q, cache, index, W, float(eps),
        qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), cache.stride(0) if cache.shape[0] > 1 else 0,
        cache.stride(1),
        cache.stride(2), cache.stride(3), index.stride(0), index.stride(1),
        H=heads, KV=kv_heads, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_KV=triton.next_power_of_2(kv_heads), Q_NORM=q_weight is not None, K_NORM=k_weight is not None,
        num_warps=4)
    return q
