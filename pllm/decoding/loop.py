"""`decode`: a fixed batch of prompts -> answers, one model pass per denoising step.

Semi-autoregressive as in LLaDA: each answer is cut into blocks decoded left to right; inside a
block, each step runs the model on the sequences (packed, no padding), proposes a token and a
confidence for every masked position of the block, and commits the positions chosen by the
strategy's rule (`commit.py`). The per-sequence bookkeeping lives in `state.py`; the serving engine
(`pllm.engine`) drives the same states with a changing batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .speculative import Drafter, check_draft_model
from .state import DecodeRules, DecodeState


@dataclass
class DecodeOutput:
    tokens: list[torch.Tensor]  # per prompt: (gen_length,) answer tokens
    nfe: int = 0  # model forward passes (batched)
    steps: int = 0  # denoising steps summed over the prompts (draft-and-verify takes several per pass)
    nfe_per_sequence: list[int] = field(default_factory=list)  # forward passes each prompt took part in
    draft_nfe: int = 0  # draft-model forward passes (speculative decoding)
    drafted: int = 0  # drafted tokens (autoregressive target) or steps, summed over the prompts
    verified: int = 0  # ... that the target checked (up to and including each pass's first rejection)
    accepted: int = 0  # ... that the target accepted

    @property
    def acceptance_rate(self) -> float:
        """Per drafted token (or step) checked: the chance that the target accepts it."""
        return self.accepted / max(self.verified, 1)

    @property
    def accepted_per_drafted(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_forward(self) -> float:
        return sum(t.numel() for t in self.tokens) / max(self.nfe, 1) / max(len(self.tokens), 1)


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
    draft_model: torch.nn.Module | None = None,
    **options,
) -> DecodeOutput:
    """Decode `gen_length` tokens after each prompt (1-D tensors, any lengths).

    num_steps: total steps over the answer, spread evenly over blocks (at least one per block).
    min_per_step: "schedule" commits at least the static schedule's k per step (LLaDA);
        "one" commits at least one (Fast-dLLM threshold decoding); "factor" uses Fast-dLLM's factor
        rule with options["parallel_factor"].
    confidence_threshold: also commit every position above it (None: static decoding).
    stop_at_eos: once a row's answer has a final EOS (every token before it committed), the rest of
        the row becomes EOS and the row takes no more steps; the loop ends when every row is finished.
    seed: one seed for every row, or one per row (sampling only).
    draft_model: the draft model for speculative=True (see `speculative.py`).
    options: the other `DecodeRules` fields (credit, draft_length, speculative, cache, parallel_factor, ...).
    on_step(x, committed): called after each forward pass with the full state (B, P+G), prompts
        left-padded with pad_token_id, and the bool mask of positions committed by that pass.
    """
    seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
    rules = [DecodeRules(gen_length, num_steps, block_size, temperature, top_k, top_p, repetition_penalty,
                         confidence_threshold, min_per_step, stop_at_eos, s, **options) for s in seeds]
    drafter = Drafter(draft_model) if draft_model is not None else None
    return decode_with_rules(model, prompts, rules, on_step, drafter=drafter)


@torch.no_grad()
def decode_with_rules(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    rules: list[DecodeRules],
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    suffixes: list[torch.Tensor] | None = None,
    runner=None,
    drafter: Drafter | None = None,
) -> DecodeOutput:
    """`decode` with each prompt's settings given as DecodeRules (e.g. `DecodeRules.from_config`).
    suffixes: per prompt, fixed tokens after the answer (infilling, bidirectional models).
    runner: runs each step's forward pass, states -> per state its segments' logits, with the
    runner's own decoding states (`pllm.engine.ModelRunner`: fixed-shape CUDA-graph steps); default:
    one packed pass (`run_states`). drafter: the draft model's `Drafter`, needed by rules with
    speculative=True."""
    suffixes = suffixes or [None] * len(prompts)
    if any(r.speculative for r in rules):
        if drafter is None:
            raise ValueError("speculative decoding needs a draft model")
        check_draft_model(model.config, drafter.config)
    if runner is not None:
        states = [runner.new_state(p, r, sfx) for p, r, sfx in zip(prompts, rules, suffixes)]
    else:
        states = [DecodeState(p, r, model.config, model.device, sfx) for p, r, sfx in zip(prompts, rules, suffixes)]
    nfe = draft_nfe = 0
    while active := [s for s in states if not s.finished]:
        if drafter is not None:
            draft_nfe += drafter.propose(active)
        logits = runner.run(active) if runner is not None else run_states(model, active)
        nfe += 1
        commits = {id(s): (s.start, s.advance(l)) for s, l in zip(active, logits)}
        if on_step is not None:
            on_step(*_left_padded(states, commits, model.config.pad_token_id))
    return DecodeOutput(tokens=[s.answer.clone() for s in states], nfe=nfe,
                        steps=sum(s.num_steps_taken for s in states), nfe_per_sequence=[s.nfe for s in states],
                        draft_nfe=draft_nfe, drafted=sum(s.drafted for s in states),
                        verified=sum(s.verified for s in states), accepted=sum(s.accepted for s in states))


def run_states(model: torch.nn.Module, states: list[DecodeState]) -> list[list[torch.Tensor]]:
    """One packed forward pass over every segment of every state; the logits, grouped per state."""
    segments = [s.segments() for s in states]
    flat = iter(model.forward_segments([seg for segs in segments for seg in segs]))
    return [[next(flat) for _ in segs] for segs in segments]


def _left_padded(states: list[DecodeState], commits: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(s.prompt_len for s in states)
    x = torch.stack([torch.nn.functional.pad(s.tokens, (P - s.prompt_len, 0), value=pad_id) for s in states])
    committed = torch.zeros_like(x, dtype=torch.bool)
    for b, s in enumerate(states):
        if id(s) in commits:
            start, mask = commits[id(s)]
            offset = start + P - s.prompt_len
            committed[b, offset:offset + mask.numel()] = mask
    return x, committed
