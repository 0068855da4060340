"""`fused_attention`: one entry point for every attention the model runs.

Dispatch, fastest first: flash-attn (optional `gpu` extra) for unmasked or causal fp16/bf16 CUDA
inputs; otherwise PyTorch SDPA, restricted to its flash / memory-efficient / math backends as the
inputs allow (a boolean mask rules out flash). cuDNN attention builds an execution plan per new
shape, which ragged batches keep producing, so it runs only for callers that declare fixed shapes
(`fixed_shape=True`: training on batches of one sequence length, and the CUDA-graph decoding
step). Bidirectional attention is `mask=None`, block-causal attention passes `block_size` (or a
prebuilt mask), cached-block attention passes keys/values longer than the queries with
`query_offset` = the position of the first query. The decoding step's fixed-shape call with an
additive bias runs our Triton kernel (`bias_attention`) on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .bias_attention import bias_attention, gather_pages, runs_kernel
from .options import DEFAULT_KERNELS, KernelOptions

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_func = None

UNMASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def block_causal_mask(num_queries: int, num_keys: int, block_size: int, query_offset: int = 0,
                      device=None) -> torch.Tensor:
    """(num_queries, num_keys) bool: query at position query_offset + i sees key j iff j's block is
    not after i's block (causal across blocks, bidirectional inside one)."""
    q_blocks = (torch.arange(num_queries, device=device) + query_offset) // block_size
    k_blocks = torch.arange(num_keys, device=device) // block_size
    return k_blocks[None, :] <= q_blocks[:, None]


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    block_size: int | None = None,
    query_offset: int = 0,
    causal: bool = False,
    use_flash: bool = True,
    fixed_shape: bool = False,
    kernels: KernelOptions = DEFAULT_KERNELS,
    kv_pages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention. query (B, H, Lq, hd); key/value (B, KV, Lk, hd) with KV
    dividing H (grouped-query attention: query head h reads key/value head h // (H // KV)).
    mask: broadcastable to (B, H, Lq, Lk), bool (True = may attend) or an additive float bias.
    fixed_shape: the caller runs these exact shapes again and again (training batches of one
    length; the decoding step, replayed from CUDA graphs), so cuDNN attention, which plans once per
    shape, may run on a Hopper GPU: without a mask (training, forward and backward) it is faster
    than FlashAttention-2. With an additive (B, 1, Lq, Lk) bias in half precision and no gradients
    (the decoding step) our Triton kernel `bias_attention` runs instead, on any CUDA GPU, where it
    was measured to pay (`_bias_kernel_pays`); elsewhere cuDNN on Hopper.
    Elsewhere, a masked grouped-query call with a (B, 1, Lq, Lk) mask runs the G = H // KV query
    heads of each key/value head as one head of G * Lq queries, reading keys/values as they are
    instead of copying them per query head. kernels: the step attention kernel's options
    (`KernelOptions.bias_attention` and its tiles). kv_pages (B, n): paged keys/values, (pages,
    KV, page_size, hd), read through each query row's page table (the decoding step's cache; in
    place by `bias_attention`, gathered for the other paths; the mask's last dimension gives Lk).
    Returns (B, H, Lq, hd)."""
    if kv_pages is not None:
        if (fixed_shape and mask is not None and kernels.bias_attention
                and runs_kernel(query, key, value, mask, kv_pages) and _bias_kernel_pays(query, mask.shape[-1])):
            return bias_attention(query, key, value, mask, kernels, kv_pages)
        key, value = (gather_pages(t, kv_pages, mask.shape[-1]) for t in (key, value))
    gqa = key.shape[1] != query.shape[1]
    if block_size is not None:
        block = block_causal_mask(query.shape[2], key.shape[2], block_size, query_offset, query.device)
        mask = block if mask is None else mask & block
    if fixed_shape and mask is None and not causal and _cudnn_ok(query):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *UNMASKED_BACKENDS]):
            return F.scaled_dot_product_attention(query, key, value, enable_gqa=gqa)
    if fixed_shape and mask is not None:
        if kernels.bias_attention and runs_kernel(query, key, value, mask) and _bias_kernel_pays(query, key.shape[2]):
            return bias_attention(query, key, value, mask, kernels)
        if _cudnn_ok(query):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=gqa)
        if gqa and mask.shape[1] == 1:
            return _grouped_query_attention(query, key, value, mask)
    if mask is None and _flash_ok(query, use_flash):
        # flash-attn takes (B, L, H, hd) and maps GQA heads itself.
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if mask is not None and gqa:
        # SDPA's memory-efficient kernel (the one that takes a mask) has no grouped-query mode and
        # would fall back to the float32 math path: give every query head its key/value head.
        groups = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        gqa = False
    backends = UNMASKED_BACKENDS if mask is None else MASKED_BACKENDS
    if not use_flash:
        backends = [b for b in backends if b != SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def _bias_kernel_pays(query: torch.Tensor, num_keys: int) -> bool:
    """Where `bias_attention` measured faster than cuDNN (benchmarks/RESULTS.md): when its programs (one
    per query head and 64-query tile) fill the GPU, or over at most 512 keys. With few programs over
    long keys (batch 1 at 1,024 keys and more) each program's serial pass over the keys is the
    critical path, and cuDNN, which splits it, is faster."""
    if not query.is_cuda:
        return True
    programs = query.shape[0] * query.shape[1] * -(-query.shape[2] // 64)  # as measured: 64-query tiles
    return num_keys <= 512 or programs >= torch.cuda.get_device_properties(query.device).multi_processor_count


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Unmasked (or causal) attention on the fastest available kernel (seed API name)."""
    return fused_attention(query, key, value, causal=causal)


def _grouped_query_attention(query, key, value, mask) -> torch.Tensor:
    B, H, L, hd = query.shape
    kv = key.shape[1]
    groups = H // kv
    grouped = query.reshape(B, kv, groups * L, hd)  # head kv * G + g -> rows g * L ... (g + 1) * L
    with sdpa_kernel(MASKED_BACKENDS):
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask.repeat(1, 1, groups, 1))
    # One copy into (B, L, H, hd) memory, returned as its (B, H, L, hd) view: the usual
    # `.transpose(1, 2).reshape(B, L, H * hd)` that follows is then free.
    return out.unflatten(2, (groups, L)).permute(0, 3, 1, 2, 4).reshape(B, L, H, hd).transpose(1, 2)


# Whether cuDNN attention runs on a device: Hopper or newer, cuDNN present and SDPA's cuDNN backend
# enabled. Those queries cannot be traced by torch.compile (each one would split the compiled graph
# in every layer), so they run eagerly: on the first eager call, or in `prepare_attention`, which
# compiling callers run first. A compiled graph traced before either uses the other backends.
_CUDNN_BY_DEVICE: dict[torch.device, bool] = {}


def prepare_attention(device: torch.device | str) -> None:
    """Record (again) whether cuDNN attention may run on `device`; call it before torch.compile."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    _CUDNN_BY_DEVICE[device] = (torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled()
                                and torch.cuda.get_device_capability(device)[0] >= 9)


def _cudnn_ok(query: torch.Tensor) -> bool:
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        return False
    if not torch.compiler.is_compiling():
        prepare_attention(query.device)
    return _CUDNN_BY_DEVICE.get(query.device, False)


def _flash_ok(query: torch.Tensor, use_flash: bool) -> bool:
    return (use_flash and flash_attn_func is not None and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16))
