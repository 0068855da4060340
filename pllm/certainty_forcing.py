"""Certainty-forcing self-distillation (dParallel, Chen et al. 2025) for block-diffusion models.

Threshold decoding commits every masked position whose confidence passes the threshold, so its
tokens per forward pass (TPF) are only as high as the model is sure. A model trained on the plain
masked-diffusion objective becomes sure of a block's positions one after another. Here the model is
fine-tuned on its own answers (what it writes one token per step, its "trajectory"): the
cross-entropy keeps it on that trajectory, and an entropy penalty on the masked positions it
already predicts right pushes it to be sure of them early, several at a time.

    answers = self_generated_sequences(model, prompts, gen_length=256)
    trainer = CertaintyForcingTrainer(model, train_cfg, model.config, loader_over(answers),
                                      prompt_length=prompts.shape[1])
    trainer.train()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GenerationConfig
from .decoding import DecodeRules, decode_with_rules
from .diffusion import DiffusionLoss, masked_positions, to_device, unpack_batch
from .trainer import DistributedTrainer


def self_generated_sequences(model: torch.nn.Module, prompts: torch.Tensor, gen_length: int,
                             batch_size: int = 64) -> torch.Tensor:
    """(N, P + gen_length): each prompt of `prompts` (N, P) followed by the model's greedy answer,
    decoded one token per forward pass (LLaDA's low-confidence remasking with as many steps as
    tokens): the trajectory the distilled model keeps."""
    cfg = GenerationConfig(max_new_tokens=gen_length, num_refinement_steps=gen_length, temperature=0.0,
                           strategy="static", use_adaptive_steps=False)
    rules = DecodeRules.from_config(cfg)
    was_training = model.training
    model.eval()
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            answers += [a.cpu() for a in decode_with_rules(model, chunk, [rules] * len(chunk)).tokens]
    model.train(was_training)
    return torch.cat([prompts.cpu(), torch.stack(answers)], dim=1)


@dataclass
class CertaintyForcingLoss(DiffusionLoss):
    cross_entropy: torch.Tensor = None  # mean over masked answer positions (detached)
    entropy: torch.Tensor = None  # mean over the masked positions predicted right (detached)
    accuracy: torch.Tensor = None  # share of masked positions predicted right (detached)


def certainty_forcing_loss(model: torch.nn.Module, sequences: torch.Tensor, prompt_length: int, schedule,
                           mask_token_id: int, block_size: int, t: torch.Tensor, mask_draw: torch.Tensor,
                           entropy_weight: float = 2.0, temperature: float = 0.5) -> CertaintyForcingLoss:
    """Mean cross-entropy over the masked answer positions of `sequences` (B, L) plus entropy_weight
    times the mean entropy of softmax(logits / temperature) over those of them the model already
    predicts right. Answer blocks are masked as in block-diffusion training (t (B, num_blocks) and
    mask_draw (B, L), drawn on the host); the prompt's `prompt_length` tokens are never masked."""
    B, L = sequences.shape
    device = sequences.device
    if prompt_length % block_size:
        raise ValueError(f"prompt_length {prompt_length} must be a multiple of block_size {block_size}: "
                         "answers then start on a block boundary, as when decoding")
    noise = mask_draw.device
    answer = torch.arange(L, device=noise)[None, :].expand(B, L) >= prompt_length
    t_pos = t.view(B, -1).repeat_interleave(block_size, dim=1)[:, :L]
    is_masked = masked_positions(t_pos.to(noise), schedule, answer, draw=mask_draw)
    index = is_masked.flatten().nonzero().squeeze(1)
    is_masked, index, t = (to_device(x, device) for x in (is_masked, index, t))
    x_t = torch.where(is_masked, mask_token_id, sequences)
    logits = model(x_t, t, logits_mask=index, clean_input_ids=sequences).float()  # (N, V)
    targets = sequences.flatten()[index]
    num_masked = max(int(index.numel()), 1)  # sums over no masked position are 0, not NaN
    cross_entropy_sum = F.cross_entropy(logits, targets, reduction="sum")
    cross_entropy = cross_entropy_sum / num_masked
    right = (logits.argmax(-1) == targets).float()
    log_p = F.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    certainty = (entropy * right).sum() / right.sum().clamp(min=1)
    loss = cross_entropy + entropy_weight * certainty
    # nelbo_sum (what the trainer logs as the loss's sum) is the cross-entropy's here
    return CertaintyForcingLoss(loss, cross_entropy_sum.detach(), int(answer.sum()), int(index.numel()),
                                cross_entropy.detach(), certainty.detach(), (right.sum() / num_masked).detach())


class CertaintyForcingTrainer(DistributedTrainer):
    """`DistributedTrainer` (strategies, checkpoints, logging, time budget) with the certainty-forcing
    objective over batches of prompt + self-generated answer (all prompts `prompt_length` long)."""

    def __init__(self, *args, prompt_length: int, entropy_weight: float = 2.0, temperature: float = 0.5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if self.block_size is None:
            raise ValueError("certainty forcing is for block-causal models (attention_mode: block_causal)")
        if prompt_length % self.block_size:
            raise ValueError(f"prompt_length {prompt_length} must be a multiple of block_size {self.block_size}")
        self.prompt_length, self.entropy_weight, self.temperature = prompt_length, entropy_weight, temperature

    def training_step(self, batch, micro: int = 0) -> CertaintyForcingLoss:
        sequences, _ = unpack_batch(batch, self.device)
        t, draw = self._noise(sequences, micro)
        with self.autocast():
            return certainty_forcing_loss(self.model, sequences, self.prompt_length, self.schedule,
                                          self.model_config.mask_token_id, self.block_size, t, draw,
                                          self.entropy_weight, self.temperature)
