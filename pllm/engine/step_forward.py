"""The fixed-shape decoding step's forward pass, as functions over a `DiffusionTransformer`'s modules.

Every row of the step is a window of consecutive positions over its slot of a `StaticKVCache`:
the window's keys and values are written into the slot, and each query reads the slot's keys up
to the row's limit under the block-causal rule. The shapes depend only on the batch bucket and
the key-length bucket, so the pass can be captured as a CUDA graph (`cuda_graphs.py`). The model
itself (`pllm.model`) holds only the math it shares with training; this module adds the step's
own path: attention into the cache, the skinny GEMMs where they were measured faster, and the
elementwise chains compiled once for all shapes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pllm.kernels import add_rms_norm, fused_attention, rotate_into_cache, silu_mul
from pllm.kernels.options import DEFAULT_KERNELS, KernelOptions
from pllm.kernels.skinny_gemm import step_linear, step_linear_add_norm, step_silu_mul_linear
from pllm.kernels.step_bias import step_bias
from ..kv_cache import StaticKVCache, StaticStep
from ..model import Attention, Block, DiffusionTransformer
from ..quantization import QuantizedLinear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    h = x + y
    return h, _rms_norm(h, weight, eps)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@functools.cache
def compiled_elementwise(fn):
    """`fn` compiled once for all shapes: the step's chains of small elementwise kernels (residual
    add + RMSNorm, SiLU * up) become one kernel each."""
    return torch.compile(fn, dynamic=True)


def new_static_cache(model: DiffusionTransformer, num_slots: int, max_positions: int | None = None,
                     page_size: int | None = None, num_pages: int | None = None) -> StaticKVCache:
    """Slots of `max_positions` (default: the model's context) for `forward_static`; at least a
    block and one entry of scratch before position 0 (a padding row's window: `scratch_positions`).
    page_size / num_pages: see `StaticKVCache` (default: one page per slot, every slot allocated)."""
    cfg = model.config
    return StaticKVCache(cfg.num_hidden_layers, num_slots, cfg.kv_heads, max_positions or cfg.max_position_embeddings,
                         cfg.attention_head_size, cfg.block_size + 1, model.embed_tokens.weight.dtype, model.device,
                         page_size, num_pages)


def scratch_positions(window: int, device=None) -> torch.Tensor:
    """A padding row's window: positions -window .. -1, whose keys/values land in scratch entries
    (windows are at most a block and one position)."""
    return torch.arange(-window, 0, device=device)


def step_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: StaticStep,
                   kernels: KernelOptions) -> torch.Tensor:
    """The step's attention up to o_proj, (B, L, heads * head_dim): QK-norm and rotary, the window's
    keys and values into each row's slot (one kernel on the GPU: `rotate_into_cache`); then
    attention over the row's slot's first key_length entries under the step's bias."""
    B, L, _ = x.shape
    layer = step.cache.keys_values[attn.layer_idx]  # (2, KV, pages, page_size, hd)
    q_weight, k_weight = (getattr(n, "weight", None) for n in (attn.q_norm, attn.k_norm))
    eps = attn.q_norm.eps if q_weight is not None else 0.0
    q = rotate_into_cache(attn.qkv_proj(x), attn.n_heads, attn.n_kv, q_weight, k_weight, eps, cos, sin,
                          layer.flatten(2, 3)[None], step.entries)
    pages = layer.transpose(1, 2)  # (2, pages, KV, page_size, hd), read in place through the page tables
    y = fused_attention(q, pages[0], pages[1], mask=step.mask, use_flash=attn.use_flash,
                        fixed_shape=step.fixed_shape, kernels=kernels,
                        kv_pages=step.tables)  # (B, H, L, hd) view of (B, L, H, hd)
    return y.transpose(1, 2).reshape(B, L, -1)


def linear(proj: nn.Module, x: torch.Tensor, kernels: KernelOptions) -> torch.Tensor:
    """A projection in the step: a quantized one runs its own kernel (`QuantizedLinear`), a float
    one the skinny kernel where measured faster (`step_linear`)."""
    if isinstance(proj, QuantizedLinear):
        return proj(x)
    return step_linear(x, proj.weight, kernels, proj.bias)


def linear_add_norm(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: nn.RMSNorm, add_norm,
                    kernels: KernelOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + proj(x), norm of it): `step_linear_add_norm`, or the quantized kernel and add_norm."""
    if isinstance(proj, QuantizedLinear):
        return add_norm(residual, proj(x), norm.weight, norm.eps)
    return step_linear_add_norm(x, proj.weight, residual, norm.weight, norm.eps, add_norm, kernels, proj.bias)


def silu_mul_linear(proj: nn.Module, x: torch.Tensor, silu_mul, kernels: KernelOptions) -> torch.Tensor:
    """silu(gate) * up of the fused gate | up projection."""
    if isinstance(proj, QuantizedLinear):
        return silu_mul(*proj(x).chunk(2, dim=-1))
    return step_silu_mul_linear(x, proj.weight, silu_mul, kernels)


def compiled_block_step(block: Block, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        step: StaticStep, next_norm: nn.RMSNorm, kernels: KernelOptions):
    """`Block.forward` for the step with compiled elementwise kernels: h = attn_norm(x) comes in, and
    (output, next_norm(output)) go out, so every residual add runs fused with the norm that follows
    it (the next block's attention norm, or the final norm)."""
    add_norm = compiled_elementwise(_add_rms_norm)
    attn, mlp = block.attn, block.mlp
    x, h = linear_add_norm(attn.o_proj, step_attention(attn, h, cos, sin, step, kernels), x, block.mlp_norm,
                           add_norm, kernels)
    act = silu_mul_linear(mlp.gate_up_proj, h, compiled_elementwise(_silu_mul), kernels)
    return linear_add_norm(mlp.down_proj, act, x, next_norm, add_norm, kernels)


def eager_block_step(block: Block, x: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor,
                     sin: torch.Tensor, step: StaticStep, kernels: KernelOptions):
    """`Block.forward` with the step's attention: (x, this block's MLP output, not yet added)."""
    norm, mlp_norm = block.attn_norm, block.mlp_norm
    if pending is None:
        h = norm(x)
    else:
        x, h = add_rms_norm(x, pending, norm.weight, norm.eps, kernels.add_rms_norm)
    attn = block.attn
    y = linear(attn.o_proj, step_attention(attn, h, cos, sin, step, kernels), kernels)
    x, h = add_rms_norm(x, y, mlp_norm.weight, mlp_norm.eps, kernels.add_rms_norm)
    return x, block.mlp.down_proj(silu_mul(block.mlp.gate_up_proj(h), kernels.silu_mul))


@torch.no_grad()
def forward_static(model: DiffusionTransformer, tokens: torch.Tensor, positions: torch.Tensor, limits: torch.Tensor,
                   cache: StaticKVCache, slots: torch.Tensor | slice, num_logits: int, key_length: int | None = None,
                   compile_ops: bool = False, fixed_shape: bool = True, float_logits: bool = True,
                   kernels: KernelOptions = DEFAULT_KERNELS, visible_block: int | None = None,
                   logits_end: int | None = None) -> torch.Tensor:
    """A fixed-shape block-causal pass over cache slots: tokens and positions (B, W) (a window
    of consecutive positions per row; positions below 0 are padding), slots (B,) each row's cache
    slot (rows may share one) or a slice of consecutive slots, limits (B,) the first position
    no query may see. Keys/values of the window are written into the slots, and each query reads
    its slot's keys at positions < limit in blocks up to its own, among the first `key_length`
    cache entries (default: all; must cover every window). Returns the logits of the last
    `num_logits` window positions, (B, num_logits, V), in float32 (float_logits=False: the weights'
    dtype, for consumers that upcast as they read them). compile_ops: the elementwise chains as
    torch.compile'd kernels (GPU; `compiled_elementwise`). fixed_shape=False for one-off shapes (a
    prompt's prefill): no attention kernel that plans per shape. kernels: the step's kernel choices.
    visible_block: the block size of the visibility rule (default the model's; bidirectional models'
    dual-cache steps pass one block spanning every position). logits_end: the window index after
    the last position whose logits are returned (default: the window's end; with logits_shift it
    may be W + 1: the position after the window, whose logits its last position gives)."""
    cfg = model.config
    S = key_length or cache.length
    x = model.embed_tokens(tokens)
    # An additive bias built once for all layers (a bool mask is converted in every call).
    bias = step_bias(positions, limits, S, cache.offset, visible_block or cfg.block_size, x.dtype,
                     use_kernel=kernels.step_bias)
    if isinstance(slots, slice):
        slots = torch.arange(slots.start or 0, slots.stop, device=tokens.device)
    step = StaticStep(cache, slots, positions + cache.offset, bias, S, fixed_shape)
    rope_at = positions.clamp(min=0)
    cos, sin = model.rope_cos[rope_at], model.rope_sin[rope_at]  # (B, W, hd)
    next_norms = [b.attn_norm for b in model.layers[1:]] + [model.norm]
    if compile_ops:
        first = model.layers[0].attn_norm
        h = compiled_elementwise(_rms_norm)(x, first.weight, first.eps)
        for block, next_norm in zip(model.layers, next_norms):
            x, h = compiled_block_step(block, x, h, cos, sin, step, next_norm, kernels)
    else:
        pending = None
        for block in model.layers:
            x, pending = eager_block_step(block, x, pending, cos, sin, step, kernels)
        x = x if pending is None else x + pending
    if num_logits == 0:
        return x.new_empty(x.shape[0], 0, cfg.vocab_size, dtype=torch.float32)
    # logits_shift: each position's logits from the position before it (inside the window: the
    # window's earlier block holds the position before the current block).
    last = (logits_end or x.shape[1]) - int(cfg.logits_shift)
    if last < num_logits:
        raise ValueError(f"logits_shift needs a window longer than the {num_logits} positions whose logits it returns")
    logits = model.lm_head(h[:, last - num_logits:last] if compile_ops else model.norm(x[:, last - num_logits:last]))
    return logits.float() if float_logits else logits
