"""Skinny GEMMs for the decoding step at small batch: `skinny_linear` (x @ W.T, optionally split
over K into float32 partial sums) and `silu_mul_linear` (the SwiGLU gate | up matmul with
silu(gate) * up in its epilogue).

At batch 1 the step's matmuls have 64 rows (a window of two 32-token blocks): they are weight
reads of 8-46 MB. Every program owns a narrow band of output columns and, optionally, a slice of
K, written as float32 partial sums (S, M, N) for the caller to fold into its next elementwise
kernel. The gated form reads the gate rows and the matching up rows of the fused weight in one
program, so the (M, 2I) gate | up output and the SiLU kernel disappear. Measured inside CUDA
graphs (`benchmarks/decode_kernels.py`; timing one launch at a time measures Triton's host-side
launch instead), on an H200 the gated form is 1.21x cuBLAS + the SiLU kernel and o_proj 1.07x; the
other projections gain little (each call's ramp and tail, not its tiles, dominate), so the step
uses these kernels only for the shapes in `CONFIGS`. Elsewhere (CPU, no Triton) the references run.

`scaled_linear` and `residual_linear` are the fused step's forms (opt-in, `FUSED_STEP`): an RMSNorm
folded into the matmul after it (rows scaled in the epilogue, from partial sums of squares) and the
residual add in the epilogue of the matmul before it, which also writes the next norm's inputs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, pdl, use_triton
from .rms_norm import add_partials_rms_norm

if HAS_TRITON:
    from .backend import await_previous_kernel

MAX_ROWS = 64  # one row tile: the decoding step's window at batch 1
USE_SKINNY = True  # the decoding step takes these kernels where they were measured to pay (False: cuBLAS; A/B)
# True: at most MAX_ROWS rows, the step's layer is four of these kernels with the norms and residual
# adds folded in (`fuses_step`). Off by default: on an H200 that step's graph took 1.375 ms against
# 1.289 for the unfused one (skinny GEMMs where they paid alone + add&norm kernels; RESULTS.md).
FUSED_STEP = False
# Under PDL (backend.USE_PDL), the weight shapes (N, K) whose programs prefetch their weights into L2
# before they wait for the previous kernel; None: every shape. A prefetch pays only while the kernel
# before it leaves HBM idle (o_proj after attention) and costs where that kernel is a weight read.
PREFETCH_SHAPES: set[tuple[int, int]] | None = None


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, split: int = 1,
                  config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T. split == 1: (..., N) in x's dtype. split > 1: float32 partial
    sums (split, ..., N) over K slices, whose sum is the product. config: (block_n, block_k,
    stages[, warps]) for the kernel (default: `default_config`; 4 warps)."""
    if split < 1:
        raise ValueError(f"skinny_linear: split must be >= 1, got {split}")
    rows = x.numel() // x.shape[-1]
    if not runs_kernel(x, weight):
        return skinny_linear_reference(x, weight, split)
    x2 = x.reshape(rows, x.shape[-1])
    out = _launch(x2, weight, split, gated=False, config=config)
    return out.view(*((split,) if split > 1 else ()), *x.shape[:-1], out.shape[-1])


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weight (2I, K) = rows gate | up; returns (..., I)."""
    if weight.shape[0] % 2:
        raise ValueError(f"silu_mul_linear: weight rows {weight.shape[0]} are not gate | up halves")
    if not runs_kernel(x, weight):
        return silu_mul_linear_reference(x, weight)
    x2 = x.reshape(-1, x.shape[-1])
    return _launch(x2, weight, 1, gated=True, config=config).view(*x.shape[:-1], weight.shape[0] // 2)


def normed_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  gated: bool = False, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """rms_norm(x) * norm_weight @ weight.T; gated: silu(gate) * up of that product, for weight
    rows gate | up. The norm's scale is applied to the product's rows (`scaled_linear`)."""
    if norm_weight.shape != x.shape[-1:]:
        raise ValueError(f"normed_linear: norm weight {tuple(norm_weight.shape)} does not fit x {tuple(x.shape)}")
    return scaled_linear(*norm_inputs(x, norm_weight), eps, weight, gated, config)


def norm_inputs(x: torch.Tensor, norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * norm_weight in x's dtype, the rows' sums of squares as (1, rows) float32): what
    `scaled_linear` takes. In the step, `residual_linear(..., next_norm=)` writes both instead."""
    xf = x.float()
    return (xf * norm_weight.float()).to(x.dtype), xf.square().sum(-1).reshape(1, -1)


