"""One sequence's denoising state: what the next forward pass must compute for it, and how that
pass's logits become committed tokens.

Everything here is per sequence (its own block, step counter, schedule, cache and random
generator), so a sequence decodes to the same tokens whether it runs alone, in a fixed batch
(`decode`), or in the engine's continuously changing batch (`pllm.engine`).

Strategies (`GenerationConfig.strategy`, see `DecodeRules.from_config`):
- static, threshold, factor: the commit rules of `commit.py`;
- credit: threshold commits on logits fused with trace credits (`credit.py`);
- draft_verify: lossless draft-and-verify (FreeDave, Wu et al. 2025, arXiv 2510.00294; reference
  code cychomatica/FreeDave). Besides the current state, each forward pass also runs the states that
  the static rule would reach in the next `draft_length` steps if the current confidence order held
  (drafted from the last step's logits). A draft is accepted when the static rule, applied to the
  previous accepted state and its logits, yields exactly that draft; its logits then serve the next
  step. Every accepted state is one the static decoder reaches (same logits, same random draws, in
  order), so the answer equals static decoding's, in fewer forward passes.
- speculative: the same verification with drafts from a separate draft model, or for an
  autoregressive target (block-causal, block_size 1) standard speculative sampling
  (`speculative.py`; the engine's `Drafter` proposes before each pass).

Caches (`KVCache` / `Segment`, see `pllm/kv_cache.py`): "block" is exact for block-causal models;
"prefix" and "dual" (Fast-dLLM) are approximations for bidirectional models, refreshed by a full
pass at the first step of every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import GenerationConfig, ModelConfig
from pllm.kernels.parallel_decode import commit_in_place
from ..kv_cache import KVCache, Segment
from .commit import commit_mask, factor_commit_mask, transfer_schedule
from .credit import CreditTrace
from .sampling import apply_repetition_penalty, banned_token_ids, propose_tokens

CACHE_MODES = ("auto", "none", "block", "prefix", "dual")
MIN_PER_STEP = ("schedule", "one", "factor")


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
    min_per_step: str = "schedule"  # "schedule" (static), "one" (threshold), "factor"
    stop_at_eos: bool = False
    seed: int | None = None
    parallel_factor: float = 1.0  # the factor rule's f
    credit: bool = False  # fuse trace credits into the logits (CreditDecoding)
    credit_alpha: float = 0.7
    credit_beta: float = 0.8
    credit_gamma: float = 0.2
    draft_length: int = 0  # draft-and-verify / speculative: future steps drafted and verified per pass
    speculative: bool = False  # drafts come from a draft model (`speculative.Drafter`), not the model itself
    adaptive_draft: bool = False  # speculative: draft one more than was last accepted (up to draft_length)
    cache: str = "none"  # one of CACHE_MODES

    def __post_init__(self):
        if self.min_per_step not in MIN_PER_STEP:
            raise ValueError(f"min_per_step must be one of {MIN_PER_STEP}, got {self.min_per_step!r}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.draft_length and (self.min_per_step != "schedule" or self.credit):
            raise ValueError("draft-and-verify reproduces static decoding: it needs min_per_step='schedule' "
                             "and no credit")
        if self.speculative and not self.draft_length:
            raise ValueError("speculative decoding needs draft_length >= 1")

    def check_model(self, model_config: ModelConfig) -> None:
        """Raise ValueError if these rules cannot run on this model."""
        if self.cache == "block" and model_config.attention_mode != "block_causal":
            raise ValueError("kv_cache='block' (exact) needs a block-causal model; use 'prefix' or 'dual' "
                             "(approximate) for bidirectional models")

    @classmethod
    def from_config(cls, cfg: GenerationConfig, gen_length: int | None = None) -> "DecodeRules":
        s = cfg.strategy
        # use_adaptive_steps: static steps also commit whatever is already above the threshold
        # (confident blocks take fewer steps), and an answer stops at its first final EOS.
        threshold = cfg.confidence_threshold if (s in ("threshold", "credit") or
                                                 (s in ("static", "draft_verify", "speculative") and cfg.use_adaptive_steps)) else None
        return cls(gen_length=gen_length or cfg.max_new_tokens, num_steps=cfg.num_refinement_steps,
                   block_size=cfg.block_size, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   repetition_penalty=cfg.repetition_penalty, confidence_threshold=threshold,
                   min_per_step={"threshold": "one", "credit": "one", "factor": "factor"}.get(s, "schedule"),
                   stop_at_eos=cfg.use_adaptive_steps, seed=cfg.seed, parallel_factor=cfg.parallel_factor,
                   credit=s == "credit", credit_alpha=cfg.credit_alpha, credit_beta=cfg.credit_beta,
                   credit_gamma=cfg.credit_gamma,
                   draft_length=cfg.draft_length if s in ("draft_verify", "speculative") else 0,
                   speculative=s == "speculative", adaptive_draft=cfg.adaptive_draft_length, cache=cfg.kv_cache)


def block_bounds(prompt_len: int, total: int, block_size: int, aligned: bool) -> list[tuple[int, int]]:
    """The answer's blocks. Aligned (block-causal models): on multiples of block_size counted from
    position 0, as in training, so the first block may be short and holds the prompt's tail."""
    bounds, pos = [], prompt_len
    while pos < total:
        end = min((pos // block_size + 1) * block_size if aligned else pos + block_size, total)
        bounds.append((pos, end))
        pos = end
    return bounds or [(prompt_len, prompt_len)]


def host_copy(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of device tokens, queued without waiting: read it after the event has passed."""
    if not tokens.is_cuda:
        return tokens.clone(), None
    ready = torch.cuda.Event()
    host = tokens.to("cpu", non_blocking=True)
    ready.record()
    return host, ready


class DecodeState:
    """prompt + `gen_length` mask tokens, decoded block by block (LLaDA's semi-autoregressive
    order). `segments()` describes what the next forward pass runs for this sequence (the current
    state, plus drafts for draft-and-verify); `advance(logits)` commits what the rule picks.
    Prompt tokens and committed tokens never change."""

    def __init__(self, prompt: torch.Tensor, rules: DecodeRules, model_config: ModelConfig, device,
                 suffix: torch.Tensor | None = None, commit_kernel: bool = True):
        """suffix (bidirectional models): fixed tokens after the answer, which is then an infill.
        commit_kernel: a greedy step's commit as one selection kernel on the GPU
        (`KernelOptions.commit_in_place`; False: the PyTorch definition)."""
        self.rules, self.cfg, self.commit_kernel = rules, model_config, commit_kernel
        prompt = torch.as_tensor(prompt, dtype=torch.long).flatten().to(device)
        self.prompt_len = prompt.numel()
        if model_config.logits_shift and self.prompt_len == 0:
            # the first answer token's logits come from the position before it (a BOS at least)
            raise ValueError("a model with logits_shift needs a prompt of at least one token (e.g. its BOS)")
        answer = torch.full((rules.gen_length,), model_config.mask_token_id, dtype=torch.long, device=device)
        self.block_causal = model_config.attention_mode == "block_causal"
        suffix = torch.as_tensor([] if suffix is None else suffix, dtype=torch.long).flatten().to(device)
        if suffix.numel() and self.block_causal:
            raise ValueError("infilling needs a bidirectional model: a block-causal model cannot see the suffix")
        self.tokens = torch.cat([prompt, answer, suffix])  # (P + G + S,)
        self.answer_end = self.prompt_len + rules.gen_length
        # A block-causal model decodes its own blocks (it was trained on them); its cache is exact.
        block_size = model_config.block_size if self.block_causal else (rules.block_size or max(rules.gen_length, 1))
        self.blocks = block_bounds(self.prompt_len, self.answer_end, block_size, self.block_causal)
        self.steps_per_block = max(1, math.ceil(rules.num_steps / len(self.blocks)))
        rules.check_model(model_config)
        cache = rules.cache
        if cache == "auto":
            cache = "block" if self.block_causal else "none"
        elif self.block_causal and cache != "none":
            cache = "block"  # nothing after the current block is visible: prefix/dual are the block cache
        self.cache_mode = cache
        self.kv = KVCache(model_config.num_hidden_layers) if cache != "none" else None
        self.rng = None
        if rules.temperature > 0:
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(rules.seed if rules.seed is not None else int(torch.randint(0, 2**62, (1,))))
        # Speculative decoding (`speculative.py`): the draft model's proposal for the next pass, its
        # cache and its random draws; an autoregressive target verifies token by token.
        self.ar_target = self.block_causal and model_config.block_size == 1
        self.speculation = None
        self.draft_kv: KVCache | None = None
        self.draft_rng = None
        if rules.speculative and rules.temperature > 0:
            self.draft_rng = torch.Generator(device=device)
            # Its own stream: the target's draws must stay those of decoding without a draft model.
            seed = (rules.seed + 0x5DEECE66D) % 2**62 if rules.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.draft_rng.manual_seed(seed)
        # Drafted tokens (AR target) or steps: proposed, verified (up to and including the first
        # rejection) and accepted. accepted / verified estimates the per-token acceptance rate.
        self.drafted = self.verified = self.accepted = 0
        self.draft_len = rules.draft_length  # this sequence's next draft length (adapted with adaptive_draft)
        self.nfe = 0  # forward passes this sequence took part in
        self.num_steps_taken = 0  # denoising steps (rule applications); > nfe with draft-and-verify
        self.drafts: list[torch.Tensor] = []
        self.num_final = 0  # answer tokens final in order (a committed prefix): safe to stream
        self.final_ids: list[int] = []  # those tokens on the host, up to a stopping EOS
        self.eos_at: int | None = None  # answer index of the first final EOS (stop_at_eos only)
        self.finished = rules.gen_length == 0
        self.deferred = False  # the current step's bookkeeping waits for `finish_step` (see `advance`)
        self._reading: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._start_block(0)

    # -- the current block ---------------------------------------------------------------------
    def _start_block(self, block: int) -> None:
        self.block, self.step = block, 0
        self.start, self.end = self.blocks[block]
        self.schedule = transfer_schedule(max(self.end - self.start, 1), self.steps_per_block)
        self.drafts, self._last = [], None
        r = self.rules
        self.credit = (CreditTrace(self.end - self.start, self.cfg.vocab_size, r.credit_alpha, r.credit_beta,
                                   r.credit_gamma, self.tokens.device) if r.credit else None)

    def window(self) -> torch.Tensor:
        """Positions (in the sequence) whose logits the next step needs: the current block."""
        return torch.arange(self.start, self.end, device=self.tokens.device)

    @property
    def answer(self) -> torch.Tensor:
        return self.tokens[self.prompt_len:self.answer_end]

    def _plan(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(positions to compute, positions whose keys/values to store) for the next pass."""
        n, mode = self.tokens.numel(), self.cache_mode
        if mode == "block":  # recompute the uncached tail up to the block's end; keep finished blocks
            a = self.kv.length
            # Only whole model blocks before the current one are final: the first decoding block
            # shares its model block with the prompt's tail, whose keys see the answer's first tokens.
            done = self.start - self.start % self.cfg.block_size
            return (a, self.end), ((a, done) if done > a else None)
        if mode == "none":  # block-causal: later blocks are invisible, so skip them
            return ((0, self.end) if self.block_causal else None), None
        if self.step == 0:  # prefix / dual: refresh with a full pass at each block's first step
            return (0, n), ((0, self.start) if mode == "prefix" else (0, n))
        return ((self.start, n) if mode == "prefix" else (self.start, self.end)), None

    def segments(self) -> list[Segment]:
        """What the next forward pass runs for this sequence: the current state, then any drafts."""
        compute, store = self._plan()
        if self.cfg.logits_shift and compute is not None:
            # The first logit of the block comes from the position before it.
            compute = (min(compute[0], max(self.start - 1, 0)), compute[1])
        window = self.window()
        current = Segment(self.tokens, window, compute, self.kv, store)
        if self.ar_target and self.speculation is not None:
            return [current] + self._prefix_segments(compute[0] if compute else 0)
        return [current] + [Segment(d, window, compute, self.kv, None) for d in self.drafts]

    # -- speculative decoding with a draft model --------------------------------------------------
    def wants_speculation(self) -> bool:
        return self.rules.speculative and not self.finished and self.speculation is None and not self.drafts

    def speculation_positions(self) -> torch.Tensor:
        """Where the draft model proposes: the next `draft_length` tokens (autoregressive target),
        else the current block's masked positions."""
        if self.ar_target:
            return torch.arange(self.start, min(self.start + self.draft_len, self.answer_end),
                                device=self.tokens.device)
        block = self.tokens[self.start:self.end]
        return (block == self.cfg.mask_token_id).nonzero().flatten() + self.start

    def set_speculation(self, spec) -> None:
        """The draft model's proposal (a `speculative.Speculation`) for the next pass."""
        if self.ar_target:
            self.speculation = spec
            return
        # Block target: the draft's tokens, in the draft's confidence order, give the future static states.
        proposal = self.tokens[self.start:self.end].clone()
        confidence = torch.zeros(proposal.shape, dtype=torch.float32, device=proposal.device)
        proposal[spec.positions - self.start] = spec.tokens
        confidence[spec.positions - self.start] = spec.confidence.float()
        self.drafts = self._draft(proposal, confidence, self.draft_len)

    def _adapt(self, drafted: int, accepted: int) -> None:
        """Adaptive draft length: after a rejection, draft one more than was accepted; after a fully
        accepted draft, one more than before (at most draft_length). Any length keeps the output exact."""
        if self.rules.adaptive_draft and drafted:
            self.draft_len = min(self.rules.draft_length, accepted + 1 if accepted < drafted else self.draft_len + 1)

    def _prefix_segments(self, compute_start: int) -> list[Segment]:
        """Autoregressive target: the logits after each drafted prefix, read-only on the cache."""
        n, drafted = self.start, self.speculation.tokens
        segments = []
        for k in range(1, drafted.numel() + 1):
            if n + k >= self.answer_end:
                break
            tokens = self.tokens.clone()
            tokens[n:n + k] = drafted[:k]
            segments.append(Segment(tokens, torch.tensor([n + k], device=tokens.device), (compute_start, n + k + 1),
                                    self.kv, None))
        return segments

    def _verify_tokens(self, logits: list[torch.Tensor]) -> int:
        """Speculative sampling over the drafted tokens; returns how many tokens were committed."""
        from .speculative import token_distribution

        spec, r = self.speculation, self.rules
        self.speculation = None
        committed, accepted_before = 0, self.accepted
        for k, step_logits in enumerate(logits):
            p = token_distribution(step_logits, r, self.cfg, self.tokens)[0]
            drafted = k < spec.tokens.numel()
            if drafted:
                d = int(spec.tokens[k])
                if r.temperature == 0:
                    token = int(p.argmax())
                else:  # accept with probability min(1, p/q), else draw from norm(max(p - q, 0))
                    q = spec.probs[k]
                    u = torch.rand((), dtype=torch.float64, generator=self.rng, device=p.device)
                    token = d if u * q[d] < p[d] else None
                    if token is None:
                        residual = (p - q).clamp_min(0)
                        residual = residual if residual.sum() > 0 else p
                        token = int(torch.multinomial(residual / residual.sum(), 1, generator=self.rng))
                self.verified += 1
                self.accepted += token == d
            else:  # every drafted token was accepted: one more from the target's own distribution
                token = int(p.argmax()) if r.temperature == 0 else int(torch.multinomial(p, 1, generator=self.rng))
            block = self.tokens[self.start:self.end]
            still_masked = block == self.cfg.mask_token_id
            one = torch.tensor([token], device=block.device)
            self._commit(block, one, p[one].float(), still_masked.clone())
            committed += 1
            if self.finished or not drafted or token != d:
                break
        self.drafted += spec.tokens.numel()
        self._adapt(spec.tokens.numel(), self.accepted - accepted_before)
        return committed

    # -- one forward pass ----------------------------------------------------------------------
    def advance(self, logits: torch.Tensor | list[torch.Tensor], defer: bool = False) -> torch.Tensor:
        """Logits for `segments()` (one (n, V) tensor each) -> bool (n,) mask of the positions of
        the block that was current before the call which were committed by this pass.
        defer: return once the commit is queued on the device; the caller then calls `finish_step`,
        and until then the state still shows the block as it was (`start`, `finished`, ...).
        The engine uses it to launch the next step before waiting for this one (one segment only)."""
        logits = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if defer and (len(logits) > 1 or self.rules.draft_length):
            raise ValueError("only a single-segment step (no drafts) can defer its bookkeeping")
        self.deferred = defer
        start, drafts, accepted_before = self.start, self.drafts, self.accepted
        if self.ar_target and self.speculation is not None:
            self.nfe += 1
            return torch.ones(self._verify_tokens(logits), dtype=torch.bool, device=self.tokens.device)
        committed = None
        for i, step_logits in enumerate(logits):
            # Logits i > 0 belong to drafts[i - 1]: usable only if the state now is exactly that draft.
            if i:
                if self.finished or self.start != start:
                    break
                self.verified += 1
                if not torch.equal(self.tokens, drafts[i - 1]):
                    break
                self.accepted += 1
            commit = self._step(step_logits)
            committed = commit if committed is None else committed | commit
        self.nfe += 1
        self.drafted += len(drafts)
        if self.rules.speculative:
            self._adapt(len(drafts), self.accepted - accepted_before)
        self_drafting = self.rules.draft_length and not self.rules.speculative
        self.drafts = self._draft(*self._last) if (self_drafting and not self.finished and self.start == start) else []
        return committed

    def _step(self, logits: torch.Tensor) -> torch.Tensor:
        """One denoising step of the current block with the logits of its current state."""
        r, cfg = self.rules, self.cfg
        block = self.tokens[self.start:self.end]
        min_count = self.min_commits()
        if self.greedy_kernel_rules():
            # Greedy confidence decoding: logits -> token, confidence and the commit into the block
            # in one call (two kernels on a GPU).
            out = commit_in_place(logits, block, min_count, r.confidence_threshold, cfg.mask_token_id,
                                  banned_ids=banned_token_ids(cfg), use_kernel=self.commit_kernel)
            self._record_step(out.tokens, out.confidence, *host_copy(block))
            return out.commit
        still_masked = block == cfg.mask_token_id
        logits = logits.to(torch.float32, copy=True)  # (a fixed-shape step's logits are in the weights' dtype)
        # The answer may never contain mask or padding tokens (an undertrained model can rank them
        # first, and committing a mask would stall the loop).
        logits[:, list(banned_token_ids(cfg))] = float("-inf")
        if r.repetition_penalty != 1.0:
            seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen[0, self.tokens] = True
            seen[0, list(banned_token_ids(cfg))] = False
            logits = apply_repetition_penalty(logits[None], seen, r.repetition_penalty)[0]
        if self.credit is not None:
            logits = self.credit.fuse(logits, still_masked)
        gens = [self.rng] if self.rng is not None else None
        proposal, confidence = propose_tokens(logits[None], r.temperature, r.top_k, r.top_p, gens)
        if r.min_per_step == "factor":
            commit = factor_commit_mask(confidence, still_masked[None], r.parallel_factor)[0]
        else:
            commit = commit_mask(confidence, still_masked[None], min_count, r.confidence_threshold)[0]
        return self._commit(block, proposal[0], confidence[0], commit)

    def _commit(self, block: torch.Tensor, proposal: torch.Tensor, confidence: torch.Tensor,
                commit: torch.Tensor) -> torch.Tensor:
        block.copy_(torch.where(commit, proposal, block))
        self._record_step(proposal, confidence, *host_copy(block))
        return commit

    def _record_step(self, proposal: torch.Tensor, confidence: torch.Tensor, host: torch.Tensor,
                     ready: torch.cuda.Event | None) -> None:
        """A step's commit is queued: `host` will hold the block's new tokens once `ready` has
        passed. `finish_step`, the step's one wait for the device, runs now unless this step is
        deferred (see `advance`)."""
        self._last = (proposal, confidence)
        self.step += 1
        self.num_steps_taken += 1
        self._reading = (host, ready)
        if not self.deferred:
            self.finish_step()

    def advance_committed(self, proposal: torch.Tensor, confidence: torch.Tensor, host: torch.Tensor,
                          ready: torch.cuda.Event | None, defer: bool = False) -> None:
        """`advance` for a step whose commit was made for many states at once
        (`pllm.engine.batched_commit`): the current block in `tokens` is already updated, and
        `host` is (once `ready` has passed) its host copy."""
        self.deferred = defer
        self.nfe += 1
        self._record_step(proposal, confidence, host, ready)

    def greedy_kernel_rules(self) -> bool:
        """Whether a step's commit is one `commit_in_place` call (greedy confidence decoding)."""
        r = self.rules
        return r.temperature == 0 and r.repetition_penalty == 1.0 and self.credit is None and r.min_per_step != "factor"

    def min_commits(self) -> int:
        """Positions the next step commits at least (the static schedule's count, else one)."""
        if self.rules.min_per_step == "factor":
            return 0
        return self.schedule[self.step] if (self.rules.min_per_step == "schedule"
                                            and self.step < len(self.schedule)) else 1

    def block_may_be_done(self) -> bool:
        """Whether the steps taken in the current block may have committed all of it (known for
        sure only once `finish_step` has read it): static decoding commits exactly its schedule,
        other rules may commit every masked position in any step."""
        r = self.rules
        if r.min_per_step == "schedule" and r.confidence_threshold is None:
            return sum(self.schedule[:self.step]) + max(0, self.step - len(self.schedule)) >= self.end - self.start
        return True

    def finish_step(self) -> None:
        """Wait for the last commit's host copy of the block, then the bookkeeping that needs it:
        the final prefix, an EOS stop, the move to the next block. Proposals are never the mask
        token, so a mask left in the copy is a position still to decode."""
        if self._reading is None:
            return
        host, ready = self._reading
        self._reading = None
        if ready is not None:
            ready.synchronize()
        host_block = host.tolist()
        self._update_final(host_block)
        if not self.finished and self.cfg.mask_token_id not in host_block:
            if self.block + 1 < len(self.blocks):
                self._start_block(self.block + 1)
            else:
                self.finished = True

    def _draft(self, proposal: torch.Tensor, confidence: torch.Tensor, length: int | None = None) -> list[torch.Tensor]:
        """The states the static rule reaches in the next steps if this confidence order and these
        proposals (over the current block; the last step's, or a draft model's) held: each draft
        commits the next scheduled count of masked positions."""
        block = self.tokens[self.start:self.end]
        masked = (block == self.cfg.mask_token_id).nonzero().flatten()
        if masked.numel() == 0:
            return []
        order = masked[confidence[masked].argsort(descending=True, stable=True)]
        drafts, filled = [], 0
        for m in range(length or self.rules.draft_length):
            j = self.step + m
            filled += self.schedule[j] if j < len(self.schedule) else 1
            draft = self.tokens.clone()
            chosen = order[:filled] + self.start
            draft[chosen] = proposal[order[:filled]]
            drafts.append(draft)
            if filled >= order.numel():
                break
        return drafts

    def _update_final(self, host_block: list[int]) -> None:
        """Extend the final prefix with the current block's newly final tokens (its host copy). Blocks
        are decoded in order, so every answer token before the current block is already final."""
        cfg, answer = self.cfg, self.answer
        base = self.start - self.prompt_len  # the block's first answer index
        masked_at = host_block.index(cfg.mask_token_id) if cfg.mask_token_id in host_block else len(host_block)
        new = host_block[self.num_final - base:masked_at]
        stops = [i for i, t in enumerate(new) if t in cfg.stop_ids] if self.rules.stop_at_eos else []
        if stops:
            # The answer ends at its first final EOS (or end-of-turn id): the rest is filled with EOS.
            cut = stops[0]
            self.eos_at = self.num_final + cut
            answer[self.eos_at:] = cfg.eos_token_id
            self.final_ids += new[:cut]
            self.num_final, self.finished = answer.numel(), True
            return
        self.final_ids += new
        self.num_final = base + masked_at
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
