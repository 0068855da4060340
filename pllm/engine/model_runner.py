"""Tensors in, logits out: one packed forward pass over the running sequences."""

from __future__ import annotations

import torch

from ..model import DiffusionTransformer
from .request import Request


class ModelRunner:
    """Packs each running sequence (prompt + partly decoded answer) end to end, without padding,
    and returns the logits of each sequence's current block. Packing keeps every sequence's result
    independent of its batch-mates, which is what makes "batching never changes outputs" hold."""

    def __init__(self, model: DiffusionTransformer):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def run(self, batch: list[Request]) -> list[torch.Tensor]:
        return self.model.forward_packed([r.state.tokens for r in batch], [r.state.window() for r in batch])
