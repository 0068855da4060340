"""Which masked positions of the current block to commit at a denoising step.

- static (LLaDA, Nie et al. 2025, Alg. 5 "low-confidence remasking"): a block of n masked tokens is
  decoded in s steps; step j commits exactly k_j of them, the k_j with the highest confidence,
  where k_j = n // s, plus one for the first n % s steps (LLaDA's `get_num_transfer_tokens`).
- threshold (Fast-dLLM, Wu et al. 2025, sec. 3.3, `get_transfer_index` in NVlabs/Fast-dLLM): commit
  every masked position of the block whose confidence exceeds the threshold, and at least the single
  most confident one.
- factor (Fast-dLLM sec. 3.3, `get_transfer_index_dynamic`): with masked confidences sorted
  c(1) >= c(2) >= ..., commit the largest n such that every n' <= n has c(n') >= 1 - f / (n' + 1),
  at least one. (The reference code also commits everything when the first failure is the block's
  last position; we keep the rule as stated in the paper.)
"""

from __future__ import annotations

import torch


def transfer_schedule(num_masked: int, num_steps: int) -> list[int]:
    """Tokens to commit at each of `num_steps` steps for a block of `num_masked` masked tokens."""
    num_steps = max(1, min(num_steps, num_masked))
    base, extra = divmod(num_masked, num_steps)
    return [base + (1 if j < extra else 0) for j in range(num_steps)]


def _top_count(conf: torch.Tensor, still_masked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Commit the `count` most confident masked positions of each row (ties to the lower index)."""
    conf = conf.masked_fill(~still_masked, float("-inf"))
    count = torch.minimum(count, still_masked.sum(-1))
    order = conf.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return (rank < count[:, None]) & still_masked


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
    count = torch.as_tensor(min_count, device=confidence.device).expand(confidence.shape[0]).clone()
    if threshold is not None:
        count = torch.maximum(count, ((confidence > threshold) & still_masked).sum(-1))
    return _top_count(confidence, still_masked, count)


def factor_commit_mask(confidence: torch.Tensor, still_masked: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule (see the module docstring). confidence, still_masked: (B, L)."""
    conf = confidence.masked_fill(~still_masked, float("-inf"))
    ranked = conf.sort(dim=-1, descending=True).values  # (B, L)
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device)
    passes = ranked >= 1.0 - factor / (n + 1)
    count = passes.long().cumprod(-1).sum(-1).clamp(min=1)  # the leading run of passes, at least one
    return _top_count(confidence, still_masked, count)
