"""Turning logits into a proposed token and a confidence per masked position."""

from __future__ import annotations

import torch

from ..config import ModelConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al., 2019): for tokens already in the sequence, divide positive
    logits and multiply negative ones by `penalty`. logits (B, L, V); seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen[:, None, :], penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to -inf (last dim)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def propose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: list[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, V) -> (tokens (B, L), confidence (B, L)).

    Greedy when temperature == 0, else a sample from softmax(filtered logits / temperature) drawn by
    the Gumbel-max trick in float64 (LLaDA notes low-precision Gumbel noise hurts quality). Each row
    draws from its own generator, so a row's tokens do not depend on the other rows of the batch.
    The confidence is the model's probability of the proposed token (LLaDA's low-confidence
    remasking score)."""
    probs = logits.softmax(-1)
    if temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scores = filter_top_k_top_p(logits / temperature, top_k, top_p).double()
        B, L, V = scores.shape
        uniform = torch.stack(
            [torch.rand((L, V), generator=g, dtype=torch.float64, device=logits.device) for g in generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
        tokens = (scores + gumbel).argmax(-1)
    confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, confidence


def banned_token_ids(cfg: ModelConfig) -> tuple[int, ...]:
    """Ids an answer may never contain: the mask token (committing it would stall decoding) and
    padding (an undertrained model can rank it first), unless padding is also how answers end
    (LLaDA and Qwen pad with their eos)."""
    return (cfg.mask_token_id,) if cfg.pad_token_id in cfg.stop_ids else (cfg.mask_token_id, cfg.pad_token_id)
