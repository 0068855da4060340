"""Tensors in, logits out: one forward pass over the running sequences."""

from __future__ import annotations

import torch

from ..decoding.loop import run_states
from ..model import DiffusionTransformer
from .cuda_graphs import StaticStepRunner
from .request import Request


class ModelRunner:
    """Packs each running sequence (the part of prompt + partly decoded answer that its cache does
    not cover) end to end, without padding, and returns the logits of each sequence's current
    block. Packing keeps every sequence's result independent of its batch-mates, which is what
    makes "batching never changes outputs" hold.

    static_step (block-causal models): sequences with the exact block cache and one segment per
    step run instead through fixed-shape steps (`StaticStepRunner`), captured as CUDA graphs on
    GPUs; the others (draft-and-verify, no cache) still run packed, in a second pass."""

    def __init__(self, model: DiffusionTransformer, static_step: bool = False, max_num_seqs: int = 32,
                 compile_ops: bool = True):
        self.model = model.eval()
        self.static = None
        if static_step and model.config.attention_mode == "block_causal":
            on_gpu = model.device.type == "cuda"
            self.static = StaticStepRunner(model, max_num_seqs, capture=on_gpu, compile_ops=compile_ops and on_gpu)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def run(self, batch: list[Request]) -> list[list[torch.Tensor]]:
        """Per request, the logits of each of its segments (the state, then any drafts)."""
        return run_states(self.model, [r.state for r in batch], self.static)
