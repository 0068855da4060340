"""Export a pllm model as a Hugging Face folder in the Llama, Qwen2 or Qwen3 layout.

The layout follows the model's features: QK-norm -> Qwen3; q/k/v biases without an output bias ->
Qwen2; otherwise Llama. `transformers` loads the folder with that class (as a causal LM: our
attention mode is not something its classes know), and our own `ModelConfig` travels under the
config's "pllm" key so that `import_checkpoint` rebuilds the model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model import DiffusionTransformer
from ..tokenizer import Tokenizer
from . import llama_layout
from .folder import CONFIG, GENERATION, INDEX, CheckpointError
from .weights import unfused_state


def layout_of(cfg: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the transformers class that computes this model's layers."""
    if cfg.qk_norm and cfg.attention_bias == cfg.attention_out_bias:
        return "Qwen3ForCausalLM", "qwen3"
    if not cfg.qk_norm and cfg.attention_bias and not cfg.attention_out_bias and cfg.head_dim in (None, cfg.hidden_size // cfg.num_attention_heads):
        return "Qwen2ForCausalLM", "qwen2"
    if not cfg.qk_norm and cfg.attention_bias == cfg.attention_out_bias:
        return "LlamaForCausalLM", "llama"
    raise CheckpointError(f"no transformers layout has qk_norm={cfg.qk_norm}, attention_bias={cfg.attention_bias}, "
                          f"attention_out_bias={cfg.attention_out_bias}")


def hf_config(cfg: ModelConfig) -> dict:
    architecture, model_type = layout_of(cfg)
    out = {
        "architectures": [architecture], "model_type": model_type, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.attention_head_size,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling.to_dict() if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "mask_token_id": cfg.mask_token_id, "torch_dtype": str(cfg.dtype).removeprefix("torch."),
        "pllm": cfg.to_dict(),
    }
    if model_type != "qwen2":
        out["attention_bias"] = cfg.attention_bias
    return out


def export_checkpoint(model: DiffusionTransformer, path: str | Path, tokenizer: Tokenizer | None = None,
                      max_shard_size: str | int = "5GB") -> Path:
    """Write config.json, generation_config.json, the weights as safetensors (sharded with an index
    past max_shard_size) and the tokenizer files. The weights keep the model's dtype."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = hf_config(cfg)
    state = {llama_layout.weight_name(name): t.contiguous() for name, t in unfused_state(model).items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(path / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (path / INDEX).write_text(json.dumps(index, indent=2))
    else:
        (path / INDEX).unlink(missing_ok=True)
    (path / CONFIG).write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.stop_ids), "pad_token_id": cfg.pad_token_id}
    (path / GENERATION).write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save(path)
    return path
