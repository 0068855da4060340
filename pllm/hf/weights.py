"""Our parameters under their unfused names, and moving tensors between those names and a model.

`DiffusionTransformer` keeps q | k | v and gate | up as fused matrices; checkpoints in every
published layout keep them apart. `unfused_shapes` is the one list of what a model of a config holds
under separate names; importing fuses the parts as they stream in, exporting splits them again.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..config import ModelConfig
from ..model import DiffusionTransformer

# fused parameter -> its parts, rows stacked in this order
FUSED = {"attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def unfused_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model of this config, under our unfused names."""
    d, hd, inter, vocab = cfg.hidden_size, cfg.attention_head_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, d), "norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {p + "attn_norm.weight": (d,), p + "attn.q_proj.weight": (q, d), p + "attn.k_proj.weight": (kv, d),
                   p + "attn.v_proj.weight": (kv, d), p + "attn.o_proj.weight": (d, q), p + "mlp_norm.weight": (d,),
                   p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                   p + "mlp.down_proj.weight": (d, inter)}
        if cfg.attention_bias:
            shapes |= {p + "attn.q_proj.bias": (q,), p + "attn.k_proj.bias": (kv,), p + "attn.v_proj.bias": (kv,)}
        if cfg.attention_out_bias:
            shapes[p + "attn.o_proj.bias"] = (d,)
        if cfg.qk_norm:
            shapes |= {p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,)}
    return shapes


def _fused_name(name: str) -> tuple[str, int, int] | None:
    """(fused parameter name, index of this part, number of parts) for a part's name."""
    for fused, parts in FUSED.items():
        for j, part in enumerate(parts):
            if f".{part}." in f".{name}":
                return name.replace(part, fused), j, len(parts)
    return None


def fused_parts(names: Iterable[str]) -> dict[str, list[str]]:
    """Our parameter name -> the unfused names whose rows it stacks, in row order; a name that is no
    part of a fused parameter maps to itself alone."""
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        fused = _fused_name(name)
        target, j = (name, 0) if fused is None else fused[:2]
        groups.setdefault(target, {})[j] = name
    return {target: [parts[j] for j in sorted(parts)] for target, parts in groups.items()}


def build_model(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device) -> DiffusionTransformer:
    """A model of `cfg` whose parameters are exactly `tensors` (our names, fused or unfused): built
    on the meta device (no random init, no float32 copy), each fused matrix concatenated once all
    its parts have arrived, then assigned; returned in eval mode. The names and shapes must be the
    model's (`unfused_shapes` for checkpoints in a published layout)."""
    with torch.device("meta"):
        model = DiffusionTransformer(cfg)
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors:
        fused = _fused_name(name)
        if fused is None:
            state[name] = tensor
            continue
        target, j, n = fused
        parts = pending.setdefault(target, {})
        parts[j] = tensor
        if len(parts) == n:
            state[target] = torch.cat([parts[k] for k in range(n)])
            del pending[target]
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:  # assigning replaced the shared parameter: share it again
        model.lm_head.weight = model.embed_tokens.weight
    model.set_rotary_buffers(device)
    return model.eval()


def unfused_state(model: DiffusionTransformer) -> dict[str, torch.Tensor]:
    """The model's tensors under our unfused names (views of the fused matrices, split by rows)."""
    shapes = unfused_shapes(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    parts: dict[str, list[str]] = {}  # fused parameter -> its parts' names, in row order
    for name in shapes:
        fused = _fused_name(name)
        if fused is not None:
            parts.setdefault(fused[0], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for name in shapes:
        if _fused_name(name) is None:
            out[name] = params[name].detach()
    for target, names in parts.items():
        for name, piece in zip(names, params[target].detach().split([shapes[n][0] for n in names])):
            out[name] = piece
    return out
