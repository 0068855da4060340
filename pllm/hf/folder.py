"""A Hugging Face checkpoint folder on disk: config.json, safetensors weights (one file, or shards
with their index), generation_config.json. Every problem is reported as a `CheckpointError` that
names the file and the field, before any tensor is read.

Weights are only ever read from safetensors: pickle-based `.bin` / `.pt` files are refused, never
unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION = "generation_config.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be imported; the message names the file and the field."""


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint folder has a {path.name})")
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class CheckpointFolder:
    """Where each tensor of a checkpoint lives, and its shape and dtype (from the safetensors headers)."""

    path: Path
    config: dict[str, Any]
    generation: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> the file holding it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "CheckpointFolder":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (a Hugging Face checkpoint is a folder with {CONFIG})")
        folder = cls(path, read_json(path / CONFIG), read_json(path / GENERATION, required=False))
        folder._index_weights()
        return folder

    def _index_weights(self) -> None:
        index_file, single = self.path / INDEX, self.path / SINGLE
        if index_file.exists():
            weight_map = read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_file}: field 'weight_map' is missing or empty")
            for name, shard in weight_map.items():
                shard_path = self.path / str(shard)
                if not shard_path.exists():
                    raise CheckpointError(f"{index_file}: weight_map names shard {shard!r} (for tensor {name!r}), "
                                          f"which is not in {self.path}")
                self.files[name] = shard_path
        elif single.exists():
            self.files = dict.fromkeys(self._tensor_names(single), single)
        else:
            pickled = sorted(p.name for p in self.path.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
            hint = (f"; found {pickled}: pickle-based weights are never loaded (they can run code): "
                    "convert them to safetensors first") if pickled else ""
            raise CheckpointError(f"{self.path}: no weights: neither {SINGLE} nor {INDEX}{hint}")
        for shard in sorted(set(self.files.values())):
            with safe_open(str(shard), framework="pt") as f:
                names = set(f.keys())
                for name in names:
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
            listed = {n for n, p in self.files.items() if p == shard}
            absent = sorted(listed - names)
            if absent:
                raise CheckpointError(f"{self.path / INDEX}: tensor {absent[0]!r} is listed in {shard.name}, "
                                      f"which does not hold it")

    @staticmethod
    def _tensor_names(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # a truncated or foreign file: safetensors' own message
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None

    def tensors(self, names: list[str], device: torch.device, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each named tensor, read from its shard straight to `device` in `dtype`: one shard open at
        a time, no copy of the whole model on the host."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        # safetensors reads onto a CUDA device directly; elsewhere it reads to host memory.
        target = str(device) if device.type == "cuda" else "cpu"
        for shard, shard_names in by_file.items():
            with safe_open(str(shard), framework="pt", device=target) as f:
                for name in shard_names:
                    tensor = f.get_tensor(name)
                    yield name, tensor.to(device=device, dtype=dtype or tensor.dtype)
