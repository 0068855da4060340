import pytest
import torch
from pydantic import ValidationError

from pllm import GenerationConfig, JobConfig, ModelConfig, TrainingConfig


def test_defaults_follow_the_api_reference():
    m = ModelConfig()
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.num_attention_heads) == (50257, 2048, 24, 16)
    assert (m.num_key_value_heads, m.intermediate_size, m.max_position_embeddings) == (None, 8192, 4096)
    assert (m.num_diffusion_steps, m.noise_schedule, m.confidence_threshold) == (10, "cosine", 0.9)
    assert m.use_flash_attention is True and m.dtype == torch.bfloat16 and m.use_fp8 is False
    t = TrainingConfig()
    assert (t.batch_size, t.learning_rate, t.num_train_steps) == (8, 3e-4, 100000)
    assert (t.use_fsdp, t.fsdp_sharding_strategy, t.use_deepspeed, t.zero_stage) == (True, "full", False, 3)
    assert (t.use_torch_compile, t.torch_compile_mode, t.use_cuda_graphs) == (True, "max-autotune", True)
    assert (t.gradient_checkpointing, t.mixed_precision) == (True, "bf16")
    g = GenerationConfig()
    assert (g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.repetition_penalty) == (512, 1.0, 50, 0.95, 1.0)
    assert (g.num_refinement_steps, g.confidence_threshold, g.use_adaptive_steps) == (5, 0.9, True)


@pytest.mark.parametrize(
    "cls, kwargs, must_mention",
    [
        (ModelConfig, {"noise_schedule": "quadratic"}, ["noise_schedule", "'linear'", "'cosine'", "'sqrt'"]),
        (ModelConfig, {"attention_mode": "causal"}, ["attention_mode", "'bidirectional'", "'block_causal'"]),
        (ModelConfig, {"hidden_size": 0}, ["hidden_size", "greater than 0"]),
        (ModelConfig, {"hidden_size": 100, "num_attention_heads": 16}, ["hidden_size", "num_attention_heads"]),
        (ModelConfig, {"num_attention_heads": 16, "num_key_value_heads": 5}, ["num_key_value_heads"]),
        (ModelConfig, {"dtype": "int8"}, ["dtype", "bfloat16", "float32"]),
        (ModelConfig, {"confidence_threshold": 1.5}, ["confidence_threshold", "less than or equal to 1"]),
        (ModelConfig, {"vocab_size": 3}, ["mask_token_id", "vocab_size"]),
        (TrainingConfig, {"fsdp_sharding_strategy": "hybrid"}, ["fsdp_sharding_strategy", "'full'", "'shard_grad_op'", "'no_shard'"]),
        (TrainingConfig, {"zero_stage": 4}, ["zero_stage", "0", "1", "2", "3"]),
        (TrainingConfig, {"mixed_precision": "fp32"}, ["mixed_precision", "'no'", "'fp16'", "'bf16'"]),
        (TrainingConfig, {"torch_compile_mode": "fast"}, ["torch_compile_mode", "'max-autotune'"]),
        (TrainingConfig, {"use_deepspeed": True}, ["use_fsdp", "use_deepspeed"]),
        (TrainingConfig, {"learning_rate": -1.0}, ["learning_rate", "greater than 0"]),
        (TrainingConfig, {"batch_size": "8"}, ["batch_size", "integer"]),
        (TrainingConfig, {"deepspeed_config": {"wall_clock_breakdown": True}}, ["deepspeed_config", "use_deepspeed"]),
        (TrainingConfig, {"use_fsdp": False, "use_deepspeed": True, "deepspeed_config": {"train_micro_batch_size_per_gpu": 4}},
         ["train_micro_batch_size_per_gpu", "training.batch_size"]),
        (TrainingConfig, {"use_fsdp": False, "use_deepspeed": True, "deepspeed_config": {"zero_optimization": {"stage": 2}}},
         ["zero_optimization", "training.zero_stage"]),
        (GenerationConfig, {"top_p": 0.0}, ["top_p", "greater than 0"]),
        (GenerationConfig, {"temperature": -0.5}, ["temperature", "greater than or equal to 0"]),
        (GenerationConfig, {"strategy": "beam"}, ["strategy", "'static'", "'threshold'"]),
        (GenerationConfig, {"max_new_tokens": 0}, ["max_new_tokens"]),
    ],
)
def test_invalid_values_name_the_field_and_allowed_values(cls, kwargs, must_mention):
    with pytest.raises(ValidationError) as err:
        cls(**kwargs)
    for text in must_mention:
        assert text in str(err.value), f"{text!r} not in: {err.value}"


