#!/usr/bin/env bash
# Create .venv and install the framework (with EXTRAS, e.g. "test"). Idempotent: reinstalls
# only when pyproject.toml changes. torch/torchvision come from the registry, pinned together
# (a machine-local CPU torch wheel breaks the registry's torchvision; see README "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
spec="."; [[ -n $extras ]] && spec=".[$extras]"
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras:-base}"
if [[ -f $stamp ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
echo "installing into .venv (first time: a few minutes, ~6 GB with torch's CUDA libraries)..."
# pip warns about every package missing from this machine's local indexes: not errors, drop them
.venv/bin/pip install -q -e "$spec" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 1
touch "$stamp"
