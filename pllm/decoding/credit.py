"""Trace credits (CreditDecoding, Wang et al. 2025, arXiv 2510.06133; reference implementation:
`CreditThresholdParallelDecoder` in inclusionAI/dInfer).

A masked position often predicts the same token step after step with a confidence just under the
commit threshold. Each position keeps a credit per token id: every step, credits decay by beta and
the position's current top token gains p^gamma; the logits used to propose and commit are
`logits + alpha * log(1 + credit)`, so a consistently predicted token crosses the threshold steps
earlier. Credits are kept for the current block only (reset when a block starts).
"""

from __future__ import annotations

import torch


class CreditTrace:
    def __init__(self, num_positions: int, vocab_size: int, alpha: float, beta: float, gamma: float, device):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.credit = torch.zeros(num_positions, vocab_size, device=device)

    def fuse(self, logits: torch.Tensor, still_masked: torch.Tensor) -> torch.Tensor:
        """logits (n, V) of the block's positions -> fused logits; updates the credits."""
        probs = logits.softmax(-1)
        top_p, top = probs.max(-1)
        self.credit.mul_(self.beta)
        gain = top_p.pow(self.gamma) * still_masked
        self.credit.scatter_add_(-1, top[:, None], gain[:, None].to(self.credit.dtype))
        return logits + self.alpha * torch.log1p(self.credit)
