"""The Generator deployment: one replica holds one engine (one GPU on GPU clusters).

The engine's synchronous step loop runs in a background thread; requests arrive on the replica's
event loop, queue into the engine, and get the tokens that became final through an asyncio queue,
streamed back to the caller as they come. A request whose caller goes away (client disconnect,
cancelled handle call) is aborted, which frees its slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid

import torch
from ray import serve
from ray.serve import metrics

from pllm.checkpoint import load_model
from pllm.config import EngineConfig, GenerationConfig
from pllm.engine import Engine, context_length
from pllm.quantization import quantization_config
from pllm.registry import resolve_model_source

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]


class Generator:
    def __init__(self, model: str, mlflow_uri: str | None = None, engine: dict | None = None, device: str = "auto",
                 draft_model: str | None = None, quantize: str | None = None):
        """draft_model: a small model with the same tokenizer (same forms as `model`), loaded on the same
        device, for requests with strategy="speculative". quantize: "int8" | "fp8" | "int4", the
        model's projections quantized at load (`load_model`)."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model_dir, generation = resolve_model_source(model, mlflow_uri)
        draft = load_model(resolve_model_source(draft_model, mlflow_uri)[0], device=device) if draft_model else None
        self.engine = Engine(load_model(model_dir, device=device, quantize=quantize), EngineConfig.from_dict(engine or {}),
                             generation or GenerationConfig(), draft_model=draft)
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._metrics()
        self._thread = threading.Thread(target=self._run, name="pllm-engine", daemon=True)
        self._thread.start()
        log.info("Generator ready: %s on %s%s%s", model, device, f" quantized to {quantize}" if quantize else "",
                 f" (draft model {draft_model})" if draft_model else "")

    def _metrics(self) -> None:
        self.m_requests = metrics.Counter("pllm_requests", "Finished generation requests.", tag_keys=("finish_reason",))
        self.m_tokens = metrics.Counter("pllm_generated_tokens", "Answer tokens generated.")
        self.m_latency = metrics.Histogram("pllm_request_latency_s", "Request latency in the engine (s).",
                                           boundaries=LATENCY_BUCKETS_S)
        self.m_batch = metrics.Gauge("pllm_batch_size", "Sequences in the last forward pass.")
        self.m_running = metrics.Gauge("pllm_running_requests", "Requests being decoded.")
        self.m_waiting = metrics.Gauge("pllm_waiting_requests", "Requests waiting for a slot.")
        self.m_tps = metrics.Gauge("pllm_tokens_per_second", "Answer tokens per second over the last step.")

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # a failed step fails its requests, not the replica
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            elapsed = time.perf_counter() - start
            new_tokens = sum(len(o.new_token_ids) for o in outputs)
            if new_tokens:
                self.m_tokens.inc(new_tokens)
            self.m_tps.set(new_tokens / max(elapsed, 1e-9))
            self.m_batch.set(self.engine.stats["batch_size"])
            self.m_running.set(len(self.engine.scheduler.running))
            self.m_waiting.set(len(self.engine.scheduler.waiting))
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    self._loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, exc: BaseException) -> None:
        for request in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.scheduler.remove(request.request_id)
            queue = self._queues.get(request.request_id)
            if queue is not None:
                self._loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"generation failed: {exc}"))

    # -- requests ------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], config: dict):
        """Stream {"token_ids", "finished", "finish_reason", ...} chunks for one request."""
        self._loop = self._loop or asyncio.get_running_loop()
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        start, finished = time.perf_counter(), False
        try:
            self.engine.add_request(prompt_ids, GenerationConfig.from_dict(config), request_id)
            self._wake.set()
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                if finished:
                    self.m_requests.inc(tags={"finish_reason": out.finish_reason})
                    self.m_latency.observe(time.perf_counter() - start)
                yield {"token_ids": out.new_token_ids, "finished": out.finished, "finish_reason": out.finish_reason,
                       "num_prompt_tokens": out.num_prompt_tokens, "num_generated": out.num_generated, "nfe": out.nfe}
        finally:  # normal end, error, or cancellation (the caller went away)
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)
                self._wake.set()
                self.m_requests.inc(tags={"finish_reason": "abort"})

    def info(self) -> dict:
        cfg = self.engine.model_config
        return {"context_length": context_length(cfg, self.engine.config), "max_new_tokens_limit": self.engine.max_new_tokens_limit,
                "max_batched_tokens": self.engine.config.max_batched_tokens, "generation": self.engine.generation.to_dict(),
                "quantization": quantization_config(self.engine.runner.model)}

    def stats(self) -> dict:
        s = self.engine.scheduler
        return {**self.engine.stats, "running": len(s.running), "waiting": len(s.waiting), "pid": os.getpid(),
                "open_streams": len(self._queues)}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread died")


GeneratorDeployment = serve.deployment(
    Generator, name="Generator", max_ongoing_requests=64, health_check_period_s=5,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