def scaled_linear(xg: torch.Tensor, squares: torch.Tensor, eps: float, weight: torch.Tensor, gated: bool = False,
                  config: tuple[int, ...] | None = None) -> torch.Tensor:
    """An RMSNorm folded into a matmul: (xg @ weight.T) * rsqrt(mean square + eps) per row, for xg
    = x * norm weight and squares (parts, rows), partial sums of x's squared rows (summed here, so
    the kernel that writes x can leave one per program). gated: silu(gate) * up of it."""
    rows = xg.numel() // xg.shape[-1]
    if gated and weight.shape[0] % 2:
        raise ValueError(f"scaled_linear: weight rows {weight.shape[0]} are not gate | up halves")
    if squares.dim() != 2 or squares.shape[1] != rows:
        raise ValueError(f"scaled_linear: squares {tuple(squares.shape)} are not (parts, {rows})")
    if not (runs_kernel(xg, weight) and squares.is_contiguous() and squares.dtype == torch.float32):
        return scaled_linear_reference(xg, squares, eps, weight, gated)
    out = _launch(xg.reshape(rows, xg.shape[-1]), weight, 1, gated, config, row_scale=(squares, eps))
    return out.view(*xg.shape[:-1], out.shape[-1])


def residual_linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                    config: tuple[int, ...] | None = None, next_norm: torch.Tensor | None = None):
    """h = residual + x @ weight.T in one kernel (the add in the matmul's epilogue). With next_norm
    (the weight of the RMSNorm after it), (h, h * next_norm, squares): `scaled_linear`'s inputs."""
    if residual.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"residual_linear: residual {tuple(residual.shape)} does not fit x {tuple(x.shape)} "
                         f"@ weight {tuple(weight.shape)}.T")
    if not (runs_kernel(x, weight) and residual.is_contiguous() and residual.dtype == x.dtype):
        return residual_linear_reference(x, weight, residual, next_norm)
    out = _launch(x.reshape(-1, x.shape[-1]), weight, 1, False, config, residual=residual, next_norm=next_norm)
    if next_norm is None:
        return out.view(residual.shape)
    h, hg, squares = out
    return h.view(residual.shape), hg.view(residual.shape), squares


def step_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The decoding step's x @ weight.T: the skinny kernel for the weight shapes where the in-graph
    sweep measured it faster than cuBLAS (`CONFIGS`), else cuBLAS."""
    config = CONFIGS.get((*weight.shape, 1, False))
    if USE_SKINNY and config and runs_kernel(x, weight):
        return skinny_linear(x, weight, 1, config)
    return F.linear(x, weight)


def step_linear_add_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                         eps: float, add_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding step's h = residual + x @ weight.T and rms_norm(h) * norm_weight (o_proj and
    down_proj with the add + norm after them). For the weight shapes in `SPLIT_CONFIGS`: the
    skinny kernel split over K, its float32 partial sums folded into the add + norm kernel
    (`add_partials_rms_norm`); else `step_linear` and add_norm (a callable of residual, y,
    norm_weight, eps)."""
    config = SPLIT_CONFIGS.get(tuple(weight.shape))
    if USE_SKINNY and config and runs_kernel(x, weight) and residual.is_contiguous():
        block_n, block_k, stages, split, *warps = config
        tile = (block_n, block_k, stages, *warps)
        return add_partials_rms_norm(residual, skinny_linear(x, weight, split, tile), norm_weight, eps)
    return add_norm(residual, step_linear(x, weight), norm_weight, eps)


