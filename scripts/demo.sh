#!/usr/bin/env bash
# The main job on embedded defaults: built-in corpus, tokenizer, ~3 minutes of CPU training, generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pllm demo "$@"
