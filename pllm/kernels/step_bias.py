"""`step_bias`: the fixed-shape decoding step's additive attention bias, in one kernel.

Each row of the step holds a window of consecutive positions; each query sees its slot's keys at
positions below the row's limit in blocks up to its own, and itself (so padding rows, at negative
positions, see their scratch entry and never nothing). Built from PyTorch ops that is a dozen small
kernels at the head of every step's graph (compares, divisions, ands and ors, a fill and a masked
fill), together about as long as a layer's attention at batch 1; here it is one launch.
`step_bias_reference` is the PyTorch definition, used on CPU.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, use_triton

BLOCK_S = 256  # keys per program


def step_bias(positions: torch.Tensor, limits: torch.Tensor, key_length: int, offset: int, block_size: int,
              dtype: torch.dtype, use_kernel: bool = True) -> torch.Tensor:
    """positions (B, W) int64 (below 0: padding), limits (B,) int64: the (B, 1, W, key_length) bias,
    0 where a query may read cache entry s (key position s - offset), else -inf. use_kernel=False:
    the PyTorch definition on GPUs too (`KernelOptions.step_bias`)."""
    B, W = positions.shape
    if limits.shape != (B,):
        raise ValueError(f"step_bias: limits {tuple(limits.shape)} do not fit positions {tuple(positions.shape)}")
    if use_kernel and use_triton(positions, limits) and positions.is_contiguous():
        bias = torch.empty(B, 1, W, key_length, dtype=dtype, device=positions.device)
        _step_bias_kernel[(B * W, triton.cdiv(key_length, BLOCK_S))](positions, limits, bias, W, key_length, offset,
                                                                      BS=block_size, BLOCK_S=BLOCK_S, num_warps=2)
        return bias
    return step_bias_reference(positions, limits, key_length, offset, block_size, dtype)


def step_bias_reference(positions, limits, key_length: int, offset: int, block_size: int, dtype) -> torch.Tensor:
    B, W = positions.shape
    key_pos = torch.arange(key_length, device=positions.device) - offset  # (S,)
    visible = ((key_pos[None, None, :] >= 0) & (key_pos[None, None, :] < limits[:, None, None])
               & (key_pos.div(block_size, rounding_mode="floor")[None, None, :]
                  <= positions.div(block_size, rounding_mode="floor")[:, :, None]))
    visible |= key_pos[None, None, :] == positions[:, :, None]  # every query sees itself
    return torch.zeros(B, 1, W, key_length, dtype=dtype, device=positions.device).masked_fill_(
        ~visible[:, None], float("-inf"))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _step_bias_kernel(positions_ptr, limits_ptr, bias_ptr, W, S, offset, BS: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program (query row, key tile). A query at a negative position sees only itself, so the
        block comparison runs on non-negative positions, where integer division is the floor."""
        query, tile = tl.program_id(0), tl.program_id(1)
        pos = tl.load(positions_ptr + query)
        limit = tl.load(limits_ptr + query // W)
        s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        key = s - offset
        visible = (key >= 0) & (key < limit) & (pos >= 0) & (key // BS <= tl.maximum(pos, 0) // BS)
        visible |= key == pos
        bias = tl.where(visible, 0.0, float("-inf"))
        tl.store(bias_ptr + query.to(tl.int64) * S + s, bias.to(bias_ptr.dtype.element_ty), mask=s < S)
