"""Model files: weights as safetensors, the ModelConfig as JSON, the tokenizer as tokenizer.json.
Loading never unpickles anything. Every loader here also takes a Hugging Face checkpoint folder
(`pllm.hf`: LLaDA, Dream, Fast-dLLM v2, SDAR, Llama/Qwen), so a path works wherever a model does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from .config import ModelConfig
from .model import DiffusionTransformer
from .quantization import INT4_GROUP, check_fp8_support, check_quantizable, quantization_config, quantize_model
from .tokenizer import TOKENIZER_FILE, Tokenizer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded weights (Hugging Face checkpoints)
CONFIG_FILE = "config.json"


def save_pretrained(model: DiffusionTransformer, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_model drops the duplicate of tied weights (embedding == LM head) and restores the tie on load.
    _save_weights(model, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    quantization = quantization_config(model)
    if quantization is not None:  # quantized weights + scales in the safetensors, how to read them here
        config["quantization"] = quantization
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER_FILE)
    return path


ADAPTER_CONFIG = "adapter_config.json"  # a LoRA adapter folder (`pllm.lora.save_adapter`)


def is_model_folder(path: str | Path) -> bool:
    """A saved pllm model, a Hugging Face checkpoint (single-file or sharded safetensors) or a LoRA
    adapter folder (its base named inside)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        return True
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


def _adapter_base(path: str | Path) -> Path | None:
    """An adapter folder's base model folder (resolved if it is an MLflow URI); None otherwise."""
    if not (Path(path) / ADAPTER_CONFIG).is_file():
        return None
    from .lora import adapter_base
    from .registry import resolve_model_source

    return resolve_model_source(adapter_base(path)[0])[0]


def load_config(path: str | Path) -> ModelConfig:
    from .hf import is_hf_checkpoint, plan_import

    base = _adapter_base(path)
    if base is not None:
        return load_config(base)
    if is_hf_checkpoint(path):
        return plan_import(path).config
    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    config.pop("quantization", None)  # `load_model` reads it
    return ModelConfig.from_dict(config)


def load_model(path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None) -> DiffusionTransformer:
    """Build the model from config.json and load model.safetensors into it (strict: every tensor
    must match); Hugging Face checkpoint folders are imported, adapter folders merged into their
    base. On CUDA the weights are cast to ModelConfig.dtype for inference. quantize: "int8", "fp8"
    or "int4": the projections weight-only quantized once loaded (`pllm.quantization`), checked
    against the model's config before any tensor is read."""
    if quantize is None:
        return _load(path, device)
    if quantize == "fp8":
        check_fp8_support(torch.device(device))
    config_file = Path(path) / CONFIG_FILE
    if config_file.exists() and "quantization" in json.loads(config_file.read_text()):
        raise ValueError(f"{config_file}: the model is saved quantized already; load it without quantize")
    check_quantizable(load_config(path), quantize, str(path))
    return quantize_model(_load(path, device), quantize)


def _load(path: str | Path, device: str | torch.device) -> DiffusionTransformer:
    from .hf import import_checkpoint, is_hf_checkpoint

    base = _adapter_base(path)
    if base is not None:  # the base with the adapter merged in
        from .lora import load_adapter

        return load_adapter(path, load_model(base, device))
    if is_hf_checkpoint(path):
        return import_checkpoint(path, device=device)[0]
    path = Path(path)
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}: not a saved pllm model")
    config = json.loads((path / CONFIG_FILE).read_text())
    quantization = config.pop("quantization", None)
    model = DiffusionTransformer(ModelConfig.from_dict(config))
    if quantization is not None:  # the quantized modules first, so the saved tensors fit them
        try:
            quantize_model(model, quantization["precision"], tuple(quantization["modules"]),
                           int(quantization.get("int4_group_size", INT4_GROUP)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path / CONFIG_FILE}: field 'quantization' is not a valid quantization section "
                             f"({err!r})") from err
    _load_weights(model, str(path / WEIGHTS_FILE), strict=True, device="cpu")
    model.eval()
    device = torch.device(device)
    if quantization is not None and quantization["precision"] == "fp8":
        check_fp8_support(device)
    if device.type == "cuda":
        return model.to(device, model.config.dtype)
    return model.to(device)


def load_tokenizer(path: str | Path) -> Tokenizer:
    from .hf import is_hf_checkpoint, plan_import

    base = _adapter_base(path)
    if base is not None:
        return load_tokenizer(base)
    if is_hf_checkpoint(path):
        tokenizer = plan_import(path).tokenizer
        if tokenizer is None:
            raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}")
        return tokenizer
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE} (saved without its tokenizer)")
    return Tokenizer.load(file)
