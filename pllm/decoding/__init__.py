"""Decoding strategies for masked-diffusion models: per-sequence state (`state.py`) driven by one
loop (`decode`) or by the serving engine (`pllm.engine`)."""

from .commit import commit_mask, factor_commit_mask, transfer_schedule
from .credit import CreditTrace
from .loop import DecodeOutput, decode, decode_with_rules, run_states
from .sampling import apply_repetition_penalty, filter_top_k_top_p, propose_tokens
from .speculative import Drafter, Speculation, check_draft_model
from .state import CACHE_MODES, DecodeRules, DecodeState

__all__ = [
    "CACHE_MODES", "CreditTrace", "DecodeOutput", "DecodeRules", "DecodeState", "Drafter", "Speculation",
    "apply_repetition_penalty", "check_draft_model", "commit_mask", "decode", "decode_with_rules", "factor_commit_mask", "filter_top_k_top_p", "propose_tokens",
    "run_states", "transfer_schedule",
]
