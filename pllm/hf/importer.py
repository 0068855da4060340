"""Import a Hugging Face checkpoint folder: family, ModelConfig, special tokens, weights, tokenizer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ..config import ModelConfig
from ..model import DiffusionTransformer
from ..tokenizer import TOKENIZER_FILE, Tokenizer, read_tokenizer_config, token_string
from .families import Family, family_of
from .folder import CONFIG, CheckpointError, CheckpointFolder
from .weights import build_model, unfused_shapes

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that hold nothing the model needs (recomputed rotary tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# End-of-turn tokens of the chat templates these families use: answers stop there too.
_TURN_ENDS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")
MASK_TOKEN = "<|mask|>"  # added to an autoregressive base's tokenizer when it has none


def is_hf_checkpoint(path: str | Path) -> bool:
    """A folder whose config.json is a Hugging Face one (it names a model_type or architectures)."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


@dataclass
class ImportPlan:
    """Everything known about a checkpoint before its tensors are read."""

    folder: CheckpointFolder
    family: Family
    config: ModelConfig
    tokenizer: Tokenizer | None
    names: dict[str, str]  # the checkpoint's tensor name -> our unfused name


def plan_import(path: str | Path, **overrides: Any) -> ImportPlan:
    """Read and check a checkpoint folder without reading its tensors: family, ModelConfig, special
    ids, tokenizer, and every tensor's presence and shape. Raises `CheckpointError` naming the file
    and the field."""
    path = Path(path)
    folder = CheckpointFolder.open(path)
    family = family_of(folder.config, path)
    exported_by_us = isinstance(folder.config.get("pllm"), dict)
    # Our own exports carry every special id in config.json: the tokenizer is optional there.
    hf_tokenizer = None if exported_by_us and not (path / TOKENIZER_FILE).exists() else _read_tokenizer(path)
    tok_config = read_tokenizer_config(path)
    cfg = model_config(folder, family, hf_tokenizer, tok_config, overrides)
    names = {family.weight_name(ours): ours for ours in unfused_shapes(cfg)}
    _check_weights(folder, family, cfg, names)
    tokenizer = None if hf_tokenizer is None else Tokenizer(
        hf_tokenizer, chat_template=tok_config.get("chat_template"),
        special_token_ids={k: getattr(cfg, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")},
        token_strings={k: v for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                       if (v := token_string(tok_config, k)) is not None})
    return ImportPlan(folder, family, cfg, tokenizer, names)


def import_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      **overrides: Any) -> tuple[DiffusionTransformer, Tokenizer | None]:
    """The model and tokenizer of a Hugging Face checkpoint folder. dtype: default float32 on CPU,
    the checkpoint's dtype (ModelConfig.dtype) elsewhere. overrides: ModelConfig fields to change
    (attention_mode, max_position_embeddings, mask_token_id, ...). Every check runs before a tensor
    is read (`plan_import`); tensors stream from their shards straight to `device` in `dtype`. The
    tokenizer is None only for a folder we exported without one."""
    plan, device = plan_import(path, **overrides), torch.device(device)
    cfg = plan.config
    dtype = dtype or (cfg.dtype if device.type != "cpu" else torch.float32)
    log.info("importing %s (%s) from %s: %d tensors to %s in %s", plan.family.name, cfg.attention_mode, path,
             len(plan.names), device, dtype)
    tensors = ((plan.names[hf], t) for hf, t in plan.folder.tensors(list(plan.names), device, dtype))
    return build_model(cfg, tensors, device), plan.tokenizer


def model_config(folder: CheckpointFolder, family: Family, hf_tokenizer: HFTokenizer | None, tok_config: dict,
                 overrides: dict[str, Any]) -> ModelConfig:
    config = folder.config
    if isinstance(config.get("pllm"), dict):  # exported by us: our own config, exactly
        fields = dict(config["pllm"])
    else:
        fields = family.model_fields(_with_rope_parameters(config))
        fields |= _special_ids(folder, family, hf_tokenizer, tok_config, overrides.get("mask_token_id"))
        dtype = config.get("torch_dtype", config.get("dtype"))
        if dtype in ("float32", "bfloat16", "float16"):
            fields["dtype"] = dtype
    fields |= overrides
    try:
        return ModelConfig.from_dict(fields)
    except ValidationError as exc:
        raise CheckpointError(f"{folder.path / CONFIG}: gives an invalid model configuration: {exc}") from None


def _with_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes rotary settings as `rope_parameters`; older files as rope_theta / rope_scaling."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return config
    out = dict(config)
    out.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", rope)
    return out


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _special_ids(folder: CheckpointFolder, family: Family, hf: HFTokenizer, tok_config: dict,
                 mask_override: int | None) -> dict[str, Any]:
    config, generation, path = folder.config, folder.generation, folder.path

    def token_id(key: str) -> int | None:
        text = token_string(tok_config, key)
        return hf.token_to_id(text) if text is not None else None

    eos_ids = _ids(config.get("eos_token_id")) or _ids(generation.get("eos_token_id")) or _ids(token_id("eos_token"))
    if not eos_ids:
        raise CheckpointError(f"{path / CONFIG}: no eos_token_id (nor in generation_config.json or tokenizer_config.json)")
    eos = eos_ids[0]
    turn_ends = [i for t in _TURN_ENDS if (i := hf.token_to_id(t)) is not None]
    stops = [i for i in dict.fromkeys(eos_ids[1:] + _ids(generation.get("eos_token_id")) + turn_ends) if i != eos]
    pad = (_ids(config.get("pad_token_id")) or _ids(generation.get("pad_token_id")) or _ids(token_id("pad_token"))
           or [eos])[0]
    bos = (_ids(config.get("bos_token_id")) or _ids(generation.get("bos_token_id")) or _ids(token_id("bos_token"))
           or [eos])[0]
    mask = mask_override if mask_override is not None else _mask_id(family, config, hf, tok_config, path)
    return dict(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos, mask_token_id=mask,
                stop_token_ids=[i for i in stops if i != mask])


def _mask_id(family: Family, config: dict, hf: HFTokenizer, tok_config: dict, path: Path) -> int:
    if isinstance(config.get("mask_token_id"), int):
        mask = config["mask_token_id"]
        if hf.id_to_token(mask) is None and family.diffusion:
            raise CheckpointError(f"{path / TOKENIZER_FILE}: no mask token: config.json mask_token_id = {mask} is not "
                                  f"in the tokenizer's vocabulary ({hf.get_vocab_size()} tokens)")
        return mask
    for text in (family.mask_token, token_string(tok_config, "mask_token")):
        if text is not None and hf.token_to_id(text) is not None:
            return hf.token_to_id(text)
    if family.diffusion:
        raise CheckpointError(f"{path / TOKENIZER_FILE}: no mask token: the tokenizer has no {family.mask_token!r} "
                              f"and config.json has no mask_token_id ({family.name} is a masked-diffusion family)")
    # An autoregressive base: a mask token of its own in the first spare row of its padded
    # embedding (where Fast-dLLM v2 and SDAR put theirs), or one of its reserved tokens.
    vocab = config.get("vocab_size", 0)
    if hf.get_vocab_size() < vocab:
        hf.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
        return hf.token_to_id(MASK_TOKEN)
    reserved = [t for t in sorted(hf.get_added_tokens_decoder().items()) if "reserved" in t[1].content]
    if reserved:
        return reserved[0][0]
    raise CheckpointError(f"{path / CONFIG}: no mask token and no spare id for one (vocab_size {vocab} = tokenizer "
                          f"size): pass mask_token_id explicitly")


def _read_tokenizer(path: Path) -> HFTokenizer:
    file = path / TOKENIZER_FILE
    if not file.exists():
        raise CheckpointError(f"{file}: missing (the tokenizer is read from {TOKENIZER_FILE})")
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file}: not a readable tokenizer ({exc})") from None


