"""Skinny GEMMs for the decoding step at small batch: `skinny_linear` (x @ W.T, optionally split
over K into float32 partial sums) and `silu_mul_linear` (the SwiGLU gate | up matmul with
silu(gate) * up in its epilogue).

At batch 1 the step's matmuls have 64 rows (a window of two 32-token blocks): they are weight
reads of 8-46 MB. Every program owns a narrow band of output columns and, optionally, a slice of
K, written as float32 partial sums (S, M, N) for the caller to fold into its next elementwise
kernel. The gated form reads the gate rows and the matching up rows of the fused weight in one
program, so the (M, 2I) gate | up output and the SiLU kernel disappear. The step uses these
kernels only for the weight shapes where they measured faster than cuBLAS inside CUDA graphs
(`KernelOptions.gemm_tiles` / `split_tiles`; `benchmarks/decode_kernels.py`, figures in
benchmarks/RESULTS.md). Elsewhere (CPU, no Triton) the references run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton
from .options import DEFAULT_KERNELS, GEMM_TILES, KernelOptions
from .rms_norm import add_partials_rms_norm

MAX_ROWS = 64  # one row tile: the decoding step's window at batch 1


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


def step_linear(x: torch.Tensor, weight: torch.Tensor, kernels: KernelOptions = DEFAULT_KERNELS,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The decoding step's x @ weight.T (+ bias): the skinny kernel for the weight shapes where the
    in-graph sweep measured it faster than cuBLAS (`kernels.gemm_tiles`), else cuBLAS."""
    config = kernels.gemm_tile(*weight.shape, 1, False)
    if kernels.skinny_gemm and config and bias is None and runs_kernel(x, weight):
        return skinny_linear(x, weight, 1, config)
    return F.linear(x, weight, bias)


def step_linear_add_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                         eps: float, add_norm, kernels: KernelOptions = DEFAULT_KERNELS,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding step's h = residual + x @ weight.T and rms_norm(h) * norm_weight (o_proj and
    down_proj with the add + norm after them). For the weight shapes in `kernels.split_tiles`: the
    skinny kernel split over K, its float32 partial sums folded into the add + norm kernel
    (`add_partials_rms_norm`); else `step_linear` and add_norm (a callable of residual, y,
    norm_weight, eps)."""
    config = kernels.split_tile(*weight.shape)
    if kernels.skinny_gemm and config and bias is None and runs_kernel(x, weight) and residual.is_contiguous():
        block_n, block_k, stages, split, *warps = config
        tile = (block_n, block_k, stages, *warps)
        return add_partials_rms_norm(residual, skinny_linear(x, weight, split, tile), norm_weight, eps)
    return add_norm(residual, step_linear(x, weight, kernels, bias), norm_weight, eps)


def step_silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, silu_mul,
                         kernels: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """The decoding step's SwiGLU input: the gated kernel where it was measured faster, else cuBLAS
    and `silu_mul` (a callable of gate and up)."""
    config = kernels.gemm_tile(*weight.shape, 1, True)
    if kernels.skinny_gemm and config and runs_kernel(x, weight):
        return silu_mul_linear(x, weight, config)
    return silu_mul(*F.linear(x, weight).chunk(2, dim=-1))


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


def default_config(n: int, k: int, split: int, gated: bool) -> tuple[int, ...]:
    """(block_n, block_k, stages[, warps]) by weight shape: the measured tile (`options.GEMM_TILES`),
    else the middle of the in-graph sweeps (`benchmarks/decode_kernels.py`)."""
    return dict(GEMM_TILES).get((n, k, split, gated), (64, 128, 4))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, half, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, PARTIAL: tl.constexpr):
        """Program (n tile, k slice): out[:, n tile] (+)= x[:, k slice] @ W[n tile, k slice].T; with
        GATED, W's rows n (gate) and half + n (up) both, and silu(gate) * up is written."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        n_ok = n < (half if GATED else N)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
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
        ok = (m[:, None] < M) & n_ok[None, :]
        if GATED:
            out = acc / (1.0 + tl.exp(-acc)) * acc_up
            tl.store(out_ptr + m[:, None] * half + n[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)
        elif PARTIAL:
            tl.store(out_ptr + pid_k * M * N + m[:, None] * N + n[None, :], acc, mask=ok)
        else:
            tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, weight: torch.Tensor, split: int, gated: bool, config) -> torch.Tensor:
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
    _skinny_kernel[grid](x, weight, out, M, N, K, k_per_split, N // 2, BLOCK_M=max(16, triton.next_power_of_2(M)),
                         BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated, PARTIAL=split > 1,
                         num_warps=warps[0] if warps else 4, num_stages=stages)
    return out
