"""Tensors in, tokens out: one forward pass over the running sequences, then their commits."""

from __future__ import annotations

import torch

from ..config import EngineConfig, ModelConfig
from ..decoding import DecodeState
from ..decoding.loop import run_states
from ..model import DiffusionTransformer
from .batched_commit import batchable, commit_batch
from .cuda_graphs import StaticStepRunner, page_size
from .dual_cache_graphs import DualCacheStepRunner


def context_length(model_config: ModelConfig, config: EngineConfig) -> int:
    """The longest sequence (prompt + answer) the engine runs: EngineConfig.max_model_len, at most
    the model's context."""
    return min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)


def check_cache_fits(model: DiffusionTransformer, slots: int, positions: int, pages: int | None = None) -> None:
    """Fail with the settings to change, instead of running out of GPU memory, when the fixed-shape
    steps' KV cache pool (allocated up front: `pages` pages, default every slot at full length)
    would not fit in the free memory."""
    if model.device.type != "cuda":
        return
    cfg = model.config
    entries = pages * page_size(cfg.block_size) if pages else slots * (positions + 2 * cfg.block_size + 16)
    need = (cfg.num_hidden_layers * 2 * cfg.kv_heads * entries * cfg.attention_head_size
            * model.embed_tokens.weight.element_size())
    free = torch.cuda.mem_get_info(model.device)[0]
    if need > 0.8 * free:
        what = f"{pages} pages" if pages else f"{slots} sequences x {positions} positions"
        raise ValueError(f"the KV cache of {what} needs {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB of GPU "
                         f"memory are free: lower engine kv_cache_pages, max_model_len or max_num_seqs")


class ModelRunner:
    """Packs each running sequence (the part of prompt + partly decoded answer that its cache does
    not cover) end to end, without padding, and returns the logits of each sequence's current
    block. Packing keeps every sequence's result independent of its batch-mates, which is what
    makes "batching never changes outputs" hold.

    static_step: sequences with the exact block cache (block-causal models) or the dual cache
    (bidirectional models) and one segment per step run instead through fixed-shape steps
    (`StaticStepRunner`, `DualCacheStepRunner`: cache slots, CUDA graphs on GPUs); the others
    (draft-and-verify, no cache) still run packed, in a second pass."""

    def __init__(self, model: DiffusionTransformer, config: EngineConfig | None = None, static_step: bool = False):
        config = config or EngineConfig()
        if any(type(m).__module__.startswith("peft.") for m in model.modules()):
            # the fixed-shape step reads projection weights directly: adapters would be skipped
            raise ValueError("the model has unmerged LoRA adapters: merge them first (pllm.lora.merge_lora)")
        self.model = model.eval()
        self.min_batched_commits = config.min_batched_commits
        self.commit_kernel = config.kernels.commit_in_place
        # The fixed-shape step runner; read it to inspect its graphs and counters, drive it through `run`.
        self.static: StaticStepRunner | None = None
        self.dual: DualCacheStepRunner | None = None  # bidirectional models' dual-cache steps
        on_gpu = model.device.type == "cuda"
        if static_step:
            positions = context_length(model.config, config)
            block_causal = model.config.attention_mode == "block_causal"
            check_cache_fits(model, config.max_num_seqs, positions, config.kv_cache_pages)
            options = dict(prefix_caching=config.prefix_caching) if block_causal else {}
            runner = StaticStepRunner if block_causal else DualCacheStepRunner
            built = runner(model, config.max_num_seqs, capture=on_gpu, compile_ops=config.compile_step and on_gpu,
                           kernels=config.kernels, max_positions=positions, num_pages=config.kv_cache_pages,
                           **options)
            self.static, self.dual = (built, None) if runner is StaticStepRunner else (None, built)
        # Launch each step before the host reads the last one's commits (`StaticStepRunner.run_ahead`):
        # on a GPU, where the step is a graph replay and the host's bookkeeping would leave it idle.
        self.pipeline = bool(config.pipeline_steps and self.static is not None and self.static.capture)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def fixed(self) -> StaticStepRunner | DualCacheStepRunner | None:
        """The fixed-shape step runner, whichever kind; None without one."""
        return self.static or self.dual

    @property
    def max_batch(self) -> int | None:
        """The most sequences one fixed-shape step takes (its largest batch bucket); None without one."""
        return self.fixed.max_seqs if self.fixed is not None else None

    def can_admit(self, lengths: list[int]) -> bool:
        """Whether sequences of these lengths (prompt + answer) get KV cache pages now (always,
        without a fixed-shape step's paged cache)."""
        return self.fixed is None or self.fixed.can_admit(lengths)

    def release(self, state: DecodeState) -> None:
        """A sequence left the batch: the fixed-shape step frees its cache pages at once."""
        if self.fixed is not None:
            self.fixed.release(state)

    def check_length(self, length: int) -> None:
        """Raise ValueError if a sequence of this length could never get its pages."""
        runner = self.fixed
        if runner is not None and length > runner.capacity():
            raise ValueError(f"prompt + max_tokens = {length} tokens exceeds the engine's KV cache pool of "
                             f"{runner.capacity()} positions (engine kv_cache_pages)")

    def new_state(self, prompt: torch.Tensor, rules, suffix: torch.Tensor | None = None) -> DecodeState:
        """A sequence's decoding state on this runner's device, with its kernel choices."""
        return DecodeState(prompt, rules, self.model.config, self.device, suffix, commit_kernel=self.commit_kernel)

    @torch.no_grad()
    def run(self, states: list[DecodeState]) -> list[list[torch.Tensor]]:
        """Per state, the logits of each of its segments (the state, then any drafts): the states the
        fixed-shape step takes run through it, the others in one packed pass beside it."""
        static = self.fixed
        fixed = [s for s in states if static.eligible(s)] if static is not None else []
        logits = dict(zip(map(id, fixed), static.run(fixed))) if fixed else {}
        packed = [s for s in states if id(s) not in logits]
        if packed:
            logits.update(zip(map(id, packed), run_states(self.model, packed)))
        return [logits[id(s)] for s in states]

    def commit(self, states: list[DecodeState], logits: list[list[torch.Tensor]]) -> None:
        """Each state commits its step's tokens from `run`'s logits: greedy requests of one
        fixed-shape step in one call (`batched_commit`), the others one by one. Pipelined, the next
        step is launched before the host waits for these commits."""
        static = self.static
        fixed = static is not None and all(map(static.eligible, states))  # one fixed-shape step for all
        ahead = self.pipeline and fixed
        if fixed and batchable(states, self.min_batched_commits):
            commit_batch(states, static.last_logits[:len(states)], static.to_device, defer=ahead)
        else:
            for state, state_logits in zip(states, logits):
                state.advance(state_logits, defer=ahead)
        if ahead:
            static.run_ahead(states)
            for state in states:
                state.finish_step()
