#!/usr/bin/env bash
# Install, then train recipes/quickstart.yaml: 2 processes on CPU, or one per GPU when present.
# Extra arguments are recipe overrides, e.g. `bash launch/quickstart.sh schedule.epochs=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/bnswa train recipes/quickstart.yaml "$@"
