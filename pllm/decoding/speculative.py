"""Speculative decoding with a draft model: a small model proposes, the target verifies.

`Drafter.propose(states)` runs the draft model, batched over every sequence that asked for
speculation (`GenerationConfig(strategy="speculative")`), and hands each its proposal; the target's
next forward pass verifies it (`DecodeState.segments` / `advance`). Two targets:

- autoregressive (block-causal with block_size 1): the draft proposes the next `draft_length`
  tokens; the target computes, in one pass, its distribution at the current position and after each
  drafted prefix, and standard speculative sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen
  et al. 2023, arXiv 2302.01318) accepts each drafted token with probability min(1, p/q), replacing
  the first rejected one by a sample of norm(max(p - q, 0)), or adding one from p when all pass.
  The output follows the target's distribution exactly; greedy output equals the target's greedy
  output.
- block diffusion (or semi-autoregressive bidirectional): the draft fills the current block's
  masked positions; ordered by the draft's confidence, its tokens give the states the target's static
  rule would reach in its next `draft_length` steps if it agreed, and the target verifies them like
  draft-and-verify (`state.py`): the longest agreeing chain of steps is committed, so the answer
  equals the target's static decoding.

The draft fills its positions left to right, one draft-model block per pass (an autoregressive draft:
one token per pass; a bidirectional draft: all in one pass), each position sampled from its own
distribution q under the request's temperature / top-k / top-p. Speculation never writes the
target's cache: the committed tokens are recomputed and stored by the next pass, so a rejected draft
leaves nothing behind. The draft model keeps its own cache of whole finished blocks of final tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..kv_cache import KVCache, Segment
from .sampling import apply_repetition_penalty, banned_token_ids, filter_top_k_top_p


def check_draft_model(target: ModelConfig, draft: ModelConfig) -> None:
    """Raise ValueError if the draft model cannot propose tokens for the target."""
    for name in ("vocab_size", "mask_token_id", "pad_token_id", "eos_token_id"):
        if getattr(target, name) != getattr(draft, name):
            raise ValueError(f"the draft model's {name} ({getattr(draft, name)}) differs from the target's "
                             f"({getattr(target, name)}): they must share a tokenizer")


def token_distribution(logits: torch.Tensor, rules, cfg: ModelConfig, context: torch.Tensor) -> torch.Tensor:
    """Rows of logits (n, V) -> the float64 distributions a sampler with these rules draws from: mask and
    padding banned, repetition penalty over `context`, then temperature / top-k / top-p."""
    logits = logits.double().clone()
    logits[:, list(banned_token_ids(cfg))] = float("-inf")
    if rules.repetition_penalty != 1.0:
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
        seen[0, context[context != cfg.mask_token_id]] = True
        seen[0, list(banned_token_ids(cfg))] = False
        logits = apply_repetition_penalty(logits[None], seen, rules.repetition_penalty)[0]
    if rules.temperature == 0:
        return logits.softmax(-1)
    return filter_top_k_top_p(logits / rules.temperature, rules.top_k, rules.top_p).softmax(-1)


@dataclass
class Speculation:
    """What the draft proposed for one sequence: token and confidence per drafted position, and for
    sampling the distribution each token was drawn from."""

    positions: torch.Tensor  # (n,) positions in the sequence, increasing
    tokens: torch.Tensor  # (n,)
    confidence: torch.Tensor  # (n,) q(token)
    probs: torch.Tensor | None = None  # (n, V) float64 q, for speculative sampling (temperature > 0)


@dataclass
class _DraftJob:
    """Drafting for one sequence: the positions to fill, in chunks of one draft-model block per pass."""

    state: object  # DecodeState
    positions: torch.Tensor
    tokens: torch.Tensor  # working copy: the state's tokens with the drafted ones filled in
    chunks: list[torch.Tensor]
    out_tokens: list[torch.Tensor] = field(default_factory=list)
    out_conf: list[torch.Tensor] = field(default_factory=list)
    out_probs: list[torch.Tensor] = field(default_factory=list)


class Drafter:
    """Runs the draft model for a batch of `DecodeState`s (one packed pass per draft-model block)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.block_causal = self.config.attention_mode == "block_causal"
        self.passes = 0  # draft forward passes run so far

    @torch.no_grad()
    def propose(self, states: list) -> int:
        """Give every state that wants a proposal (`state.wants_speculation()`) one; returns the
        number of draft passes this took (the most any one sequence needed)."""
        jobs = [self._job(s) for s in states if s.wants_speculation()]
        jobs = [j for j in jobs if j is not None]
        passes = 0
        while pending := [j for j in jobs if len(j.out_tokens) < len(j.chunks)]:
            logits = self.model.forward_segments([self._segment(j) for j in pending])
            for job, chunk_logits in zip(pending, logits):
                self._take(job, chunk_logits)
            passes += 1
        for job in jobs:
            probs = torch.cat(job.out_probs) if job.out_probs else None
            job.state.set_speculation(Speculation(job.positions, torch.cat(job.out_tokens), torch.cat(job.out_conf),
                                                  probs))
        self.passes += passes
        return passes

    def _job(self, state) -> _DraftJob | None:
        positions = state.speculation_positions()
        if positions.numel() == 0:
            return None
        if state.draft_kv is None and self.block_causal:
            state.draft_kv = KVCache(self.config.num_hidden_layers)
        if self.block_causal:  # one pass per draft-model block, left to right
            ids = torch.div(positions, self.config.block_size, rounding_mode="floor")
            chunks = list(positions.split(torch.unique_consecutive(ids, return_counts=True)[1].tolist()))
        else:
            chunks = [positions]
        return _DraftJob(state, positions, state.tokens.clone(), chunks)

    def _segment(self, job: _DraftJob) -> Segment:
        chunk = job.chunks[len(job.out_tokens)]
        last = int(chunk[-1])
        if not self.block_causal:  # no exact cache: the prefix, and the masks up to the last drafted position
            return Segment(job.tokens, chunk, (0, last + 1))
        kv, bs = job.state.draft_kv, self.config.block_size
        # Cache only whole draft-model blocks before the first drafted position: those tokens are final.
        first = int(job.positions[0])
        done = first - first % bs
        end = min((last // bs + 1) * bs, job.tokens.numel())
        store = (kv.length, done) if not job.out_tokens and done > kv.length else None
        return Segment(job.tokens, chunk, (min(kv.length, done), end), kv, store)

    def _take(self, job: _DraftJob, logits: torch.Tensor) -> None:
        state, chunk = job.state, job.chunks[len(job.out_tokens)]
        rules = state.rules
        q = token_distribution(logits, rules, self.config, job.tokens)
        if rules.temperature == 0:
            tokens = q.argmax(-1)
        else:
            tokens = torch.multinomial(q, 1, generator=state.draft_rng).squeeze(-1)
            job.out_probs.append(q)
        job.tokens[chunk] = tokens
        job.out_tokens.append(tokens)
        job.out_conf.append(q.gather(-1, tokens[:, None]).squeeze(-1))
