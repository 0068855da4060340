"""One request's state in the engine: its prompt, decoding settings and denoising state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig
from ..decoding import DecodeRules, DecodeState


def tokens_per_pass(num_prompt_tokens: int, max_new_tokens: int, draft_length: int) -> int:
    """Tokens a request may put in one forward pass, the unit of `max_batched_tokens`: prompt +
    answer (a full pass; the first one when cached), times the drafts verified beside it."""
    return (num_prompt_tokens + max_new_tokens) * (1 + draft_length)


@dataclass
class Request:
    request_id: str
    prompt: torch.Tensor  # (P,) token ids
    config: GenerationConfig
    rules: DecodeRules
    arrival_time: float = field(default_factory=time.perf_counter)
    state: DecodeState | None = None  # built when the request is admitted
    num_sent: int = 0  # answer tokens already handed out
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def length(self) -> int:
        """Positions of the whole sequence: prompt + answer."""
        return self.prompt.numel() + self.rules.gen_length

    @property
    def num_tokens(self) -> int:
        return tokens_per_pass(self.prompt.numel(), self.rules.gen_length, self.rules.draft_length)


@dataclass
class RequestOutput:
    """What one step produced for one request: the answer tokens that became final (in order, since
    the last output) and, once finished, why ("stop": EOS, "length": max tokens, "abort")."""

    request_id: str
    new_token_ids: list[int]
    num_generated: int
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    nfe: int = 0
