"""DeepSpeed ZeRO stages 0-3 (optionally offloading optimizer state / parameters to CPU memory).

The engine owns accumulation, clipping, loss scaling and the LR schedule's stepping, so `backward`
hands every micro-batch to it and `step` only reads back the gradient norm. Checkpoints are
DeepSpeed's own (one file per rank and stage)."""

from __future__ import annotations

from pathlib import Path

import torch

from pllm.kernels import prepare_attention
from ..optim import build_scheduler, param_groups
from .base import Strategy, compile_options

TAG = "zero"


def deepspeed_config(cfg, device: torch.device) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if cfg.zero_offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    on_gpu = device.type == "cuda"
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": on_gpu and cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": on_gpu and cfg.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merged(config, cfg.deepspeed_config)


def _merged(base: dict, extra: dict) -> dict:
    """`extra` over `base`, mapping by mapping (the user's deepspeed_config over ours)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    casts_itself = True  # the engine casts the model for bf16/fp16

    def setup(self, model: torch.nn.Module) -> None:
        import deepspeed

        ds_config = deepspeed_config(self.cfg, self.device)
        model = self._with_kernels(model).to(self.device)
        if self.cfg.zero_offload_optimizer:
            # Offloaded optimizer state is stepped on the CPU by DeepSpeed's CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups(model, self.cfg.weight_decay), lr=self.cfg.learning_rate,
                                         betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=self.cfg.learning_rate,
                                          betas=(self.cfg.adam_beta1, self.cfg.adam_beta2))
        scheduler = build_scheduler(optimizer, self.cfg)
        if self.cfg.zero_stage == 3:
            # The fused loss reads the LM head's weight inside the model's own forward, not through
            # lm_head's: ZeRO-3 must gather it for the whole forward.
            deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
            # Likewise the norms' weights, which the fused ops (`add_rms_norm`, `rotate_qkv`) read
            # inside their block's and attention's forward, not through the norms' own.
            for block in model.layers:
                for norm in (block.attn_norm, block.mlp_norm):
                    deepspeed.zero.register_external_parameter(block, norm.weight)
                for norm in (block.attn.q_norm, block.attn.k_norm):
                    if getattr(norm, "weight", None) is not None:
                        deepspeed.zero.register_external_parameter(block.attn, norm.weight)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        if self.cfg.use_torch_compile and self.device.type == "cuda":
            prepare_attention(self.device)
            # DeepCompile (deepspeed_config compile.deepcompile) brings its own backend, which takes no options.
            engine.compile(compile_kwargs={} if engine.is_deepcompile_enabled() else
                           {"options": compile_options("default", self.cfg.kernels.coordinate_descent_tuning)})
        self.engine = self.model = engine
        self.module = engine.module
        self.optimizer, self.scheduler = optimizer, scheduler

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scaled by 1/gradient_accumulation_steps inside
        self.engine.step()  # optimizer/scheduler step only at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def optimizer_steps(self) -> int:
        return int(self.engine.global_steps)

    def save(self, path: Path) -> None:
        # A LoRA run's frozen base is left out: a resume loads it from the starting checkpoint.
        self.engine.save_checkpoint(str(path), tag=TAG, exclude_frozen_parameters=bool(self.frozen))
        if self.is_main:
            self._save_scheduler(path)
        self.barrier()

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=False,
                                                   load_module_strict=not self.frozen)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        self._load_scheduler(path)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # gathers to rank 0 (collective)
        else:
            state = self.module.state_dict()
        if not self.is_main:
            return None
        return {k: v.detach().float().cpu() for k, v in state.items()}
