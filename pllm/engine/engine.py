"""The engine: a synchronous loop of denoising steps over a changing batch of requests.

`add_request` and `abort` may be called from another thread: they only queue work, which `step`
takes in at the next step boundary. Each `step` admits waiting requests (scheduler), runs one packed
forward pass over the running ones (model runner), lets each request commit tokens by its own
decoding rules, and returns the answer tokens that became final. Finished and aborted requests leave
the batch at once. Async serving, streaming and back-pressure live in the Ray Serve layer.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from ..config import EngineConfig, GenerationConfig, ModelConfig
from ..decoding import DecodeRules, Drafter, check_draft_model
from ..model import DiffusionTransformer
from .model_runner import ModelRunner, context_length
from .request import Request, RequestOutput, tokens_per_pass
from .scheduler import Scheduler


def max_new_tokens_limit(model_config: ModelConfig, config: EngineConfig) -> int:
    return config.max_new_tokens_limit or context_length(model_config, config)


def check_request(model_config: ModelConfig, config: EngineConfig, num_prompt_tokens: int, max_new_tokens: int,
                  draft_length: int = 0) -> None:
    """Raise ValueError, with a message for the caller, if such a request can never run."""
    context = context_length(model_config, config)
    if num_prompt_tokens == 0:
        raise ValueError("the prompt is empty")
    limit = max_new_tokens_limit(model_config, config)
    if max_new_tokens > limit:
        raise ValueError(f"max_tokens={max_new_tokens} is above this server's limit of {limit}")
    total = num_prompt_tokens + max_new_tokens
    if total > context:
        raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the {'engine' if context < model_config.max_position_embeddings else 'model'}'s "
                         f"context of {context} tokens")
    if tokens_per_pass(num_prompt_tokens, max_new_tokens, draft_length) > config.max_batched_tokens:
        drafts = f" x {1 + draft_length} (draft_verify runs the state and {draft_length} drafts)" if draft_length else ""
        raise ValueError(f"prompt + max_tokens = {total} tokens{drafts} exceeds the engine's max_batched_tokens "
                         f"({config.max_batched_tokens})")


class Engine:
    def __init__(self, model: DiffusionTransformer, config: EngineConfig | None = None,
                 generation: GenerationConfig | None = None, static_step: bool | None = None,
                 draft_model: DiffusionTransformer | None = None):
        """static_step: fixed-shape (CUDA-graph) steps for block-causal models; default: on when
        `config.use_cuda_graphs` and the model is on a GPU.
        draft_model: a small model with the same tokenizer, for requests with strategy="speculative"."""
        self.config = config or EngineConfig()
        # Defaults for requests that bring none (the model config's confidence_threshold among them).
        self.generation = generation or GenerationConfig(confidence_threshold=model.config.confidence_threshold)
        if static_step is None:
            static_step = self.config.use_cuda_graphs and model.device.type == "cuda"
        self.runner = ModelRunner(model, self.config, static_step)
        self.model_config = model.config
        if draft_model is not None:
            check_draft_model(model.config, draft_model.config)
        self.drafter = Drafter(draft_model) if draft_model is not None else None
        self.scheduler = Scheduler(self.config, self.runner.can_admit)
        self._incoming: deque[Request] = deque()
        self._aborts: deque[str] = deque()
        self._ids = itertools.count()
        self.stats = {"steps": 0, "batch_size": 0, "peak_batch_size": 0, "batch_tokens": 0, "generated_tokens": 0,
                      "finished": 0, "aborted": 0, "draft_passes": 0, "drafted_tokens": 0,
                      "accepted_draft_tokens": 0}

    @property
    def max_new_tokens_limit(self) -> int:
        return max_new_tokens_limit(self.model_config, self.config)

    # -- requests in (thread-safe) ---------------------------------------------------------------
    def add_request(self, prompt_ids, config: GenerationConfig | None = None, request_id: str | None = None) -> str:
        """Queue a request; raises ValueError at once if it can never run."""
        config = config or self.generation
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        rules = DecodeRules.from_config(config)
        rules.check_model(self.model_config)
        if rules.speculative and self.drafter is None:
            raise ValueError("strategy 'speculative' needs a draft model, and this engine has none")
        check_request(self.model_config, self.config, prompt.numel(), config.max_new_tokens, rules.draft_length)
        request = Request(request_id or f"req-{next(self._ids)}", prompt, config, rules)
        self.runner.check_length(request.length)
        self._incoming.append(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request: it leaves the batch (and frees its slot) at the next step boundary."""
        self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._incoming or self._aborts or self.scheduler.has_work())

    # -- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit and schedule, run one forward pass over the batch, commit, collect the new tokens."""
        outputs = self._take_incoming()
        batch = self._schedule()
        if not batch:
            return outputs
        states = [r.state for r in batch]
        if self.drafter is not None:
            self.stats["draft_passes"] += self.drafter.propose(states)
        drafted, accepted = sum(s.drafted for s in states), sum(s.accepted for s in states)
        self.runner.commit(states, self.runner.run(states))
        self.stats["drafted_tokens"] += sum(s.drafted for s in states) - drafted
        self.stats["accepted_draft_tokens"] += sum(s.accepted for s in states) - accepted
        return outputs + self._collect(batch)

    def _take_incoming(self) -> list[RequestOutput]:
        """New requests join the queue; aborted ones leave it (their outputs)."""
        outputs = []
        while self._incoming:
            self.scheduler.add(self._incoming.popleft())
        while self._aborts:
            request = self.scheduler.remove(self._aborts.popleft())
            if request is not None:
                if request.state is not None:
                    self.runner.release(request.state)
                self.stats["aborted"] += 1
                outputs.append(self._output(request, [], finish_reason="abort"))
        return outputs

    def _schedule(self) -> list[Request]:
        """This step's batch; newly admitted requests get their decoding state."""
        admitted, batch = self.scheduler.schedule()
        for request in admitted:
            request.state = self.runner.new_state(request.prompt, request.rules)
        return batch

    def _collect(self, batch: list[Request]) -> list[RequestOutput]:
        """The answer tokens that became final this step; finished requests leave the batch."""
        outputs, now = [], time.perf_counter()
        for request in batch:
            state = request.state
            final = state.final_ids  # host copy: no device read per request
            new = final[request.num_sent:]
            if new and request.first_token_time is None:
                request.first_token_time = now
            request.num_sent = len(final)
            if state.finished:
                self.scheduler.remove(request.request_id)
                self.runner.release(state)
                request.finish_time = now
                self.stats["finished"] += 1
                outputs.append(self._output(request, new, state.finish_reason))
            elif new:
                outputs.append(self._output(request, new, None))
            self.stats["generated_tokens"] += len(new)
        self.stats.update(steps=self.stats["steps"] + 1, batch_size=len(batch),
                          peak_batch_size=max(self.stats["peak_batch_size"], len(batch)),
                          batch_tokens=sum(r.num_tokens for r in batch))
        return outputs

    @staticmethod
    def _output(request: Request, new: list[int], finish_reason: str | None) -> RequestOutput:
        state = request.state
        return RequestOutput(request.request_id, new, request.num_sent, finished=finish_reason is not None,
                             finish_reason=finish_reason, num_prompt_tokens=request.prompt.numel(),
                             nfe=state.nfe if state is not None else 0)

    # -- offline use -----------------------------------------------------------------------------
    def generate(self, prompts: list, configs: list[GenerationConfig] | GenerationConfig | None = None) -> list[list[int]]:
        """Run prompts to completion; returns each answer's tokens (up to a stopping EOS)."""
        configs = configs if isinstance(configs, list) else [configs] * len(prompts)
        ids = [self.add_request(p, c) for p, c in zip(prompts, configs)]
        answers: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for out in self.step():
                answers[out.request_id].extend(out.new_token_ids)
        return [answers[i] for i in ids]
