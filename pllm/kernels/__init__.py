"""Attention dispatch and Triton kernels, each with a PyTorch reference implementation that runs where
Triton or a GPU is absent and that the tests compare against."""

from .attention import block_causal_mask, flash_attention, fused_attention, prepare_attention
from .backend import HAS_TRITON, use_triton
from .bias_attention import bias_attention, bias_attention_reference
from .cross_entropy import cross_entropy_rows, cross_entropy_rows_reference, linear_cross_entropy
from .parallel_decode import ParallelDecodeOutput, parallel_decode, parallel_decode_reference
from .qkv_rotary import rotate_qkv, rotate_qkv_reference
from .rms_norm import add_rms_norm, add_rms_norm_reference
from .rotary_cache import apply_rotary, rotate_into_cache, rotate_into_cache_reference
from .swiglu import silu_mul, silu_mul_reference

__all__ = ["HAS_TRITON", "ParallelDecodeOutput", "add_rms_norm", "add_rms_norm_reference", "apply_rotary",
           "bias_attention", "bias_attention_reference", "block_causal_mask", "cross_entropy_rows",
           "cross_entropy_rows_reference", "flash_attention", "fused_attention", "linear_cross_entropy",
           "parallel_decode", "parallel_decode_reference", "prepare_attention", "rotate_into_cache",
           "rotate_into_cache_reference", "rotate_qkv", "rotate_qkv_reference", "silu_mul", "silu_mul_reference",
           "use_triton"]
