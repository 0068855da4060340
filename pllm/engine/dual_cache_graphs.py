"""Fixed-shape steps for bidirectional models under Fast-dLLM's dual cache, replayed as CUDA graphs.

With the dual cache (Fast-dLLM, Wu et al. 2025, sec. 3.2) a block's first step runs the whole
sequence and keeps every position's keys/values; its later steps recompute only the block and read
the prefix and the suffix (the still-masked answer after the block) from the cache. Those later
steps have one shape for every sequence: the block (plus, for shifted-logit models, the position
before it), every key of the sequence visible. Here they run as one fixed-shape pass over a slot
cache (`forward_static` with one visibility block spanning all positions), captured per batch
bucket and key-length bucket and replayed; the refresh at each block's first step runs eagerly
into the same slot. A block shorter than the window (the answer's last) pads its row with
positions below 0, which only see themselves and write to the slot's scratch entries.
On CPU the same steps run eagerly, which is what the CPU tests compare with the packed path.
"""

from __future__ import annotations

import torch

from ..decoding import DecodeState
from ..model import DiffusionTransformer
from pllm.kernels.options import DEFAULT_KERNELS, KernelOptions
from .cuda_graphs import CapturedSteps, batch_buckets, key_length_buckets
from .step_forward import forward_static


class DualCacheStepRunner(CapturedSteps):
    """Runs dual-cache states of a bidirectional model through fixed-shape steps (module docstring)."""

    def __init__(self, model: DiffusionTransformer, max_num_seqs: int, capture: bool, compile_ops: bool | None = None,
                 kernels: KernelOptions = DEFAULT_KERNELS, max_positions: int | None = None,
                 num_pages: int | None = None):
        """num_pages: the KV cache pool's pages for sequences (default: every sequence at max_positions)."""
        cfg = model.config
        if cfg.attention_mode != "bidirectional":
            raise ValueError("dual-cache steps are for bidirectional models (block-causal ones use the exact cache)")
        self.model, self.capture, self.kernels = model, capture, kernels
        self.compile_ops = capture if compile_ops is None else compile_ops
        self.block = cfg.block_size  # the longest block a state may decode here
        self.shift = int(cfg.logits_shift)
        self.window = self.block + self.shift
        self.buckets = batch_buckets(max_num_seqs)
        self.max_seqs = self.buckets[-1]
        self._init_pages(model, self.max_seqs, max_positions or cfg.max_position_embeddings, num_pages)
        self.visible = self.cache.length + self.cache.offset  # one block holding every position
        B, W, device = self.buckets[-1], self.window, model.device
        self.tokens = torch.full((B, W), cfg.pad_token_id, dtype=torch.long, device=device)
        self.positions = torch.full((B, W), -1, dtype=torch.long, device=device)
        self.limits = torch.zeros(B, dtype=torch.long, device=device)
        self.slots = torch.zeros(B, dtype=torch.long, device=device)
        self.lengths = key_length_buckets(W, self.cache.length)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_steps = self.num_replays = self.num_refreshes = 0
        self.last_length = self.lengths[0]
        if capture:
            self._capture_all()

    def eligible(self, state: DecodeState) -> bool:
        """Dual cache, one segment per step, a block that fits the window."""
        return (not state.block_causal and state.cache_mode == "dual" and not state.rules.draft_length
                and state.end - state.start <= self.block)

    def _step(self, B: int, S: int) -> torch.Tensor:
        return forward_static(self.model, self.tokens[:B], self.positions[:B], self.limits[:B], self.cache,
                              self.slots[:B], self.block, key_length=S, compile_ops=self.compile_ops,
                              kernels=self.kernels, visible_block=self.visible)

    @torch.no_grad()
    def run(self, states: list[DecodeState]) -> list[list[torch.Tensor]]:
        """Per state, the logits of its current block: a full refresh pass at a block's first step,
        a fixed-shape step over the block after."""
        self._assign_slots(states)
        logits: list[torch.Tensor | None] = [None] * len(states)
        stepping = []
        for i, state in enumerate(states):
            if state.step == 0:
                logits[i] = self._refresh(state, self.slot_of[state])
            else:
                stepping.append(i)
        if stepping:
            n = len(states)
            B = next(b for b in self.buckets if b >= n)
            self.positions[:B].fill_(-1)
            self.limits[:B] = 0
            self.slots[:B] = 0
            self.slots[:n] = torch.tensor([self.slot_of[s] for s in states], device=self.tokens.device)
            lo = [states[i].start - self.shift for i in stepping]
            spans = [states[i].end - first for i, first in zip(stepping, lo)]
            rows = torch.tensor(stepping, device=self.tokens.device)
            ranges = torch.arange(self.window, device=self.tokens.device)
            first = torch.tensor(lo, device=self.tokens.device)
            width = torch.tensor(spans, device=self.tokens.device)
            self.positions[rows] = torch.where(ranges < width[:, None], first[:, None] + ranges, -1)
            self.limits[rows] = torch.tensor([states[i].tokens.numel() for i in stepping], device=self.tokens.device)
            torch._foreach_copy_([self.tokens[i, :w] for i, w in zip(stepping, spans)],
                                 [states[i].tokens[a:a + w] for i, a, w in zip(stepping, lo, spans)])
            out = self._replay(B, max(states[i].tokens.numel() for i in stepping) + self.cache.offset)
            for i in stepping:
                logits[i] = out[i, :states[i].end - states[i].start]
        return [[block] for block in logits]

    def _refresh(self, state: DecodeState, slot: int) -> torch.Tensor:
        """A block's first step: the whole sequence, every position's keys/values into the slot."""
        n = state.tokens.numel()
        self.num_refreshes += 1
        positions = torch.arange(n, device=self.tokens.device)[None]
        limit = torch.full((1,), n, device=self.tokens.device)
        return forward_static(self.model, state.tokens[None], positions, limit, self.cache, slice(slot, slot + 1),
                              state.end - state.start, fixed_shape=False, kernels=self.kernels,
                              visible_block=self.visible, logits_end=state.end)[0]

    def _admit(self, state: DecodeState, slot: int) -> None:
        """Pages for the state's length (its block's first step, a refresh, writes them all)."""
        self._give_pages(state, slot)
