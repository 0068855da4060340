"""Continuous-batching generation engine for masked-diffusion models (plain PyTorch, no Ray).

Split by responsibility: `request.py` (one request's state), `scheduler.py` (admission under the
budgets), `model_runner.py` (the forward pass and the commits), `cuda_graphs.py` (fixed-shape
steps: cache slots, CUDA graphs), `step_forward.py` (the fixed-shape step's forward pass),
`batched_commit.py` (one commit for a whole step), `engine.py` (the step loop)."""

from ..config import EngineConfig
from .engine import Engine, check_request, max_new_tokens_limit
from .model_runner import ModelRunner, context_length
from .request import Request, RequestOutput
from .scheduler import Scheduler

__all__ = ["check_request", "context_length", "max_new_tokens_limit", "Engine", "EngineConfig", "ModelRunner", "Request", "RequestOutput", "Scheduler"]
