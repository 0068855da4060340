"""The masked-diffusion (absorbing-state) objective, as in MDLM (Sahoo et al., 2024, eq. 10-11)
and LLaDA (Nie et al., 2025, eq. 3).

Forward process: each token of x0 is independently replaced by the mask token with probability
1 - alpha(t). The negative ELBO is

    NELBO(x0) = E_{t ~ U(0,1)} [ w(t) * sum_{i masked in x_t} -log p_theta(x0_i | x_t) ],
    w(t) = -alpha'(t) / (1 - alpha(t)),

which for the linear schedule alpha(t) = 1 - t gives LLaDA's 1/t weight. The training loss is the
NELBO divided by the number of real (non-padding) tokens; validation reports it per token in nats,
bits and as a perplexity upper bound exp(NELBO per token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha(t): probability that a token is still unmasked at time t (alpha(0)=1, alpha(1)=0)."""

    name: str
    alpha: Callable[[torch.Tensor], torch.Tensor]
    alpha_prime: Callable[[torch.Tensor], torch.Tensor]

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha(t)

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))


SCHEDULES: dict[str, NoiseSchedule] = {
    "linear": NoiseSchedule("linear", lambda t: 1.0 - t, lambda t: -torch.ones_like(t)),
    "cosine": NoiseSchedule(
        "cosine",
        lambda t: torch.cos(0.5 * math.pi * t),
        lambda t: -0.5 * math.pi * torch.sin(0.5 * math.pi * t),
    ),
    "sqrt": NoiseSchedule("sqrt", lambda t: 1.0 - torch.sqrt(t), lambda t: -0.5 / torch.sqrt(t)),
}


def get_schedule(name: str) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name]


