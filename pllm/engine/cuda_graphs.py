"""Fixed-shape denoising steps for block-causal models, replayed as CUDA graphs per batch bucket.

With the exact block cache, a step of a sequence whose current block is model block k computes
only that block (with shifted logits, and the position before it, whose hidden state gives the
block's first logit): everything before lives in the sequence's slot of a preallocated
`StaticKVCache`. A block's keys/values become final when its last mask is committed, which the
step that committed it could not yet see; so the step after recomputes the finished block once,
in a row of its own beside the row of the next block (a "finalize" row: same slot, written before
any row of that layer reads it), and never again. Autoregressive models (one-token blocks, shifted
logits) need no finalize row: their window is the last committed token alone. Every row is a
window of the same length, so a batch is one fixed-shape pass, captured once per row bucket (1, 2,
4, 8, 16, 32, 48, ...) and key-length bucket (the cache prefix the batch can see) and replayed:
one graph launch instead of hundreds of kernel launches per step, which dominate at batch 1 (the
CUDA-graph decoding of gpt-fast / nano-vllm, applied to block diffusion). Prompts are prefilled
eagerly into their slot. On CPU the same fixed-shape step runs eagerly (what the CPU tests run).

On a GPU the engine also launches each step ahead (`run_ahead`): before the host has read the
last step's commits, with each row's window (this block or the next) and whether a finalize row
is real chosen on the device, so the host's per-step bookkeeping overlaps the device's work
instead of leaving it idle.
"""

from __future__ import annotations

import itertools

import torch

from ..decoding import DecodeState
from pllm.kernels.options import DEFAULT_KERNELS, KernelOptions
from pllm.kernels.step_windows import TABLE_ROWS, next_windows
from ..model import DiffusionTransformer
from .page_pool import PagePool, prefix_keys
from .step_forward import forward_static, new_static_cache, scratch_positions


def batch_buckets(max_num_seqs: int) -> list[int]:
    buckets = [1]
    while buckets[-1] < max_num_seqs:
        buckets.append(buckets[-1] * 2)
    return buckets


def row_buckets(max_rows: int) -> list[int]:
    """Row counts steps are captured for: powers of two up to 16, then steps of 16 (a batch of 64
    with a few finalize rows pads to 80, not 128)."""
    buckets = [b for b in batch_buckets(min(max_rows, 16))]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] + 16)
    return buckets


