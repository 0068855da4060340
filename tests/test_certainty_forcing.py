"""Certainty-forcing self-distillation: a block-diffusion model fine-tuned on its own answers decodes
more tokens per forward pass at a fixed threshold, and writes the same answers."""

import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from pllm import DiffusionTransformer, GenerationConfig, TrainingConfig
from pllm.certainty_forcing import (CertaintyForcingTrainer, certainty_forcing_loss, one_token_per_forward,
                                    self_generated_answers)
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
    teacher = decode_with_rules(model, list(prompts), [DecodeRules.from_config(one_token_per_forward(GEN, BLOCK))]
                                * len(prompts)).tokens
    teacher = torch.stack(teacher)

    # Prompts of 9-16 tokens (answers then start anywhere in a block), each answered up to 32 tokens
    own = torch.from_numpy(noisy_cycle(256 * PROMPT, seed=3)).view(256, PROMPT)
    own = [row[: 9 + i % 8] for i, row in enumerate(own)]
    data = self_generated_answers(model, own, PROMPT + GEN, fixed_shape_steps=True)
    assert [int(d["prompt_length"]) for d in data] == [len(p) for p in own]
    assert all(d["input_ids"].shape == (PROMPT + GEN,) and torch.equal(d["input_ids"][:len(p)], p)
               for d, p in zip(data, own))
    assert not any((d["input_ids"] == cfg.mask_token_id).any() for d in data)
    # Through the engine's fixed-shape steps (as on a GPU): the answers of the packed decoding loop.
    packed_rules = [DecodeRules.from_config(one_token_per_forward(PROMPT + GEN - len(p), BLOCK)) for p in own]
    packed = decode_with_rules(model, own, packed_rules).tokens
    assert all(torch.equal(d["input_ids"][len(p):], a) for d, p, a in zip(data, own, packed))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    trainer = CertaintyForcingTrainer(model, train_config(300, tmp_path / "cf", 5e-4), cfg, loader, device="cpu",
                                      show_progress=False, on_save=lambda trainer: None)
    trainer.train()
    logged = [h for h in trainer.history if "loss" in h]
    assert logged and all(0 <= h["accuracy"] <= 1 and h["entropy_of_right"] >= 0 for h in logged)
    assert logged[-1]["loss"] == pytest.approx(logged[-1]["cross_entropy"] + 2 * logged[-1]["entropy_of_right"], rel=1e-4)

    tpf_after, answers_after = tpf_and_answers(model, prompts, threshold=0.9)
    ideal = cycle_continuation(prompts[:, -1])
    assert tpf_before < 1.5 and tpf_after > 3, (tpf_before, tpf_after)
    # On prompts it did not train on, the answers stay mostly the teacher's own (one token per
    # forward), which here are all the most likely continuation, the cycle's. (Measured: 84% of the
    # tokens, at a TPF of 5.0; the rest are the parallel commits' typical slip, a run of the cycle
    # out of phase. A fine-tune that broke the model would leave far fewer.)
    assert (teacher == ideal).float().mean() > 0.95
    assert (answers_after == teacher).float().mean() > 0.75
    assert (answers_after == ideal).float().mean() > 0.75


