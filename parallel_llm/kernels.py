"""`parallel_llm.kernels`: alias of `pllm.kernels` under the distribution's name."""

from pllm.kernels import *  # noqa: F401,F403
from pllm.kernels import __all__  # noqa: F401
