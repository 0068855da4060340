"""LoRA adapters (Hu et al. 2021) on a `DiffusionTransformer`, through `peft`.

`apply_lora` puts low-rank adapters on the chosen projections and freezes everything else, so the
optimizer sees only the adapters; `adapter_state_dict` is what a LoRA checkpoint holds; `merge_lora`
folds the adapters into the base weights and gives back a plain model (what serving and export
run: the fixed-shape decoding step reads weights directly).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from .config import LoraSettings

# Our projection names: fused q | k | v, the attention output, fused gate | up, and down.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Adapters on every linear layer whose name ends with one of settings.target_modules; only
    they train. Fails naming a target that matches no layer, and the layers there are."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in settings.target_modules if t not in linear]
    if missing:
        raise ValueError(f"training.lora.target_modules: {missing} match no linear layer of the model; "
                         f"its linear layers are {sorted(linear)}")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


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
