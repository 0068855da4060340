"""Weight-only quantization of a model's projections: int8 and fp8 (e4m3) per output channel, int4 in
groups of 128 along the input (two values a byte), each with its float scales.

`quantize_model(model, precision)` swaps the transformer blocks' projections (fused QKV, output,
fused gate | up, down) for `QuantizedLinear` modules, in place, as a function applied to an
unchanged model (gpt-fast's `quantize.py`). Activations stay in the model's dtype: a quantized
projection dequantizes its weight and multiplies (`dequantize` is the reference every faster kernel
is tested against). The embedding, norms and the LM head keep their precision.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRECISIONS", "QuantizedLinear", "dequantize", "is_quantized", "quantize_model", "quantize_weight",
           "quantization_config", "to_dtype"]

Precision = Literal["int8", "fp8", "int4"]
PRECISIONS = ("int8", "fp8", "int4")
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INT4_GROUP = 128
FP8_MAX = 448.0  # the largest float8 e4m3 (fn) value


def quantize_weight(weight: torch.Tensor, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (quantized weight, float32 scales). int8 / fp8: scales (N, 1), one per
    output channel (its largest magnitude maps to 127 / 448); int4: values in [-8, 7] packed two a
    byte, (N, K // 2) uint8, and scales (N, K // 128), one per group of 128 inputs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    w = weight.detach().float()
    if precision == "int4":
        N, K = w.shape
        if K % INT4_GROUP:
            raise ValueError(f"int4 needs input sizes in whole groups of {INT4_GROUP}, got {K}")
        groups = w.view(N, K // INT4_GROUP, INT4_GROUP)
        scale = (groups.abs().amax(-1) / 7).clamp(min=1e-12)  # (N, G)
        q = torch.clamp(torch.round(groups / scale[..., None]), -8, 7).to(torch.int8).view(N, K) + 8  # 0..15
        return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8), scale
    top = 127.0 if precision == "int8" else FP8_MAX
    scale = (w.abs().amax(-1, keepdim=True) / top).clamp(min=1e-12)
    if precision == "int8":
        return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8), scale
    return (w / scale).to(torch.float8_e4m3fn), scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, precision: Precision,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float (N, K) weight a quantized one stands for (the reference of every quantized matmul)."""
    if precision == "int4":
        low, high = (qweight & 0xF).to(torch.int8) - 8, (qweight >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=-1).view(qweight.shape[0], -1).float()  # (N, K)
        return (q.view(q.shape[0], scale.shape[1], -1) * scale[..., None]).view_as(q).to(dtype)
    return (qweight.float() * scale).to(dtype)


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(weight).T + bias, with the weight stored quantized (buffers `qweight`,
    `scale`; `bias` in the model's dtype)."""

    def __init__(self, linear: nn.Linear, precision: Precision):
        super().__init__()
        self.precision, self.in_features, self.out_features = precision, linear.in_features, linear.out_features
        qweight, scale = quantize_weight(linear.weight, precision)
        self.register_buffer("qweight", qweight.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.dtype = linear.weight.dtype

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.precision, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, precision={self.precision}, bias={self.bias is not None}"


def quantize_model(model: nn.Module, precision: Precision = "int8",
                   modules: tuple[str, ...] = PROJECTIONS) -> nn.Module:
    """Replace the projections named in `modules` (every `nn.Linear` whose attribute name is one of
    them) with `QuantizedLinear` modules of this precision, in place; returns the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if name in modules and type(child) is nn.Linear]
    if not targets:
        raise ValueError(f"quantize_model: no nn.Linear named {list(modules)} in the model")
    for parent, name, child in targets:
        setattr(parent, name, QuantizedLinear(child, precision))
    return model


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
    return {"precision": precisions.pop(), "modules": sorted({n for n, _ in layers}), "int4_group_size": INT4_GROUP}


def to_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` that leaves quantized weights and their scales as they are (a plain cast
    would turn fp8 weights back into 16-bit ones); quantized projections then compute in dtype."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.dtype = dtype
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return model