def step_silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, silu_mul) -> torch.Tensor:
    """The decoding step's SwiGLU input: the gated kernel where it was measured faster, else cuBLAS
    and `silu_mul` (a callable of gate and up)."""
    config = CONFIGS.get((*weight.shape, 1, True))
    if USE_SKINNY and config and runs_kernel(x, weight):
        return silu_mul_linear(x, weight, config)
    return silu_mul(*F.linear(x, weight).chunk(2, dim=-1))


def fuses_step(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the decoding step runs its layers as fused skinny kernels (`scaled_linear`,
    `residual_linear`) for activations x against weights like `weight`."""
    return USE_SKINNY and FUSED_STEP and runs_kernel(x, weight)


def fused_config(weight: torch.Tensor, gated: bool = False) -> tuple[int, ...] | None:
    return FUSED_CONFIGS.get((*weight.shape, gated))


def runs_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton kernel for half-precision CUDA tensors of at most MAX_ROWS rows (under the CPU
    interpreter float16 only: it multiplies bfloat16 dots' raw bits), a contiguous weight and a K
    of whole 64-element tiles."""
    dtypes = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    rows = x.numel() // max(x.shape[-1], 1)
    return (use_triton(x, weight) and 0 < rows <= MAX_ROWS and x.dtype in dtypes and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.is_contiguous() and x.shape[-1] == weight.shape[1]
            and weight.shape[1] % 64 == 0 and x.is_contiguous())


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, split: int = 1) -> torch.Tensor:
    """The definition; with split > 1, partial sums in float32 (the whole product in the first)."""
    if split == 1:
        return F.linear(x, weight)
    product = F.linear(x.float(), weight.float())
    return torch.stack([product] + [torch.zeros_like(product)] * (split - 1))


def silu_mul_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def scaled_linear_reference(xg, squares, eps: float, weight, gated: bool = False) -> torch.Tensor:
    scale = torch.rsqrt(squares.sum(0) / xg.shape[-1] + eps).view(*xg.shape[:-1], 1)
    y = (F.linear(xg, weight).float() * scale).to(xg.dtype)
    if not gated:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def residual_linear_reference(x, weight, residual, next_norm=None):
    h = residual + F.linear(x, weight)
    return h if next_norm is None else (h, *norm_inputs(h, next_norm))


def default_config(n: int, k: int, split: int, gated: bool) -> tuple[int, ...]:
    """(block_n, block_k, stages[, warps]) by weight shape, from the in-graph sweeps on an H200 and
    an H100 (`benchmarks/decode_kernels.py`); other shapes get the middle of those sweeps."""
    return CONFIGS.get((n, k, split, gated), (64, 128, 4))


# (N, K, split, gated) -> (block_n, block_k, stages[, warps]; 4 when left out): the shapes where the kernel beat cuBLAS in
# benchmarks/decode_kernels.py (64 rows, ~1.1B model; benchmarks/RESULTS.md), H200 / H100 us:
# gate | up with SiLU * up, 15.1 / 19.5 against 18.4 / 21.7 for cuBLAS + the SiLU kernel (3 stages:
# the H100's pick, 4 within 0.1 us; 8 warps never won); o_proj
# (with the add + RMSNorm after it), 9.3 / 9.9 against 9.9 / 10.2; down_proj (the same), 14.9 /
# 16.2 against 15.2 / 17.1 (cuBLAS's split-K reduce kernel goes too). qkv stays on cuBLAS (7.2
# against 6.8 on the H200 without a K split, whose partial sums the rotary kernel would have to add).
CONFIGS: dict[tuple[int, int, int, bool], tuple[int, ...]] = {
    (11264, 2048, 1, True): (64, 128, 3),
    (2048, 2048, 1, False): (16, 256, 4),
    (2048, 5632, 1, False): (16, 256, 4),
}

