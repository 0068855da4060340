"""Adapting an autoregressive checkpoint into a diffusion LM (task "adapt").

An autoregressive base (Llama, Qwen2, Qwen3) imports as a causal model: block-causal with one-token
blocks and shifted logits (position i's logits from position i-1: the next-token head). Adaptation
continues training it with the masked-diffusion objective under another attention:

- "bidirectional": a masked-diffusion LM as Dream 7B (Ye et al. 2025) and DiffuLLaMA (Gong et al.
  2024, "Scaling Diffusion Language Models via Adaptation from Autoregressive Models") make it. Both
  keep the one-position logits shift, so every position's head is still the one that was trained to
  predict the next token. DiffuLLaMA also anneals the attention mask: it starts causal and, over
  the first steps, a growing random share of future keys becomes visible, until it is bidirectional
  (`future_fraction`, `annealing_mask`); the model is never shown an abrupt change of attention.
- "block": block diffusion (BD3-LM; SDAR, Fast-dLLM v2 adapt Qwen bases this way): causal across
  blocks of `block_size` tokens, bidirectional inside one, shift kept as Fast-dLLM v2 does.
"""

from __future__ import annotations

import torch

from .config import AdaptSettings, ModelConfig


def adapted_model_config(model_cfg: ModelConfig, adapt: AdaptSettings) -> ModelConfig:
    """The checkpoint's config with the attention `adapt` chooses; everything else (logits_shift
    included) as the checkpoint has it. The checkpoint must be autoregressive (block-causal with
    one-token blocks): a diffusion model is trained further with task "pretrain"."""
    if model_cfg.attention_mode == "bidirectional":
        raise ValueError("task 'adapt': the checkpoint is already bidirectional (a masked-diffusion model), not "
                         "autoregressive; continue training it with task: pretrain")
    if model_cfg.block_size != 1:
        raise ValueError(f"task 'adapt': the checkpoint is already a block-diffusion model (block_size "
                         f"{model_cfg.block_size}), not autoregressive (block_size 1); continue training it with "
                         "task: pretrain (model.block_size / model.attention_mode change its attention)")
    if adapt.attention == "bidirectional":
        return model_cfg.replace(attention_mode="bidirectional")
    return model_cfg.replace(attention_mode="block_causal", block_size=adapt.block_size)


def future_fraction(step: int, anneal_steps: int) -> float:
    """The share of future (upper-triangle) attention entries visible at optimizer step `step`:
    0 (causal) at step 0, rising linearly to 1 (bidirectional) at `anneal_steps` and after."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, max(step, 0) / anneal_steps)


def annealing_mask(seq_len: int, fraction: float, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(seq_len, seq_len) bool, True where query i may attend to key j: every key at or before i
    (causal) and each future key with probability `fraction`, drawn on the host from a generator
    seeded by `seed`, so every rank (and a resumed run) draws the same mask for the same seed."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(seed)
    future = torch.rand(seq_len, seq_len, generator=g) < fraction  # fraction 0: none, 1: all (rand < 1)
    return (causal | future).to(device) if device is not None else causal | future


def annealing_seed(seed: int, step: int, micro: int) -> int:
    """The mask's seed for (run seed, optimizer step, micro-batch): the same on every rank; the
    constant keeps it off the trainer's noise seeds, so mask and noise are drawn independently."""
    return ((seed * 1_000_003 + step) * 1_009 + micro) % 2**63 ^ 0x2545_F491_4F6C_DD1D
