"""Weights into L2 while the decoding step's attention runs: `prefetch_during`.

At batch 1 the step's attention reads a few hundred KB of keys and values, so HBM sits nearly idle
for its few microseconds, and the matmul after it (o_proj, 8 MB at the ~1.1B shape) is a weight
read bound by each load's latency. `prefetch_during(weight)` forks a side stream that issues
`prefetch.global.L2::evict_last` for every 128-byte line of the weight while the main stream runs
the attention, and joins it before the matmul: inside a CUDA graph, a parallel branch. The matmul
then reads from L2. The prefetch writes nothing, so results are the same bit for bit; it only runs
while a CUDA graph is being captured (where the step's time is set) and Triton is present.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .backend import HAS_TRITON

USE_PREFETCH = True  # False: no side branch (A/B in benchmarks/profile_step.py)
LINE_BYTES = 128
LINES_PER_PROGRAM = 1024


def prefetches(weight: torch.Tensor) -> bool:
    """Whether `prefetch_during(weight)` forks: CUDA weights with Triton, while a graph is captured."""
    return (USE_PREFETCH and HAS_TRITON and weight.is_cuda and weight.is_contiguous()
            and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def prefetch_during(weight: torch.Tensor):
    """Run the body on the current stream while a side stream prefetches `weight` into L2; on exit
    the current stream waits for the prefetch (so what follows reads the weight from L2)."""
    if not prefetches(weight):
        yield
        return
    main, side = torch.cuda.current_stream(), _side_stream(weight.device)
    side.wait_stream(main)  # start after what is queued: the matmul before it reads HBM at full rate
    with torch.cuda.stream(side):
        prefetch_l2(weight)
    yield
    main.wait_stream(side)


def prefetch_l2(tensor: torch.Tensor) -> None:
    """Issue L2 prefetches for every line of a contiguous CUDA tensor (no-op elsewhere)."""
    if not (HAS_TRITON and tensor.is_cuda and tensor.is_contiguous()) or tensor.numel() == 0:
        return
    per_line = max(LINE_BYTES // tensor.element_size(), 1)
    lines = -(-tensor.numel() // per_line)
    _prefetch_kernel[(triton.cdiv(lines, LINES_PER_PROGRAM),)](tensor, tensor.numel(), per_line,
                                                               LINES=LINES_PER_PROGRAM, num_warps=4)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _prefetch_kernel(ptr, numel, per_line, LINES: tl.constexpr):
        line = tl.program_id(0) * LINES + tl.arange(0, LINES)
        offsets = tl.minimum(line.to(tl.int64) * per_line, numel - 1)
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n mov.u32 $0, 0;", "=r,l",
                                  [ptr + offsets], dtype=tl.int32, is_pure=False, pack=1)
