"""Ray actors and Serve deployments: thin shells around `pllm`'s plain
PyTorch trainer and generation engine."""
