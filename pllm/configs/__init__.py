"""Built-in YAML job configs (`pllm train --config tiny`, `--config gpu-1b`, ...)."""
