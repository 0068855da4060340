"""Ray actors and Serve deployments (installed as `pllm.actors`): thin shells around `pllm`'s plain
PyTorch trainer and generation engine."""
