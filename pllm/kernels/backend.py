"""When a Triton kernel runs: on CUDA tensors with Triton importable. Elsewhere (CPU, no Triton) each
kernel's PyTorch reference implementation runs, and tests compare the two on the GPU."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors (or anywhere under TRITON_INTERPRET=1, Triton's CPU interpreter)."""
    if not HAS_TRITON:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return all(t.is_cuda for t in tensors)


# Programmatic dependent launch for the decoding step's Triton kernels. Off by default: on an H200
# it made the batch-1 step's graph slower (1.43 against 1.29 ms unfused; RESULTS.md).
USE_PDL = False


def pdl(tensor: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: on Hopper and later a kernel's programs may start
    while the previous kernel drains (prefetching weights, say) and wait in `gdc_wait` before they
    read anything an earlier kernel wrote. Not under the interpreter, which has no such launch."""
    if not USE_PDL or not tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _capability(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


if HAS_TRITON:

    @triton.jit
    def await_previous_kernel():
        """A PDL-launched kernel's first step before it reads an earlier kernel's output: wait for
        that kernel, then let the next kernel's programs launch."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