def page_size(block_size: int) -> int:
    """Positions per KV cache page: whole blocks, at least 16."""
    return block_size * -(-16 // block_size)


def key_length_buckets(window: int, cache_length: int) -> list[int]:
    """Key lengths graphs are captured for: a step reads only the cache prefix its sequences can see."""
    lengths, length = [], max(4 * window, 64)
    while length < cache_length:
        lengths.append(length)
        length *= 2
    return lengths + [cache_length]


class CapturedSteps:
    """What both fixed-shape runners share: one CUDA graph per (batch bucket, key-length bucket) of
    `_step`, captured up front, and replaying one (or stepping eagerly where none was captured).
    Subclasses set buckets, lengths, graphs and the counters, and define `_step(B, S)`."""

    buckets: list[int]
    lengths: list[int]
    graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]]
    num_steps: int
    num_replays: int
    last_length: int

    def _step(self, B: int, S: int) -> torch.Tensor:
        raise NotImplementedError

    # -- the KV cache's pages ------------------------------------------------------------------
    def _init_pages(self, model: DiffusionTransformer, max_seqs: int, max_positions: int,
                    num_pages: int | None) -> None:
        """The cache pool (`num_pages` pages for sequences; default max_seqs of max_positions),
        its allocator, and a page-table row ("slot") per running sequence."""
        self.page_size = page_size(model.config.block_size)
        self.cache = new_static_cache(model, max_seqs, max_positions, self.page_size, num_pages)
        self.pool = PagePool(self.cache.num_pages, first_page=self.cache.scratch_pages)
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.slot_of: dict[DecodeState, int] = {}  # a running state -> its page-table row
        self.pages_of: dict[DecodeState, list[int]] = {}  # ... and the pages it holds

    def pages_needed(self, num_tokens: int) -> int:
        """Pages a sequence of num_tokens positions holds: a page is whole blocks, so they also cover
        its windows up to the end of its last block."""
        return -(-num_tokens // self.page_size)

    def can_admit(self, lengths: list[int]) -> bool:
        """Whether sequences of these lengths would get their pages now (no prefix counted as shared)."""
        return sum(map(self.pages_needed, lengths)) <= self.pool.available()

    def capacity(self) -> int:
        """The longest sequence the pool can ever hold."""
        return (self.cache.num_pages - self.cache.scratch_pages) * self.page_size

    def _give_pages(self, state: DecodeState, slot: int, shared: list[int] = ()) -> list[int]:
        """The state's page-table row: `shared` pages (held already), then fresh ones for the rest
        of its length; returns the fresh ones."""
        own = self.pool.allocate(self.pages_needed(state.tokens.numel()) - len(shared))
        self.pages_of[state] = [*shared, *own]
        self.cache.set_pages(slot, self.pages_of[state])
        return own

    def release(self, state: DecodeState) -> None:
        """A state left (finished or aborted): its slot and pages are free for the next request."""
        if state in self.slot_of:
            self.free_slots.append(self.slot_of.pop(state))
            self.pool.release(self.pages_of.pop(state))

    def _assign_slots(self, states: list[DecodeState]) -> None:
        """Release the states that left; give each new one a page-table row and its pages (`_admit`)."""
        running = set(states)
        for state in [s for s in self.slot_of if s not in running]:
            self.release(state)
        for state in states:
            if state not in self.slot_of:
                self.slot_of[state] = self.free_slots.pop()
                self._admit(state, self.slot_of[state])

    def _admit(self, state: DecodeState, slot: int) -> None:
        raise NotImplementedError

    def _capture_all(self) -> None:
        """Capture every bucket before any request holds a slot (warm-up writes scratch slots)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        shapes = [(B, S) for B in reversed(self.buckets) for S in reversed(self.lengths)]  # largest first
        with torch.cuda.stream(side):
            for B, S in shapes:
                self._step(B, S)  # warm-up: kernels picked and compiled outside the capture
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        for B, S in shapes:  # the largest first, so the smaller ones fit in its memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._step(B, S)
            pool = graph.pool()
            self.graphs[B, S] = (graph, out)
        torch.cuda.synchronize()

    def _replay(self, B: int, need: int) -> torch.Tensor:
        """The step over rows :B, reading enough of the cache to cover entry `need` (the furthest
        one any window touches): a graph replay where one was captured."""
        S = next(length for length in self.lengths if length >= need)
        self.num_steps += 1
        self.last_length = S  # a shorter bucket would scatter keys/values past its slice
        if (B, S) in self.graphs:
            graph, out = self.graphs[B, S]
            graph.replay()
            self.num_replays += 1
            return out
        return self._step(B, S)


class StaticStepRunner(CapturedSteps):
    """Runs the states of requests (by id) through fixed-shape steps; see the module docstring."""

    def __init__(self, model: DiffusionTransformer, max_num_seqs: int, capture: bool, compile_ops: bool | None = None,
                 kernels: KernelOptions = DEFAULT_KERNELS, max_positions: int | None = None,
                 num_pages: int | None = None, prefix_caching: bool = True):
        """capture: CUDA graphs (GPU); compile_ops: torch.compile the step's elementwise chains
        (default: with capture); kernels: the step's kernel choices (`EngineConfig.kernels`);
        max_positions: a sequence's longest length (default: the model's context); num_pages: the
        KV cache pool's pages of `page_size(block)` positions (default: max_num_seqs sequences of
        max_positions); prefix_caching: share the pages of common prompt prefixes."""
        cfg = model.config
        if cfg.attention_mode != "block_causal":
            raise ValueError("fixed-shape steps need a block-causal model (bidirectional models see the whole answer)")
        self.model, self.block, self.capture = model, cfg.block_size, capture
        self.compile_ops = capture if compile_ops is None else compile_ops
        self.kernels = kernels
        self.shift = int(cfg.logits_shift)
        # One-token blocks with shifted logits (autoregressive models): the window is the last
        # committed token alone, final at once, whose logits are the next token's.
        self.one_token = self.block == 1 and self.shift == 1
        self.window = 1 if self.one_token else self.block + self.shift
        self.max_seqs = batch_buckets(max_num_seqs)[-1]
        self.buckets = row_buckets(self.max_seqs * (1 if self.one_token else 2))  # + finalize rows
        positions = max_positions or cfg.max_position_embeddings
        # Whole blocks, so that a window never reaches past its slot's table.
        self._init_pages(model, self.max_seqs, -(-positions // self.block) * self.block, num_pages)
        self.prefix_caching = prefix_caching
        self.num_prefilled = 0  # prompt positions prefilled (shared prefix pages are not)
        self.final_end: dict[DecodeState, int] = {}  # its slot's keys/values are final before this position
        device, W, R = model.device, self.window, self.buckets[-1]
        self.tokens = torch.full((R, W), cfg.pad_token_id, dtype=torch.long, device=device)
        self.positions = scratch_positions(W, device).repeat(R, 1)
        self.limits = torch.zeros(R, dtype=torch.long, device=device)
        self.slots = torch.zeros(R, dtype=torch.long, device=device)
        self.lengths = key_length_buckets(W, self.cache.length)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # num_finalize_rows: rows that recomputed a finished block (pipelined: the candidate rows
        # launched, which the device turns into padding unless their block ended).
        self.num_steps = self.num_replays = self.num_finalize_rows = 0
        self.last_length = self.lengths[0]  # the key-length bucket of the last step
        self.num_ahead = self.num_ahead_used = 0  # steps launched ahead (see `run_ahead`), and those used
        self._layout = None  # the last step's rows (see `run`)
        self.last_logits: torch.Tensor | None = None
        self._ahead: tuple[tuple, torch.Tensor] | None = None  # (what it assumed, its logits)
        pinned = device.type == "cuda"
        self._table = torch.zeros(TABLE_ROWS * R, dtype=torch.long, device=device)  # see `to_device`
        self._tables = [(torch.zeros(TABLE_ROWS * R, dtype=torch.long, pin_memory=pinned),
                         torch.cuda.Event() if pinned else _Done()) for _ in range(4)]
        self._turn = 0
        if capture:
            self._capture_all()

    @staticmethod
    def eligible(state: DecodeState) -> bool:
        """Exact block cache, one segment per step (draft-and-verify runs several)."""
        return state.block_causal and state.cache_mode == "block" and not state.rules.draft_length

    def _step(self, R: int, S: int) -> torch.Tensor:
        # Captured steps keep the logits in the weights' dtype: the commit kernels read them into
        # float32 (no cast kernel in the graph).
        return forward_static(self.model, self.tokens[:R], self.positions[:R], self.limits[:R], self.cache,
                              self.slots[:R], self.block, key_length=S, compile_ops=self.compile_ops,
                              float_logits=not self.capture, kernels=self.kernels,
                              logits_end=self.window + 1 if self.one_token else None)

    def _block_of(self, position: int) -> int:
        """The first position of the model block holding `position`."""
        return position // self.block * self.block

    def _need(self, ends: list[int]) -> int:
        """The furthest cache entry a step reads or writes, for rows whose limits are `ends`."""
        return -(-max(ends) // self.block) * self.block + self.cache.offset

    # -- one step ------------------------------------------------------------------------------
    @staticmethod
    def _inputs(states: list[DecodeState]) -> tuple:
        """What a step launched ahead assumed: these states in this order, at this many commits."""
        return tuple((id(s), s.num_steps_taken) for s in states)

    def run_ahead(self, states: list[DecodeState]) -> None:
        """Launch the next step for these states now: call it after their commits are queued and
        before waiting for them (`DecodeState.advance(defer=True)`), so the device computes the next
        step while the host does this one's bookkeeping. Whether a commit finished its block is
        known only on the device, so the device picks each row's window: the next block's if the
        current one has no mask left, else the current one's (what the host's bookkeeping will
        decide from the same tokens); and each state whose block may have ended gets a finalize
        row, padding unless it did. The next `run` uses the result if its states are the same, in
        the same order, at the same number of commits; otherwise (an answer ended, the batch
        changed) it is dropped. A dropped step wrote only keys/values that the replacing step
        writes again: its windows recomputed from the same tokens."""
        n = len(states)
        self._assign_slots(states)
        pad, mask_id = self.model.config.pad_token_id, self.model.config.mask_token_id
        finalize = [] if self.one_token else [i for i, s in enumerate(states) if s.block_may_be_done()]
        rows = list(range(n)) + finalize
        R = next(b for b in self.buckets if b >= len(rows))
        # A fixed number of device operations whatever the batch size: per row (one host-to-device
        # copy) where its sequence's tokens start in one tensor of every sequence's tokens, their
        # count, the current block, the next block's end (-1 after the last block), its slot and
        # whether it finalizes; then one kernel writes every row's window.
        sizes = [s.tokens.numel() for s in states]
        starts = list(itertools.accumulate([0] + sizes[:-1]))
        after = [s.blocks[s.block + 1][1] if s.block + 1 < len(s.blocks) else -1 for s in states]
        columns = [starts, sizes, [s.start for s in states], [s.end for s in states], after,
                   [self.slot_of[s] for s in states]]
        table = self.to_device([[column[i] for i in rows] for column in columns] + [[0] * n + [1] * len(finalize)])
        flat = states[0].tokens if n == 1 else torch.cat([s.tokens for s in states])
        next_windows(flat, table, self.tokens[:R], self.positions[:R], self.limits[:R], self.slots[:R], self.block,
                     self.shift, mask_id, pad, use_kernel=self.kernels.next_windows)
        self._layout = None  # the next plain `run` rewrites every row
        self.num_finalize_rows += len(finalize)
        self._ahead = (self._inputs(states), self._replay(R, self._need([a if a >= 0 else s.end
                                                                          for s, a in zip(states, after)])))
        self.num_ahead += 1

    def to_device(self, rows: list[list[int]]) -> torch.Tensor:
        """A small table of ints (at most 7 rows of at most the largest row bucket) on the device,
        without a stream sync: a copy from pageable memory would wait for the step in flight,
        undoing the pipelining; from pinned memory it is queued. The copy is of one contiguous
        run (a strided one would be staged through pageable memory). Pinned buffers take turns,
        and a buffer is refilled only after its last copy is done (at up to three calls per step,
        the one before last step's: finished). The result is valid for the work queued before the
        next call."""
        host, done = self._tables[self._turn]
        self._turn = (self._turn + 1) % len(self._tables)
        done.synchronize()
        k, n = len(rows), len(rows[0])
        source = host[:k * n]
        source.copy_(torch.tensor(rows).view(-1))
        table = self._table[:k * n]
        table.copy_(source, non_blocking=True)
        done.record()
        return table.view(k, n)

    def run(self, states: list[DecodeState]) -> list[list[torch.Tensor]]:
        """One step for these states (all eligible): per state, the logits of its current block
        (on a GPU, views of the graph's output: valid until the next step). A state keeps its cache
        slot from step to step (states are keys by identity)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == self._inputs(states):
            self.num_ahead_used += 1
            for state in states:  # the device finalized every block that ended
                self.final_end[state] = self._block_of(state.start)
            return self._current_blocks(ahead[1], states)
        n = len(states)
        self._assign_slots(states)
        bs, W = self.block, self.window
        blocks = [self._block_of(s.start) for s in states]
        # (state, window start, limit) of every row: each state's current block, then the blocks
        # that ended with masks in their last step's keys/values.
        rows = [(s, kb - self.shift, s.end) for s, kb in zip(states, blocks)]
        if not self.one_token:
            rows += [(s, kb - bs - self.shift, kb) for s, kb in zip(states, blocks) if self.final_end[s] < kb]
        R = next(b for b in self.buckets if b >= len(rows))
        layout = (R, tuple((id(s), lo, limit) for s, lo, limit in rows), tuple(s.tokens.numel() for s in states))
        if layout != self._layout:  # a new batch or a new block: positions, limits, slots and padding change
            self._layout, device = layout, self.positions.device
            self.tokens[:R].fill_(self.model.config.pad_token_id)
            self.positions[len(rows):R] = scratch_positions(W, device)
            self.limits[:R] = 0
            self.slots[:R] = 0
            first, ends, slots = self.to_device([[r[1] for r in rows], [r[2] for r in rows],
                                                 [self.slot_of[r[0]] for r in rows]])
            self.positions[:len(rows)] = first[:, None] + torch.arange(W, device=device)
            self.limits[:len(rows)] = ends
            self.slots[:len(rows)] = slots
        # Otherwise only the tokens: one multi-tensor copy for all rows.
        spans = [(max(lo, 0), min(lo + W, s.tokens.numel())) for s, lo, _ in rows]
        torch._foreach_copy_([self.tokens[i, a - lo:b - lo] for i, ((a, b), (_, lo, _)) in enumerate(zip(spans, rows))],
                             [s.tokens[a:b] for (s, _, _), (a, b) in zip(rows, spans)])
        self.num_finalize_rows += len(rows) - n
        out = self._replay(R, self._need([r[2] for r in rows]))
        for state, kb in zip(states, blocks):
            self.final_end[state] = kb
        return self._current_blocks(out, states)

    def _current_blocks(self, out: torch.Tensor, states: list[DecodeState]) -> list[list[torch.Tensor]]:
        """Each row's current block: in the window's model block, from offset start % block_size
        (the answer's first block may start inside a model block)."""
        bs = self.block
        self.last_logits = out  # row i: states[i]'s model block (see `pllm.engine.batched_commit`)
        return [[out[i, s.start % bs:s.start % bs + s.end - s.start]] for i, s in enumerate(states)]

    def release(self, state: DecodeState) -> None:
        super().release(state)
        self.final_end.pop(state, None)

    def _admit(self, state: DecodeState, slot: int) -> None:
        """Pages for the state, and keys/values of every whole block before its first window.
        Pages wholly before any window (`first - shift`) are the shareable prompt prefix: taken from
        the pool's memory where another prompt started alike, else computed and remembered. Prompt
        lengths vary, so no per-shape attention plans (cuDNN's cost far more than they save here)."""
        first, P = self._block_of(state.start), self.page_size
        self.final_end[state] = first
        shareable = max(0, first - self.shift) // P if self.prefix_caching else 0
        keys = prefix_keys(state.tokens[:shareable * P].tolist(), P, shareable) if shareable else []
        shared = self.pool.lookup(keys)
        own = self._give_pages(state, slot, shared)
        start = len(shared) * P
        end = first - self.shift if self.one_token else first  # the one-token window holds the last one
        if end > start:
            positions = torch.arange(start, end, device=self.tokens.device)[None]
            limit = torch.full((1,), end, device=self.tokens.device)  # a fill: no copy that waits for the GPU
            forward_static(self.model, state.tokens[None, start:end], positions, limit, self.cache,
                           slice(slot, slot + 1), 0, fixed_shape=False, kernels=self.kernels)
            self.num_prefilled += end - start
        self.pool.remember(keys[len(shared):], own[:shareable - len(shared)])


class _Done:
    """A CPU stand-in for a CUDA event: CPU copies finish before they return."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass
