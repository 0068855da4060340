"""Tensors in, logits out: one packed forward pass over the running sequences."""

from __future__ import annotations

import torch

from ..decoding.loop import run_states
from ..model import DiffusionTransformer
from .request import Request


class ModelRunner:
    """Packs each running sequence (the part of prompt + partly decoded answer that its cache does
    not cover) end to end, without padding, and returns the logits of each sequence's current block. Packing keeps every sequence's result
    independent of its batch-mates, which is what makes "batching never changes outputs" hold."""

    def __init__(self, model: DiffusionTransformer):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def run(self, batch: list[Request]) -> list[list[torch.Tensor]]:
        """Per request, the logits of each of its segments (the state, then any drafts)."""
        return run_states(self.model, [r.state for r in batch])
