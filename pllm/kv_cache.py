"""Per-sequence key/value cache and the description of one sequence in a packed forward pass.

A `Segment` says which positions of a sequence to run through the model (`compute`), which logits
to return, which cached keys/values stand in for the positions not computed, and which freshly
computed keys/values to keep for later steps (`store`). Three uses:

- exact block cache (block-causal models, BD3-LM / Fast-dLLM v2): finished blocks never see later
  blocks, so their keys/values are final; a step computes only the uncached tail (the block that
  just finished, if any, plus the current block) and stores the finished part.
- prefix cache (bidirectional models, Fast-dLLM sec. 3.2, approximate): the first step of a block
  runs the whole sequence and stores the prefix; later steps of the block compute block + suffix.
- dual cache (same, approximate): the first step stores every position; later steps compute only
  the current block and read both prefix and suffix from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Keys/values of positions 0..length-1 of one sequence, per layer, (kv_heads, length, head_dim)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def around(self, layer: int, start: int, end: int, k: torch.Tensor, v: torch.Tensor):
        """Keys/values of the whole visible sequence: cached [0, start), fresh (k, v) for
        [start, end), cached [end, length). k, v: (kv_heads, end - start, head_dim)."""
        ck, cv = self.keys[layer], self.values[layer]
        if ck is None:
            return k, v
        return torch.cat([ck[:, :start], k, ck[:, end:]], 1), torch.cat([cv[:, :start], v, cv[:, end:]], 1)

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, span: tuple[int, int]) -> None:
        """Keep cached [0, span[0]) and the fresh keys/values of span (k, v start at `start`);
        everything after span[1] is dropped."""
        s, e = span
        ck, cv = self.keys[layer], self.values[layer]
        fresh_k, fresh_v = k[:, s - start:e - start], v[:, s - start:e - start]
        if ck is None or s == 0:
            self.keys[layer], self.values[layer] = fresh_k.clone(), fresh_v.clone()
        else:
            self.keys[layer] = torch.cat([ck[:, :s], fresh_k], 1)
            self.values[layer] = torch.cat([cv[:, :s], fresh_v], 1)


@dataclass
class Segment:
    """One sequence in a packed forward pass.

    tokens: the whole sequence (1-D); logit_positions: positions (in the sequence) whose logits are
    returned; compute: the span of positions run through the model (default: all); cache: keys and
    values for the positions outside `compute` (required when compute does not cover everything the
    computed positions may attend to); store: the span whose fresh keys/values replace the cache's
    after this pass (within `compute`).
    """

    tokens: torch.Tensor
    logit_positions: torch.Tensor
    compute: tuple[int, int] | None = None
    cache: KVCache | None = None
    store: tuple[int, int] | None = None

    def span(self) -> tuple[int, int]:
        return self.compute if self.compute is not None else (0, int(self.tokens.numel()))

    def visible_length(self) -> int:
        """Positions 0..n-1 whose keys the computed queries read (cached or fresh)."""
        start, end = self.span()
        return max(end, self.cache.length if self.cache is not None else 0)


class StaticKVCache:
    """Keys/values for fixed-shape decoding steps that CUDA graphs can replay
    (`pllm.engine.cuda_graphs`), in pages of `page_size` entries from one preallocated pool:
    `keys_values` is (layers, 2, kv_heads, num_pages, page_size, head_dim), keys beside values, so
    a step stores both with one kernel (`pllm.kernels.rotate_into_cache`). Each of `num_slots`
    sequence slots has a page table row (`page_tables`, on the device): entry e of the slot
    (position e - offset) lives in page page_tables[slot, e // page_size]. The first `offset`
    entries of every slot are scratch for window positions before 0, which no query but their own
    reads: every table starts with the scratch pages, and columns no page was given point at one.
    By default slot s holds its own run of pages (a static allocation); a page allocator
    (`pllm.engine.page_pool`) may give slots pages for their length only and share prefix pages."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_positions: int, head_dim: int,
                 offset: int, dtype: torch.dtype, device, page_size: int | None = None, num_pages: int | None = None):
        """offset: scratch entries needed before position 0 (rounded up to whole pages); page_size
        (default: offset, one scratch page); num_pages: pages for sequences, the scratch pages
        come on top (default: every slot at max_positions)."""
        P = page_size or offset
        self.page_size = P
        self.scratch_pages = -(-offset // P)
        self.offset = self.scratch_pages * P
        self.pages_per_slot = self.scratch_pages + -(-max_positions // P)
        self.num_slots = num_slots
        static = self.scratch_pages + num_slots * (self.pages_per_slot - self.scratch_pages)
        self.num_pages = self.scratch_pages + num_pages if num_pages else static
        shape = (num_layers, 2, kv_heads, self.num_pages, P, head_dim)
        self.keys_values = torch.zeros(shape, dtype=dtype, device=device)
        self.page_tables = torch.zeros(num_slots, self.pages_per_slot, dtype=torch.long, device=device)
        if self.num_pages >= static:  # slot s: the scratch pages, then its own run
            own = self.pages_per_slot - self.scratch_pages
            self.page_tables[:, :self.scratch_pages] = torch.arange(self.scratch_pages, device=device)
            self.page_tables[:, self.scratch_pages:] = (self.scratch_pages + own * torch.arange(num_slots, device=device)[:, None]
                                                        + torch.arange(own, device=device))

    @property
    def length(self) -> int:
        """Entries of one slot (scratch + positions)."""
        return self.pages_per_slot * self.page_size

    def entries(self, tables: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Pool entry (over pages x page_size) of slot entries `index` (B, W) for rows with page
        tables `tables` (B, pages_per_slot)."""
        return tables.gather(1, index // self.page_size) * self.page_size + index % self.page_size

    def set_pages(self, slot: int, pages: list[int]) -> None:
        """Give a slot these pages (after the scratch ones); the rest of its row points at scratch."""
        row = list(range(self.scratch_pages)) + pages
        row += [0] * (self.pages_per_slot - len(row))
        self.page_tables[slot] = torch.tensor(row, device=self.page_tables.device)


@dataclass
class StaticStep:
    """A fixed-shape pass of B rows over a StaticKVCache: each row computes a window of W
    consecutive positions, writes their keys/values into its slot, and reads keys [0, limit) of
    its slot under the block-causal rule (plus itself, so padding rows never see nothing), among
    the slot's first key_length entries (shorter contexts read less)."""

    cache: StaticKVCache
    slots: torch.Tensor  # (B,) the slot of each row
    index: torch.Tensor  # (B, W) slot entry of each window position (its keys and values go there)
    mask: torch.Tensor  # (B, 1, W, key_length) additive bias (0 or -inf)
    key_length: int  # cache entries the step reads (a prefix of the slot)
    fixed_shape: bool = True  # shapes that recur (see `pllm.kernels.fused_attention`)

    def __post_init__(self):
        self.tables = self.cache.page_tables[self.slots]  # (B, pages_per_slot), gathered once for all layers
        self.entries = self.cache.entries(self.tables, self.index)  # (B, W) pool entries
