"""Continuous-batching generation engine for masked-diffusion models (plain PyTorch, no Ray).

Split by responsibility: `request.py` (one request's state), `scheduler.py` (admission under the
budgets), `model_runner.py` (packed forward pass), `engine.py` (the step loop)."""

from ..config import EngineConfig
from .engine import Engine, check_request, max_new_tokens_limit
from .request import Request, RequestOutput
from .scheduler import Scheduler

__all__ = ["check_request", "max_new_tokens_limit", "Engine", "EngineConfig", "Request", "RequestOutput", "Scheduler"]
