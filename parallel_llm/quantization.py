"""`parallel_llm.quantization`: alias of `pllm.quantization` under the distribution's name."""

from pllm.quantization import *  # noqa: F401,F403
from pllm.quantization import __all__  # noqa: F401
