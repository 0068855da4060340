"""Certainty-forcing self-distillation (dParallel, Chen et al. 2025) for block-diffusion models.

Threshold decoding commits every masked position whose confidence passes the threshold, so its
tokens per forward pass (TPF) are only as high as the model is sure. A model trained on the plain
masked-diffusion objective becomes sure of a block's positions one after another. Here the model is
fine-tuned on its own answers (what it writes one token per forward pass, its "trajectory"): the
cross-entropy keeps it on that trajectory, and an entropy penalty on the masked positions it
already predicts right pushes it to be sure of them early, several at a time.

A small model's own answers are often poor (repeated lines), and training on them alone pulls its
validation ELBO up. `pretrain_dataloader` with `pretrain_weight` > 0 adds the pre-training objective
on corpus rows to each step (replay), which holds the model near the data while it grows certain.

    data = self_generated_answers(model, prompts, length=384)   # prompts: 1-D token tensors
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    CertaintyForcingTrainer(model, train_cfg, model.config, loader).train()
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .decoding import DecodeRules, decode_with_rules
from .diffusion import DiffusionLoss, masked_positions, to_device
from .trainer import DistributedTrainer, set_epoch


def one_token_per_forward(gen_length: int, block_size: int) -> GenerationConfig:
    """Greedy decoding that commits exactly one token per forward pass (LLaDA's low-confidence
    remasking): every block gets at least as many steps as it has positions."""
    return GenerationConfig(max_new_tokens=gen_length, num_refinement_steps=gen_length * max(block_size, 1),
                            temperature=0.0, strategy="static", use_adaptive_steps=False)


def self_generated_answers(model: torch.nn.Module, prompts: Sequence[torch.Tensor], length: int,
                           batch_size: int = 64,
                           fixed_shape_steps: bool | None = None) -> list[dict[str, torch.Tensor]]:
    """The fine-tune's data: each prompt (1-D, shorter than `length`) followed by the model's answer
    decoded one token per forward pass, up to `length` tokens in all, as {"input_ids" (length,),
    "prompt_length" ()}. Prompts may differ in length; the rows then have answers of different lengths.
    fixed_shape_steps: decode block-causal models through the engine's fixed-shape steps (default: on
    a GPU, where they are CUDA graphs)."""
    if any(len(p) >= length for p in prompts):
        raise ValueError(f"every prompt must be shorter than length={length}")
    block = model.config.block_size or 1
    was_training = model.training
    model.eval()
    data = []
    # The fixed-shape step is one graph replay for the whole batch, where the packed pass runs
    # attention sequence by sequence: on a GPU the host's launches, not the device, set that pace.
    if fixed_shape_steps is None:
        fixed_shape_steps = next(model.parameters()).is_cuda
    runner = None
    if fixed_shape_steps and model.config.attention_mode == "block_causal" and prompts:
        from .engine import EngineConfig, ModelRunner

        config = EngineConfig(max_num_seqs=min(batch_size, len(prompts)), compile_step=False)
        runner = ModelRunner(model, config, static_step=True)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = [p.cpu() for p in prompts[start:start + batch_size]]
            rules = [DecodeRules.from_config(one_token_per_forward(length - len(p), block)) for p in chunk]
            for prompt, answer in zip(chunk, decode_with_rules(model, chunk, rules, runner=runner).tokens):
                data.append({"input_ids": torch.cat([prompt, answer.cpu()]), "prompt_length": torch.tensor(len(prompt))})
    model.train(was_training)
    return data


@dataclass
class CertaintyForcingLoss(DiffusionLoss):
    num_answer_tokens: int = 0  # answer positions (the only ones that can be masked)
    cross_entropy: torch.Tensor = None  # mean over masked answer positions (detached)
    entropy: torch.Tensor = None  # mean over the masked positions predicted right (detached)
    accuracy: torch.Tensor = None  # share of masked positions predicted right (detached)
    pretrain_nelbo: torch.Tensor | None = None  # the replayed corpus rows' NELBO per token (detached)


def certainty_forcing_loss(model: torch.nn.Module, sequences: torch.Tensor, prompt_lengths: torch.Tensor | int,
                           schedule, mask_token_id: int, block_size: int, t: torch.Tensor, mask_draw: torch.Tensor,
                           entropy_weight: float = 2.0, temperature: float = 0.5) -> CertaintyForcingLoss:
    """Mean cross-entropy over the masked answer positions of `sequences` (B, L) plus entropy_weight
    times the mean entropy of softmax(logits / temperature) over those of them the model already
    predicts right. Blocks are masked as in block-diffusion training (t (B, num_blocks) and
    mask_draw (B, L), drawn on the host; blocks at absolute positions, as decoding places them);
    a row's first prompt_lengths[b] tokens, its prompt, are never masked."""
    B, L = sequences.shape
    num_blocks = -(-L // block_size)
    if t.shape != (B, num_blocks) or mask_draw.shape != (B, L):
        raise ValueError(f"t must be (B, num_blocks) = {(B, num_blocks)} and mask_draw (B, L) = {(B, L)}; "
                         f"got {tuple(t.shape)} and {tuple(mask_draw.shape)}")
    device, noise = sequences.device, mask_draw.device
    prompt_lengths = torch.as_tensor(prompt_lengths, device=noise).expand(B)
    answer = torch.arange(L, device=noise)[None, :] >= prompt_lengths[:, None]
    t_pos = t.to(noise).repeat_interleave(block_size, dim=1)[:, :L]
    is_masked = masked_positions(t_pos, schedule, answer, draw=mask_draw)
    index = is_masked.flatten().nonzero().squeeze(1)
    is_masked, index, t = (to_device(x, device) for x in (is_masked, index, t))
    x_t = torch.where(is_masked, mask_token_id, sequences)
    logits = model(x_t, t, logits_mask=index, clean_input_ids=sequences)  # (N, V), float32
    targets = sequences.flatten()[index]
    num_masked = max(int(index.numel()), 1)  # sums over no masked position are 0, not NaN
    cross_entropy_sum = F.cross_entropy(logits, targets, reduction="sum")
    cross_entropy = cross_entropy_sum / num_masked
    right = (logits.argmax(-1) == targets).float()
    log_p = F.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    certainty = (entropy * right).sum() / right.sum().clamp(min=1)
    loss = cross_entropy + entropy_weight * certainty
    # nelbo_sum (what the trainer logs as the loss's sum) is the cross-entropy's here; num_tokens
    # counts every token the forward pass read, as tokens/s and MFU do in pre-training
    return CertaintyForcingLoss(loss, cross_entropy_sum.detach(), B * L, int(index.numel()), int(answer.sum()),
                                cross_entropy.detach(), certainty.detach(), (right.sum() / num_masked).detach())


class CertaintyForcingTrainer(DistributedTrainer):
    """`DistributedTrainer` (strategies, checkpoints, logging, time budget) with the certainty-forcing
    objective, over batches {"input_ids" (B, L), "prompt_length" (B,)} (`self_generated_answers`)."""

    def __init__(self, model: torch.nn.Module, train_config, model_config=None, *args, entropy_weight: float = 2.0,
                 temperature: float = 0.5, pretrain_dataloader=None, pretrain_weight: float = 0.0, **kwargs):
        if (model_config or model.config).attention_mode != "block_causal":  # before the strategy wraps the model
            raise ValueError("certainty forcing is for block-causal models (attention_mode: block_causal)")
        if pretrain_weight < 0 or (pretrain_weight > 0) != (pretrain_dataloader is not None):
            raise ValueError("pretrain_weight > 0 needs a pretrain_dataloader, and a pretrain_dataloader needs "
                             f"pretrain_weight > 0 (got {pretrain_weight})")
        super().__init__(model, train_config, model_config, *args, **kwargs)
        self.entropy_weight, self.temperature = entropy_weight, temperature
        self.pretrain_weight = pretrain_weight
        self._pretrain = _endless(pretrain_dataloader) if pretrain_dataloader is not None else None
        self._last: CertaintyForcingLoss | None = None

    def _emit(self, metrics: dict[str, float]) -> None:
        """Training log lines also get the last micro-batch's terms (read here, at log steps only:
        reading them waits for the device)."""
        if "loss" in metrics and self._last is not None:
            metrics = {**metrics, "cross_entropy": float(self._last.cross_entropy),
                       "entropy_of_right": float(self._last.entropy), "accuracy": float(self._last.accuracy)}
            if self._last.pretrain_nelbo is not None:
                metrics["pretrain_nelbo"] = float(self._last.pretrain_nelbo)
        super()._emit(metrics)

    def training_step(self, batch, micro: int = 0) -> CertaintyForcingLoss:
        if not isinstance(batch, dict) or "prompt_length" not in batch:
            raise ValueError('certainty forcing needs batches {"input_ids", "prompt_length"} '
                             "(see self_generated_answers)")
        if batch.get("attention_mask") is not None:
            raise ValueError("certainty forcing takes unpadded rows (no attention_mask)")
        sequences = to_device(batch["input_ids"], self.device)
        t, draw = self._noise(sequences, micro)
        with self.autocast():
            self._last = certainty_forcing_loss(self.model, sequences, batch["prompt_length"], self.schedule,
                                                self.model_config.mask_token_id, self.block_size, t, draw,
                                                self.entropy_weight, self.temperature)
        if self._pretrain is not None:
            # Pre-training's own step, with its own noise: micro-batch numbers past any the answers use
            replay = super().training_step(next(self._pretrain), micro + self.cfg.gradient_accumulation_steps)
            self._last.loss = self._last.loss + self.pretrain_weight * replay.loss
            self._last.pretrain_nelbo = replay.nelbo_sum / max(replay.num_tokens, 1)
        return self._last


def _endless(loader):
    """The replay rows, epoch after epoch (a fresh shuffle each pass)."""
    for epoch in itertools.count():
        set_epoch(loader, epoch)
        yield from loader
