"""ParallelGenerator: the user-facing generation API over the decoding strategies."""

from __future__ import annotations

import logging

import torch

from .config import EngineConfig, GenerationConfig
from .decoding import DecodeOutput, DecodeRules, Drafter, check_draft_model, decode_with_rules
from .engine import ModelRunner
from .model import DiffusionTransformer

log = logging.getLogger(__name__)


class ParallelGenerator:
    """Generate answers for prompts with a masked-diffusion model.

    `generate(prompt)` takes a 1-D tensor or a (B, L) tensor of prompt ids and returns the new
    tokens, (B, max_new_tokens); `generate_batch(prompts)` takes prompts of different lengths and
    returns one tensor per prompt. After EOS, an answer is filled with EOS. The strategy, steps and
    sampling settings come from the GenerationConfig; `last_output` keeps the forward-pass count
    (NFE) and tokens per forward of the last call.

    Prompts run packed without padding, so each answer is the same as generating it alone; the
    serving engine (`pllm.engine.Engine`) uses the same per-sequence decoding state.
    `use_kv_cache=False` turns the KV cache off (`GenerationConfig.kv_cache="none"`); otherwise the
    config's `kv_cache` applies ("auto": the exact block cache for block-causal models).
    `use_cuda_graphs`: on a GPU, block-causal models decode cached steps as fixed-shape passes
    replayed from CUDA graphs (`pllm.engine.ModelRunner`; same tokens as the packed path).
    """

    def __init__(
        self,
        model: DiffusionTransformer,
        config: GenerationConfig | None = None,
        use_kv_cache: bool = True,
        use_cuda_graphs: bool = True,
        tokenizer=None,
        draft_model: DiffusionTransformer | None = None,
    ):
        """draft_model: a small model with the same tokenizer, for strategy="speculative"."""
        self.model = model
        self.drafter = None
        if draft_model is not None:
            check_draft_model(model.config, draft_model.config)
            self.drafter = Drafter(draft_model)
        # No config: the generation defaults, with the model config's confidence_threshold.
        self.config = config or GenerationConfig(confidence_threshold=model.config.confidence_threshold)
        self.use_kv_cache = use_kv_cache
        self.use_cuda_graphs = use_cuda_graphs
        self.tokenizer = tokenizer
        self.last_output: DecodeOutput | None = None
        self._runner: ModelRunner | None = None

    def _graph_runner(self, batch_size: int) -> ModelRunner | None:
        """A model runner with CUDA-graph steps, captured for up to `batch_size` sequences
        (re-captured for more); None where the packed pass runs every step."""
        model = self.model
        if not (self.use_cuda_graphs and model.device.type == "cuda" and model.config.attention_mode == "block_causal"):
            return None
        if self._runner is None or self._runner.max_batch < batch_size:
            self._runner = ModelRunner(model, EngineConfig(max_num_seqs=batch_size), static_step=True)
        return self._runner

    def generate(self, prompt_tokens: torch.Tensor, max_new_tokens: int | None = None) -> torch.Tensor:
        prompt_tokens = torch.as_tensor(prompt_tokens)
        rows = [prompt_tokens] if prompt_tokens.dim() == 1 else list(prompt_tokens)
        return torch.stack(self.generate_batch(rows, max_new_tokens))

    def generate_batch(self, prompts, max_new_tokens: int | None = None) -> list[torch.Tensor]:
        cfg = self.config
        prompts = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
        gen_length = max_new_tokens or cfg.max_new_tokens
        longest = max(p.numel() for p in prompts) + gen_length
        if longest > self.model.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceeds the model's context "
                f"(max_position_embeddings={self.model.config.max_position_embeddings})"
            )
        if not self.use_kv_cache:
            cfg = cfg.replace(kv_cache="none")
        rules = DecodeRules.from_config(cfg, gen_length)
        was_training = self.model.training
        self.model.eval()
        try:
            self.last_output = decode_with_rules(self.model, prompts, [rules] * len(prompts),
                                                 runner=self._graph_runner(len(prompts)), drafter=self.drafter)
        finally:
            self.model.train(was_training)
        return [t.cpu() for t in self.last_output.tokens]

    def generate_text(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Encode a prompt, generate, and decode the answer up to the first EOS."""
        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer: ParallelGenerator(model, config, tokenizer=...)")
        ids = torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long)
        answer = self.generate_batch([ids], max_new_tokens)[0].tolist()
        stops = [i for i, t in enumerate(answer) if t in self.model.config.stop_ids]
        return self.tokenizer.decode(answer[: stops[0]] if stops else answer)
