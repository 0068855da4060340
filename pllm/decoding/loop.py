"""The denoising loop: prompts + masked answer -> committed answer tokens.

Semi-autoregressive as in LLaDA: the answer is cut into blocks decoded left to right; inside a
block, each step runs the model on the whole sequence, proposes a token and a confidence for every
masked position of the block, and commits the positions chosen by the strategy's rule
(`commit.py`). Committed tokens and prompt tokens are never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .commit import commit_mask, transfer_schedule
from .sampling import apply_repetition_penalty, propose_tokens


@dataclass
class DecodeOutput:
    tokens: list[torch.Tensor]  # per prompt: (gen_length,) answer tokens
    nfe: int = 0  # model forward passes
    steps_per_block: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return sum(t.numel() for t in self.tokens) / max(self.nfe, 1) / max(len(self.tokens), 1)


def _make_generators(seeds: list[int | None], device) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        gens.append(g)
    return gens


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    gen_length: int,
    num_steps: int,
    block_size: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    confidence_threshold: float | None = None,
    min_per_step: str = "schedule",
    stop_at_eos: bool = False,
    seed: int | None | list[int | None] = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> DecodeOutput:
    """Decode `gen_length` tokens after each prompt (1-D tensors, any lengths; left-padded here).

    num_steps: total steps over the answer, spread evenly over blocks (at least one per block).
    min_per_step: "schedule" commits at least the static schedule's k per step (LLaDA);
        "one" commits at least one (Fast-dLLM threshold decoding).
    confidence_threshold: also commit every position above it (None: static decoding).
    stop_at_eos: once a finished block of a row holds EOS, fill the rest of that row with EOS
        and stop spending steps on it; the loop ends when every row is finished.
    on_step(x, committed): called after each step with the full state (B, P+G) and the bool mask of
        positions committed at that step (for tracing and tests).
    """
    cfg = model.config
    device = model.device
    mask_id, pad_id, eos_id = cfg.mask_token_id, cfg.pad_token_id, cfg.eos_token_id
    B = len(prompts)
    P = max((p.numel() for p in prompts), default=0)
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(x)
    for b, prompt in enumerate(prompts):
        n = prompt.numel()
        x[b, : P - n] = pad_id
        attention_mask[b, : P - n] = 0
        x[b, P - n : P] = prompt.to(device)
    attention_mask = None if bool(attention_mask.all()) else attention_mask

    seeds = seed if isinstance(seed, list) else [seed] * B
    generators = _make_generators(seeds, device) if temperature > 0 else None
    block_size = block_size or gen_length
    num_blocks = math.ceil(gen_length / block_size)
    steps_per_block = max(1, math.ceil(num_steps / num_blocks))
    out = DecodeOutput(tokens=[])
    done = torch.zeros(B, dtype=torch.bool, device=device)

    for block in range(num_blocks):
        start = P + block * block_size
        end = min(start + block_size, P + gen_length)
        schedule = transfer_schedule(end - start, steps_per_block)
        step = 0
        while True:
            still_masked = x[:, start:end] == mask_id
            if not still_masked.any():
                break
            logits = model(x, attention_mask=attention_mask)[:, start:end]
            out.nfe += 1
            # The answer may never contain mask or padding tokens (an undertrained model can rank
            # them first, and committing a mask would stall the loop).
            logits[..., [mask_id, pad_id]] = float("-inf")
            if repetition_penalty != 1.0:
                seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
                seen.scatter_(1, x, True)
                seen[:, [mask_id, pad_id]] = False
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            proposal, confidence = propose_tokens(logits, temperature, top_k, top_p, generators)
            min_count = schedule[step] if (min_per_step == "schedule" and step < len(schedule)) else 1
            commit = commit_mask(confidence, still_masked, min_count, confidence_threshold)
            x[:, start:end] = torch.where(commit, proposal, x[:, start:end])
            step += 1
            if on_step is not None:
                full = torch.zeros_like(x, dtype=torch.bool)
                full[:, start:end] = commit
                on_step(x, full)
        out.steps_per_block.append(step)
        if stop_at_eos:
            done |= (x[:, start:end] == eos_id).any(-1)
            x[:, end:] = torch.where(done[:, None], eos_id, x[:, end:])
            if bool(done.all()):
                break
    out.tokens = [x[b, P:].clone() for b in range(B)]
    return out
