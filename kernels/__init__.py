"""Triton kernels, each with a PyTorch reference implementation (installed as `pllm.kernels`)."""
