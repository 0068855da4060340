"""`next_windows`: each row's window for the next fixed-shape decoding step, chosen on the device.

A step launched ahead (`pllm.engine.cuda_graphs.StaticStepRunner.run_ahead`) must pick each row's
window before the host has read the last commit: the next block's if the current one has no mask
left, else the current one's; and a row that finalises a block (recomputes its keys/values now
that it has no mask) exists only if its sequence moved on. As PyTorch ops that is about 25 small
kernels per step (gathers, compares, wheres and copies into the step's input buffers), each a
launch and a device ramp of its own between two graph replays. Here one program per row writes
the row's tokens, positions, key limit and cache slot in one launch. `next_windows_reference` is
the PyTorch definition, used on CPU.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, use_triton

TABLE_ROWS = 7  # offset, size, start, end, next end, slot, finalize (see `next_windows`)


def next_windows(flat: torch.Tensor, table: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                 limits: torch.Tensor, slots: torch.Tensor, block_size: int, shift: int, mask_id: int, pad_id: int,
                 use_kernel: bool = True) -> None:
    """Write the next step's inputs in place. flat: the sequences' tokens, concatenated (int64);
    table (7, n) int64, per step row: where its sequence's tokens start in flat, their count, its
    current block's start and end, the next block's end (-1 after the last block), its cache
    slot, and 1 for a finalize row (else 0). tokens and positions (B, W), limits and slots (B,)
    for B >= n rows. A row's window starts `shift` positions before its model block (W = block +
    shift; or W = 1 for one-token blocks with shift: the token before the current one). A plain
    row takes the next block once its current one has no mask left (not after the last block),
    else the current one; a finalize row takes its sequence's current block if that has no mask
    left (with the block's end as limit), else it is padding. Padding rows (and rows n:) sit at
    positions -W .. -1 (scratch entries) with limit 0. use_kernel=False: the PyTorch definition on
    GPUs too (`KernelOptions.next_windows`)."""
    n, (B, W) = table.shape[1], tokens.shape
    fits = W == block_size + shift or (W == 1 and block_size == 1 and shift == 1)
    if table.shape[0] != TABLE_ROWS or not fits or positions.shape != (B, W) or limits.shape != (B,) \
            or slots.shape != (B,) or n > B:
        raise ValueError(f"next_windows: table {tuple(table.shape)}, tokens {tuple(tokens.shape)}, positions "
                         f"{tuple(positions.shape)}, limits {tuple(limits.shape)} and slots {tuple(slots.shape)} do "
                         f"not fit block {block_size} with shift {shift}")
    if use_kernel and use_triton(flat, table, tokens) and all(t.is_contiguous() for t in (table, tokens, positions)):
        _next_windows_kernel[(B,)](flat, table, tokens, positions, limits, slots, n, flat.numel() - 1, mask_id, pad_id,
                                   BS=block_size, W=W, SHIFT=shift, BLOCK_BS=max(2, triton.next_power_of_2(block_size)),
                                   BLOCK_W=max(2, triton.next_power_of_2(W)), num_warps=1)
        return
    next_windows_reference(flat, table, tokens, positions, limits, slots, block_size, shift, mask_id, pad_id)


def next_windows_reference(flat, table, tokens, positions, limits, slots, block_size: int, shift: int, mask_id: int,
                           pad_id: int) -> None:
    n, (B, W), bs, device = table.shape[1], tokens.shape, block_size, flat.device
    offset, size, start, end, after_end, slot, finalize = table[:, :, None]  # each (n, 1)
    last = flat.numel() - 1
    block_pos = start + torch.arange(bs, device=device)  # the current block (its first may be short)
    block_tokens = flat[(offset + block_pos).clamp(max=last)]
    done = ((block_tokens != mask_id) | (block_pos >= end)).all(-1, keepdim=True)
    move = done & (after_end >= 0)
    first = torch.where(move & (finalize == 0), end, start)  # the window's block holds this position
    lo = first // bs * bs - shift
    window = lo + torch.arange(W, device=device)  # (n, W)
    inside = (window >= 0) & (window < size)
    real = (finalize == 0) | move  # a finalize row of a sequence that stays is padding
    tokens[:n] = torch.where(inside & real, flat[(offset + window).clamp(0, last)], pad_id)
    positions[:n] = torch.where(real, window, torch.arange(-W, 0, device=device))
    limits[:n] = torch.where(real, torch.where(move & (finalize == 0), after_end, end), 0)[:, 0]
    slots[:n] = slot[:, 0]
    tokens[n:B] = pad_id
    positions[n:B] = torch.arange(-W, 0, device=device)
    limits[n:B] = 0
    slots[n:B] = 0


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _next_windows_kernel(flat_ptr, table_ptr, tokens_ptr, positions_ptr, limits_ptr, slots_ptr, n, last, mask_id,
                             pad_id, BS: tl.constexpr, W: tl.constexpr, SHIFT: tl.constexpr, BLOCK_BS: tl.constexpr,
                             BLOCK_W: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK_W)
        in_w = j < W
        scratch = (j - W).to(tl.int64)
        if row < n:
            offset = tl.load(table_ptr + row)
            size = tl.load(table_ptr + n + row)
            start = tl.load(table_ptr + 2 * n + row)
            end = tl.load(table_ptr + 3 * n + row)
            after_end = tl.load(table_ptr + 4 * n + row)
            slot = tl.load(table_ptr + 5 * n + row)
            plain = tl.load(table_ptr + 6 * n + row) == 0
            b = tl.arange(0, BLOCK_BS)
            block_pos = start + b
            block_tokens = tl.load(flat_ptr + tl.minimum(offset + block_pos, last), mask=b < BS, other=0)
            done = (block_tokens != mask_id) | (block_pos >= end) | (b >= BS)
            move = (tl.min(done.to(tl.int32), axis=0) == 1) & (after_end >= 0)
            advance = move & plain
            real = move | plain
            lo = tl.where(advance, end, start) // BS * BS - SHIFT  # start, end >= 0: no negative floor division
            window = lo + j
            inside = (window >= 0) & (window < size) & (tl.where(real, window, -1) >= 0)  # (a vector mask)
            t = tl.load(flat_ptr + tl.minimum(tl.maximum(offset + window, 0), last), mask=inside & in_w, other=0)
            tl.store(tokens_ptr + row * W + j, tl.where(inside, t, pad_id), mask=in_w)
            tl.store(positions_ptr + row * W + j, tl.where(real, window, scratch), mask=in_w)
            tl.store(limits_ptr + row, tl.where(real, tl.where(advance, after_end, end), 0))
            tl.store(slots_ptr + row, slot)
        else:
            tl.store(tokens_ptr + row * W + j, tl.zeros([BLOCK_W], dtype=tl.int64) + pad_id, mask=in_w)
            tl.store(positions_ptr + row * W + j, scratch, mask=in_w)
            tl.store(limits_ptr + row, tl.zeros([], dtype=tl.int64))
            tl.store(slots_ptr + row, tl.zeros([], dtype=tl.int64))
