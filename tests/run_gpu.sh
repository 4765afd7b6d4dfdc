#!/usr/bin/env bash
# The GPU suite in one command, on a machine with CUDA: installs, runs tests/test_gpu.py and the GPU
# benchmarks, and prints one table (naming the GPU) for docs/RESULTS.md. Extra arguments: --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
exec .venv/bin/python benchmarks/gpu_suite.py "$@"
