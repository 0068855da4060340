"""The published README's snippets, run against the package with small sizes."""

import torch


def test_training_snippet():
    from parallel_llm import DiffusionTransformer, DistributedTrainer, ModelConfig, TrainingConfig

    model_config = ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_flash_attention=True,
        max_position_embeddings=256,
    )
    model = DiffusionTransformer(model_config)
    train_config = TrainingConfig(
        batch_size=8,
        learning_rate=3e-4,
        use_fsdp=True,
        fsdp_sharding_strategy="full",
        mixed_precision="bf16",
        use_torch_compile=True,
        torch_compile_mode="max-autotune",
        num_train_steps=5,
        seq_len=32,
        warmup_steps=1,
    )
    train_dataloader = [torch.randint(4, 512, (8, 32)) for _ in range(3)]
    eval_dataloader = [torch.randint(4, 512, (8, 32))]
    trainer = DistributedTrainer(
        model=model,
        train_config=train_config,
        model_config=model_config,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
    )
    trainer.train()
    assert trainer.step == 5
    # the API reference's positional form and troubleshooting assignments
    DistributedTrainer(model, train_config, model_config, train_dataloader)
    train_config.batch_size = 4
    train_config.gradient_checkpointing = True
    train_config.fsdp_backward_prefetch = True
    train_config.fsdp_forward_prefetch = True


def test_generation_snippet():
    from parallel_llm import DiffusionTransformer, GenerationConfig, ModelConfig, ParallelGenerator

    model = DiffusionTransformer(ModelConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=640)).eval()
    gen_config = GenerationConfig(
        max_new_tokens=512,
        temperature=1.0,
        num_refinement_steps=5,
        confidence_threshold=0.9,
        use_adaptive_steps=False,
    )
    generator = ParallelGenerator(model, gen_config, use_cuda_graphs=True)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    generated = generator.generate(prompt)
    assert generated.shape == (1, 512)
    assert generator.last_output.nfe == 5  # all 512 tokens in 5 forward passes
    gen_config.num_refinement_steps = 10
    gen_config.confidence_threshold = 0.95
    gen_config.temperature = 0.8
    assert generator.generate(prompt).shape == (1, 512) and generator.last_output.nfe == 10
