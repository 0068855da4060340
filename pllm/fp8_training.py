"""FP8 training (`TrainingConfig.mixed_precision="fp8"` or `ModelConfig.use_fp8`): the transformer
blocks' projections become torchao `Float8Linear` layers, whose matmuls cast inputs, weights and
gradients to float8 with dynamic scales (tensorwise or rowwise) and run on the FP8 tensor cores;
everything else (embedding, attention, norms, the LM head, the loss) runs in bf16 as under
mixed_precision="bf16". Master weights, gradients and optimizer state stay float32, so checkpoints
are the bf16 run's.

Conversion happens before the strategy wraps the model (FSDP2 shards the float8 layers as it
shards any linear layer). GPUs need compute capability 8.9 (Ada, Hopper) or newer; on CPU the
float8 matmuls are emulated (the same casts and scales, no speed-up), so configs and tests run
anywhere. torchao's float8 kernels want torch.compile for their speed: without it the casts run
as separate kernels.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

import torch
from torch import nn

from .quantization import PROJECTIONS

log = logging.getLogger(__name__)
RECIPES = ("tensorwise", "rowwise")


def check_fp8_training(device: torch.device) -> None:
    """A clear error, before any work, where FP8 training cannot run."""
    try:
        importlib.import_module("torchao.float8")
    except ImportError as err:
        raise ValueError("mixed_precision='fp8' needs torchao (pip install torchao)") from err
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"mixed_precision='fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: train with mixed_precision='bf16'")


def convert_to_fp8_training(model: nn.Module, device: torch.device, recipe: str = "tensorwise") -> int:
    """Swap the blocks' projections (`pllm.quantization.PROJECTIONS`) for torchao Float8Linear
    layers, in place; returns how many were converted. Dimensions must be multiples of 16 (the FP8
    GEMM's rule): layers that are not keep their precision."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8_recipe must be one of {RECIPES}, got {recipe!r}")
    check_fp8_training(device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if device.type != "cuda":
        config = dataclasses.replace(config, emulate=True)
    converted = []

    def wanted(module: nn.Module, name: str) -> bool:
        ok = (type(module) is nn.Linear and name.rsplit(".", 1)[-1] in PROJECTIONS
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            converted.append(name)
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=wanted)
    if not converted:
        raise ValueError("mixed_precision='fp8': no projection has dimensions in multiples of 16 to train in float8")
    log.info("fp8 training (%s scaling%s): %d projections in float8", recipe,
             "" if device.type == "cuda" else ", emulated on CPU", len(converted))
    return len(converted)
