"""The Llama layout (`model.layers.N.self_attn.q_proj`, ...) and the families that use it: the
autoregressive bases Llama, Qwen2 and Qwen3, and the dLLMs adapted from them: Dream (Qwen2.5,
bidirectional, shifted logits), Fast-dLLM v2 (Qwen2.5, block diffusion with `bd_size`, shifted
logits) and SDAR (Qwen3, block diffusion with `block_size`, logits at their own position).

Autoregressive bases import as causal models (block-causal with one-token blocks) whose logits are
shifted: position i's logits predict token i from position i-1, exactly the next-token head, so
the imported model reproduces the base and diffusion training can start from it.
"""

from __future__ import annotations

from typing import Any

from .families import Family, expect, require

# our unfused name (after "layers.N.") -> the layout's (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}


def weight_name(ours: str) -> str:
    if ours in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[ours]
    _, index, rest = ours.split(".", 2)
    if rest.startswith("attn.") and rest not in _LAYER_NAMES:  # q/k/v/o projections and their biases
        return f"model.layers.{index}.self_attn.{rest.removeprefix('attn.')}"
    return f"model.layers.{index}.{_LAYER_NAMES[rest]}"


def _common(config: dict[str, Any], family: str) -> dict[str, Any]:
    expect(config, "hidden_act", ("silu",), family, default="silu")
    expect(config, "mlp_bias", (False,), family, default=False)
    expect(config, "use_sliding_window", (False,), family, default=False)
    heads = require(config, "num_attention_heads", family)
    fields = dict(
        vocab_size=require(config, "vocab_size", family), hidden_size=require(config, "hidden_size", family),
        num_hidden_layers=require(config, "num_hidden_layers", family), num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        intermediate_size=require(config, "intermediate_size", family),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        rope_theta=float(config.get("rope_theta", 10000.0)), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), qk_norm=False,
        initializer_range=float(config.get("initializer_range", 0.02)),
    )
    if config.get("head_dim"):
        fields["head_dim"] = int(config["head_dim"])
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        expect({"rope_scaling.rope_type": kind}, "rope_scaling.rope_type", ("linear", "llama3", "default"), family)
        if kind != "default":
            fields["rope_scaling"] = {k: v for k, v in {**scaling, "rope_type": kind}.items()
                                      if k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    return fields


def _ar(fields: dict[str, Any]) -> dict[str, Any]:
    return fields | dict(attention_mode="block_causal", block_size=1, logits_shift=True)


def llama_fields(config: dict[str, Any]) -> dict[str, Any]:
    bias = bool(config.get("attention_bias", False))
    return _ar(_common(config, "llama") | dict(attention_bias=bias, attention_out_bias=bias))


def qwen2_fields(config: dict[str, Any], family: str = "qwen2") -> dict[str, Any]:
    # Qwen2 always has q/k/v biases and none on the output projection.
    return _common(config, family) | dict(attention_bias=True, attention_out_bias=False)


def qwen3_fields(config: dict[str, Any], family: str = "qwen3") -> dict[str, Any]:
    bias = bool(config.get("attention_bias", False))
    return _common(config, family) | dict(qk_norm=True, attention_bias=bias, attention_out_bias=bias)


def qwen2_ar_fields(config: dict[str, Any]) -> dict[str, Any]:
    return _ar(qwen2_fields(config))


def qwen3_ar_fields(config: dict[str, Any]) -> dict[str, Any]:
    return _ar(qwen3_fields(config))


def dream_fields(config: dict[str, Any]) -> dict[str, Any]:
    return qwen2_fields(config, "dream") | dict(attention_mode="bidirectional", logits_shift=True)


def fast_dllm_v2_fields(config: dict[str, Any]) -> dict[str, Any]:
    return qwen2_fields(config, "fast_dllm_v2") | dict(attention_mode="block_causal", logits_shift=True,
                                                       block_size=int(config.get("bd_size", 32)))


def sdar_fields(config: dict[str, Any]) -> dict[str, Any]:
    return qwen3_fields(config, "sdar") | dict(attention_mode="block_causal", logits_shift=False,
                                               block_size=int(config.get("block_size", 4)))


FAMILIES = [
    Family("dream", ("DreamModel",), ("Dream",), dream_fields, weight_name, diffusion=True, mask_token="<|mask|>",
           description="Dream 7B: Qwen2.5 layout, bidirectional, shifted logits"),
    Family("fast_dllm_v2", ("Fast_dLLM_QwenForCausalLM",), ("Fast_dLLM_Qwen",), fast_dllm_v2_fields, weight_name,
           diffusion=True, mask_token="|<MASK>|", description="Fast-dLLM v2: Qwen2.5 layout, block diffusion"),
    Family("sdar", ("SDARForCausalLM",), ("sdar",), sdar_fields, weight_name, diffusion=True, mask_token="<|MASK|>",
           description="SDAR: Qwen3 layout, block diffusion"),
    Family("llama", ("LlamaForCausalLM",), ("llama",), llama_fields, weight_name, diffusion=False),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), qwen2_ar_fields, weight_name, diffusion=False),
    Family("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qwen3_ar_fields, weight_name, diffusion=False),
]
