"""x @ W.T for weight-only quantized W (`pllm.quantization`): int8 and fp8 (e4m3) with one float32
scale per output channel, int4 packed two a byte with one scale per group of inputs.

One Triton kernel serves the decoding step at every batch: each program owns a tile of rows and a
band of output columns, loads the quantized weight tile (1 or half a byte a value: the bytes the
step is bound by), widens it to x's dtype in registers and multiplies on the tensor cores; int8 and
fp8 apply their channel scale once at the end, int4 each group's scale as its group's partial
product is added. int4's two nibbles of a byte are inputs 2j and 2j + 1: the kernel multiplies the
low nibbles by x's even columns and the high ones by its odd columns, so nothing is interleaved.
Elsewhere (CPU, shapes the kernel does not take) the reference dequantizes and multiplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton

FORMATS = {"int8": 0, "fp8": 1, "int4": 2}


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, precision: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float (N, K) weight a quantized one stands for (the reference of the kernel)."""
    if precision == "int4":
        low, high = (qweight & 0xF).to(torch.int8) - 8, (qweight >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=-1).view(qweight.shape[0], -1).float()  # (N, K)
        return (q.view(q.shape[0], scale.shape[1], -1) * scale[..., None]).view_as(q).to(dtype)
    return (qweight.float() * scale).to(dtype)


def quantized_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, precision: str,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize(qweight, scale, precision, x.dtype), bias)


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, precision: str,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) -> (..., N) in x's dtype, W given as `pllm.quantization` stores it:
    qweight (N, K) int8 / float8_e4m3fn or (N, K // 2) uint8 for int4, scale (N, 1) or (N, groups)."""
    if precision not in FORMATS:
        raise ValueError(f"quantized_linear: precision must be one of {tuple(FORMATS)}, got {precision!r}")
    if not runs_kernel(x, qweight, scale, precision):
        return quantized_linear_reference(x, qweight, scale, precision, bias)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    out = _launch(x2, qweight, scale, precision)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], out.shape[-1])


def runs_kernel(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, precision: str) -> bool:
    """The kernel for half-precision CUDA inputs (float16 only under the CPU interpreter: it multiplies
    bfloat16 dots' raw bits) with K in whole 64-input tiles and int4 groups of whole tiles."""
    import os

    dtypes = (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.float16, torch.bfloat16)
    K = x.shape[-1]
    if not (use_triton(x, qweight) and x.dtype in dtypes and x.numel() > 0 and K % 64 == 0
            and qweight.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32):
        return False
    if precision == "int4":
        return qweight.shape[1] * 2 == K and (K // scale.shape[1]) % 64 == 0
    return qweight.shape[1] == K


def tile_config(rows: int, precision: str, group: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, block_k, warps, stages): a narrow band of columns for the step's few rows
    (the weight read is the cost; many programs keep every SM reading), square tiles for many."""
    block_k = 128 if precision != "int4" or group % 128 == 0 else 64
    if rows <= 64:
        return max(16, 1 << (rows - 1).bit_length()), 64, block_k, 4, 4
    return 64, 128, block_k, 4, 3


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quantized_kernel(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, groups, group,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FORMAT: tl.constexpr):
        """Program (n band, m tile): out[m tile, n band] = x[m tile] @ dequantize(W[n band]).T."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = m < M, n < N
        rows = m[:, None].to(tl.int64) * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FORMAT == 2:  # int4: byte j of a row holds inputs 2j (low nibble) and 2j + 1 (high)
            half = tl.arange(0, BLOCK_K // 2)
            w_ptrs = q_ptr + n[:, None].to(tl.int64) * (K // 2) + half[None, :]
            for k0 in range(0, K, BLOCK_K):
                even = tl.load(x_ptr + rows + (k0 + 2 * half)[None, :], mask=m_ok[:, None], other=0.0)
                odd = tl.load(x_ptr + rows + (k0 + 2 * half + 1)[None, :], mask=m_ok[:, None], other=0.0)
                packed = tl.load(w_ptrs, mask=n_ok[:, None], other=0).to(tl.int32)
                low = ((packed & 15) - 8).to(even.dtype)
                high = ((packed >> 4) - 8).to(even.dtype)
                part = tl.dot(even, tl.trans(low)) + tl.dot(odd, tl.trans(high))
                s = tl.load(s_ptr + n.to(tl.int64) * groups + k0 // group, mask=n_ok, other=0.0)
                acc += part * s[None, :]
                w_ptrs += BLOCK_K // 2
        else:  # int8 / fp8: one scale per output channel, applied once
            kk = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows + kk[None, :]
            w_ptrs = q_ptr + n[:, None].to(tl.int64) * K + kk[None, :]
            for _ in range(0, K, BLOCK_K):
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[:, None]).to(x.dtype)  # (masked columns are never stored)
                acc = tl.dot(x, tl.trans(w), acc)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
        tl.store(out_ptr + m[:, None].to(tl.int64) * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, precision: str) -> torch.Tensor:
    (M, K), N = x.shape, qweight.shape[0]
    groups = scale.shape[1]
    group = K // groups
    block_m, block_n, block_k, warps, stages = tile_config(M, precision, group)
    block_k = min(block_k, K) if K % block_k == 0 else 64
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    _quantized_kernel[grid](x, qweight, scale, out, M, N, K, groups, group, BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_K=block_k, FORMAT=FORMATS[precision], num_warps=warps, num_stages=stages)
    return out
