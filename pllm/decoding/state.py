"""One sequence's denoising state: which positions the next step needs, and how a step's logits
become committed tokens.

Everything here is per sequence (its own block, step counter, schedule and random generator), so a
sequence decodes to the same tokens whether it runs alone, in a fixed batch (`decode`), or in the
engine's continuously changing batch (`pllm.engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import GenerationConfig, ModelConfig
from .commit import commit_mask, transfer_schedule
from .sampling import apply_repetition_penalty, propose_tokens

# GenerationConfig.strategy -> (commit at least: "schedule" | "one", uses confidence_threshold)
STRATEGIES = {"static": ("schedule", False), "threshold": ("one", True)}


@dataclass(frozen=True)
class DecodeRules:
    """The decoding settings of one sequence (see `decode` for their meaning)."""

    gen_length: int
    num_steps: int
    block_size: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    confidence_threshold: float | None = None
    min_per_step: str = "schedule"
    stop_at_eos: bool = False
    seed: int | None = None

    @classmethod
    def from_config(cls, cfg: GenerationConfig, gen_length: int | None = None) -> "DecodeRules":
        min_per_step, uses_threshold = STRATEGIES[cfg.strategy]
        return cls(gen_length=gen_length or cfg.max_new_tokens, num_steps=cfg.num_refinement_steps,
                   block_size=cfg.block_size, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   repetition_penalty=cfg.repetition_penalty,
                   confidence_threshold=cfg.confidence_threshold if uses_threshold else None,
                   min_per_step=min_per_step, stop_at_eos=cfg.use_adaptive_steps, seed=cfg.seed)


class DecodeState:
    """prompt + `gen_length` mask tokens, decoded block by block (LLaDA's semi-autoregressive
    order). `window()` gives the positions whose logits the next step needs; `advance(logits)`
    commits the positions the rule picks. Prompt tokens and committed tokens never change."""

    def __init__(self, prompt: torch.Tensor, rules: DecodeRules, model_config: ModelConfig, device):
        self.rules, self.cfg = rules, model_config
        prompt = torch.as_tensor(prompt, dtype=torch.long).flatten().to(device)
        self.prompt_len = prompt.numel()
        answer = torch.full((rules.gen_length,), model_config.mask_token_id, dtype=torch.long, device=device)
        self.tokens = torch.cat([prompt, answer])  # (P + G,)
        self.block_size = rules.block_size or max(rules.gen_length, 1)
        num_blocks = max(1, math.ceil(rules.gen_length / self.block_size))
        self.steps_per_block = max(1, math.ceil(rules.num_steps / num_blocks))
        self.generator = None
        if rules.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(rules.seed if rules.seed is not None else int(torch.randint(0, 2**62, (1,))))
        self.nfe = 0
        self.num_final = 0  # answer tokens final in order (a committed prefix): safe to stream
        self.eos_at: int | None = None  # answer index of the first final EOS (stop_at_eos only)
        self.finished = rules.gen_length == 0
        self._start_block(0)

    # -- the current block ---------------------------------------------------------------------
    def _start_block(self, block: int) -> None:
        self.block, self.step = block, 0
        self.start = self.prompt_len + block * self.block_size
        self.end = min(self.start + self.block_size, self.tokens.numel())
        self.schedule = transfer_schedule(max(self.end - self.start, 1), self.steps_per_block)

    def window(self) -> torch.Tensor:
        """Positions (in the sequence) whose logits the next step needs: the current block."""
        return torch.arange(self.start, self.end, device=self.tokens.device)

    @property
    def answer(self) -> torch.Tensor:
        return self.tokens[self.prompt_len:]

    # -- one denoising step --------------------------------------------------------------------
    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (n, V) for `window()` -> bool (n,) mask of the positions committed now."""
        r, cfg = self.rules, self.cfg
        block = self.tokens[self.start:self.end]
        still_masked = block == cfg.mask_token_id
        logits = logits.clone()
        # The answer may never contain mask or padding tokens (an undertrained model can rank them
        # first, and committing a mask would stall the loop).
        logits[:, [cfg.mask_token_id, cfg.pad_token_id]] = float("-inf")
        if r.repetition_penalty != 1.0:
            seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen[0, self.tokens] = True
            seen[0, [cfg.mask_token_id, cfg.pad_token_id]] = False
            logits = apply_repetition_penalty(logits[None], seen, r.repetition_penalty)[0]
        gens = [self.generator] if self.generator is not None else None
        proposal, confidence = propose_tokens(logits[None], r.temperature, r.top_k, r.top_p, gens)
        min_count = self.schedule[self.step] if (r.min_per_step == "schedule" and self.step < len(self.schedule)) else 1
        commit = commit_mask(confidence, still_masked[None], min_count, r.confidence_threshold)[0]
        block.copy_(torch.where(commit, proposal[0], block))
        self.nfe += 1
        self.step += 1
        self._update_final()
        if not self.finished and not bool((still_masked & ~commit).any()):
            self._start_block(self.block + 1)
            self.finished = self.start >= self.tokens.numel()
        return commit

    def _update_final(self) -> None:
        answer, cfg = self.answer, self.cfg
        masked = (answer == cfg.mask_token_id).nonzero()
        self.num_final = int(masked[0]) if masked.numel() else answer.numel()
        if self.rules.stop_at_eos:
            eos = (answer[: self.num_final] == cfg.eos_token_id).nonzero()
            if eos.numel():
                # The answer ends at its first final EOS: the rest is filled with EOS, no more steps.
                self.eos_at = int(eos[0])
                answer[self.eos_at:] = cfg.eos_token_id
                self.num_final, self.finished = answer.numel(), True
        if self.num_final == answer.numel():
            self.finished = True

    @property
    def finish_reason(self) -> str | None:
        if not self.finished:
            return None
        return "stop" if self.eos_at is not None else "length"

    def final_tokens(self) -> torch.Tensor:
        """The answer's final tokens in order, up to (not including) a stopping EOS."""
        n = self.eos_at if self.eos_at is not None else self.num_final
        return self.answer[:n]
