"""Alias of `pllm` under the distribution's name, so `from parallel_llm import ...` works."""

from pllm import *  # noqa: F401,F403
from pllm import __all__, __version__  # noqa: F401
