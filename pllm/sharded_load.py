"""Each rank reads, straight from the safetensors files, only the rows of each parameter its shard holds.

Why: starting FSDP2 from a checkpoint by sending a full state dict from rank 0 needs the whole model
in host memory there (an 8B model in float32 is 32 GB). Here every rank reads about 1/W of the
checkpoint, one tensor slice at a time, into its own shards: peak host memory is about one slice.

The folder is our own (config.json + model.safetensors, our fused names) or a Hugging Face checkpoint
(`pllm.hf.plan_import` maps its names to ours; a fused q | k | v or gate | up matrix is read part by
part, only the rows of each part that this rank's shard covers).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .hf import CheckpointError, CheckpointFolder, is_hf_checkpoint, plan_import
from .hf.weights import fused_parts, unfused_shapes

# Name segments that wrappers add to a parameter's name: peft's LoRA layer, torch.compile, activation checkpointing.
_WRAPPER_SEGMENTS = ("base_layer.", "_orig_mod.", "_checkpoint_wrapped_module.")


@dataclass
class ShardedLoad:
    loaded: list[str]  # model parameter names filled from the checkpoint
    missing: list[str]  # model parameter names the checkpoint does not hold (e.g. LoRA adapters), left untouched
    bytes_read: int  # bytes this rank read from the files


@dataclass
class _Part:
    tensor: str  # the checkpoint's tensor name
    shape: tuple[int, ...] | None  # the shape the model expects of it (None: the whole parameter's)


def load_local_shards(model: torch.nn.Module, folder: str | Path) -> ShardedLoad:
    """Fill each parameter of `model` (FSDP2 DTensors or plain tensors, already allocated) with its
    local rows of the checkpoint in `folder`, converting dtype and device. Every name and shape is
    checked before a tensor is read: a shape that differs, or a checkpoint tensor with no place in the
    model, raises `CheckpointError` naming the file and the tensor."""
    ckpt, sources = _sources(model, Path(folder))
    names_of: dict[int, list[str]] = {}  # a tied parameter has several names: any of them may be in the file
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)

    plan: list[tuple[str, torch.Tensor, list[_Part]]] = []
    missing: list[str] = []
    for name, param in model.named_parameters():
        ours = next((n for n in map(_our_name, names_of[id(param)]) if n in sources), None)
        if ours is None:
            missing.append(name)
            continue
        parts = sources.pop(ours)
        _check_shapes(ckpt, name, tuple(param.shape), parts)
        plan.append((name, param, parts))
    if sources:
        tensor = sources[min(sources)][0].tensor
        raise CheckpointError(f"{ckpt.files[tensor]}: tensor {tensor!r} ({len(sources)} unexpected in all) has no "
                              f"place in the model")

    bytes_read = 0
    with ExitStack() as stack, torch.no_grad():
        handles: dict[Path, Any] = {}  # each file opened once for the whole load
        for name, param, parts in plan:
            for file in {ckpt.files[p.tensor] for p in parts} - handles.keys():
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            bytes_read += _fill(name, param, parts, ckpt, handles)
    return ShardedLoad([name for name, _, _ in plan], missing, bytes_read)


def _sources(model: torch.nn.Module, folder: Path) -> tuple[CheckpointFolder, dict[str, list[_Part]]]:
    """The checkpoint's index, and for each of our parameter names the checkpoint tensors whose rows
    it stacks, in order."""
    if is_hf_checkpoint(folder):
        plan = plan_import(folder)
        hf_of = {ours: hf for hf, ours in plan.names.items()}  # our unfused name -> the checkpoint's
        expected = unfused_shapes(model.config)
        return plan.folder, {target: [_Part(hf_of[p], expected.get(p)) for p in parts]
                             for target, parts in fused_parts(hf_of).items()}
    ckpt = CheckpointFolder.open(folder)  # our own folder: the file holds our (fused) names
    return ckpt, {name: [_Part(name, None)] for name in ckpt.shapes}


def _our_name(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _check_shapes(ckpt: CheckpointFolder, name: str, shape: tuple[int, ...], parts: list[_Part]) -> None:
    for part in parts:
        want = part.shape or shape
        if ckpt.shapes[part.tensor] != want:
            raise CheckpointError(f"{ckpt.files[part.tensor]}: tensor {part.tensor!r} has shape "
                                  f"{list(ckpt.shapes[part.tensor])} but the model's {name!r} expects {list(want)}")
    stacked = [ckpt.shapes[p.tensor] for p in parts]
    if sum(s[0] for s in stacked) != shape[0] or any(s[1:] != shape[1:] for s in stacked):
        raise CheckpointError(f"{ckpt.files[parts[0].tensor]}: tensors {[p.tensor for p in parts]} of shapes "
                              f"{[list(s) for s in stacked]} do not stack to the model's {name!r} {list(shape)}")


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """This rank's tensor of the parameter, its shape, and where it starts in the whole parameter."""
    if not isinstance(param, DTensor):  # unsharded: all of it
        return param, tuple(param.shape), (0,) * param.dim()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"local shard of shape {list(local.shape)}, its placements {param.placements} imply "
                           f"{list(shape)}")
    return local, tuple(shape), tuple(offset)


def _fill(name: str, param: torch.Tensor, parts: list[_Part], ckpt: CheckpointFolder, handles: dict) -> int:
    """Copy the rows [r0, r1) of the parameter that this rank holds, from each part they intersect;
    the bytes read."""
    local, shape, offset = _local_region(param)
    if local.is_meta:
        raise ValueError(f"{name}: on the meta device; allocate the model first (to_empty)")
    r0, r1 = offset[0], offset[0] + shape[0]
    rest = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))  # other dims, if sharded too
    read, p0 = 0, 0
    for part in parts:
        p1 = p0 + ckpt.shapes[part.tensor][0]
        a, b = max(r0, p0), min(r1, p1)
        if a < b:
            piece = handles[ckpt.files[part.tensor]].get_slice(part.tensor)[(slice(a - p0, b - p0),) + rest]
            local[a - r0 : b - r0].copy_(piece)  # casts dtype and moves to the parameter's device
            read += piece.numel() * piece.element_size()
        p0 = p1
    return read