def sample_t(batch_size: int, eps: float = 1e-3, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Low-discrepancy t ~ U(eps, 1): one uniform offset, then evenly spaced over the batch (MDLM),
    which lowers the variance of the batch's loss without biasing it."""
    u = torch.rand(1, generator=generator, device=device)
    u = (u + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return eps + (1.0 - eps) * u


def mask_tokens(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    mask_token_id: int,
    valid: torch.Tensor,
    generator: torch.Generator | None = None,
    draw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each valid token with probability 1 - alpha(t), t per row (B,) or per position (B, L).
    Returns (x_t, is_masked). `draw` (uniforms shaped like input_ids) fixes the noise, e.g. to slice
    one global draw across ranks."""
    is_masked = masked_positions(t, schedule, valid, generator, draw)
    return torch.where(is_masked, mask_token_id, input_ids), is_masked


def masked_positions(t: torch.Tensor, schedule: NoiseSchedule, valid: torch.Tensor,
                     generator: torch.Generator | None = None, draw: torch.Tensor | None = None) -> torch.Tensor:
    """`mask_tokens`' is_masked alone, on valid's device."""
    p_mask = schedule.mask_probability(t)
    p_mask = p_mask[:, None] if p_mask.dim() == 1 else p_mask  # (B, 1) or (B, L)
    if draw is None:
        draw = torch.rand(valid.shape, generator=generator, device=valid.device)
    return (draw < p_mask) & valid


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # NELBO summed over the batch / number of real tokens (what we backprop)
    nelbo_sum: torch.Tensor  # NELBO in nats summed over the batch (detached)
    num_tokens: int  # real (non-padding) tokens
    num_masked: int


def diffusion_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    schedule: NoiseSchedule,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    mask_draw: torch.Tensor | None = None,
    block_size: int | None = None,
    attention_override: torch.Tensor | None = None,
) -> DiffusionLoss:
    """One Monte-Carlo sample of the masked-diffusion NELBO for a batch (B, L) of clean tokens.
    Padding (attention_mask == 0) is never masked, never predicted and never counted.
    attention_override: a bool (L, L) attention mask the model uses instead of its own (the
    annealed masks of adaptation, `pllm.adaptation`); not with block_size.

    block_size (block-causal models): the block-diffusion NELBO of BD3-LM (Arriola et al. 2025,
    eq. 6), a sum over blocks of each block's masked-diffusion NELBO given the clean blocks before
    it. Each block draws its own t (t may be (B,) or (B, num_blocks)), and the model sees the
    clean sequence beside the noisy one (`clean_input_ids`). With block_size 1 a block is one token
    whose NELBO is exactly its cross-entropy given the prefix, so every token is masked with weight
    1: the ordinary autoregressive loss, with no sampling noise. With shifted logits (Fast-dLLM v2,
    adapted autoregressive models) a block's first token is predicted from the clean block before
    it, as decoding does (`DiffusionTransformer._shifted_noisy_and_clean`).
    """
    B, L = input_ids.shape
    device = input_ids.device
    # Which positions are masked is decided where the noise is (t, mask_draw or the generator). Noise
    # drawn on the host (as the trainer does) gives their count and indices without waiting for the
    # GPU, so a training step has no host-device sync and the host queues the next step's kernels
    # while the GPU still runs this one.
    noise = next((x.device for x in (mask_draw, generator, t) if x is not None), device)
    t = None if t is None else t.to(noise)
    # The padding mask goes where the masking is decided; the model's copy below is then a no-op
    # unless that is the host.
    attention_mask = None if attention_mask is None else attention_mask.to(noise)
    valid = (torch.ones(B, L, dtype=torch.bool, device=noise) if attention_mask is None
             else attention_mask.bool())
    num_blocks = -(-L // block_size) if block_size else 1
    if t is None:
        t = sample_t(B * num_blocks, eps, generator, device=noise).view(B, num_blocks)
    per_block = t.view(B, -1)  # (B, 1) or (B, num_blocks)
    t_pos = per_block.repeat_interleave(block_size if per_block.shape[1] > 1 else L, dim=1)[:, :L]  # (B, L)
    if block_size == 1:
        is_masked = valid
        weight = torch.ones(B, L, device=noise)
    else:
        is_masked = masked_positions(t_pos, schedule, valid, generator, mask_draw)
        weight = schedule.elbo_weight(t_pos)
    index = is_masked.flatten().nonzero().squeeze(1)  # flat positions b * L + i of the masked tokens
    num_tokens, num_masked = int(valid.sum()), int(index.numel())
    weight = weight.flatten()[index]
    is_masked, index, weight, t = (to_device(x, device) for x in (is_masked, index, weight, t))
    x_t = torch.where(is_masked, mask_token_id, input_ids)
    extra = {"clean_input_ids": input_ids} if block_size else {}
    if attention_override is not None:
        extra["attention_mask_override"] = to_device(attention_override, device)
    # sum over masked positions of weight * CE, computed by the model's fused LM head + loss
    nelbo = model(x_t, t, attention_mask=None if attention_mask is None else to_device(attention_mask, device),
                  logits_mask=index, loss_targets=input_ids.flatten()[index], loss_weights=weight, **extra)
    return DiffusionLoss(nelbo / max(num_tokens, 1), nelbo.detach(), num_tokens, num_masked)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device`; from host memory to a GPU through pinned memory, without waiting for the copy."""
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@dataclass
class ElboReport:
    nelbo_per_token: float  # nats
    bits_per_token: float
    perplexity_bound: float
    num_tokens: int

    def as_metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {
            f"{prefix}elbo_nats": self.nelbo_per_token,
            f"{prefix}elbo_bits": self.bits_per_token,
            f"{prefix}ppl_bound": self.perplexity_bound,
        }


@torch.no_grad()
def evaluate_elbo(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | dict],
    schedule: NoiseSchedule,
    mask_token_id: int,
    num_samples: int = 1,
    seed: int = 1234,
    autocast: Callable | None = None,
    reduce: Callable[[list[float]], list[float]] | None = None,
    block_size: int | None = None,
) -> ElboReport:
    """Validation NELBO per token (an upper bound on the true NLL), averaged over `num_samples`
    draws of (t, mask) per batch with a fixed seed, so successive evaluations are comparable.
    `reduce` sums [nelbo, tokens] across processes when each holds a shard of the batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    total, tokens = 0.0, 0
    for batch in batches:
        input_ids, attention_mask = unpack_batch(batch, device)
        for _ in range(num_samples):
            ctx = autocast() if autocast else contextlib.nullcontext()
            with ctx:
                out = diffusion_loss(model, input_ids, schedule, mask_token_id, attention_mask, generator=generator,
                                     block_size=block_size)
            total += float(out.nelbo_sum)
            tokens += out.num_tokens
    model.train(was_training)
    if reduce is not None:  # sum over data-parallel ranks
        total, tokens = reduce([total, float(tokens)])
        tokens = int(tokens)
    if tokens == 0:
        raise ValueError("evaluate_elbo got no tokens: is the validation set empty?")
    per_token = total / tokens
    return ElboReport(per_token, per_token / math.log(2), math.exp(min(per_token, 700.0)), tokens // num_samples)


def unpack_batch(batch: torch.Tensor | dict, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept a tensor of token ids or a dict with input_ids and optional attention_mask. The ids go
    to `device`; the mask stays where the loader put it (on the host, usually): `diffusion_loss`
    decides the masking there and copies it to the model's device itself."""
    device = torch.device(device)
    if isinstance(batch, dict):
        return to_device(batch["input_ids"], device), batch.get("attention_mask")
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return to_device(batch, device), None

