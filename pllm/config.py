"""Configuration objects: ModelConfig, TrainingConfig, GenerationConfig, DataConfig, JobConfig.

Field names and defaults follow the public API reference; every field is validated when the object
is built or a field is assigned, and an invalid value raises `pydantic.ValidationError` whose message
names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from pllm.kernels.options import KernelOptions

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    name = str(value).removeprefix("torch.")
    if name in _DTYPES:
        return _DTYPES[name]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {value!r}")


DType = Annotated[
    torch.dtype,
    BeforeValidator(_parse_dtype),
    PlainSerializer(lambda d: str(d).removeprefix("torch."), return_type=str),
]

# Strict types: no silent "3" -> 3 or 1.0 -> True coercion; unknown fields are errors (typos fail loudly).
_STRICT = ConfigDict(validate_assignment=True, extra="forbid", arbitrary_types_allowed=True, strict=True)
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _ConfigMixin:
    def to_dict(self) -> dict[str, Any]:
        from pydantic import TypeAdapter

        return TypeAdapter(type(self)).dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        from pydantic import TypeAdapter

        # JSON/YAML give strings for dtypes and lists for tuples: validate in lax "python" mode.
        return TypeAdapter(cls).validate_python(data, strict=False)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass(config=_STRICT)
class RopeScaling(_ConfigMixin):
    """Rotary frequency scaling of long-context checkpoints, as their config.json's `rope_scaling`:
    "linear" divides every frequency by `factor`; "llama3" (Llama 3.1) divides the low frequencies
    by `factor`, keeps the high ones and blends in between."""

    rope_type: Literal["linear", "llama3"]
    factor: Annotated[float, Field(gt=0)]
    low_freq_factor: Annotated[float, Field(gt=0)] = 1.0
    high_freq_factor: Annotated[float, Field(gt=0)] = 4.0
    original_max_position_embeddings: PositiveInt = 8192


@dataclass(config=_STRICT)
class ModelConfig(_ConfigMixin):
    # Architecture
    vocab_size: PositiveInt = 50257
    hidden_size: PositiveInt = 2048
    num_hidden_layers: PositiveInt = 24
    num_attention_heads: PositiveInt = 16
    num_key_value_heads: Optional[PositiveInt] = None  # GQA; None means num_attention_heads
    intermediate_size: PositiveInt = 8192
    max_position_embeddings: PositiveInt = 4096
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: Annotated[float, Field(gt=0)] = 1e-5
    tie_word_embeddings: bool = True
    qk_norm: bool = True  # RMSNorm on each head's queries and keys
    initializer_range: Annotated[float, Field(gt=0)] = 0.02
    # Imported layouts: a per-head width of its own (Qwen3, SDAR: None = hidden_size / heads), biases
    # on the q, k, v projections (Qwen2, Dream, Fast-dLLM v2) and on the output projection.
    head_dim: Optional[PositiveInt] = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    # Position i's logits come from position i-1's hidden state (Dream, Fast-dLLM v2 and models
    # adapted from autoregressive ones keep the next-token head); the first position uses its own.
    logits_shift: bool = False

    # Attention layout: "bidirectional" (MDLM/LLaDA) or "block_causal" (block diffusion: causal across
    # blocks of `block_size` tokens, bidirectional inside a block).
    attention_mode: Literal["bidirectional", "block_causal"] = "bidirectional"
    block_size: PositiveInt = 32

    # Special tokens (ids in the tokenizer's vocabulary; the tokenizer reserves 0..3 for these).
    pad_token_id: NonNegInt = 0
    bos_token_id: NonNegInt = 1
    eos_token_id: NonNegInt = 2
    mask_token_id: NonNegInt = 3
    # More ids that end an answer besides eos (chat models' end-of-turn tokens, e.g. <|eot_id|>).
    stop_token_ids: tuple[NonNegInt, ...] = ()

    # Diffusion. num_diffusion_steps and confidence_threshold are the model's own decoding defaults:
    # `generate_parallel`'s, and the threshold of a ParallelGenerator or Engine given no
    # GenerationConfig (a GenerationConfig's fields decide everywhere else).
    num_diffusion_steps: PositiveInt = 10
    noise_schedule: Literal["linear", "cosine", "sqrt"] = "cosine"
    confidence_threshold: Probability = 0.9

    # Attention kernels
    use_flash_attention: bool = True

    # Precision: `dtype` is the dtype weights are cast to for inference on GPU; training keeps fp32
    # master weights and uses TrainingConfig.mixed_precision for autocast.
    dtype: DType = torch.bfloat16
    # Train the blocks' projections in float8 (the same as TrainingConfig.mixed_precision="fp8";
    # `pllm.fp8_training`). For FP8 inference weights, quantize: `pllm.quantization`.
    use_fp8: bool = False

    # Where the starting weights come from: a model folder (ours or a Hugging Face checkpoint) or an
    # MLflow URI (models:/NAME@ALIAS, runs:/ID/model). When set, the architecture, special ids and
    # tokenizer are that checkpoint's; the fields given beside it (`given_fields`) override its values,
    # except those that change tensor shapes or token ids (pllm.pipelines.job_stages.resolve_init).
    init_from: Optional[str] = None

    @model_validator(mode="wrap")
    @classmethod
    def _record_given(cls, data: Any, handler: Any) -> "ModelConfig":
        # Which fields the caller gave (keywords or mapping keys: a YAML model section with its --set
        # overrides), as pydantic models' `model_fields_set`; assignment re-validation keeps the record.
        if isinstance(data, (dict, ArgsKwargs)):
            given = frozenset(data if isinstance(data, dict) else (data.kwargs or {}))
        else:
            given = getattr(data, "_given_fields", frozenset())
        config = handler(data)
        object.__setattr__(config, "_given_fields", given)
        return config

    @property
    def given_fields(self) -> frozenset[str]:
        """The fields given explicitly when this config was built; `replace()` gives every field."""
        return getattr(self, "_given_fields", frozenset())

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or head_dim set"
            )
        if self.attention_head_size % 2:
            raise ValueError(f"head_dim must be even for rotary, got {self.attention_head_size}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_key_value_heads ({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        special = {
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "mask_token_id": self.mask_token_id,
        }
        for name, value in [*special.items(), *(("stop_token_ids", i) for i in self.stop_token_ids)]:
            if value >= self.vocab_size:
                raise ValueError(f"{name} ({value}) must be < vocab_size ({self.vocab_size})")
        # pad, bos and eos may share an id (LLaDA, Qwen); the mask token must be a token of its own.
        if self.mask_token_id in (self.pad_token_id, self.bos_token_id, self.eos_token_id, *self.stop_token_ids):
            raise ValueError(f"mask_token_id must differ from the other special token ids, got {special}")
        return self

    @property
    def attention_head_size(self) -> int:
        """Per-head width: head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends an answer: eos, then stop_token_ids."""
        return (self.eos_token_id, *(i for i in self.stop_token_ids if i != self.eos_token_id))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def num_matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (all linear layers, incl. the LM head)."""
        d, h, kv = self.hidden_size, self.attention_head_size, self.kv_heads
        attn = d * (self.num_attention_heads * h) * 2 + d * (kv * h) * 2
        mlp = 3 * d * self.intermediate_size
        return self.num_hidden_layers * (attn + mlp) + d * self.vocab_size

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6*N_matmul (forward + backward) plus attention scores/values
        (12 * layers * d_attn * seq for full attention; block-causal attention does about half)."""
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.attention_head_size * seq_len
        if self.attention_mode == "block_causal":
            attn //= 2
        return 6 * self.num_matmul_params() + attn


@dataclass(config=_STRICT)
class LoraSettings(_ConfigMixin):
    """Low-rank adapters (`pllm.lora`): rank, scale alpha / rank, dropout, and the projections
    (by layer name) that get them."""

    rank: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Probability = 0.0
    target_modules: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(config=_STRICT)
class TrainingConfig(_ConfigMixin):
    # Basic
    batch_size: PositiveInt = 8  # sequences per micro-batch per worker
    learning_rate: Annotated[float, Field(gt=0)] = 3e-4
    num_train_steps: PositiveInt = 100000  # optimizer steps
    seq_len: PositiveInt = 512
    gradient_accumulation_steps: PositiveInt = 1
    warmup_steps: NonNegInt = 100
    min_lr_ratio: Probability = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    adam_beta1: Probability = 0.9
    adam_beta2: Probability = 0.95
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0  # 0 disables clipping
    seed: int = 0
    max_train_minutes: Optional[Annotated[float, Field(gt=0)]] = None  # wall-clock budget; stops early

    # Evaluation, logging, checkpoints
    eval_interval: PositiveInt = 500
    eval_batches: PositiveInt = 20
    log_interval: PositiveInt = 10
    save_interval: Optional[PositiveInt] = None
    output_dir: str = "runs/default"

    # Distributed
    use_fsdp: bool = True
    fsdp_sharding_strategy: Literal["full", "shard_grad_op", "no_shard"] = "full"
    fsdp_backward_prefetch: bool = True
    fsdp_forward_prefetch: bool = False
    use_deepspeed: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 3
    zero_offload_optimizer: bool = False
    zero_offload_params: bool = False
    # Extra DeepSpeed config merged over the one the fields above build (bucket and prefetch sizes,
    # wall_clock_breakdown, ...); batch sizes, accumulation and the ZeRO stage stay the fields' own.
    deepspeed_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    # Optimization
    use_torch_compile: bool = True
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "max-autotune"
    use_cuda_graphs: bool = True
    gradient_checkpointing: bool = True
    # Our Triton ops in the model's forward and backward, and Inductor's tuning (GPU; A/B baselines).
    kernels: KernelOptions = dataclasses.field(default_factory=KernelOptions)
    # Low-rank adapters instead of full fine-tuning (`pllm.lora`): only they train; the model saved at
    # the end has them merged. In-process and Ray jobs.
    lora: Optional[LoraSettings] = None
    # FSDP2's CPUOffloadPolicy: parameters, gradients and optimizer state live in host memory and are
    # copied to the GPU per layer (a model that does not fit, at the cost of speed). FSDP2 only.
    fsdp_cpu_offload: bool = False

    # Mixed precision. "fp8": the blocks' projections in float8 (torchao Float8Linear, `pllm.fp8_training`),
    # the rest in bf16; fp8_recipe: its scaling, one scale per tensor or per row.
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] = "bf16"
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The 16-bit dtype the model computes in on a GPU (fp8's layers outside the projections: bf16)."""
        return {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        if self.use_fsdp and self.use_deepspeed:
            raise ValueError(
                "use_fsdp and use_deepspeed are exclusive: set use_fsdp=False to train with DeepSpeed ZeRO"
            )
        if self.zero_offload_optimizer and not self.use_deepspeed:
            raise ValueError("zero_offload_optimizer needs use_deepspeed=True (with FSDP2, offload through "
                             "fsdp_cpu_offload instead)")
        if self.zero_offload_params and not (self.use_deepspeed and self.zero_stage == 3):
            raise ValueError("zero_offload_params needs use_deepspeed=True and zero_stage=3")
        if self.fsdp_cpu_offload and not (self.use_fsdp and not self.use_deepspeed):
            raise ValueError("fsdp_cpu_offload needs use_fsdp=True (with DeepSpeed, offload through "
                             "zero_offload_optimizer / zero_offload_params instead)")
        if self.mixed_precision == "fp8" and self.use_deepspeed:
            raise ValueError("mixed_precision: 'fp8' trains with FSDP2 or in one process, not DeepSpeed "
                             "(set use_deepspeed=False, or mixed_precision='bf16')")
        if self.mixed_precision == "fp8" and self.lora is not None:
            raise ValueError("mixed_precision: 'fp8' converts full projections; with lora use mixed_precision='bf16'")
        if self.deepspeed_config and not self.use_deepspeed:
            raise ValueError("deepspeed_config is set but use_deepspeed is False")
        owned = {"train_batch_size": "batch_size", "train_micro_batch_size_per_gpu": "batch_size",
                 "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm",
                 "bf16": "mixed_precision", "fp16": "mixed_precision"}
        clash = sorted(self.deepspeed_config.keys() & owned.keys())
        if clash:
            raise ValueError(f"deepspeed_config: set {clash[0]!r} through training.{owned[clash[0]]} instead")
        zero = self.deepspeed_config.get("zero_optimization", {})
        if not isinstance(zero, dict) or "stage" in zero:
            raise ValueError("deepspeed_config.zero_optimization must be a mapping without 'stage' "
                             "(set training.zero_stage instead)")
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one worker."""
        return self.batch_size * self.seq_len * self.gradient_accumulation_steps


@dataclass(config=_STRICT)
class GenerationConfig(_ConfigMixin):
    max_new_tokens: PositiveInt = 512
    temperature: Annotated[float, Field(ge=0.0)] = 1.0  # 0 means greedy
    top_k: NonNegInt = 50  # 0 disables top-k filtering
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    num_refinement_steps: PositiveInt = 5  # total denoising steps over the whole answer
    confidence_threshold: Probability = 0.9
    # Adaptive steps: static steps also commit every position already above confidence_threshold
    # (confident blocks take fewer steps), and an answer stops at its first final EOS.
    use_adaptive_steps: bool = True

    # Decoding strategy (pllm/decoding/state.py):
    #   "static"       LLaDA low-confidence remasking, a fixed number of tokens per step;
    #   "threshold"    Fast-dLLM: every masked position above confidence_threshold, at least one;
    #   "factor"       Fast-dLLM's factor rule with parallel_factor;
    #   "credit"       CreditDecoding: threshold commits on logits fused with trace credits;
    #   "draft_verify" FreeDave: lossless draft-and-verify; the answer equals "static"'s.
    #   "speculative": a draft model proposes, this model verifies (pllm/decoding/speculative.py);
    #       lossless: the target's distribution (autoregressive targets) / its static decoding (block targets).
    strategy: Literal["static", "threshold", "factor", "credit", "draft_verify", "speculative"] = "static"
    block_size: Optional[PositiveInt] = None  # semi-autoregressive block length; None = one block
    seed: Optional[int] = None  # sampling seed (per request); None = nondeterministic when sampling
    parallel_factor: Annotated[float, Field(gt=0.0)] = 1.0  # "factor": f in n-th token conf >= 1 - f/(n+1)
    draft_length: PositiveInt = 4  # "draft_verify" / "speculative": drafted future steps (tokens for an
    #   autoregressive target) verified per forward pass
    adaptive_draft_length: bool = False  # "speculative": per sequence, draft one more than was last accepted
    credit_alpha: Annotated[float, Field(ge=0.0)] = 0.7  # "credit": weight of log(1 + credit)
    credit_beta: Probability = 0.8  # "credit": per-step decay of the credits
    credit_gamma: Annotated[float, Field(gt=0.0)] = 0.2  # "credit": the top token gains p ** gamma
    # KV cache: "auto" = exact block cache for block-causal models, none for bidirectional ones;
    # "prefix" / "dual" = Fast-dLLM's approximate caches for bidirectional models (refreshed per
    # block; outputs may differ from uncached decoding); "none" recomputes every step.
    kv_cache: Literal["auto", "none", "block", "prefix", "dual"] = "auto"


@dataclass(config=_STRICT)
class EngineConfig(_ConfigMixin):
    """The serving engine's batching limits (`pllm.engine.Engine`)."""

    max_num_seqs: PositiveInt = 32  # sequences decoded together in one forward pass
    # Tokens in one forward pass: every step recomputes each running sequence (prompt + answer), so
    # this bounds activation memory. A request longer than this is rejected.
    max_batched_tokens: PositiveInt = 8192
    # "continuous": requests join at the next step boundary and leave when done; "static": a batch
    # is formed when the engine is idle and runs until its last request finishes (the baseline).
    batching: Literal["continuous", "static"] = "continuous"
    max_new_tokens_limit: Optional[PositiveInt] = None  # per request; default: the model's context
    # The longest sequence (prompt + answer) served; default: the model's context. Fixed-shape steps
    # keep a cache slot of this length per sequence, allocated up front (7-8B models at 32k positions
    # would not fit 32 of them on one GPU).
    max_model_len: Optional[PositiveInt] = None
    # Pages of the fixed-shape steps' KV cache pool (a page holds `page_size` positions: the model's
    # block, at least 16); a sequence holds pages for its own length, and requests wait while the
    # pool is short. Default: enough for max_num_seqs sequences of max_model_len.
    kv_cache_pages: Optional[PositiveInt] = None
    # Requests whose prompts start alike share the pages of their common whole-page prefix (computed
    # once, reference-counted, never written by a sharer).
    prefix_caching: bool = True
    # Block-causal models on a GPU: cached decoding steps run as fixed-shape passes replayed from
    # CUDA graphs captured per batch-size bucket (pllm/engine/cuda_graphs.py).
    use_cuda_graphs: bool = True
    compile_step: bool = True  # ...with its elementwise chains fused by torch.compile (GPU)
    # ...and each step launched before the host reads the last one's commits, so the GPU computes
    # while the host does the bookkeeping (a step launched ahead is dropped when the batch changes).
    pipeline_steps: bool = True
    # Greedy requests of one fixed-shape step commit in one call from this many on; fewer commit one
    # by one, which takes fewer operations (break-even at two on CPU, benchmarks/profile_step.py).
    min_batched_commits: PositiveInt = 3
    # Which kernels and tiles the fixed-shape step runs (GPU; the defaults are the measured choices).
    kernels: KernelOptions = dataclasses.field(default_factory=KernelOptions)


@dataclass(config=_STRICT)
class DataConfig(_ConfigMixin):
    # Text/jsonl/parquet files, folders or globs; empty = the built-in corpus (the Python standard
    # library's own sources of the running interpreter).
    paths: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05
    max_files: Optional[PositiveInt] = None  # take only the first N files (sorted) for quick runs
    tokenizer_vocab_size: Optional[PositiveInt] = None  # default: the model's vocab_size
    tokenizer_sample_mb: Annotated[float, Field(gt=0)] = 64.0  # training text the BPE tokenizer sees
    shuffle_buffer_rows: NonNegInt = 1024  # per-worker local shuffle of packed rows (0: file order)
    sft_packing: bool = False  # task "sft": pack several examples per row (else one, padded with eos)


@dataclass(config=_STRICT)
class AdaptSettings(_ConfigMixin):
    """task "adapt": continue an autoregressive checkpoint (model.init_from) as a diffusion LM
    (`pllm.adaptation`). The next-token head's one-position logits shift is kept (Dream).

    attention: "bidirectional" (a masked-diffusion LM: Dream, DiffuLLaMA) or "block" (block diffusion
    with `block_size`: SDAR, Fast-dLLM v2). mask_anneal_steps ("bidirectional" only): over the first
    N optimizer steps the causal mask opens to bidirectional, a growing random share of future keys
    visible each step (DiffuLLaMA's attention-mask annealing); 0 = bidirectional from the start."""

    attention: Literal["bidirectional", "block"] = "bidirectional"
    block_size: Optional[PositiveInt] = None
    mask_anneal_steps: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self) -> "AdaptSettings":
        if self.attention == "block" and self.block_size is None:
            raise ValueError("adapt.attention 'block' needs adapt.block_size (tokens per diffusion block)")
        if self.attention == "bidirectional" and self.block_size is not None:
            raise ValueError("adapt.block_size is for adapt.attention 'block'; 'bidirectional' has no blocks")
        if self.mask_anneal_steps and self.attention != "bidirectional":
            raise ValueError("adapt.mask_anneal_steps anneals causal attention to bidirectional: it needs "
                             "adapt.attention 'bidirectional'")
        return self


