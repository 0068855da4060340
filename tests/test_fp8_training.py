"""FP8 training (`pllm.fp8_training`): the seed API's `ModelConfig.use_fp8` and
`mixed_precision="fp8"` train the projections as torchao Float8Linear layers (emulated on CPU), the
checkpoints are plain ones, and combinations that cannot work fail before any work. The two-process
FSDP2 run is in test_strategies.py; the H100 speed in benchmarks/train_throughput.py."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig
from pllm.config import LoraSettings
from pllm.checkpoint import load_model, save_pretrained
from test_trainer import loader, small_training


def float8_layers(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if type(m).__name__ == "Float8Linear"]


def test_use_fp8_trains_the_projections_in_float8_and_saves_a_plain_checkpoint(tmp_path):
    def run(use_fp8: bool):
        torch.manual_seed(0)
        model = DiffusionTransformer(tiny_config(use_fp8=use_fp8))
        return DistributedTrainer(model, small_training(num_train_steps=60), train_dataloader=loader(),
                                  eval_dataloader=loader(2, seed=1), show_progress=False)

    trainer = run(use_fp8=True)
    assert trainer.cfg.mixed_precision == "fp8"  # the model's use_fp8 asked for it
    layers = float8_layers(trainer.model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(layers) == 4 * trainer.model_config.num_hidden_layers and type(trainer.model.lm_head) is torch.nn.Linear
    before = trainer.evaluate()["val_elbo_nats"]
    final = trainer.train()["val_elbo_nats"]
    reference = run(use_fp8=False).train()["val_elbo_nats"]  # float32 projections, the same steps and noise
    assert final < before - 0.5 and abs(final - reference) < 0.05, (before, final, reference)
    # The float8 layers hold float32 master weights under the same names: a plain model loads them.
    save_pretrained(trainer.consolidated_model(), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert not float8_layers(loaded)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.cpu()), name


@pytest.mark.parametrize("bad, match", [
    (dict(use_deepspeed=True), "not DeepSpeed"),
    (dict(lora=LoraSettings(rank=4)), "with lora use mixed_precision='bf16'"),
    (dict(fp8_recipe="blockwise"), "fp8_recipe"),
])
def test_fp8_combinations_that_cannot_work_fail_at_config_time(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig(mixed_precision="fp8", use_fsdp=False, **bad)


def test_use_fp8_with_deepspeed_fails_before_any_work():
    model = DiffusionTransformer(tiny_config(use_fp8=True))
    with pytest.raises(ValueError, match="not DeepSpeed"):
        DistributedTrainer(model, small_training(use_deepspeed=True), train_dataloader=loader(), show_progress=False)
