import time

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig
from pllm.optim import lr_lambda


def chain_batches(n=64, length=32, vocab=96, seed=0):
    """Sequences with x[i+1] = x[i] + 7 (mod): learnable only by reading the neighbours."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab - 4, (n, 1), generator=g)
    return (start + torch.arange(length) * 7) % (vocab - 4) + 4


def small_training(**kw):
    base = dict(batch_size=16, seq_len=32, learning_rate=3e-3, warmup_steps=5, num_train_steps=40, use_fsdp=False,
                use_torch_compile=False, gradient_checkpointing=False, mixed_precision="no", log_interval=5,
                eval_interval=20, eval_batches=2)
    base.update(kw)
    return TrainingConfig(**base)


def loader(n_batches=4, seed=0):
    data = chain_batches(16 * n_batches, seed=seed)
    return [data[i * 16 : (i + 1) * 16] for i in range(n_batches)]


def test_training_lowers_the_validation_elbo():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config())
    seen = []
    trainer = DistributedTrainer(model, small_training(num_train_steps=120), train_dataloader=loader(),
                                 eval_dataloader=loader(2, seed=1), callbacks=[lambda m, s: seen.append(m)],
                                 show_progress=False)
    before = trainer.evaluate()["val_elbo_nats"]
    final = trainer.train()
    assert trainer.step == 120
    assert final["val_elbo_nats"] < before - 1.0, (before, final)  # nats per token
    assert any("tokens_per_s" in m for m in seen) and any("val_elbo_nats" in m for m in seen)
    assert trainer.tokens_seen == 120 * 16 * 32


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = small_training(warmup_steps=10, num_train_steps=110, min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_gradient_accumulation_counts_micro_batches():
    model = DiffusionTransformer(tiny_config())
    trainer = DistributedTrainer(model, small_training(num_train_steps=3, gradient_accumulation_steps=2),
                                 train_dataloader=loader(), show_progress=False)
    trainer.train()
    assert trainer.step == 3 and trainer.tokens_seen == 3 * 2 * 16 * 32


def test_checkpoint_restores_weights_optimizer_scheduler_and_step(tmp_path):
    torch.manual_seed(0)
    cfg = small_training(num_train_steps=20, output_dir=str(tmp_path))
    first = DistributedTrainer(DiffusionTransformer(tiny_config()), cfg, train_dataloader=loader(), show_progress=False)
    first.cfg = cfg.replace(num_train_steps=10)
    first.train()
    path = first.save_checkpoint()
    assert path.name == "checkpoint-10"

    second = DistributedTrainer(DiffusionTransformer(tiny_config()), cfg, train_dataloader=loader(), show_progress=False)
    second.load_checkpoint(path)
    assert second.step == 10 and second.tokens_seen == first.tokens_seen
    assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    s1, s2 = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    second.train()
    assert second.step == 20  # continues, does not restart


def test_missing_dataloader_is_a_clear_error():
    with pytest.raises(ValueError, match="train_dataloader"):
        DistributedTrainer(DiffusionTransformer(tiny_config()), small_training())


def test_padded_batches_mask_and_count_only_real_tokens():
    """A dict batch with a padding mask: the noise (drawn on the host) never masks padding, and the
    loss counts real tokens only, like `diffusion_loss` given the same noise by hand."""
    from pllm.diffusion import diffusion_loss

    torch.manual_seed(0)
    trainer = DistributedTrainer(DiffusionTransformer(tiny_config()), small_training(), train_dataloader=loader(),
                                 show_progress=False)
    input_ids = loader()[0]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 20:] = 0  # right padding
    out = trainer.training_step({"input_ids": input_ids, "attention_mask": attention_mask})
    assert out.num_tokens == int(attention_mask.sum()) and 0 < out.num_masked <= out.num_tokens
    t, draw = trainer._noise(input_ids, 0)
    want = diffusion_loss(trainer.model, input_ids, trainer.schedule, trainer.model_config.mask_token_id,
                          attention_mask, t=t, mask_draw=draw)
    p_mask = trainer.schedule.mask_probability(t)  # (B, 1): one noise level per sequence
    assert out.num_masked == want.num_masked == int(((draw < p_mask) & attention_mask.bool()).sum())
    torch.testing.assert_close(out.loss, want.loss)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, 0.0])  # clipping active / inactive / off
def test_clipping_inside_fused_adamw_equals_clip_then_step(max_norm):
    # On a GPU the optimizer is fused AdamW and the clip is folded into its kernel (grad_scale); the
    # CPU build of fused AdamW takes the same path here, against clip_grad_norm_ + unfused AdamW.
    from pllm.optim import build_scheduler, param_groups
    from pllm.strategies.base import Strategy

    torch.manual_seed(0)
    cfg = small_training(max_grad_norm=max_norm, learning_rate=1e-2, warmup_steps=1)
    models, strategies = [DiffusionTransformer(tiny_config()) for _ in range(2)], []
    models[1].load_state_dict(models[0].state_dict())
    for model, fused in zip(models, (True, False)):
        strategy = Strategy(cfg, torch.device("cpu"))
        strategy.setup(model)
        strategy.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, fused=fused)
        strategy.scheduler = build_scheduler(strategy.optimizer, cfg)
        strategies.append(strategy)
    batch = chain_batches(8)
    norms = []
    for _ in range(3):
        for model in models:
            model(batch).float().pow(2).mean().backward()
        grads = [p.grad for p in models[0].parameters() if p.grad is not None]
        assert strategies[0]._clips_in_optimizer(grads) and not strategies[1]._clips_in_optimizer(grads)
        norms.append([float(s.step()) for s in strategies])
        assert not hasattr(strategies[0].optimizer, "grad_scale")  # left for no other step
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert norms[0][0] == pytest.approx(norms[0][1], rel=1e-5)
    assert (norms[0][0] > max_norm) == (max_norm < 1)  # the small bound does clip; 0 is no clipping


def test_progress_is_log_lines_not_bar_redraws_when_output_is_not_a_terminal(capsys, caplog):
    """Under pytest stderr is a pipe, as in a log file: no bar, one line per log_interval instead."""
    trainer = DistributedTrainer(DiffusionTransformer(tiny_config()), small_training(num_train_steps=10),
                                 train_dataloader=loader(), show_progress=True)
    with caplog.at_level("INFO", logger="pllm.trainer"):
        trainer.train()
    err = capsys.readouterr().err
    assert "\r" not in err and "train:" not in err  # tqdm's redraws and its "train:" label
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 5/10", "step 10/10"]
    assert all("loss=" in line for line in lines)


class SlowStart:
    """A loader whose first batch takes a while, like a data pipeline or workers starting up."""

    def __init__(self, batches, delay_s):
        self.batches, self.delay_s, self.started = batches, delay_s, False

    def __iter__(self):
        if not self.started:
            time.sleep(self.delay_s)
            self.started = True
        return iter(self.batches)


def test_the_time_budget_counts_training_only():
    """max_train_minutes starts after the first optimizer step: a start-up longer than the whole budget
    still leaves the budget for training steps."""
    budget_s = 3.0
    trainer = DistributedTrainer(DiffusionTransformer(tiny_config()),
                                 small_training(num_train_steps=100_000, max_train_minutes=budget_s / 60,
                                                eval_interval=100_000),
                                 train_dataloader=SlowStart(loader(), delay_s=budget_s + 1), show_progress=False)
    trainer.train()
    assert 5 < trainer.step < 100_000


def test_the_training_configs_kernel_choices_reach_every_layer():
    from pllm.kernels.options import KernelOptions
    from pllm.model import Attention, Block, SwiGLU

    kernels = KernelOptions(silu_mul=False, rotate_qkv=False, add_rms_norm=False)
    model = DiffusionTransformer(tiny_config())
    DistributedTrainer(model, small_training(kernels=kernels), train_dataloader=loader(), show_progress=False)
    layers = [m for m in model.modules() if isinstance(m, (Attention, SwiGLU, Block))]
    assert len(layers) == 3 * tiny_config().num_hidden_layers
    assert all(m.kernels is kernels for m in layers)
