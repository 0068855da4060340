"""Weight-only quantization of a model's projections: int8 and fp8 (e4m3) per output channel, int4 in
groups of 128 along the input (two values a byte), each with its float scales.

`quantize_model(model, precision)` swaps the transformer blocks' projections (fused QKV, output,
fused gate | up, down) for `QuantizedLinear` modules, in place, as a function applied to an
unchanged model (gpt-fast's `quantize.py`). Activations stay in the model's dtype: a quantized
projection widens its weight in registers as it multiplies (`pllm.kernels.quantized_gemm`, on the
GPU; elsewhere `dequantize` and a matmul, the reference the kernel is tested against). The
embedding, norms and the LM head keep their precision.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .kernels.quantized_gemm import dequantize, quantized_linear

__all__ = ["PRECISIONS", "check_fp8_support", "check_quantizable", "QuantizedLinear", "dequantize", "is_quantized", "quantize_model", "quantize_weight",
           "quantization_config"]

Precision = Literal["int8", "fp8", "int4"]
PRECISIONS = ("int8", "fp8", "int4")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INT4_GROUP = 128
FP8_MAX = 448.0  # the largest float8 e4m3 (fn) value


def check_precision(precision: str, group_size: int = INT4_GROUP) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int4" and (group_size < 2 or group_size % 2):
        raise ValueError(f"int4 group_size must be an even number of inputs, got {group_size}")


def check_quantizable(config, precision: str, where: str = "the model") -> None:
    """A `ModelConfig` whose projections `quantize_model` can quantize at this precision (checked
    before any weight is read): int4's groups must divide every projection's input size."""
    check_precision(precision)
    if precision == "int4":
        for name, size in [("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                           ("attention heads x head size", config.num_attention_heads * config.attention_head_size)]:
            if size % INT4_GROUP:
                raise ValueError(f"{where}: int4 quantizes inputs in groups of {INT4_GROUP}; {name} is {size}")


def quantize_weight(weight: torch.Tensor, precision: Precision,
                    group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (quantized weight, float32 scales). int8 / fp8: scales (N, 1), one per
    output channel (its largest magnitude maps to 127 / 448); int4: values in [-8, 7] packed two a
    byte, (N, K // 2) uint8, and scales (N, K // group_size), one per group of inputs."""
    check_precision(precision, group_size)
    w = weight.detach().float()
    if precision == "int4":
        N, K = w.shape
        if K % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide the input size {K}")
        groups = w.view(N, K // group_size, group_size)
        scale = (groups.abs().amax(-1) / 7).clamp(min=1e-12)  # (N, G)
        q = torch.clamp(torch.round(groups / scale[..., None]), -8, 7).to(torch.int8).view(N, K) + 8  # 0..15
        return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), scale
    top = 127.0 if precision == "int8" else FP8_MAX
    scale = (w.abs().amax(-1, keepdim=True) / top).clamp(min=1e-12)
    if precision == "int8":
        return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8), scale
    return (w / scale).to(torch.float8_e4m3fn), scale


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(weight).T + bias, with the weight stored quantized (buffers `qweight`,
    `scale`; `bias` in the model's dtype)."""

    def __init__(self, linear: nn.Linear, precision: Precision, group_size: int = INT4_GROUP):
        super().__init__()
        self.precision, self.in_features, self.out_features = precision, linear.in_features, linear.out_features
        qweight, scale = quantize_weight(linear.weight, precision, group_size)
        self.group_size = group_size if precision == "int4" else None
        self.register_buffer("qweight", qweight.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dtype = linear.weight.dtype

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()` and the like set the dtype the projection computes in and move its
        quantized weight and scales without casting them (a cast would turn fp8 weights into 16-bit
        ones and round the float32 scales); device moves apply to all."""
        qweight, scale = self._buffers.pop("qweight"), self._buffers.pop("scale")
        probe = fn(torch.empty(0, dtype=self.dtype, device=qweight.device))
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["qweight"], self._buffers["scale"] = qweight.to(probe.device), scale.to(probe.device)
        self.dtype = probe.dtype
        return self

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.precision, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.qweight, self.scale, self.precision,
                                None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, precision={self.precision}, bias={self.bias is not None}"


def quantize_model(model: nn.Module, precision: Precision = "int8", modules: tuple[str, ...] = PROJECTIONS,
                   group_size: int = INT4_GROUP) -> nn.Module:
    """Replace the projections named in `modules` (every `nn.Linear` whose attribute name is one of
    them) with `QuantizedLinear` modules of this precision, in place; returns the model. group_size:
    int4's inputs per scale. Every target is checked before any is replaced."""
    check_precision(precision, group_size)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if name in modules and type(child) is nn.Linear]
    if not targets:
        raise ValueError(f"quantize_model: no nn.Linear named {list(modules)} in the model")
    if precision == "int4":
        for _, name, child in targets:
            if child.in_features % group_size:
                raise ValueError(f"int4 group_size {group_size} does not divide {name}'s input size {child.in_features}")
    if precision == "fp8":
        check_fp8_support(next(iter(targets))[2].weight.device)
    while targets:  # each float weight is freed as its replacement is made (peak: one layer's, not the model's)
        parent, name, child = targets.pop()
        setattr(parent, name, QuantizedLinear(child, precision, group_size))
        del child
    return model


def check_fp8_support(device: torch.device) -> None:
    """fp8 weights are widened in registers by instructions GPUs have from compute capability 8.9
    (Ada, Hopper) on; elsewhere on a GPU the kernel cannot compile (the CPU reference always runs)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use int8 instead")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantization_config(model: nn.Module) -> dict | None:
    """The `quantization` section a saved model's config.json carries (None: not quantized)."""
    layers = [(name.rsplit(".", 1)[-1], m.precision) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    precisions = {p for _, p in layers}
    if len(precisions) > 1:
        raise ValueError(f"a saved model takes one quantization precision, this one has {sorted(precisions)}")
    groups = {m.group_size for m in model.modules() if isinstance(m, QuantizedLinear)}
    return {"precision": precisions.pop(), "modules": sorted({n for n, _ in layers}),
            "int4_group_size": groups.pop() if len(groups) == 1 and None not in groups else INT4_GROUP}