def test_unknown_field_is_an_error():
    with pytest.raises(ValidationError, match="hiden_size"):
        ModelConfig(hiden_size=64)


def test_assignment_is_validated():
    cfg = TrainingConfig()
    cfg.batch_size = 4
    assert cfg.batch_size == 4
    with pytest.raises(ValidationError, match="batch_size"):
        cfg.batch_size = -1


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_attention_heads: 4\n  dtype: float32\ntraining:\n  use_fsdp: false\n")
    job = JobConfig.from_yaml(path)
    assert job.model.hidden_size == 64 and job.model.dtype == torch.float32 and job.training.use_fsdp is False
    assert JobConfig.from_dict(job.to_dict()) == job
    path.write_text("model:\n  hidden_size: big\n")
    with pytest.raises(ValidationError, match="hidden_size"):
        JobConfig.from_yaml(path)


def test_flops_per_token_formula():
    cfg = ModelConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    d, hd, kv = 64, 16, 2
    n_matmul = 2 * (d * d * 2 + d * kv * hd * 2 + 3 * d * 128) + d * 1000
    assert cfg.num_matmul_params() == n_matmul
    assert cfg.flops_per_token(256) == 6 * n_matmul + 12 * 2 * 64 * 256


def test_deepspeed_config_is_merged_over_the_built_one():
    from pllm.strategies.zero import deepspeed_config

    cfg = TrainingConfig(use_fsdp=False, use_deepspeed=True, zero_stage=3, zero_offload_optimizer=True,
                         deepspeed_config={"zero_optimization": {"stage3_prefetch_bucket_size": 0},
                                           "wall_clock_breakdown": True})
    built = deepspeed_config(cfg, torch.device("cpu"))
    assert built["wall_clock_breakdown"] is True
    zero = built["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == 0 and zero["offload_optimizer"]["device"] == "cpu"
    assert built["train_micro_batch_size_per_gpu"] == cfg.batch_size


def test_the_model_configs_decoding_fields_are_its_decoding_defaults(monkeypatch):
    # num_diffusion_steps and confidence_threshold are not decorative: generate_parallel, and a
    # generator or engine given no GenerationConfig, take them.
    import pllm.decoding
    from conftest import tiny_config
    from pllm import DiffusionTransformer, ParallelGenerator
    from pllm.engine import Engine

    model = DiffusionTransformer(tiny_config(num_diffusion_steps=3, confidence_threshold=0.75)).eval()
    seen, decode = [], pllm.decoding.decode

    def recording(*args, **kwargs):
        seen.append((kwargs["num_steps"], kwargs["confidence_threshold"]))
        return decode(*args, **kwargs)

    monkeypatch.setattr(pllm.decoding, "decode", recording)
    default = model.generate_parallel(2, 12, seed=0)
    assert torch.equal(default, model.generate_parallel(2, 12, num_steps=3, confidence_threshold=0.75, seed=0))
    model.generate_parallel(2, 12, num_steps=5, confidence_threshold=0.5, seed=0)
    assert seen == [(3, 0.75), (3, 0.75), (5, 0.5)]
    assert ParallelGenerator(model).config.confidence_threshold == 0.75
    assert Engine(model).generation.confidence_threshold == 0.75


def test_offload_flags_without_deepspeed_are_refused():
    with pytest.raises(ValueError, match="zero_offload_optimizer needs use_deepspeed=True"):
        TrainingConfig(zero_offload_optimizer=True, use_deepspeed=False)