def local_ray_cpus() -> int:
    """Logical CPUs for a Ray started on this machine: more than its cores, because Ray Data's tasks and
    the Train workers each hold CPUs and would otherwise starve each other on a small machine."""
    return max(8, 2 * (os.cpu_count() or 1))


@dataclass(config=_STRICT)
class ClusterConfig(_ConfigMixin):
    """Where a Ray job runs: Ray Train's scaling and failure settings."""

    num_workers: PositiveInt = 2  # Ray Train workers (one per GPU on GPU clusters)
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0  # fractional CPUs keep small machines from starving
    max_failures: NonNegInt = 2  # worker-group restarts from the last checkpoint before the job fails
    checkpoints_to_keep: PositiveInt = 2
    storage_path: Optional[str] = None  # Ray Train storage (checkpoints); default <output_dir>/ray; s3:// ok
    num_cpus: Optional[PositiveInt] = None  # logical CPUs of an in-process local Ray (default: local_ray_cpus())


@dataclass(config=_STRICT)
class TrackingConfig(_ConfigMixin):
    """MLflow tracking and registry."""

    mlflow_uri: Optional[str] = None  # default: sqlite store mlflow.db in the current folder
    experiment: str = "pllm"
    registered_model: Optional[str] = "pllm"  # None: log the model without registering it
    # Every trained model is registered as a new version; `alias` moves to it only if its validation
    # ELBO beats the holder's on the same held-out rows (or no version holds it), unless forced.
    alias: str = "champion"
    force_alias: bool = False


