"""Which masked positions to commit at a denoising step.

- static (LLaDA, Nie et al. 2025, Alg. 5 "low-confidence remasking"): a block of n masked tokens is
  decoded in s steps; step j commits exactly k_j of them, the k_j with the highest confidence,
  where k_j = n // s, plus one for the first n % s steps (LLaDA's `get_num_transfer_tokens`).
- threshold (Fast-dLLM, Wu et al. 2025, sec. 3.3): commit every masked position of the current
  block whose confidence exceeds the threshold, and at least the single most confident one.
"""

from __future__ import annotations

import torch


def transfer_schedule(num_masked: int, num_steps: int) -> list[int]:
    """Tokens to commit at each of `num_steps` steps for a block of `num_masked` masked tokens."""
    num_steps = max(1, min(num_steps, num_masked))
    base, extra = divmod(num_masked, num_steps)
    return [base + (1 if j < extra else 0) for j in range(num_steps)]


def commit_mask(
    confidence: torch.Tensor,
    still_masked: torch.Tensor,
    min_count: torch.Tensor | int,
    threshold: float | None = None,
) -> torch.Tensor:
    """Select positions to commit in each row.

    confidence, still_masked: (B, L). Each row commits max(min_count, #positions with confidence >
    threshold) of its masked positions, highest confidence first (ties to the lower index), capped by
    the number still masked. Returns a bool (B, L) mask.
    """
    conf = confidence.masked_fill(~still_masked, float("-inf"))
    count = torch.as_tensor(min_count, device=conf.device).expand(conf.shape[0]).clone()
    if threshold is not None:
        count = torch.maximum(count, ((conf > threshold) & still_masked).sum(-1))
    count = torch.minimum(count, still_masked.sum(-1))
    order = conf.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return (rank < count[:, None]) & still_masked
