"""LoRA adapters (Hu et al. 2021) on a `DiffusionTransformer`, through `peft`.

`apply_lora` puts low-rank adapters on the chosen projections and freezes everything else, so the
optimizer sees only the adapters; `adapter_state_dict` is what a LoRA checkpoint holds; `merge_lora`
folds the adapters into the base weights and gives back a plain model (what serving and export
run: the fixed-shape decoding step reads weights directly).

An adapter folder (`save_adapter`) is peft's layout: adapter_model.safetensors and
adapter_config.json, whose `base_model_name_or_path` names the base (a folder or an MLflow URI);
`load_adapter` loads that base and merges the adapter into it, so an adapter folder works wherever
a model folder does (`pllm.load_model`, `pllm serve --model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from .config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Our projection names: fused q | k | v, the attention output, fused gate | up, and down.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Adapters on every linear layer whose name ends with one of settings.target_modules; only
    they train. Fails naming a target that matches no layer, and the layers there are."""
    _check_targets(model, settings)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


@torch.no_grad()
def init_adapters(model: torch.nn.Module, seed: int) -> list[str]:
    """Give every adapter peft's initial values (A: Kaiming-uniform, B: zeros, so training starts
    at the base model), the same on every rank from `seed`: for adapters allocated uninitialised
    (a model built on the meta device and sharded; a DTensor keeps its own shard). Returns the
    names set."""
    import math

    from torch.distributed.tensor import DTensor, distribute_tensor

    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        full = torch.empty(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            bound = 1 / math.sqrt(full.shape[1])  # kaiming_uniform_(a=sqrt(5)), what nn.Linear and peft use
            full.uniform_(-bound, bound, generator=generator)
        else:
            full.zero_()
        if isinstance(param, DTensor):  # every rank holds the full tensor: no communication
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(full)
        else:
            param.copy_(full)
        names.append(name)
    return names


def _check_targets(model: torch.nn.Module, settings: LoraSettings) -> None:
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in settings.target_modules if t not in linear]
    if missing:
        raise ValueError(f"training.lora.target_modules: {missing} match no linear layer of the model; "
                         f"its linear layers are {sorted(linear)}")


def check_lora_targets(config, settings: LoraSettings) -> None:
    """The job's check before any worker starts: every target names a linear layer of a model of
    `config` (a ModelConfig; built on the meta device, nothing allocated)."""
    from .model import DiffusionTransformer

    with torch.device("meta"):
        _check_targets(DiffusionTransformer(config), settings)


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (what a LoRA checkpoint saves)."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (W + scale * B @ A) and put the plain layer back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(model: torch.nn.Module, path: str | Path, settings: LoraSettings, base: str) -> Path:
    """The adapters alone, in peft's folder layout, with `base` (where the base model lives) recorded."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model).items()}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": settings.rank,
              "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": list(settings.target_modules), "bias": "none"}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> tuple[str, LoraSettings]:
    """(the base model's location, the adapter's settings) of an adapter folder."""
    file = Path(path) / ADAPTER_CONFIG
    config = json.loads(file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or not config.get("base_model_name_or_path"):
        raise ValueError(f"{file}: a LoRA adapter config with base_model_name_or_path is needed, got "
                         f"peft_type={config.get('peft_type')!r}, base={config.get('base_model_name_or_path')!r}")
    settings = LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                            dropout=float(config.get("lora_dropout", 0.0)),
                            target_modules=tuple(config["target_modules"]))
    return config["base_model_name_or_path"], settings


def load_adapter(path: str | Path, base_model: torch.nn.Module) -> torch.nn.Module:
    """`base_model` with the adapter folder's adapters merged in."""
    _, settings = adapter_base(path)
    model = apply_lora(base_model, settings)
    weights = load_file(str(Path(path) / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{Path(path) / ADAPTER_WEIGHTS}: does not fit the base model ({len(missing)} adapter tensors "
                         f"missing, unexpected: {list(result.unexpected_keys)[:3]})")
    return merge_lora(model).eval()