def _check_weights(folder: CheckpointFolder, family: Family, cfg: ModelConfig, names: dict[str, str]) -> None:
    """Every tensor the config implies is present with its shape, and nothing else is."""
    shapes = unfused_shapes(cfg)
    for hf, ours in names.items():
        if hf not in folder.shapes:
            raise CheckpointError(f"{folder.path}: tensor {hf!r} is missing from the weights (config.json implies it: "
                                  f"num_hidden_layers={cfg.num_hidden_layers}, tie_word_embeddings="
                                  f"{cfg.tie_word_embeddings}, attention_bias={cfg.attention_bias}, qk_norm={cfg.qk_norm})")
        if folder.shapes[hf] != shapes[ours]:
            raise CheckpointError(
                f"{folder.files[hf]}: tensor {hf!r} has shape {list(folder.shapes[hf])} but config.json implies "
                f"{list(shapes[ours])} (hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
                f"num_attention_heads={cfg.num_attention_heads}, num_key_value_heads={cfg.kv_heads}, "
                f"head_dim={cfg.attention_head_size}, vocab_size={cfg.vocab_size})")
    # A tied head may be saved anyway (it equals the embedding): not read.
    tied_head = family.weight_name("lm_head.weight") if cfg.tie_word_embeddings else None
    extra = sorted(n for n in folder.shapes if n not in names and n != tied_head and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{folder.files[extra[0]]}: tensor {extra[0]!r} ({len(extra)} unexpected in all) has no "
                              f"place in a {family.name} model of this config.json")
