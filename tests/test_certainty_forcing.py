"""Certainty-forcing self-distillation: a block-diffusion model fine-tuned on its own answers decodes
more tokens per forward pass at a fixed threshold, and writes the same answers."""

import statistics

import numpy as np
import pytest
import torch
from conftest import tiny_config

from pllm import DiffusionTransformer, GenerationConfig, TrainingConfig
from pllm.certainty_forcing import CertaintyForcingTrainer, certainty_forcing_loss, self_generated_sequences
from pllm.data import make_dataloader
from pllm.decoding import DecodeRules, decode_with_rules
from pllm.diffusion import get_schedule
from pllm.trainer import DistributedTrainer

BLOCK, PROMPT, GEN, VOCAB = 8, 16, 16, 24


def noisy_cycle(length: int, seed: int) -> np.ndarray:
    """Tokens 4..VOCAB-1 stepping +1 (mod the cycle) with probability 0.7, else jumping anywhere: the
    most likely continuation is the cycle, but no single position is more than 70% certain."""
    rng = np.random.default_rng(seed)
    out, token = np.empty(length, dtype=np.int64), 4
    for i in range(length):
        token = 4 + (token - 4 + 1) % (VOCAB - 4) if rng.random() < 0.7 else int(rng.integers(4, VOCAB))
        out[i] = token
    return out


def cycle_continuation(last: torch.Tensor) -> torch.Tensor:
    """(N, GEN): the cycle's next GEN tokens after each of `last` (N,)."""
    return 4 + (last[:, None] - 4 + torch.arange(1, GEN + 1)) % (VOCAB - 4)


def tpf_and_answers(model, prompts, threshold: float):
    cfg = GenerationConfig(max_new_tokens=GEN, num_refinement_steps=GEN, temperature=0.0, strategy="threshold",
                           confidence_threshold=threshold, use_adaptive_steps=False)
    model.eval()
    out = decode_with_rules(model, list(prompts), [DecodeRules.from_config(cfg)] * len(prompts))
    return GEN / statistics.fmean(out.nfe_per_sequence), torch.stack(out.tokens)


def train_config(steps: int, tmp_path, lr: float) -> TrainingConfig:
    return TrainingConfig(batch_size=32, seq_len=PROMPT + GEN, learning_rate=lr, num_train_steps=steps,
                          warmup_steps=10, eval_interval=10**9, log_interval=10**9, save_interval=10**9, use_fsdp=False,
                          use_torch_compile=False, gradient_checkpointing=False, mixed_precision="no",
                          output_dir=str(tmp_path))


def test_certainty_forcing_raises_tokens_per_forward_and_keeps_the_answers(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, attention_mode="block_causal",
                      block_size=BLOCK, noise_schedule="linear", mask_token_id=3)
    model = DiffusionTransformer(cfg)
    corpus = noisy_cycle(40_000, seed=1)
    DistributedTrainer(model, train_config(300, tmp_path / "base", 3e-3), cfg,
                       make_dataloader(corpus, PROMPT + GEN, 32, shuffle=True), device="cpu",
                       show_progress=False, on_save=lambda trainer: None).train()

    held_out = noisy_cycle(64 * PROMPT, seed=2)
    prompts = torch.from_numpy(held_out).view(64, PROMPT)
    tpf_before, _ = tpf_and_answers(model, prompts, threshold=0.9)
    _, teacher = tpf_and_answers(model, prompts, threshold=1.0)  # one token per forward pass

    own = torch.from_numpy(noisy_cycle(256 * PROMPT, seed=3)).view(256, PROMPT)
    sequences = self_generated_sequences(model, own, GEN)
    assert sequences.shape == (256, PROMPT + GEN) and torch.equal(sequences[:, :PROMPT], own)
    assert not (sequences == cfg.mask_token_id).any()
    loader = torch.utils.data.DataLoader(sequences, batch_size=32, shuffle=True, drop_last=True)
    trainer = CertaintyForcingTrainer(model, train_config(300, tmp_path / "cf", 5e-4), cfg, loader, device="cpu",
                                      show_progress=False, on_save=lambda trainer: None, prompt_length=PROMPT)
    trainer.train()

    tpf_after, answers_after = tpf_and_answers(model, prompts, threshold=0.9)
    ideal = cycle_continuation(prompts[:, -1])
    assert tpf_before < 1.5 and tpf_after > 3, (tpf_before, tpf_after)
    # On prompts it did not train on, the answers stay mostly the teacher's own (one token per
    # forward), which here are all the most likely continuation, the cycle's. (Measured: 90% of the
    # tokens; the rest are the parallel commits' typical slip, a run of the cycle out of phase.)
    assert (teacher == ideal).float().mean() > 0.95
    assert (answers_after == teacher).float().mean() > 0.85
    assert (answers_after == ideal).float().mean() > 0.85


def test_certainty_forcing_loss_masks_answers_only_and_checks_its_inputs(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, attention_mode="block_causal", block_size=BLOCK, mask_token_id=3)
    model = DiffusionTransformer(cfg)
    sequences = torch.randint(4, VOCAB, (2, PROMPT + GEN))
    blocks = (PROMPT + GEN) // BLOCK
    t, draw = torch.ones(2, blocks), torch.zeros(2, PROMPT + GEN)  # everything maskable is masked
    out = certainty_forcing_loss(model, sequences, PROMPT, get_schedule("linear"), 3, BLOCK, t, draw)
    assert out.num_masked == 2 * GEN and out.num_tokens == 2 * GEN
    assert out.loss.requires_grad and float(out.cross_entropy) > 0
    assert float(out.loss) == pytest.approx(float(out.cross_entropy) + 2.0 * float(out.entropy))
    no_entropy = certainty_forcing_loss(model, sequences, PROMPT, get_schedule("linear"), 3, BLOCK, t, draw,
                                        entropy_weight=0.0)
    assert torch.allclose(no_entropy.loss, out.cross_entropy)
    none_masked = certainty_forcing_loss(model, sequences, PROMPT, get_schedule("linear"), 3, BLOCK, t,
                                         torch.ones(2, PROMPT + GEN))  # every draw above the mask probability
    assert none_masked.num_masked == 0 and float(none_masked.loss) == 0.0
    with pytest.raises(ValueError, match="multiple of block_size"):
        certainty_forcing_loss(model, sequences, PROMPT - 1, get_schedule("linear"), 3, BLOCK, t, draw)
    bidirectional = DiffusionTransformer(tiny_config(vocab_size=VOCAB, mask_token_id=3))
    with pytest.raises(ValueError, match="multiple of block_size"):  # before any training step
        CertaintyForcingTrainer(model, train_config(1, tmp_path, 1e-3), cfg, [sequences], device="cpu",
                                prompt_length=PROMPT + 1)
    with pytest.raises(ValueError, match="block-causal"):
        CertaintyForcingTrainer(bidirectional, train_config(1, tmp_path, 1e-3), bidirectional.config,
                                [sequences], device="cpu", prompt_length=PROMPT)
