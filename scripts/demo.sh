#!/usr/bin/env bash
# The main job on embedded defaults: built-in corpus, tokenizer, about 4 minutes of CPU training
# (training.max_train_minutes in pllm/configs/tiny.yaml), registry, generation, one served request.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pllm demo "$@"
