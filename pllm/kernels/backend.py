"""When a Triton kernel runs: on CUDA tensors with Triton importable. Elsewhere (CPU, no Triton) each
kernel's PyTorch reference implementation runs, and tests compare the two on the GPU."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

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


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one Triton program may use on this GPU (None: no limit, e.g. the
    interpreter). Tile choices check their footprint against it instead of failing to launch."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block
