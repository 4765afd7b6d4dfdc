#!/usr/bin/env bash
# The GPU suite in one command, on a machine with CUDA: installs, runs tests/test_gpu.py and the GPU
# benchmarks (DDP, ZeRO 2 and 3, FSDP2; bf16 and fp16), and prints one table (naming the GPU) for
# docs/RESULTS.md. Extra arguments: --quick (fits a 15-minute lease).
# A machine with a registry installs into .venv (launch/setup.sh). A lent GPU machine reaches none: fill
# wheelhouse/ here first (bash tests/gpu_wheelhouse.sh), carry it along, and this installs from it
# offline into the image's own Python, which already holds torch, timm and accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -d wheelhouse ]]; then
    py=$(command -v python3)
    "$py" -m pip install -q --no-index --no-deps wheelhouse/*.whl
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    "$py" -m pip check | grep -iE "deepspeed|wandb|datasets|framework|bnswa" || true  # what is still missing, if anything
else
    bash launch/setup.sh test
    py=.venv/bin/python
fi
exec "$py" benchmarks/gpu_suite.py "$@"
