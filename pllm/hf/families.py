"""Model families: how a published config.json and weight names map onto `ModelConfig` and our
parameter names. A family is a mapping, not a model class: every family runs as one
`DiffusionTransformer`. Layout-specific details live in `llama_layout.py` (Llama, Qwen2, Qwen3 and
the dLLMs built on them: Dream, Fast-dLLM v2, SDAR) and `llada.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .folder import CONFIG, CheckpointError


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    # config.json -> ModelConfig fields other than the special token ids
    model_fields: Callable[[dict[str, Any]], dict[str, Any]]
    # a ModelConfig's unfused parameter names -> this layout's names (`weights.unfused_shapes`)
    weight_name: Callable[[str], str]
    diffusion: bool  # a masked-diffusion model: its tokenizer must have the mask token
    mask_token: str | None = None  # the mask token's text, where config.json has no mask_token_id
    description: str = ""


# Families that share a name with a supported one but need layers we do not have yet.
UNSUPPORTED = {
    "LLaDAMoEModelLM": "LLaDA-MoE (mixture of experts)", "LLaDA2MoeModelLM": "LLaDA 2.x (mixture of experts)",
    "lladamoe": "LLaDA-MoE (mixture of experts)", "llada2_moe": "LLaDA 2.x (mixture of experts)",
    "llada21_moe": "LLaDA 2.1 (mixture of experts)", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE",
    "sdar_moe": "SDAR MoE", "mixtral": "Mixtral",
}


def registry() -> list[Family]:
    from . import llada, llama_layout

    return [llada.LLADA, *llama_layout.FAMILIES]


def family_of(config: dict[str, Any], path) -> Family:
    """The family a config.json belongs to: by `architectures` first (some MoE checkpoints reuse a
    dense family's model_type), then by `model_type`."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    families = registry()
    unsupported = next((UNSUPPORTED[k] for k in [*architectures, model_type] if k in UNSUPPORTED), None)
    if unsupported is None:
        for family in families:
            if set(architectures) & set(family.architectures) or model_type in family.model_types:
                return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.architectures)}, model_type {'/'.join(f.model_types)})"
                          for f in families)
    note = f" ({unsupported} is not supported yet)" if unsupported else ""
    raise CheckpointError(f"{path}/{CONFIG}: architectures {architectures} / model_type {model_type!r} is not a "
                          f"supported family{note}; supported: {supported}")


def require(config: dict[str, Any], key: str, family: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{CONFIG}: field {key!r} is missing (needed for {family})")
    return config[key]


def expect(config: dict[str, Any], key: str, allowed: tuple, family: str, default: Any = None) -> None:
    """Refuse a config whose `key` selects something our model does not compute."""
    value = config.get(key, default)
    if value not in allowed:
        raise CheckpointError(f"{CONFIG}: field {key!r} = {value!r} is not supported for {family} "
                              f"(supported: {list(allowed)})")
