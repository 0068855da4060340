"""`bias_attention`: attention of a decoding step's window over a cached prefix, under an additive
bias (the step's block-causal mask), for grouped-query heads.

A plain flash-attention forward: one program per (query tile of up to 64, query head), an online
softmax over tiles of keys (256 for the small query tiles of small batches, else 64). It reads keys
and values in place from the cache slice (any strides), maps query head h to key/value head
h // (H / KV), and writes its output in (B, Lq, H, hd) memory, so the
`transpose(1, 2).reshape(B, Lq, H * hd)` that feeds the output projection is a view (with cuDNN
that reshape was a copy kernel per layer). `fused_attention` runs it where it was measured faster
than cuDNN (see benchmarks/RESULTS.md). At small batch and long keys (`key_splits`) the keys are
split across programs and a second kernel merges the slices (flash-decoding).
`bias_attention_reference` (SDPA) is what it is tested against and what runs elsewhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, shared_memory_limit, use_triton
from .options import DEFAULT_KERNELS, KernelOptions


def bias_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                   kernels: KernelOptions = DEFAULT_KERNELS, kv_pages: torch.Tensor | None = None) -> torch.Tensor:
    """query (B, H, Lq, hd); key/value (B, KV, Lk, hd) with KV dividing H; bias (B, 1, Lq, Lk)
    additive (0 or -inf), every query seeing at least one key. Paged keys/values: key/value
    (pages, KV, page_size, hd), and kv_pages (B, n) int64 the page table of each query row (its key
    j lives in page kv_pages[b, j // page_size]): a decoding step's rows read the cache's pages in
    place. Returns (B, H, Lq, hd). kernels: query tiles, key splits and the plain kernel's tile
    (`KernelOptions.attention_*`)."""
    if not _shapes_fit(query, key, value, bias, kv_pages):
        raise ValueError(f"bias_attention: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, bias {tuple(bias.shape)} {bias.dtype} (needs key/value (B, KV, Lk, "
                         "hd) with KV | H, or pages (P, KV, page, hd) with kv_pages (B, n) covering Lk, and an "
                         "additive (B, 1, Lq, Lk) bias)")
    if runs_kernel(query, key, value, bias, kv_pages):
        splits = key_splits(query, key, split_keys=kernels.attention_split_keys, fill_sms=kernels.attention_fill_sms,
                            num_keys=bias.shape[-1])
        if splits > 1 or (kernels.attention_group_heads and groups_few_queries(query, key)):
            return _split_keys_triton(query, key, value, bias, splits, kv_pages)
        return _bias_attention_triton(query, key, value, bias, kernels.attention_tile, kernels.attention_block_m,
                                      kernels.attention_fill_sms, kv_pages)
    if kv_pages is not None:
        key, value = gather_pages(key, kv_pages, bias.shape[-1]), gather_pages(value, kv_pages, bias.shape[-1])
    return bias_attention_reference(query, key, value, bias)


def gather_pages(pages: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """(pages, KV, page_size, hd) through page tables (B, n) -> each row's first `length` keys,
    (B, KV, length, hd) (a copy)."""
    P = pages.shape[2]
    j = torch.arange(length, device=table.device)
    entries = table[:, j // P] * P + j % P  # (B, length)
    flat = pages.transpose(0, 1).flatten(1, 2)  # (KV, pages * P, hd)
    return flat[:, entries].transpose(0, 1)


def _shapes_fit(query, key, value, bias, kv_pages=None) -> bool:
    B, H, Lq, hd = query.shape
    Lk = bias.shape[-1] if bias.dim() == 4 else -1
    if kv_pages is None:
        rows_fit = key.shape[0] == B and key.shape[2] == Lk
    else:
        rows_fit = kv_pages.dim() == 2 and kv_pages.shape[0] == B and kv_pages.shape[1] * key.shape[2] >= Lk
    return (key.dim() == 4 and value.shape == key.shape and rows_fit and key.shape[3] == hd
            and 0 < key.shape[1] and H % key.shape[1] == 0 and bias.dtype != torch.bool and bias.dim() == 4
            and bias.shape[0] in (1, B) and bias.shape[1:3] == (1, Lq))


def runs_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                kv_pages: torch.Tensor | None = None) -> bool:
    """Whether `bias_attention` would run the Triton kernel for these inputs."""
    return (_shapes_fit(query, key, value, bias, kv_pages) and use_triton(query, key, value, bias)
            and triton_fits(query, key, value) and (kv_pages is None or kv_pages.stride(1) == 1))


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


def query_tile(batch: int, heads: int, queries: int, sms: int | None, fill_sms: bool = True) -> int:
    """Queries per program: 64, or (fill_sms, on a GPU of `sms` SMs) fewer, down to 16, while the
    programs would not give every SM one. At batch 1, 32 heads x one 64-query tile are 32 programs
    on a GPU of 132 SMs; with tiles of 16, 128 programs share the work, each with its own pass over
    the keys (the same length: smaller tiles do not shorten that pass)."""
    tile = 64 if queries > 32 else max(16, 1 << (queries - 1).bit_length())
    while fill_sms and sms and tile > 16 and batch * heads * -(-queries // tile) < sms:
        tile //= 2
    return tile


KEY_TILE = 64  # keys per loop iteration of the split-keys kernel
# The plain kernel's (keys per loop iteration, pipeline stages, warps), and its queries per
# program (None: `query_tile`). With 16-query programs (small batch) it walks the keys in tiles of
# 256, measured faster than tiles of 64 (`decode_kernels.py --attention-sweep`, benchmarks/RESULTS.md).
# Larger query tiles keep 64 keys: 64 x 256 tiles at 3 stages need more shared memory than an SM has.
# Head sizes of 128 (7-8B models) double every key/value tile: `plain_config` steps down to the
# first tile that fits the GPU's shared memory.
PLAIN_CONFIG = (KEY_TILE, 2, 4)
SMALL_TILE_CONFIG = (256, 3, 4)
_SMALLER_CONFIGS = ((256, 2, 4), (128, 2, 4), (64, 2, 4), (32, 2, 4), (32, 1, 4))


def tile_bytes(block_m: int, block_n: int, stages: int, head_dim: int) -> int:
    """Shared memory of a plain-kernel program (16-bit inputs): the key and value tiles of every
    pipeline stage, the query tile and the float32 score tile (matches Triton's count for the
    64-query x 256-key tile at 3 stages and head size 64: 264 KB)."""
    return stages * 2 * block_n * head_dim * 2 + block_m * head_dim * 2 + block_m * block_n * 4


def plain_config(block_m: int, head_dim: int = 64, limit: int | None = None) -> tuple[int, int, int] | None:
    """(keys per iteration, stages, warps) for `block_m`-query programs: the measured choice, or the
    largest smaller tile within `limit` bytes of shared memory; None if none fits."""
    preferred = SMALL_TILE_CONFIG if block_m <= 16 else PLAIN_CONFIG
    for config in (preferred, *_SMALLER_CONFIGS):
        if limit is None or tile_bytes(block_m, config[0], config[1], head_dim) <= limit:
            return config
    return None


def key_splits(query: torch.Tensor, key: torch.Tensor, sms: int | None = None, split_keys: bool = True,
               fill_sms: bool = True, num_keys: int | None = None) -> int:
    """Key slices for the split-keys kernel (flash-decoding): 1 (the plain kernel) unless the plain
    kernel's programs would leave SMs idle (small batch). Then each program takes one key/value
    head's G query heads x a few queries over one slice of the keys, and enough slices give about
    two programs per SM; a second kernel merges the slices' softmax statistics. At batch 1 the
    plain kernel's programs each walk all keys in turn, so the step's attention time grew with the
    key length; split, every program walks a tile or two."""
    B, H, Lq, _ = query.shape
    KV, Lk = key.shape[1], num_keys or key.shape[2]
    groups = H // KV
    if sms is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 132
    tiles = -(-Lk // KEY_TILE)
    if not split_keys or groups & (groups - 1) or groups > 64 or tiles < 2:
        return 1
    # Where the split measured faster in-graph (benchmarks/decode_kernels.py, benchmarks/RESULTS.md):
    # from 2,048 keys at batch 1, from 512 at batch 2, not at batch 16.
    if B * H * -(-Lq // query_tile(B, H, Lq, sms, fill_sms)) >= 2 * sms or B * Lk < (2048 if B == 1 else 1024):
        return 1
    programs = B * KV * -(-Lq // max(1, 64 // groups))
    return max(1, min(tiles, -(-2 * sms // programs)))


def groups_few_queries(query: torch.Tensor, key: torch.Tensor, sms: int | None = None) -> bool:
    """Few queries per row (an autoregressive step's one) at a batch whose key/value heads alone
    give every SM a program: the plain kernel's programs, one per query head, would each read their
    key/value head's keys and values, G times over; the split-keys kernel's programs take a
    key/value head's G query heads together (one slice when unsplit), reading them once. At small
    batch the plain kernel's G times more programs fill the GPU instead."""
    groups = query.shape[1] // key.shape[1]
    if sms is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 0
    return (1 < groups <= 64 and groups & (groups - 1) == 0 and query.shape[2] * groups <= 64
            and query.shape[0] * key.shape[1] >= sms)


def bias_attention_reference(query, key, value, bias) -> torch.Tensor:
    """The PyTorch definition (SDPA, grouped-query heads)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype),
                                          enable_gqa=key.shape[1] != query.shape[1])


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _key_tile(q, k_base, v_base, bias_base, start, Lk, m_ok, d, row_max, row_sum, acc, s_kn, s_vn, s_bn, scale,
                  pages_row, s_kp, s_vp, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
        """One tile of BLOCK_N keys from `start` into the online softmax (row max, row sum, output).
        PAGE > 0: key n lives at offset n % PAGE of page pages_row[n // PAGE]."""
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < Lk
        if PAGE > 0:
            page = tl.load(pages_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            k_at, v_at = page * s_kp + (n % PAGE) * s_kn, page * s_vp + (n % PAGE) * s_vn
        else:
            k_at, v_at = n * s_kn, n * s_vn
        k = tl.load(k_base + k_at[None, :] + d[:, None], mask=n_ok[None, :], other=0.0)  # (HD, BLOCK_N)
        s = tl.dot(q, k) * scale
        s += tl.load(bias_base + n[None, :] * s_bn, mask=m_ok[:, None] & n_ok[None, :],
                     other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen no key yet
        p = tl.exp(s - safe[:, None])
        correction = tl.exp(row_max - safe)
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        v = tl.load(v_base + v_at[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)  # (BLOCK_N, HD)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
        return new_max, row_sum, acc

    @triton.jit
    def _bias_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, pages_ptr, Lq, Lk, H, scale,
                               s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_bb, s_bm, s_bn,
                               s_ob, s_om, s_oh, s_pb, GROUPS: tl.constexpr, HD: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
        """PAGE > 0: paged keys/values (s_kb, s_vb: page strides; pages_ptr: the rows' page tables)."""
        pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # 64-bit offsets: large caches
        b, h = bh // H, bh % H
        kv = h // GROUPS
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HD)
        m_ok = m < Lq
        q = tl.load(q_ptr + b * s_qb + h * s_qh + m[:, None] * s_qm + d[None, :], mask=m_ok[:, None], other=0.0)
        kb = 0 if PAGE > 0 else b
        k_base = k_ptr + kb * s_kb + kv * s_kh
        v_base = v_ptr + kb * s_vb + kv * s_vh
        pages_row = pages_ptr + b * s_pb
        bias_base = bias_ptr + b * s_bb + m[:, None] * s_bm
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        for start in range(0, Lk, BLOCK_N):
            row_max, row_sum, acc = _key_tile(q, k_base, v_base, bias_base, start, Lk, m_ok, d, row_max, row_sum, acc,
                                              s_kn, s_vn, s_bn, scale, pages_row, s_kb, s_vb, BLOCK_N, PAGE)
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(o_ptr + b * s_ob + m[:, None] * s_om + h * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None])

    @triton.jit
    def _split_keys_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, max_ptr, sum_ptr, pages_ptr, B, Lq, Lk, H, KV,
                           keys_per_split, scale, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                           s_bb, s_bm, s_bn, s_pb, GROUPS: tl.constexpr, QT: tl.constexpr, HD: tl.constexpr,
                           BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
        """Program (key slice, (b, key/value head, query tile)): rows = the head's GROUPS query heads
        x QT queries; writes the slice's unnormalised output, row max and row sum (float32)."""
        split, pid = tl.program_id(0), tl.program_id(1)
        q_tiles = tl.cdiv(Lq, QT)
        bkv, qt = pid // q_tiles, pid % q_tiles
        b, kv = (bkv // KV).to(tl.int64), bkv % KV
        r = tl.arange(0, GROUPS * QT)
        h = kv * GROUPS + r // QT
        m = qt * QT + r % QT
        m_ok = m < Lq
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + b * s_qb + h[:, None] * s_qh + m[:, None] * s_qm + d[None, :], mask=m_ok[:, None],
                    other=0.0)
        kb = 0 if PAGE > 0 else b
        k_base = k_ptr + kb * s_kb + kv * s_kh
        v_base = v_ptr + kb * s_vb + kv * s_vh
        pages_row = pages_ptr + b * s_pb
        bias_base = bias_ptr + b * s_bb + m[:, None] * s_bm
        row_max = tl.full([GROUPS * QT], float("-inf"), tl.float32)
        row_sum = tl.zeros([GROUPS * QT], tl.float32)
        acc = tl.zeros([GROUPS * QT, HD], tl.float32)
        lo = split * keys_per_split
        for start in range(lo, tl.minimum(lo + keys_per_split, Lk), BLOCK_N):
            row_max, row_sum, acc = _key_tile(q, k_base, v_base, bias_base, start, Lk, m_ok, d, row_max, row_sum, acc,
                                              s_kn, s_vn, s_bn, scale, pages_row, s_kb, s_vb, BLOCK_N, PAGE)
        row = ((split * B + b) * H + h) * Lq + m  # (split, B, H, Lq) rows
        tl.store(o_ptr + row[:, None] * HD + d[None, :], acc, mask=m_ok[:, None])
        tl.store(max_ptr + row, row_max, mask=m_ok)
        tl.store(sum_ptr + row, row_sum, mask=m_ok)

    @triton.jit
    def _merge_kernel(o_part_ptr, max_ptr, sum_ptr, out_ptr, rows, splits, Lq, H, s_ob, s_om, s_oh,
                      ROWS: tl.constexpr, HD: tl.constexpr):
        """Rows (b, h, query) of the key slices' partial results -> the softmax over all keys."""
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = row < rows
        d = tl.arange(0, HD)
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HD], tl.float32)
        for s in range(splits):
            at = s * rows + row
            part_max = tl.load(max_ptr + at, mask=ok, other=float("-inf"))
            new = tl.maximum(best, part_max)
            safe = tl.where(new == float("-inf"), 0.0, new)
            keep, take = tl.exp(best - safe), tl.exp(part_max - safe)
            total = total * keep + tl.load(sum_ptr + at, mask=ok, other=0.0) * take
            part = tl.load(o_part_ptr + at[:, None].to(tl.int64) * HD + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * keep[:, None] + part * take[:, None]
            best = new
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        b, h, m = row // (H * Lq), (row // Lq) % H, row % Lq
        tl.store(out_ptr + b[:, None].to(tl.int64) * s_ob + m[:, None] * s_om + h[:, None] * s_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def _split_keys_triton(query, key, value, bias, splits: int, kv_pages: torch.Tensor | None = None) -> torch.Tensor:
    B, H, Lq, hd = query.shape
    KV, Lk = key.shape[1], bias.shape[-1]
    groups = H // KV
    # Queries per program: up to 64 rows of G heads x QT queries, at least 16 (a dot's rows).
    qt = max(min(triton.next_power_of_2(Lq), 64 // groups), 16 // groups, 1)
    per_split = -(-(-(-Lk // KEY_TILE)) // splits) * KEY_TILE
    splits = -(-Lk // per_split)
    bias = bias.expand(B, 1, Lq, Lk)
    o_part = torch.empty(splits, B, H, Lq, hd, dtype=torch.float32, device=query.device)
    stats = torch.empty(2, splits, B, H, Lq, dtype=torch.float32, device=query.device)
    _split_keys_kernel[(splits, B * KV * triton.cdiv(Lq, qt))](
        query, key, value, bias, o_part, stats[0], stats[1], kv_pages if kv_pages is not None else query,
        B, Lq, Lk, H, KV, per_split, hd ** -0.5,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), bias.stride(0), bias.stride(2), bias.stride(3),
        kv_pages.stride(0) if kv_pages is not None else 0,
        GROUPS=groups, QT=qt, HD=hd, BLOCK_N=KEY_TILE, PAGE=key.shape[2] if kv_pages is not None else 0,
        num_warps=4, num_stages=2)
    out = torch.empty(B, Lq, H, hd, dtype=query.dtype, device=query.device)  # returned as (B, H, Lq, hd)
    rows, per_program = B * H * Lq, 32
    _merge_kernel[(triton.cdiv(rows, per_program),)](
        o_part, stats[0], stats[1], out, rows, splits, Lq, H, out.stride(0), out.stride(1), out.stride(2),
        ROWS=per_program, HD=hd, num_warps=4)
    return out.transpose(1, 2)


def _bias_attention_triton(query, key, value, bias, config: tuple[int, int, int] | None = None,
                           block_m: int | None = None, fill_sms: bool = True,
                           kv_pages: torch.Tensor | None = None) -> torch.Tensor:
    """config: (keys per iteration, stages, warps), default `plain_config`; block_m: queries per
    program, default `query_tile`; kv_pages: see `bias_attention`."""
    B, H, Lq, hd = query.shape
    Lk = bias.shape[-1]
    out = torch.empty(B, Lq, H, hd, dtype=query.dtype, device=query.device)  # returned as (B, H, Lq, hd)
    bias = bias.expand(B, 1, Lq, Lk)
    block_m = block_m or query_tile(
        B, H, Lq, torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else None,
        fill_sms)
    config = config or plain_config(block_m, hd, shared_memory_limit(query.device))
    if config is None:  # no tile fits this GPU's shared memory
        if kv_pages is not None:
            key, value = gather_pages(key, kv_pages, Lk), gather_pages(value, kv_pages, Lk)
        return bias_attention_reference(query, key, value, bias)
    block_n, stages, warps = config
    grid = (triton.cdiv(Lq, block_m), B * H)
    _bias_attention_kernel[grid](
        query, key, value, bias, out, kv_pages if kv_pages is not None else query, Lq, Lk, H, hd ** -0.5,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), bias.stride(0), bias.stride(2), bias.stride(3),
        out.stride(0), out.stride(1), out.stride(2), kv_pages.stride(0) if kv_pages is not None else 0,
        GROUPS=H // key.shape[1], HD=hd, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=key.shape[2] if kv_pages is not None else 0, num_warps=warps, num_stages=stages)
    return out.transpose(1, 2)
