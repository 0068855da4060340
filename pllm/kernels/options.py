"""`KernelOptions`: which kernel runs where, and with which tiles, as one typed, frozen object.

Every choice here has a default that was measured to be the faster one on the GPUs we run
(benchmarks/RESULTS.md); the other values exist for the benchmarks' A/B runs, which build options
objects instead of changing module state. Training takes them from `TrainingConfig.kernels` (the
strategy hands them to the model), serving from `EngineConfig.kernels` (the engine's fixed-shape step).
On CPU, without Triton, every kernel's PyTorch definition runs whatever the options say.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

# (N, K, split, gated) of a weight -> the skinny kernel's (block_n, block_k, stages[, warps]): the
# shapes of the ~1.1B model where the kernel beat cuBLAS inside the step's CUDA graph
# (`benchmarks/decode_kernels.py`; figures in benchmarks/RESULTS.md). Other shapes stay on cuBLAS.
GemmTiles = tuple[tuple[tuple[int, int, int, bool], tuple[int, ...]], ...]
SplitTiles = tuple[tuple[tuple[int, int], tuple[int, ...]], ...]

GEMM_TILES: GemmTiles = (
    ((11264, 2048, 1, True), (64, 128, 3)),  # gate | up, with silu(gate) * up in the epilogue
    ((2048, 2048, 1, False), (16, 256, 4)),  # o_proj, unsplit
    ((2048, 5632, 1, False), (16, 256, 4)),  # down_proj, unsplit
)

# (N, K) -> (block_n, block_k, stages, split[, warps]) for the projections whose float32 partial
# sums over K slices go straight into the add + RMSNorm after them: wide tiles split over K read
# each K slice of the activations once per block_n weight rows instead of once per 16.
SPLIT_TILES: SplitTiles = (
    ((2048, 2048), (32, 128, 4, 2)),  # o_proj
    ((2048, 5632), (32, 256, 4, 2)),  # down_proj
)

@dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class KernelOptions:
    """True: our Triton kernel (on CUDA tensors); False: the PyTorch definition (the A/B baseline)."""

    # The model's forward (training, evaluation, the packed decoding pass).
    silu_mul: bool = True  # SwiGLU's silu(gate) * up, forward and backward
    rotate_qkv: bool = True  # split, QK-norm and rotary of the fused QKV projection
    add_rms_norm: bool = True  # residual add + RMSNorm, forward and backward
    # Inductor's coordinate-descent search over its own kernels' block sizes (compile time only).
    coordinate_descent_tuning: bool = True

    # The fixed-shape decoding step (`pllm.engine.step_forward`).
    skinny_gemm: bool = True  # the skinny GEMMs for the shapes in gemm_tiles / split_tiles (False: cuBLAS)
    gemm_tiles: GemmTiles = GEMM_TILES
    split_tiles: SplitTiles = SPLIT_TILES
    bias_attention: bool = True  # the masked step attention on `bias_attention` (False: cuDNN / SDPA)
    attention_fill_sms: bool = True  # smaller query tiles while the programs leave SMs idle (False: always 64)
    attention_split_keys: bool = True  # split long keys across programs at small batch (flash-decoding)
    # Few queries per row at large batch (the AR step): a key/value head's query heads in one program
    # (`bias_attention.groups_few_queries`; chosen by traffic, not yet measured against the plain kernel).
    attention_group_heads: bool = True
    # The plain attention kernel's (keys per iteration, stages, warps) and queries per program;
    # None: chosen by query tile (`bias_attention.plain_config`, `query_tile`).
    attention_tile: Optional[tuple[int, int, int]] = None
    attention_block_m: Optional[Annotated[int, Field(gt=0)]] = None
    step_bias: bool = True  # the step's additive attention bias in one kernel
    next_windows: bool = True  # a step launched ahead picks its rows' windows in one kernel
    commit_in_place: bool = True  # a greedy commit as one selection kernel that writes the block

    def gemm_tile(self, n: int, k: int, split: int, gated: bool) -> tuple[int, ...] | None:
        return dict(self.gemm_tiles).get((n, k, split, gated))

    def split_tile(self, n: int, k: int) -> tuple[int, ...] | None:
        return dict(self.split_tiles).get((n, k))

    def replace(self, **changes) -> "KernelOptions":
        return dataclasses.replace(self, **changes)


DEFAULT_KERNELS = KernelOptions()
