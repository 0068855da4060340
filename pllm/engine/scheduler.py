"""Who runs in the next step: admission of waiting requests under the sequence, token and KV cache budgets.

Continuous batching admits waiting requests at every step boundary while the budgets allow (first
come, first served: a request that does not fit blocks those behind it, so none starves). Static
batching, the baseline, admits a new batch only when the running one has completely finished.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..config import EngineConfig
from .request import Request


class Scheduler:
    def __init__(self, config: EngineConfig, can_admit: Callable[[list[int]], bool] | None = None):
        """can_admit: whether sequences of these lengths (prompt + answer) get their KV cache pages
        now (the paged cache's back-pressure: requests wait while the pool is short)."""
        self.config = config
        self.can_admit = can_admit
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def running_tokens(self) -> int:
        return sum(r.num_tokens for r in self.running)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """Admit what fits; returns (newly admitted, the batch to run this step)."""
        admitted = []
        if self.config.batching == "continuous" or not self.running:
            tokens = self.running_tokens
            while (self.waiting and len(self.running) < self.config.max_num_seqs
                   and tokens + self.waiting[0].num_tokens <= self.config.max_batched_tokens
                   and (self.can_admit is None or self.can_admit([r.length for r in [*admitted, self.waiting[0]]]))):
                request = self.waiting.popleft()
                tokens += request.num_tokens
                self.running.append(request)
                admitted.append(request)
        return admitted, list(self.running)

    def remove(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    return request
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
