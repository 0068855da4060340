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
    """Preallocated keys/values for a fixed number of sequence slots, for fixed-shape decoding steps
    that CUDA graphs can replay (`pllm.engine.cuda_graphs`). `keys_values` is (layers, 2, kv_heads,
    slots, offset + max_positions, head_dim): keys beside values, so a step stores both with one
    kernel (`pllm.kernels.rotate_into_cache`), and every slot's entries of one head laid end to end,
    so a step addresses any slot by a flat entry index (`entries`): rows of a step need not sit in
    consecutive slots, and two rows may share one (a block finalised beside the next one's step).
    Position p of a slot lives at index p + offset; the first `offset` indices are scratch for
    window positions before 0, which no query ever reads."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_positions: int, head_dim: int,
                 offset: int, dtype: torch.dtype, device):
        shape = (num_layers, 2, kv_heads, num_slots, offset + max_positions, head_dim)
        self.keys_values = torch.zeros(shape, dtype=dtype, device=device)
        self.offset, self.num_slots = offset, num_slots

    @property
    def length(self) -> int:
        """Entries of one slot (scratch + positions)."""
        return self.keys_values.shape[4]

    def entries(self, slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Flat entry (over slots x length) of slot index `index` (B, W) in each row's slot (B,)."""
        return slots[:, None] * self.length + index

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots src[i] -> dst[i] (all reads before any write, so the lists may overlap)."""
        s, d = torch.tensor(src, device=self.keys_values.device), torch.tensor(dst, device=self.keys_values.device)
        self.keys_values[:, :, :, d] = self.keys_values[:, :, :, s]


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
        self.entries = self.cache.entries(self.slots, self.index)  # (B, W) flat entries
