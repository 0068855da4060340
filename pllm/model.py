"""DiffusionTransformer: the denoiser of a masked-diffusion language model.

A pre-norm transformer (RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP)
that maps a partly masked sequence to logits for every position. Attention is bidirectional
(MDLM / LLaDA) or block-causal (block diffusion, BD3-LM / Fast-dLLM v2: causal across blocks of
`block_size` tokens, bidirectional inside a block). Masked diffusion needs no time input: the share
of mask tokens tells the model the noise level (MDLM, Sahoo et al. 2024, sec. 3; LLaDA, Nie et al.
2025), so `timestep` is accepted for API compatibility and not used.

The model is single-device math: parallelism (FSDP2, DeepSpeed) is applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, RopeScaling
from pllm.kernels import add_rms_norm, fused_attention, linear_cross_entropy, rotate_qkv, silu_mul
from pllm.kernels.options import DEFAULT_KERNELS, KernelOptions
from .kv_cache import KVCache, Segment


def rotary_tables(head_dim: int, max_positions: int, theta: float,
                  scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # (P, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, hd): "rotate half" layout
    return angles.cos().float(), angles.sin().float()


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Rotary frequencies for a context longer than training's. "linear": all divided by the factor
    (position interpolation). "llama3": wavelengths longer than original / low_freq_factor are
    stretched by the factor, shorter than original / high_freq_factor kept, and the band between
    interpolates linearly in original / wavelength."""
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    stretched = inv_freq / scaling.factor
    smooth = ((original / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    blended = (1 - smooth) * stretched + smooth * inv_freq
    out = torch.where(wavelength > original / scaling.low_freq_factor, stretched, blended)
    return torch.where(wavelength < original / scaling.high_freq_factor, inv_freq, out)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which layer's entries of a KVCache this layer reads and writes
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.attention_head_size
        self.use_flash = cfg.use_flash_attention
        d = cfg.hidden_size
        # Queries, keys and values in one matmul (rows q | k | v): one larger GEMM instead of three.
        self.qkv_split = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.qkv_proj = nn.Linear(d, sum(self.qkv_split), bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.attention_out_bias)
        self._register_load_state_dict_pre_hook(_fuse_rows("qkv_proj", ("q_proj", "k_proj", "v_proj")))
        # QK-norm (as in OLMo 2, Qwen3): unit-RMS queries/keys keep attention logits O(1), so the
        # positional (rotary) patterns a denoiser needs form early and training stays stable.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.norm_eps = cfg.rms_norm_eps
        self.kernels = DEFAULT_KERNELS  # our Triton ops or the PyTorch definitions (`use_kernels`)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        """mask: a bool (B, 1, L, L) tensor, None (attend to all) or `PackedSegments` (B == 1);
        cos/sin (B, 1, L, hd). (The engine's fixed-shape step: `pllm.engine.step_forward`.)"""
        B, L, _ = x.shape
        qkv = self.qkv_proj(x)
        # Heads stay in (B, L, H, hd) memory and attention reads their (B, H, L, hd) views: QK-norm,
        # rotary and their backward then read and write in memory order (no transposing copies),
        # and attention's output (and its gradients) come back in that layout too.
        # One kernel each way on the GPU (`rotate_qkv`): split, QK-norm and rotary.
        q_weight, k_weight = (getattr(n, "weight", None) for n in (self.q_norm, self.k_norm))
        q, k, v = (t.transpose(1, 2) for t in rotate_qkv(qkv, cos[:, 0], sin[:, 0], self.n_heads, self.n_kv,
                                                         q_weight, k_weight, self.norm_eps,
                                                         use_kernel=self.kernels.rotate_qkv))
        if isinstance(mask, PackedSegments):
            y = self._packed_attention(q, k, v, mask)
        else:
            # Training batches share one shape, so cuDNN's per-shape plans are reused (Hopper).
            y = fused_attention(q, k, v, mask=mask, use_flash=self.use_flash, fixed_shape=self.training and mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))

    def _packed_attention(self, q, k, v, packed: "PackedSegments") -> torch.Tensor:
        """One attention call per sequence on exactly its own tokens (plus its cached keys/values):
        a sequence's result does not depend on what else is packed beside it (no padding, no shared
        softmax lengths)."""
        ys, stores = [], []
        for (s, e), (a, b), cache, store, m in zip(packed.bounds, packed.spans, packed.caches, packed.stores,
                                                   packed.masks):
            ks, vs = k[0, :, s:e], v[0, :, s:e]
            if store is not None:
                stores.append((cache, a, ks, vs, store))
            if cache is not None:
                ks, vs = cache.around(self.layer_idx, a, b, ks, vs)
            ys.append(fused_attention(q[:, :, s:e], ks[None], vs[None], mask=m, use_flash=self.use_flash))
        # Stores after every read: sequences of one pass may share a cache (draft-and-verify).
        for cache, a, ks, vs, store in stores:
            cache.store(self.layer_idx, a, ks, vs, store)
        return torch.cat(ys, dim=2)


def _padded_rows(n: int) -> int:
    """Rows to add so that n + rows is at least 16 and a multiple of 8."""
    return max(16, -(-n // 8) * 8) - n


@dataclass
class PackedSegments:
    """Several sequences packed end to end in one row: their (start, end) bounds in the row, the
    span of sequence positions each one computes, its KV cache and store span (see `Segment`), and
    its own attention mask (None = attend to all)."""

    bounds: list[tuple[int, int]]
    spans: list[tuple[int, int]]
    caches: list[KVCache | None]
    stores: list[tuple[int, int] | None]
    masks: list[torch.Tensor | None]


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Gate and up projections in one matmul (rows gate | up).
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._register_load_state_dict_pre_hook(_fuse_rows("gate_up_proj", ("gate_proj", "up_proj")))
        self.kernels = DEFAULT_KERNELS  # our Triton op or the PyTorch definition (`use_kernels`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a Triton op with its own backward on GPU
        return self.down_proj(silu_mul(self.gate_up_proj(x), use_kernel=self.kernels.silu_mul))


def _fuse_rows(fused: str, parts: tuple[str, ...]):
    """A load_state_dict pre-hook: weights (and biases) saved with separate projections (`parts`)
    load into the fused one, their rows stacked in order."""

    def hook(state_dict, prefix, *args):
        for kind in ("weight", "bias"):
            names = [f"{prefix}{part}.{kind}" for part in parts]
            if all(name in state_dict for name in names):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(name) for name in names])

    return hook


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.kernels = DEFAULT_KERNELS  # our Triton op or the PyTorch definition (`use_kernels`)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x, this block's MLP output), the latter not yet added to x: the next block adds
        it, fused with its first norm (`add_rms_norm`); after the last block `_blocks` adds it.
        pending: the previous block's MLP output (None for the first block, or one already added)."""
        use_kernel = self.kernels.add_rms_norm
        if pending is None:
            h = self.attn_norm(x)
        else:
            x, h = add_rms_norm(x, pending, self.attn_norm.weight, self.attn_norm.eps, use_kernel)
        x, h = add_rms_norm(x, self.attn(h, cos, sin, mask), self.mlp_norm.weight, self.mlp_norm.eps, use_kernel)
        return x, self.mlp(h)


class DiffusionTransformer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelOptions | None = None):
        """kernels: our Triton ops or the PyTorch definitions in the forward (`use_kernels`)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = self.rotary_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual output projections so the residual stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers))
        self.use_kernels(kernels or DEFAULT_KERNELS)

    def use_kernels(self, kernels: KernelOptions) -> None:
        """The kernel choices of every layer's forward and backward (`KernelOptions.silu_mul`,
        `rotate_qkv`, `add_rms_norm`): plain attributes read in the forward, so a compiled or
        sharded model sees the same options object at every call."""
        self.kernels = kernels
        for module in self.modules():
            if isinstance(module, (Attention, SwiGLU, Block)):
                module.kernels = kernels

    def rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return rotary_tables(cfg.attention_head_size, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_rotary_buffers(self, device: torch.device | str) -> None:
        """(Re)build the float32 rotary tables on `device`: buffers are in no state dict, so a model
        built on the meta device and then given its weights needs them built for real."""
        cos, sin = self.rotary_tables()
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def _apply(self, fn, recurse=True):
        # Keep the rotary tables in fp32 when the model is cast to bf16/fp16: positions past a few
        # hundred lose their angle in 8 mantissa bits.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.set_rotary_buffers(self.rope_cos.device)
        return self

    # -- helpers -------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights count once
        n = sum(p.numel() for p in params.values())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        return self.config.flops_per_token(seq_len)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def attention_bias(
        self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None,
        override: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Boolean mask (B, 1, L, L), True where query i may attend to key j; None = attend to all.

        Block-causal: key j is visible from query i iff block(j) <= block(i), with blocks counted on
        positions (so left padding does not shift block boundaries). Packed rows (segment_ids): only
        keys of the query's own segment. Padding keys are hidden; every query still sees itself, so
        padded rows never become empty (which would give NaNs). override: a bool (L, L) or
        (B, 1, L, L) mask used instead of the attention mode's (segments and padding still apply).
        """
        allowed = None
        if override is not None:
            B, L = position_ids.shape
            if override.dtype != torch.bool or override.shape[-2:] != (L, L) or override.dim() not in (2, 4):
                raise ValueError(f"attention_mask_override must be a bool (L, L) or (B, 1, L, L) mask for L = {L}, "
                                 f"got {override.dtype} {tuple(override.shape)}")
            allowed = override.to(position_ids.device).expand(B, 1, L, L)
        elif self.config.attention_mode == "block_causal":
            blocks = position_ids // self.config.block_size  # (B, L)
            allowed = (blocks[:, None, :] <= blocks[:, :, None])[:, None]  # (B, 1, Lq, Lk)
        if segment_ids is not None:
            same = (segment_ids[:, None, :] == segment_ids[:, :, None])[:, None]  # (B, 1, Lq, Lk)
            allowed = same if allowed is None else allowed & same
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
            allowed = keep if allowed is None else allowed & keep
            eye = torch.eye(position_ids.shape[1], dtype=torch.bool, device=position_ids.device)
            allowed = allowed | eye
        return allowed

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        timestep: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_confidence: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
        clean_input_ids: torch.Tensor | None = None,
        loss_targets: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask_override: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, L) with mask tokens -> logits (B, L, V) in float32.

        attention_mask (B, L): 1 for real tokens, 0 for padding. position_ids default to the count of
        real tokens before each position, so a left-padded prompt gets the same positions as unpadded.
        With return_confidence, also returns the max softmax probability per position (B, L).
        logits_mask (B, L) bool: compute logits only where True and return them as (N, V); the
        training loss needs them at masked positions only, and the LM head is a large matmul. Or the
        (N,) flat indices b * L + i of those positions: counting True entries of a GPU mask makes
        the host wait for the GPU, an index made on the host does not.
        clean_input_ids (B, L), block-causal models only: block-diffusion training (BD3-LM, Arriola
        et al. 2025, sec. 3.2): the noisy and the clean sequence run side by side, each noisy block
        seeing itself and the clean blocks before it, exactly what it sees when decoding after
        finished blocks; logits are for the noisy sequence.
        loss_targets (N,) with logits_mask (N True positions), optional loss_weights (N,): return
        sum_i w_i * CE(logits_i, target_i) instead of logits, through the fused LM-head
        cross-entropy (`pllm.kernels.linear_cross_entropy`), which never holds the (N, V) logits.
        segment_ids (B, L): several examples packed in one row, each a run of equal ids; each sees
        only itself, from position 0 (the shifted logits of its first token come from that token).
        attention_mask_override: a bool (L, L) or (B, 1, L, L) mask, True = may attend, in place of
        the attention mode's (padding and segments still apply): the annealed masks of adaptation
        from an autoregressive model (`pllm.adaptation`). A boolean mask always runs PyTorch's SDPA
        (memory-efficient or math backend), never flash-attn, cuDNN or our Triton kernels.
        """
        B, L = input_ids.shape
        starts = None
        if segment_ids is not None:
            if clean_input_ids is not None:
                raise ValueError("segment_ids: packed rows are not supported with clean_input_ids")
            starts = torch.ones_like(segment_ids, dtype=torch.bool)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # (B, L) first token of a segment
            if position_ids is None:
                index = torch.arange(L, device=input_ids.device).expand(B, L)
                position_ids = index - torch.where(starts, index, 0).cummax(dim=1).values
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if clean_input_ids is None:
            mask = self.attention_bias(position_ids, attention_mask, segment_ids, attention_mask_override)
        elif attention_mask_override is not None:
            raise ValueError("attention_mask_override is not supported with clean_input_ids (block diffusion)")
        else:
            mask = self._noisy_and_clean_mask(position_ids, attention_mask)
            input_ids = torch.cat([input_ids, clean_input_ids], dim=1)
            position_ids = torch.cat([position_ids, position_ids], dim=1)
        cos = self.rope_cos[position_ids][:, None]  # (B, 1, L, hd)
        sin = self.rope_sin[position_ids][:, None]

        x = self.embed_tokens(input_ids)
        if self.gradient_checkpointing and self.training:
            # In x's dtype already: FSDP2's mixed precision casts a block's inputs in forward but not in
            # the backward recomputation, and checkpointing needs both to see the same tensors.
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x = self._blocks(x, cos, sin, mask)
        if not self.config.logits_shift:
            x = self.norm(x[:, :L])  # with clean_input_ids: the noisy half only
        elif clean_input_ids is not None:  # block-diffusion training: block starts read the clean copy
            x = self._shifted_noisy_and_clean(self.norm(x), position_ids[:, :L])
        else:  # position i's logits from position i-1 (the first from itself)
            x = self.norm(x)
            shifted = torch.cat([x[:, :1], x[:, :-1]], dim=1)
            x = shifted if starts is None else torch.where(starts[..., None], x, shifted)
        if logits_mask is not None:
            if logits_mask.dtype == torch.bool:
                x = x[logits_mask]  # (N, D)
            elif not logits_mask.dtype.is_floating_point and logits_mask.dim() == 1:
                x = x.flatten(0, 1)[logits_mask]
            else:
                raise ValueError(f"logits_mask must be a bool (B, L) mask or (N,) integer indices, got "
                                 f"{logits_mask.dtype} {tuple(logits_mask.shape)}")
        if loss_targets is not None:
            if logits_mask is None:
                raise ValueError("loss_targets needs logits_mask (the positions the targets belong to)")
            return linear_cross_entropy(x, self.lm_head.weight, loss_targets, loss_weights)
        logits = self.lm_head(x).float()
        if return_confidence:
            return logits, logits.softmax(-1).amax(-1)
        return logits

    def _blocks(self, x, cos, sin, mask) -> torch.Tensor:
        """All blocks; each hands its MLP output to the next, whose first norm adds it (the last
        block's is added here)."""
        pending = None
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                # Only x crosses a checkpoint boundary (the recomputation keeps what crosses): the
                # block's MLP output is added here, not in the next block's first norm.
                x, pending = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
                x, pending = x + pending, None
            else:
                x, pending = block(x, cos, sin, mask, pending)
        return x if pending is None else x + pending

    def _shifted_noisy_and_clean(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Shifted logits' hidden states for block-diffusion training, (B, L, D) from [noisy | clean]
        (B, 2L, D): position i's from position i-1, of the noisy copy inside a block and of the clean
        copy at a block's first position, whose predecessor ends the block before: decoding computes
        it from that finished block (committed tokens) and never from a masked copy of it. With
        one-token blocks every position then reads the clean prefix, the next-token loss exactly."""
        L = position_ids.shape[1]
        noisy, clean = x[:, :L], x[:, L:]
        blocks = position_ids // self.config.block_size
        first = (blocks[:, 1:] != blocks[:, :-1])[..., None]  # (B, L - 1, 1): position i + 1 starts a block
        return torch.cat([noisy[:, :1], torch.where(first, clean[:, :-1], noisy[:, :-1])], dim=1)

    def _noisy_and_clean_mask(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Block-diffusion training mask (B, 1, 2L, 2L) over [noisy | clean]: a noisy block sees
        itself and the earlier clean blocks; the clean copy is block-causal over itself."""
        if self.config.attention_mode != "block_causal":
            raise ValueError("clean_input_ids is for block-causal (block diffusion) models")
        L = position_ids.shape[1]
        blocks = position_ids // self.config.block_size  # (B, L)
        same = blocks[:, :, None] == blocks[:, None, :]  # (B, Lq, Lk)
        before = blocks[:, None, :] < blocks[:, :, None]
        noisy_rows = torch.cat([same, before], dim=2)
        clean_rows = torch.cat([torch.zeros_like(same), before | same], dim=2)
        allowed = torch.cat([noisy_rows, clean_rows], dim=1)[:, None]
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool().repeat(1, 2)[:, None, None, :]
            allowed = (allowed & keep) | torch.eye(2 * L, dtype=torch.bool, device=position_ids.device)
        return allowed

    @torch.no_grad()
    def forward_packed(self, sequences: list[torch.Tensor], logit_positions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run several sequences of different lengths in one pass, packed end to end without padding.

        sequences: 1-D token tensors; logit_positions: for each, the positions (in that sequence) whose
        logits are wanted. Returns, per sequence, float32 logits (len(positions), V). Each sequence
        sees only itself, at positions 0..n-1, so its logits equal a forward pass on it alone; the
        LM head runs only on the requested positions (the engine needs one block, not the sequence).
        """
        return self.forward_segments([Segment(s, p) for s, p in zip(sequences, logit_positions)])

    @torch.no_grad()
    def forward_segments(self, segments: list[Segment]) -> list[torch.Tensor]:
        """`forward_packed` for `Segment`s: each computes only its span of positions, reading the
        other positions' keys/values from its KV cache and storing the ones it is asked to keep."""
        device = self.device
        spans = [seg.span() for seg in segments]
        # Pad the packed stream (and the LM head's rows) to a GEMM-friendly row count: BLAS libraries
        # pick other kernels, with other rounding, for a handful of rows, which would make a lone
        # short sequence differ from the same sequence in a batch.
        filler = _padded_rows(sum(b - a for a, b in spans))
        if filler:
            segments = [*segments, Segment(torch.full((filler,), self.config.pad_token_id, dtype=torch.long),
                                           torch.empty(0, dtype=torch.long))]
            spans.append((0, filler))
        visible = [seg.visible_length() for seg in segments]
        longest = max(visible)
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {longest} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        starts = [0]
        for a, b in spans:
            starts.append(starts[-1] + b - a)
        position_ids = torch.cat([torch.arange(a, b, device=device) for a, b in spans])[None]  # (1, N)
        packed = PackedSegments(
            bounds=list(zip(starts[:-1], starts[1:])), spans=spans, caches=[seg.cache for seg in segments],
            stores=[seg.store for seg in segments],
            masks=[self._segment_mask(a, b, n, device) for (a, b), n in zip(spans, visible)])
        cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]
        x = self.embed_tokens(torch.cat([seg.tokens[a:b].to(device) for (a, b), seg in zip(spans, segments)])[None])
        x = self._blocks(x, cos, sin, packed)
        # logits_shift: position p's logits from position p - 1's hidden state, which the segment's
        # span must include (`DecodeState.segments` starts it one position early).
        shift = int(self.config.logits_shift)
        rows = [(seg.logit_positions.to(device) - shift).clamp(min=0) for seg in segments]
        index = torch.cat([r - a + start for r, (a, _), start in zip(rows, spans, starts)])
        wanted = index.numel()
        index = torch.cat([index, index.new_zeros(_padded_rows(wanted))])
        logits = self.lm_head(self.norm(x[0, index])).float()[:wanted]
        return list(logits.split([int(seg.logit_positions.numel()) for seg in segments[:len(segments) - bool(filler)]]))

    def _segment_mask(self, start: int, end: int, visible: int, device) -> torch.Tensor | None:
        """Queries at positions [start, end) over keys at positions [0, visible)."""
        if self.config.attention_mode != "block_causal":
            return None
        q_blocks = torch.arange(start, end, device=device) // self.config.block_size
        k_blocks = torch.arange(visible, device=device) // self.config.block_size
        return (k_blocks[None, :] <= q_blocks[:, None])[None, None]  # (1, 1, end - start, visible)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_parallel(
        self,
        batch_size: int,
        seq_len: int,
        num_steps: int | None = None,
        confidence_threshold: float | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Unconditional generation by iterative refinement: start from `seq_len` mask tokens and,
        over at most `num_steps` forward passes, commit each step at least the scheduled share of
        positions (highest confidence first) plus every position whose confidence exceeds
        `confidence_threshold`. Returns (batch_size, seq_len) token ids. Defaults: the model
        config's `num_diffusion_steps` and `confidence_threshold`."""
        from .decoding import decode  # decoding runs models: imported at call time

        num_steps = self.config.num_diffusion_steps if num_steps is None else num_steps
        if confidence_threshold is None:
            confidence_threshold = self.config.confidence_threshold
        prompts = [torch.empty(0, dtype=torch.long, device=self.device)] * batch_size
        out = decode(
            self, prompts, gen_length=seq_len, num_steps=num_steps, block_size=None, temperature=temperature,
            top_k=0, top_p=1.0, confidence_threshold=confidence_threshold, min_per_step="schedule", seed=seed,
        )
        return torch.stack(out.tokens)
