"""`skinny_linear(x, w)` = x @ w.T for few rows (the decoding step at small batch: M <= 128).

At M = 64 the GEMM is a weight read: cuBLAS picks tiles as wide as 128 output columns, so a
3072 x 2048 projection runs on a few dozen CTAs and reads its weights at a third of the HBM
bandwidth. This kernel tiles the output columns finely (16-64) and, where that still leaves SMs
idle, splits K across CTAs (fp32 partials, summed by a second kernel), so every SM streams weights.
Configurations are picked per shape by Triton's autotuner. Elsewhere (CPU, no Triton) it is
`F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton

MAX_ROWS = 128  # beyond this cuBLAS's own tiles fill the GPU


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T; the Triton kernel for CUDA tensors with at most MAX_ROWS rows.
    split_k: force a K split (benchmarks); by default the autotuned kernel without a split."""
    rows = x.numel() // x.shape[-1]
    if not (use_triton(x, weight) and rows <= MAX_ROWS and x.dtype == weight.dtype and weight.is_contiguous()):
        return F.linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    out = _split_k(x2, weight, split_k) if split_k and split_k > 1 else _no_split(x2, weight)
    return out.view(*x.shape[:-1], weight.shape[0])


if HAS_TRITON:
    import triton
    import triton.language as tl

    _CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for n in (16, 32, 64) for k in (128, 256) for w in (4,) for s in (3, 4, 6)
                if n * k <= 64 * 256]

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_n[:, None] < N) & kmask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _split_k_kernel(x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * K_PER_SPLIT, tl.minimum((pid_k + 1) * K_PER_SPLIT, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & kmask[None, :],
                        other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=(offs_n[:, None] < N) & kmask[None, :],
                        other=0.0)
            acc += tl.dot(x, tl.trans(w))
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def _block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


def _no_split(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    (M, K), N = x.shape, w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm = _block_m(M)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, bm))  # noqa: E731
    _skinny_kernel[grid](x, w, out, M, N, K, BLOCK_M=bm)
    return out


def _split_k(x: torch.Tensor, w: torch.Tensor, split: int, block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    (M, K), N = x.shape, w.shape[0]
    per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    parts = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    bm = _block_m(M)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, bm), split)
    _split_k_kernel[grid](x, w, parts, M, N, K, per_split, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k,
                          num_warps=4, num_stages=4)
    return parts.sum(0).to(x.dtype)