# (N, K) -> (block_n, block_k, stages, split[, warps]) for `step_linear_add_norm`: wide tiles split over K,
# so each program reads the activations' K slice once per block_n weight rows instead of once per
# 16 (at split 1 the programs read 4x more activation bytes, from L2, than weight bytes).
# In-graph sweep with the add + norm (`benchmarks/decode_kernels.py`, results/decode_kernels_split_h200):
# on an H200, o_proj 7.4 us against 9.3 unsplit and 9.9 for cuBLAS, down_proj 11.3 against 14.9
# and 15.1; the batch-1 step's graph 1.153 ms against 1.216. On the H100 (the tiles here are its
# picks; the H200's down_proj tile, 64 x 128 split 4, is 0.1 us slower there and 0.15 faster on the
# H200): o_proj 8.0 against 10.1, down_proj 13.2 against 16.9 (RESULTS.md).
SPLIT_CONFIGS: dict[tuple[int, int], tuple[int, ...]] = {
    (2048, 2048): (32, 128, 4, 2),  # o_proj
    (2048, 5632): (32, 256, 4, 2),  # down_proj
}

# (N, K, gated) -> (block_n, block_k, stages) for the fused step's kernels at the ~1.1B shape (64
# rows; lm_head 32), from `benchmarks/decode_kernels.py --fused` on an H200.
FUSED_CONFIGS: dict[tuple[int, int, bool], tuple[int, ...]] = {
    (2560, 2048, False): (16, 256, 4),  # qkv_proj, attention norm folded in
    (2048, 2048, False): (16, 256, 4),  # o_proj + residual
    (11264, 2048, True): (64, 128, 4),  # gate | up, MLP norm folded in, SiLU * up
    (2048, 5632, False): (16, 256, 4),  # down_proj + residual
    (32768, 2048, False): (128, 128, 3),  # lm_head, final norm folded in
}


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _prefetch_l2(ptrs):
        """Start reading the 128-byte lines at ptrs into L2 (the result is a dummy)."""
        return tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs],
                                         dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_rows(w_ptr, n, N, K, k_lo, k_hi, LINES: tl.constexpr):
        """L2 prefetch of weight rows n (clamped into the weight), columns [k_lo, k_hi), a line each
        64 elements (128 bytes of bf16)."""
        line = tl.arange(0, LINES)
        col = tl.minimum(k_lo + line * 64, k_hi - 1)
        row = tl.minimum(n, N - 1).to(tl.int64)
        _prefetch_l2(w_ptr + row[:, None] * K + col[None, :])

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, out_ptr, sq_ptr, res_ptr, g_ptr, xg_ptr, sq_out_ptr, M, N, K, k_per_split,
                       half, eps, parts, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GATED: tl.constexpr, PARTIAL: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_P: tl.constexpr,
                       RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                       LINES: tl.constexpr):
        """Program (n tile, k slice): out[:, n tile] (+)= x[:, k slice] @ W[n tile, k slice].T; with
        GATED, W's rows n (gate) and half + n (up) both, and silu(gate) * up is written.
        ROW_SCALE (an RMSNorm folded in): x is already x * g, and rows are scaled by
        rsqrt(mean of squares + eps), the squares summed over `parts` partial sums (parts, M) that
        the kernel writing x left. RESIDUAL: h = res + the product is written; with NEXT_NORM also
        h * g (the next norm's input) and this n tile's sums of squares of h's rows. PDL: wait for
        the previous kernel before reading x; with PREFETCH the program's weights are prefetched
        into L2 before that wait (weights are no kernel's output)."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        n_ok = n < (half if GATED else N)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if PDL:
            if PREFETCH:
                _prefetch_rows(w_ptr, n, N, K, k_lo, k_hi, LINES)
                if GATED:
                    _prefetch_rows(w_ptr, n + half, N, K, k_lo, k_hi, LINES)
            await_previous_kernel()
        x_ptrs = x_ptr + m[:, None] * K + (k_lo + kk)[None, :]
        w_ptrs = w_ptr + n[:, None].to(tl.int64) * K + (k_lo + kk)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            up_ptrs = w_ptrs + half * K
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(k_lo, k_hi, BLOCK_K):  # K and k_per_split are whole tiles (checked on launch)
            x = tl.load(x_ptrs, mask=m[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            if GATED:
                u = tl.load(up_ptrs, mask=n_ok[:, None], other=0.0)
                acc_up = tl.dot(x, tl.trans(u), acc_up)
                up_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if ROW_SCALE:
            p = tl.arange(0, BLOCK_P)
            squares = tl.load(sq_ptr + p[:, None] * M + m[None, :], mask=(p[:, None] < parts) & (m[None, :] < M),
                              other=0.0)
            scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)[:, None]
            acc *= scale
            if GATED:
                acc_up *= scale
        ok = (m[:, None] < M) & n_ok[None, :]
        if GATED:
            out = acc / (1.0 + tl.exp(-acc)) * acc_up
            tl.store(out_ptr + m[:, None] * half + n[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)
        elif PARTIAL:
            tl.store(out_ptr + pid_k * M * N + m[:, None] * N + n[None, :], acc, mask=ok)
        else:
            if RESIDUAL:
                acc += tl.load(res_ptr + m[:, None] * N + n[None, :], mask=ok, other=0.0).to(tl.float32)
            h = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + m[:, None] * N + n[None, :], h, mask=ok)
            if NEXT_NORM:  # the residual stream as stored is what the next norm reads
                hf = tl.where(ok, h.to(tl.float32), 0.0)
                g = tl.load(g_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
                tl.store(xg_ptr + m[:, None] * N + n[None, :], (hf * g[None, :]).to(xg_ptr.dtype.element_ty), mask=ok)
                tl.store(sq_out_ptr + pid_n * M + m, tl.sum(hf * hf, axis=1), mask=m < M)


def _launch(x: torch.Tensor, weight: torch.Tensor, split: int, gated: bool, config,
            row_scale: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
            next_norm: torch.Tensor | None = None):
    (M, K), N = x.shape, weight.shape[0]
    block_n, block_k, stages, *warps = config or default_config(N, K, split, gated)
    block_k = min(block_k, K)
    if K % block_k:
        block_k = 64
    tiles = K // block_k
    k_per_split = -(-tiles // split) * block_k
    width = N // 2 if gated else N
    if split > 1:  # a split with no K of its own writes zeros
        out = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(M, width, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(width, block_n), split)
    # x stands in for the pointers a variant never reads or writes
    squares, eps = row_scale if row_scale is not None else (x, 0.0)
    parts = squares.shape[0] if row_scale is not None else 1
    g, xg, squares_out = x, x, x
    if next_norm is not None:
        g, xg = next_norm, torch.empty_like(out)
        squares_out = torch.empty(grid[0], M, device=x.device, dtype=torch.float32)
    launch_pdl = pdl(x)
    _skinny_kernel[grid](x, weight, out, squares, residual if residual is not None else x, g, xg, squares_out,
                         M, N, K, k_per_split, N // 2, float(eps), parts,
                         BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated,
                         PARTIAL=split > 1, ROW_SCALE=row_scale is not None, BLOCK_P=triton.next_power_of_2(parts),
                         RESIDUAL=residual is not None, NEXT_NORM=next_norm is not None, PDL=launch_pdl,
                         PREFETCH=launch_pdl and (PREFETCH_SHAPES is None or (N, K) in PREFETCH_SHAPES),
                         LINES=triton.next_power_of_2(-(-k_per_split // 64)), num_warps=warps[0] if warps else 4,
                         num_stages=stages,
                         launch_pdl=launch_pdl)
    return (out, xg, squares_out) if next_norm is not None else out
