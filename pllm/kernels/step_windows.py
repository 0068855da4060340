"""`next_windows`: each row's window for the next fixed-shape decoding step, chosen on the device.

A step launched ahead (`pllm.engine.cuda_graphs.StaticStepRunner.run_ahead`) must pick each row's
window before the host has read the last commit: the next block's if the current one has no mask
left, else the current one's. As PyTorch ops that is about 25 small kernels per step (gathers,
compares, wheres and copies into the step's input buffers), each a launch and a device ramp of its
own between two graph replays. Here one program per row writes the row's tokens, positions and key
limit in one launch. `next_windows_reference` is the PyTorch definition, used on CPU.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, use_triton



def next_windows(flat: torch.Tensor, table: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 limits: torch.Tensor, block_size: int, mask_id: int, pad_id: int, use_kernel: bool = True) -> None:
    """Write the next step's inputs in place. flat: the rows' tokens, concatenated (int64); table
    (5, n) int64, per row: where its tokens start in flat, their count, its current block's start
    and end, and the next block's end (-1 after the last block). tokens and positions (B, W) and
    limits (B,) for B >= n rows, W = 2 * block_size (the blocks k-1 and k), or W = 1 for one-token
    blocks (the token before the current one: autoregressive models' step). Rows n: are padding:
    pad tokens at positions -block_size .. W - block_size - 1, limit 0. use_kernel=False: the
    PyTorch definition on GPUs too (`KernelOptions.next_windows`)."""
    n, (B, W) = table.shape[1], tokens.shape
    if table.shape[0] != 5 or W not in (2 * block_size, 1 if block_size == 1 else -1) or positions.shape != (B, W) or limits.shape != (B,) or n > B:
        raise ValueError(f"next_windows: table {tuple(table.shape)}, tokens {tuple(tokens.shape)}, positions "
                         f"{tuple(positions.shape)} and limits {tuple(limits.shape)} do not fit block {block_size}")
    if use_kernel and use_triton(flat, table, tokens) and all(t.is_contiguous() for t in (table, tokens, positions)):
        _next_windows_kernel[(B,)](flat, table, tokens, positions, limits, n, flat.numel() - 1, mask_id, pad_id,
                                   BS=block_size, W=W, BLOCK_BS=max(2, triton.next_power_of_2(block_size)),
                                   BLOCK_W=max(2, triton.next_power_of_2(W)), num_warps=1)
        return
    next_windows_reference(flat, table, tokens, positions, limits, block_size, mask_id, pad_id)


def next_windows_reference(flat, table, tokens, positions, limits, block_size: int, mask_id: int, pad_id: int) -> None:
    n, (B, W), bs, device = table.shape[1], tokens.shape, block_size, flat.device
    offset, size, start, end, after_end = table[:, :, None]  # each (n, 1)
    last = flat.numel() - 1
    block_pos = start + torch.arange(bs, device=device)  # the current block (its first may be short)
    block_tokens = flat[(offset + block_pos).clamp(max=last)]
    move = ((block_tokens != mask_id) | (block_pos >= end)).all(-1, keepdim=True) & (after_end >= 0)
    lo = (torch.where(move, end, start) // bs - 1) * bs  # the window: blocks k-1 and k (W = 1: the token before k)
    window = lo + torch.arange(W, device=device)  # (n, W)
    inside = (window >= 0) & (window < size)
    tokens[:n] = torch.where(inside, flat[(offset + window).clamp(0, last)], pad_id)
    tokens[n:B] = pad_id
    positions[:n] = window
    positions[n:B] = torch.arange(-bs, W - bs, device=device)
    limits[:n] = torch.where(move, after_end, end)[:, 0]
    limits[n:B] = 0


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _next_windows_kernel(flat_ptr, table_ptr, tokens_ptr, positions_ptr, limits_ptr, n, last, mask_id, pad_id,
                             BS: tl.constexpr, W: tl.constexpr, BLOCK_BS: tl.constexpr, BLOCK_W: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK_W)
        in_w = j < W
        if row < n:
            offset = tl.load(table_ptr + row)
            size = tl.load(table_ptr + n + row)
            start = tl.load(table_ptr + 2 * n + row)
            end = tl.load(table_ptr + 3 * n + row)
            after_end = tl.load(table_ptr + 4 * n + row)
            b = tl.arange(0, BLOCK_BS)
            block_pos = start + b
            block_tokens = tl.load(flat_ptr + tl.minimum(offset + block_pos, last), mask=b < BS, other=0)
            done = (block_tokens != mask_id) | (block_pos >= end) | (b >= BS)
            move = (tl.min(done.to(tl.int32), axis=0) == 1) & (after_end >= 0)
            lo = (tl.where(move, end, start) // BS - 1) * BS  # start, end >= 0: no negative floor division
            window = lo + j
            inside = (window >= 0) & (window < size)
            t = tl.load(flat_ptr + tl.minimum(tl.maximum(offset + window, 0), last), mask=inside & in_w, other=0)
            tl.store(tokens_ptr + row * W + j, tl.where(inside, t, pad_id), mask=in_w)
            tl.store(positions_ptr + row * W + j, window, mask=in_w)
            tl.store(limits_ptr + row, tl.where(move, after_end, end))
        else:
            tl.store(tokens_ptr + row * W + j, tl.zeros([BLOCK_W], dtype=tl.int64) + pad_id, mask=in_w)
            tl.store(positions_ptr + row * W + j, (j - BS).to(tl.int64), mask=in_w)
            tl.store(limits_ptr + row, tl.zeros([], dtype=tl.int64))
