"""LoRA adapters: only they train, the merged model computes what base + adapters did, and a
target that matches no layer fails naming it."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer
from pllm.config import LoraSettings
from pllm.diffusion import diffusion_loss, get_schedule
from pllm.lora import adapter_state_dict, apply_lora, has_lora, merge_lora


def test_lora_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = apply_lora(model, LoraSettings(rank=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(4, 90, (4, 24), generator=g)
        loss = diffusion_loss(model, ids, get_schedule("linear"), 3, generator=g).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = model.state_dict()
    for name, tensor in base.items():  # base weights bit-identical after training
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], tensor), name
    adapters = adapter_state_dict(model)
    assert adapters and all("lora_" in k for k in adapters)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in adapters.items() if "lora_B" in k)  # trained
    model.eval()
    ids = torch.randint(4, 90, (2, 16))
    with torch.no_grad():
        with_adapters = model(ids)
    merged = merge_lora(model)
    assert not has_lora(merged) and set(merged.state_dict()) == set(base)
    with torch.no_grad():
        assert torch.allclose(merged(ids), with_adapters, atol=1e-5)
        changed = DiffusionTransformer(tiny_config())
        changed.load_state_dict(base)
        assert not torch.allclose(changed.eval()(ids), with_adapters, atol=1e-4)  # the adapters mattered


def test_a_lora_target_that_matches_nothing_is_named():
    model = DiffusionTransformer(tiny_config())
    with pytest.raises(ValueError, match=r"target_modules: \['q_proj'\] match no linear layer.*qkv_proj"):
        apply_lora(model, LoraSettings(target_modules=("q_proj", "o_proj")))


def test_the_engine_refuses_unmerged_adapters():
    from pllm.engine import Engine

    model = apply_lora(DiffusionTransformer(tiny_config()), LoraSettings(rank=2))
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        Engine(model)
    Engine(merge_lora(model))  # merged: a plain model


def test_lora_fine_tuning_in_the_trainer_keeps_the_base_and_saves_merged(tmp_path):
    from pllm import DistributedTrainer, TrainingConfig
    from pllm.lora import has_lora

    torch.manual_seed(0)
    cfg = tiny_config()
    model = DiffusionTransformer(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(4, 90, (64, 16))
    training = TrainingConfig(batch_size=8, seq_len=16, learning_rate=1e-2, num_train_steps=8, warmup_steps=1,
                              eval_interval=8, eval_batches=1, log_interval=4, use_fsdp=False, use_torch_compile=False,
                              gradient_checkpointing=False, output_dir=str(tmp_path),
                              lora=LoraSettings(rank=4, target_modules=("qkv_proj", "down_proj")))
    trainer = DistributedTrainer(model, training, cfg, list(tokens.split(8)), list(tokens[:8].split(8)))
    trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)  # adapters only
    merged = trainer.consolidated_model()
    assert not has_lora(merged) and set(merged.state_dict()) == set(base)
    changed = [k for k in base if not torch.equal(merged.state_dict()[k], base[k])]
    assert changed and all("qkv_proj" in k or "down_proj" in k for k in changed)


def test_an_adapter_folder_loads_as_its_base_with_the_adapter_merged(tmp_path):
    import pllm
    from pllm.lora import ADAPTER_WEIGHTS, save_adapter

    torch.manual_seed(0)
    cfg = tiny_config()
    base = DiffusionTransformer(cfg).eval()
    pllm.save_pretrained(base, tmp_path / "base")
    model = apply_lora(DiffusionTransformer(cfg), LoraSettings(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # as if trained
    settings = LoraSettings(rank=4)
    adapter = save_adapter(model, tmp_path / "adapter", settings, base=str(tmp_path / "base"))
    from safetensors import safe_open
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        assert list(f.keys()) and all("lora_" in k for k in f.keys())  # adapters only
    loaded = pllm.load_model(adapter)
    assert not has_lora(loaded)
    base_with_adapter = apply_lora(pllm.load_model(tmp_path / "base"), settings)
    base_with_adapter.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(4, 90, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), base_with_adapter.eval()(ids), atol=1e-5)
        assert not torch.allclose(loaded(ids), base(ids), atol=1e-4)
    assert pllm.load_model(tmp_path / "base").config == pllm.checkpoint.load_config(adapter)
    # `pllm export` writes the merged model in the Llama layout; importing it back gives the same weights
    from pllm.cli import main
    from pllm.hf import import_checkpoint

    assert main(["export", str(adapter), str(tmp_path / "hf")]) == 0
    exported, _ = import_checkpoint(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), loaded.state_dict().values()))
