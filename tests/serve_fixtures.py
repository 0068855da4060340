"""A small model with a real BPE tokenizer, registered in a temporary MLflow store, for serving tests."""

import glob
import os
import socket
from pathlib import Path

import torch

from pllm import DiffusionTransformer, GenerationConfig, JobConfig, ModelConfig, Tokenizer, save_pretrained
from pllm.registry import log_generator_model, start_run

MODEL_NAME = "pllm-serve-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(path: Path, seed: int = 0) -> Path:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    tokenizer = Tokenizer.train([Path(f).read_text() for f in files], vocab_size=512)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                      use_flash_attention=False, dtype="float32")
    model = DiffusionTransformer(cfg)
    with torch.no_grad():
        # An untrained model ranks tokens at random; silence the tokens that are partial UTF-8 bytes
        # so greedy answers are readable text that streams piece by piece.
        for token_id in range(cfg.vocab_size):
            if "\ufffd" in tokenizer.decode([token_id]):
                model.lm_head.weight[token_id] = 0.0
    return save_pretrained(model, path, tokenizer)


def register_model(model_dir: Path, tracking_uri: str) -> str:
    run_id = start_run(JobConfig(), tracking_uri, run_name="serve-test")
    generation = GenerationConfig(max_new_tokens=32, num_refinement_steps=16, block_size=8)
    return log_generator_model(run_id, tracking_uri, model_dir, generation, MODEL_NAME, "champion")["registry_uri"]