@dataclass(config=_STRICT)
class JobConfig(_ConfigMixin):
    """One YAML file drives a job: model, training, data and generation sections."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    prompt: str = "def fibonacci(n):\n"
    # "pretrain": the masked-diffusion objective on a text corpus; "sft": instruction fine-tuning of
    # model.init_from on data.paths' rows (`messages`, or `prompt` and `response`; none: the built-in
    # instruction set), the loss on responses only (`pllm.sft`), read by Ray Data in the Ray job;
    # "adapt": an autoregressive checkpoint (model.init_from: Llama, Qwen2, Qwen3) continued as a
    # diffusion LM on the corpus, as pretrain does, with the attention `adapt` chooses.
    task: Literal["pretrain", "sft", "adapt"] = "pretrain"
    adapt: Optional[AdaptSettings] = None  # task "adapt" only; default AdaptSettings() there

    @model_validator(mode="after")
    def _check_task(self) -> "JobConfig":
        if self.task in ("sft", "adapt") and not self.model.init_from:
            raise ValueError(f"task {self.task!r} starts from a checkpoint: set model.init_from")
        if self.adapt is not None and self.task != "adapt":
            raise ValueError(f"adapt settings are for task 'adapt'; this job's task is {self.task!r}: remove the "
                             "adapt section or set task: adapt")
        if self.task == "adapt" and self.adapt is None:
            object.__setattr__(self, "adapt", AdaptSettings())  # bypasses re-validation (it is valid)
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with sections model/training/data/generation")
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
