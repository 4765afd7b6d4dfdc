#!/usr/bin/env bash
# Install, then train recipes/quickstart.yaml: 2 processes on CPU, or one per GPU when present.
# Extra arguments are recipe overrides, e.g. `bash launch/quickstart.sh schedule.epochs=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
gpus=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc=2; [[ $gpus -gt 0 ]] && nproc=$gpus
exec .venv/bin/accelerate launch --config_file accelerate_config.yaml --num_processes "$nproc" \
  launch/train.py recipes/quickstart.yaml "$@"
