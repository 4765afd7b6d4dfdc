#!/usr/bin/env bash
# Install with the test tools, lint, run the whole suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
.venv/bin/ruff check framework launch benchmarks studies tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=12 "$@"
