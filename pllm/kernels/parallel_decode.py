"""`parallel_decode`: logits of a block -> proposed token, confidence and the positions to commit.

The per-step work of confidence-based parallel decoding (LLaDA low-confidence remasking, Fast-dLLM
threshold decoding) in two kernel launches: for every position of a block, the greedy token and its
probability under softmax(logits) (with banned ids such as the mask token excluded), then, among
the positions still masked, the `max(min_count, #confidence > threshold)` most confident ones
(ties to the lower index, capped by the number still masked) -- exactly the rule of
`pllm.decoding.commit.commit_mask`. The Triton kernels read the logits once, one program per
position (online softmax over vocabulary tiles: a single program per sequence would stream the
whole block's logits through one SM), then one program per sequence selects the positions;
`parallel_decode_reference` is the PyTorch definition they are tested against and the path used
on CPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backend import HAS_TRITON, use_triton

MAX_BLOCK = 256  # positions per sequence the selection kernel ranks in one program


class ParallelDecodeOutput(NamedTuple):
    tokens: torch.Tensor  # (B, L) int64: the greedy token of every position
    confidence: torch.Tensor  # (B, L) float32: its probability
    commit: torch.Tensor  # (B, L) bool: positions to commit this step


def parallel_decode(
    logits: torch.Tensor,
    num_parallel: int | torch.Tensor = 1,
    threshold: float | None = None,
    masked: torch.Tensor | None = None,
    banned_ids: tuple[int, ...] = (),
) -> ParallelDecodeOutput:
    """logits (B, L, V) or (L, V); num_parallel: the minimum number of positions committed per
    sequence (int or (B,) tensor); threshold: also commit every masked position above it;
    masked (B, L) bool: positions still to decode (default: all); banned_ids: at most two token ids
    never proposed (e.g. mask and padding)."""
    squeeze = logits.dim() == 2
    if squeeze:
        logits = logits[None]
    B, L, V = logits.shape
    if masked is None:
        masked = torch.ones(B, L, dtype=torch.bool, device=logits.device)
    masked = masked.reshape(B, L)
    if len(banned_ids) > 2:
        raise ValueError(f"parallel_decode bans at most two token ids, got {banned_ids}")
    if isinstance(num_parallel, torch.Tensor):
        min_count = num_parallel.to(logits.device, torch.int32).expand(B).contiguous()
    elif use_triton(logits) and L <= MAX_BLOCK:
        min_count = int(num_parallel)  # a kernel argument: no device tensor to fill per step
    else:  # a fill on the device: no host-to-device copy (which would wait for the GPU) per step
        min_count = torch.full((B,), num_parallel, dtype=torch.int32, device=logits.device)
    if use_triton(logits) and L <= MAX_BLOCK:
        out = _parallel_decode_triton(logits, masked, min_count, threshold, banned_ids)
    else:
        out = parallel_decode_reference(logits, masked, min_count, threshold, banned_ids)
    return ParallelDecodeOutput(*(t[0] for t in out)) if squeeze else out


def commit_in_place(logits: torch.Tensor, block: torch.Tensor, min_count: int, threshold: float | None,
                    mask_id: int, banned_ids: tuple[int, ...] = (), use_kernel: bool = True) -> ParallelDecodeOutput:
    """One greedy step of a block, committed into it: logits (L, V) of the block's positions, block
    (L,) int64 tokens, masked where they equal mask_id. The chosen positions get their tokens in
    place (`parallel_decode`'s rule). On the GPU that is two kernel launches for the whole step,
    where `parallel_decode` followed by the compare, where and copy around it is several more
    (use_kernel=False: that path, `KernelOptions.commit_in_place`)."""
    if block.dim() != 1 or logits.shape[:-1] != block.shape:
        raise ValueError(f"commit_in_place: logits {tuple(logits.shape)} do not fit block {tuple(block.shape)}")
    if len(banned_ids) > 2:
        raise ValueError(f"parallel_decode bans at most two token ids, got {banned_ids}")
    L = block.numel()
    if use_kernel and use_triton(logits, block) and L <= MAX_BLOCK and block.is_contiguous():
        out = _parallel_decode_triton(logits[None], None, min_count, threshold, banned_ids, (block, mask_id))
        return ParallelDecodeOutput(*(t[0] for t in out))
    masked = block == mask_id
    out = parallel_decode(logits, min_count, threshold, masked, banned_ids)
    block.copy_(torch.where(out.commit, out.tokens, block))
    return out


def parallel_decode_reference(logits: torch.Tensor, masked: torch.Tensor, min_count: torch.Tensor,
                              threshold: float | None, banned_ids: tuple[int, ...] = ()) -> ParallelDecodeOutput:
    """The PyTorch definition (float32 softmax, stable sort for the ranking)."""
    x = logits.float()
    if banned_ids:
        x = x.clone()
        x[..., list(banned_ids)] = float("-inf")
    tokens = x.argmax(-1)
    confidence = x.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    count = min_count.to(torch.long).clone()
    if threshold is not None:
        count = torch.maximum(count, ((confidence > threshold) & masked).sum(-1))
    count = torch.minimum(count, masked.sum(-1))
    order = confidence.masked_fill(~masked, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
    return ParallelDecodeOutput(tokens, confidence, (rank < count[:, None]) & masked)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_confidence_kernel(logits_ptr, tokens_ptr, conf_ptr, L, V, stride_b, stride_l, banned0, banned1,
                                 BLOCK_V: tl.constexpr):
        """One program per position: greedy token and its probability, online softmax over
        vocabulary tiles (per-lane running max / sum / argmax, merged at the end)."""
        b, pos = tl.program_id(0), tl.program_id(1)
        row = logits_ptr + b * stride_b + pos * stride_l
        run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_V], tl.float32)
        run_arg = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = (cols < V) & (cols != banned0) & (cols != banned1)
            x = tl.load(row + cols, mask=ok, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
            run_arg = tl.where(x > run_max, cols, run_arg)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        total = tl.sum(run_sum * tl.exp(run_max - safe_max), axis=0)
        # The first index holding the maximum (torch.argmax's tie rule).
        token = tl.min(tl.where(run_max == row_max, run_arg, V), axis=0)
        tl.store(tokens_ptr + b * L + pos, token.to(tl.int64))
        tl.store(conf_ptr + b * L + pos, 1.0 / total)

    @triton.jit
    def _select_kernel(conf_ptr, masked_ptr, min_count_ptr, min_count, commit_ptr, tokens_ptr, block_ptr, mask_id, L,
                       threshold, BLOCK_L: tl.constexpr, PER_ROW_COUNT: tl.constexpr, IN_PLACE: tl.constexpr):
        """One program per sequence: the positions to commit, from the confidences. IN_PLACE: the
        masked positions are the block's mask tokens, and committed ones get their tokens there."""
        b = tl.program_id(0)
        rows = tl.arange(0, BLOCK_L)
        row_ok = rows < L
        conf = tl.load(conf_ptr + b * L + rows, mask=row_ok, other=0.0)
        if IN_PLACE:
            current = tl.load(block_ptr + b * L + rows, mask=row_ok, other=0)
            masked = (current == mask_id) & row_ok
        else:
            masked = (tl.load(masked_ptr + b * L + rows, mask=row_ok, other=0) != 0) & row_ok
        # Rank among masked positions: more confident first, ties to the lower index.
        ahead = masked[None, :] & ((conf[None, :] > conf[:, None])
                                   | ((conf[None, :] == conf[:, None]) & (rows[None, :] < rows[:, None])))
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        num_masked = tl.sum(masked.to(tl.int32), axis=0)
        above = tl.sum((masked & (conf > threshold)).to(tl.int32), axis=0)
        least = tl.load(min_count_ptr + b) if PER_ROW_COUNT else min_count
        count = tl.minimum(tl.maximum(least, above), num_masked)
        commit = masked & (rank < count)
        tl.store(commit_ptr + b * L + rows, commit.to(tl.int8), mask=row_ok)
        if IN_PLACE:
            tokens = tl.load(tokens_ptr + b * L + rows, mask=row_ok, other=0)
            tl.store(block_ptr + b * L + rows, tokens, mask=row_ok & commit)


def _parallel_decode_triton(logits, masked, min_count, threshold, banned_ids, in_place=None) -> ParallelDecodeOutput:
    """min_count: an int or a (B,) int32 tensor. in_place: (block tokens (B, L), mask id), whose
    mask tokens are the masked positions and which gets the committed tokens (masked unused)."""
    B, L, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(B, L, dtype=torch.long, device=logits.device)
    confidence = torch.empty(B, L, dtype=torch.float32, device=logits.device)
    commit = torch.empty(B, L, dtype=torch.int8, device=logits.device)
    banned = [*banned_ids, -1, -1][:2]
    _token_confidence_kernel[(B, L)](logits, tokens, confidence, L, V, logits.stride(0), logits.stride(1),
                                     banned[0], banned[1], BLOCK_V=min(4096, triton.next_power_of_2(V)),
                                     num_warps=8)
    per_row = isinstance(min_count, torch.Tensor)
    block, mask_id = in_place if in_place is not None else (tokens, -1)
    if in_place is None:  # a bool tensor's bytes are int8s: a view, not a conversion kernel
        masked = masked.contiguous()
        masked = masked.view(torch.int8) if masked.dtype == torch.bool else masked.to(torch.int8)
    _select_kernel[(B,)](confidence, masked if in_place is None else commit, min_count if per_row else commit,
                         0 if per_row else int(min_count), commit, tokens, block, mask_id, L,
                         2.0 if threshold is None else float(threshold), BLOCK_L=max(16, triton.next_power_of_2(L)),
                         PER_ROW_COUNT=per_row, IN_PLACE=in_place is not None, num_warps=4)
    return ParallelDecodeOutput(tokens, confidence, commit.view(torch.bool))
