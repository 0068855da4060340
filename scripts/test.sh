#!/usr/bin/env bash
# Set up and run the whole test suite (GPU-only tests are skipped on machines without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -rfEs --durations=25 "$@"
