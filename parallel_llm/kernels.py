"""`parallel_llm.kernels`: alias of `pllm.kernels` (the seed README imports kernels from here)."""

from pllm.kernels import *  # noqa: F401,F403
from pllm.kernels import __all__  # noqa: F401
