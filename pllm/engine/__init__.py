"""Continuous-batching generation engine for masked-diffusion models (plain PyTorch, no Ray).

Split by responsibility: `request.py` (one request's state), `scheduler.py` (admission under the
budgets), `model_runner.py` (packed forward pass), `engine.py` (the step loop)."""

from ..config import EngineConfig
from .engine import Engine
from .request import Request, RequestOutput
from .scheduler import Scheduler

__all__ = ["Engine", "EngineConfig", "Request", "RequestOutput", "Scheduler"]