def test_certainty_forcing_loss_equals_its_definition_and_masks_answers_only(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=VOCAB, attention_mode="block_causal", block_size=BLOCK, mask_token_id=3)
    model = DiffusionTransformer(cfg)
    L = PROMPT + GEN
    sequences = torch.randint(4, VOCAB, (3, L))
    prompt_lengths = torch.tensor([PROMPT, 5, 13])  # answers starting on and off block boundaries
    t, draw = torch.full((3, L // BLOCK), 0.5), torch.rand(3, L)
    # The definition, over a full forward pass: masked = answer positions whose draw is under t
    answer = torch.arange(L)[None, :] >= prompt_lengths[:, None]
    masked = answer & (draw < 0.5)
    # Some masked positions predicted right, so the entropy term counts: the last block's masked
    # tokens set to the model's predictions (no other position sees them)
    with torch.no_grad():
        guess = model(torch.where(masked, 3, sequences), t, clean_input_ids=sequences).argmax(-1)
    last = masked & (torch.arange(L) >= L - BLOCK)
    sequences = torch.where(last, guess, sequences)
    out = certainty_forcing_loss(model, sequences, prompt_lengths, get_schedule("linear"), 3, BLOCK, t, draw,
                                 entropy_weight=2.0, temperature=0.5)
    logits = model(torch.where(masked, 3, sequences), t, clean_input_ids=sequences)[masked]
    targets = sequences[masked]
    ce = F.cross_entropy(logits, targets)
    right = logits.argmax(-1) == targets
    p = (logits / 0.5).softmax(-1)
    entropy = -(p * p.log()).sum(-1)[right].mean()
    assert out.num_masked == int(masked.sum()) and out.num_answer_tokens == int(answer.sum())
    assert out.num_tokens == 3 * L and right.any()
    assert torch.allclose(out.cross_entropy, ce, atol=1e-5) and torch.allclose(out.entropy, entropy, atol=1e-5)
    assert torch.allclose(out.loss, ce + 2.0 * entropy, atol=1e-5)
    assert torch.allclose(out.accuracy, right.float().mean())

    everything = certainty_forcing_loss(model, sequences, prompt_lengths, get_schedule("linear"), 3, BLOCK,
                                        torch.ones(3, L // BLOCK), torch.zeros(3, L))
    assert everything.num_masked == int(answer.sum())  # every answer position, never a prompt one
    none_masked = certainty_forcing_loss(model, sequences, PROMPT, get_schedule("linear"), 3, BLOCK,
                                         torch.ones(3, L // BLOCK), torch.ones(3, L))
    assert none_masked.num_masked == 0 and float(none_masked.loss) == 0.0
    with pytest.raises(ValueError, match="num_blocks"):  # a t per row instead of per block
        certainty_forcing_loss(model, sequences, PROMPT, get_schedule("linear"), 3, BLOCK, torch.ones(3), draw)


def test_certainty_forcing_trainer_checks_its_inputs_before_training(tmp_path):
    bidirectional = DiffusionTransformer(tiny_config(vocab_size=VOCAB, mask_token_id=3))
    with pytest.raises(ValueError, match="block-causal"):
        CertaintyForcingTrainer(bidirectional, train_config(1, tmp_path, 1e-3), bidirectional.config,
                                [torch.zeros(2, 8)], device="cpu")
    cfg = tiny_config(vocab_size=VOCAB, attention_mode="block_causal", block_size=BLOCK, mask_token_id=3)
    model = DiffusionTransformer(cfg)
    with pytest.raises(ValueError, match="every prompt must be shorter"):
        self_generated_answers(model, [torch.arange(4, 12)], length=8)
    sequences = torch.randint(4, VOCAB, (2, PROMPT + GEN))
    for batch, match in [(sequences, "prompt_length"),
                         ({"input_ids": sequences, "prompt_length": torch.tensor([4, 4]),
                           "attention_mask": torch.ones_like(sequences)}, "attention_mask")]:
        trainer = CertaintyForcingTrainer(model, train_config(1, tmp_path, 1e-3), cfg, [batch], device="cpu",
                                          show_progress=False, on_save=lambda trainer: None)
        with pytest.raises(ValueError, match=match):
            trainer.train()


def test_replay_of_the_pretraining_loss_holds_the_model_near_the_data(tmp_path):
    """Fine-tuned on poor answers (one token repeated), a model forgets the corpus; replaying the
    pre-training loss on corpus rows in the same steps keeps its validation ELBO near the base's."""
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, attention_mode="block_causal",
                      block_size=BLOCK, noise_schedule="linear", mask_token_id=3)
    corpus, held_out = noisy_cycle(40_000, seed=1), noisy_cycle(4_096, seed=2)
    torch.manual_seed(0)
    base = DiffusionTransformer(cfg)
    DistributedTrainer(base, train_config(200, tmp_path / "base", 3e-3), cfg,
                       make_dataloader(corpus, PROMPT + GEN, 32, shuffle=True), device="cpu",
                       show_progress=False, on_save=lambda trainer: None).train()
    prompts = torch.from_numpy(noisy_cycle(128 * PROMPT, seed=3)).view(128, PROMPT)
    poor = [{"input_ids": torch.cat([p, torch.full((GEN,), 4)]), "prompt_length": torch.tensor(PROMPT)} for p in prompts]
    val = make_dataloader(held_out, PROMPT + GEN, 32, shuffle=False)

    def fine_tune(weight: float, name: str) -> tuple[float, list[dict]]:
        model = DiffusionTransformer(cfg)
        model.load_state_dict(base.state_dict())
        replay = make_dataloader(corpus, PROMPT + GEN, 32, shuffle=True) if weight else None
        trainer = CertaintyForcingTrainer(model, train_config(60, tmp_path / name, 3e-3), cfg,
                                          torch.utils.data.DataLoader(poor, batch_size=32, shuffle=True, drop_last=True),
                                          val, device="cpu", show_progress=False, on_save=lambda trainer: None,
                                          pretrain_dataloader=replay, pretrain_weight=weight)
        trainer.cfg.log_interval = 10
        metrics = trainer.train()
        return metrics["val_elbo_nats"], [h for h in trainer.history if "loss" in h]

    base_elbo = DistributedTrainer(base, train_config(1, tmp_path / "eval", 1e-3), cfg, [], val, device="cpu",
                                   show_progress=False).evaluate()["val_elbo_nats"]
    alone, logged_alone = fine_tune(0.0, "alone")
    replayed, logged = fine_tune(1.0, "replay")
    assert all("pretrain_nelbo" not in h for h in logged_alone)
    assert logged and all(h["pretrain_nelbo"] > 0 for h in logged)
    # Measured: base 1.85 nats, answers alone 10.6, with replay 2.03
    assert alone > base_elbo + 1.0, (base_elbo, alone)
    assert replayed < base_elbo + 0.5 and replayed < alone - 0.8, (base_elbo, alone, replayed)


def test_replay_needs_both_a_loader_and_a_weight(tmp_path):
    cfg = tiny_config(vocab_size=VOCAB, attention_mode="block_causal", block_size=BLOCK, mask_token_id=3)
    model = DiffusionTransformer(cfg)
    rows = make_dataloader(noisy_cycle(1_000, seed=1), PROMPT + GEN, 4, shuffle=True)
    for loader, weight in [(rows, 0.0), (None, 1.0), (rows, -1.0)]:
        with pytest.raises(ValueError, match="pretrain_weight"):
            CertaintyForcingTrainer(model, train_config(1, tmp_path, 1e-3), cfg, [torch.zeros(2, 8)], device="cpu",
                                    pretrain_dataloader=loader, pretrain_weight=weight)
