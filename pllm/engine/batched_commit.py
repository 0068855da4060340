"""One commit for a whole fixed-shape step, instead of one per request.

Per request, a greedy step is a handful of small device operations (mask test, `parallel_decode`,
the commit, its host copy). Each costs the host a launch, so at batch 16 and more the host's share
of a step grows with the batch while the GPU's barely does. Here the step's logits (one row per
request, its model block) go through one `parallel_decode` call, one commit, one multi-tensor copy
back into the requests' tokens and one host copy; each request then does only its own bookkeeping.
A request's tokens are those of its own step: every rule `parallel_decode` applies is per row.
"""

from __future__ import annotations

import itertools

import torch

from ..decoding import DecodeState
from ..decoding.sampling import banned_token_ids
from ..decoding.state import host_copy
from pllm.kernels import parallel_decode
from pllm.kernels.parallel_decode import MAX_BLOCK


def batchable(states: list[DecodeState], min_batch: int = 3) -> bool:
    """Whether these states' next step is worth one call: at least min_batch of them (the batched
    call has a fixed cost of about ten operations), one segment each (no drafts), greedy kernel
    rules and one threshold."""
    return (len(states) >= min_batch and all(s.greedy_kernel_rules() and not s.rules.draft_length for s in states)
            and len({s.rules.confidence_threshold for s in states}) == 1
            # One kernel path for both: a request's own call on a block of at most MAX_BLOCK positions
            # takes the Triton kernel, so the batched call must too (the reference rounds differently).
            and states[0].cfg.block_size <= MAX_BLOCK)


def commit_batch(states: list[DecodeState], logits: torch.Tensor, to_device, defer: bool = False) -> None:
    """One greedy step for every state. logits (n, block, V): row i is the model block holding
    states[i]'s current block, which starts at offset start % block there. to_device(rows) puts a
    small int table on the device without waiting for it (`StaticStepRunner.to_device`). defer: as
    in `DecodeState.advance`."""
    n, bs = logits.shape[:2]
    cfg = states[0].cfg
    offsets = [s.start % bs for s in states]
    lengths = [s.end - s.start for s in states]
    blocks = [s.tokens[s.start:s.end] for s in states]
    flat = torch.cat(blocks)
    table = to_device([offsets, lengths, list(itertools.accumulate([0] + lengths[:-1])),
                       [s.min_commits() for s in states]])
    offset, length, first, min_count = table[:, :, None]  # each (n, 1)
    j = torch.arange(bs, device=logits.device)
    inside = (j >= offset) & (j < offset + length)
    current = torch.where(inside, flat[(first + j - offset).clamp(0, flat.numel() - 1)], cfg.pad_token_id)
    out = parallel_decode(logits, min_count[:, 0], states[0].rules.confidence_threshold,
                          current == cfg.mask_token_id, banned_ids=banned_token_ids(cfg))
    new = torch.where(out.commit, out.tokens, current)
    rows = [slice(o, o + m) for o, m in zip(offsets, lengths)]
    torch._foreach_copy_(blocks, [new[i, r] for i, r in enumerate(rows)])
    host, ready = host_copy(new)
    for i, (state, r) in enumerate(zip(states, rows)):
        state.advance_committed(out.tokens[i, r], out.confidence[i, r], host[i, r], ready, defer)
