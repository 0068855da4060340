"""LLaDA (`LLaDAModelLM`, model_type `llada`: LLaDA-8B-Base/Instruct, LLaDA 1.5): an OLMo-style
layout (`model.transformer.blocks.N.q_proj`, `attn_out`, `ff_proj` = gate, `up_proj`, `ff_out` =
down) with OLMo config keys (d_model, n_heads, ...). Bidirectional, logits at their own position,
no QK-norm, rotate-half rotary. Only the options the published checkpoints use are accepted; the
others (ALiBi, logit scaling, layer-norm variants) are refused with the field named.
"""

from __future__ import annotations

from typing import Any

from .families import Family, expect, require

_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ff_norm.weight",
    "attn.q_proj.weight": "q_proj.weight", "attn.k_proj.weight": "k_proj.weight", "attn.v_proj.weight": "v_proj.weight",
    "attn.q_proj.bias": "q_proj.bias", "attn.k_proj.bias": "k_proj.bias", "attn.v_proj.bias": "v_proj.bias",
    "attn.o_proj.weight": "attn_out.weight", "attn.o_proj.bias": "attn_out.bias",
    "mlp.gate_proj.weight": "ff_proj.weight", "mlp.up_proj.weight": "up_proj.weight", "mlp.down_proj.weight": "ff_out.weight",
}
_GLOBAL_NAMES = {"embed_tokens.weight": "model.transformer.wte.weight", "norm.weight": "model.transformer.ln_f.weight",
                 "lm_head.weight": "model.transformer.ff_out.weight"}


def weight_name(ours: str) -> str:
    if ours in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[ours]
    _, index, rest = ours.split(".", 2)
    return f"model.transformer.blocks.{index}.{_LAYER_NAMES[rest]}"


def model_fields(config: dict[str, Any]) -> dict[str, Any]:
    for key, allowed, default in [("block_type", ("llama",), None), ("activation_type", ("silu",), None),
                                  ("layer_norm_type", ("rms",), None), ("rope", (True,), False),
                                  ("alibi", (False,), False), ("scale_logits", (False,), False),
                                  ("input_emb_norm", (False,), False), ("attention_layer_norm", (False,), False),
                                  ("include_bias", (False,), False), ("block_group_size", (1,), 1),
                                  ("layer_norm_with_affine", (True,), True), ("bias_for_layer_norm", (False, None), None)]:
        expect(config, key, allowed, "llada", default)
    d, heads = require(config, "d_model", "llada"), require(config, "n_heads", "llada")
    return dict(
        vocab_size=config.get("embedding_size") or require(config, "vocab_size", "llada"),
        hidden_size=d, num_hidden_layers=require(config, "n_layers", "llada"), num_attention_heads=heads,
        num_key_value_heads=config.get("n_kv_heads") or heads,
        intermediate_size=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d,
        max_position_embeddings=config.get("max_sequence_length", 4096),
        rope_theta=float(config.get("rope_theta", 10000.0)), rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(config.get("weight_tying", True)), qk_norm=False,
        attention_bias=bool(config.get("include_qkv_bias", False)), attention_out_bias=False,
        attention_mode="bidirectional", logits_shift=False, initializer_range=float(config.get("init_std", 0.02)),
    )


LLADA = Family("llada", ("LLaDAModelLM",), ("llada",), model_fields, weight_name, diffusion=True,
               mask_token="<|mdm_mask|>", description="LLaDA 8B / LLaDA 1.5: bidirectional")
