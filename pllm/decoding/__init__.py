"""Decoding strategies for masked-diffusion models, behind one loop (`decode`)."""

from .commit import commit_mask, transfer_schedule
from .loop import DecodeOutput, decode
from .sampling import apply_repetition_penalty, filter_top_k_top_p, propose_tokens

__all__ = [
    "DecodeOutput", "apply_repetition_penalty", "commit_mask", "decode", "filter_top_k_top_p",
    "propose_tokens", "transfer_schedule",
]
