"""Decoding strategies for masked-diffusion models: per-sequence state (`state.py`) driven by one
loop (`decode`) or by the serving engine (`pllm.engine`)."""

from .commit import commit_mask, transfer_schedule
from .loop import DecodeOutput, decode, decode_with_rules
from .sampling import apply_repetition_penalty, filter_top_k_top_p, propose_tokens
from .state import STRATEGIES, DecodeRules, DecodeState

__all__ = [
    "STRATEGIES", "DecodeOutput", "DecodeRules", "DecodeState", "apply_repetition_penalty", "commit_mask",
    "decode", "decode_with_rules", "filter_top_k_top_p", "propose_tokens", "transfer_schedule",
]
