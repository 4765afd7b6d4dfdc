#!/usr/bin/env bash
# Fill wheelhouse/ (git-ignored) with what the GPU suite needs and a lent GPU machine's image lacks:
# that machine reaches no package registry, so tests/run_gpu.sh installs from this folder offline.
# The image already holds torch, timm, accelerate, transformers, safetensors, pytest, psutil, pyarrow and
# numpy (its package list: the device tool's KINDS.md); what is fetched here is the rest of
# pyproject.toml's dependencies, for the image's Python (3.12, manylinux x86_64):
#   - DeepSpeed, built here as a pure-Python wheel with no compiled ops (DS_BUILD_OPS=0; the JIT ops are
#     not used by ZeRO with timm's optimizers) from the version pyproject.toml pins;
#   - wandb, datasets, hjson, pydantic and the wheels they need that the image has not.
# The folder must stay small enough to travel with the working tree (64 MiB in all): its size is printed.
#   bash tests/gpu_wheelhouse.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
bash launch/setup.sh test
rm -rf wheelhouse && mkdir wheelhouse
# pip warns about every package missing from this machine's local indexes: not errors, drop them
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
pin() { grep -oE "\"$1==[^\"]+\"" pyproject.toml | tr -d '"'; }
# DeepSpeed's setup.py imports torch: build against this venv's (no isolated build downloading another)
DS_BUILD_OPS=0 quiet .venv/bin/pip wheel -q --no-deps --no-build-isolation -w wheelhouse "$(pin deepspeed)"
# binary wheels for the image's interpreter; the image's own packages are left out (their versions differ)
quiet .venv/bin/pip download -q --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp --no-deps -d wheelhouse \
    "$(pin wandb)" "datasets>=3" hjson "pydantic>=2" pydantic-core annotated-types typing-inspection \
    gitpython gitdb smmap sentry-sdk platformdirs dill multiprocess
# pydantic-core must be the one pydantic pins
core=$(unzip -p wheelhouse/pydantic-2*.whl '*/METADATA' | grep -oE "pydantic-core==[0-9.]+" | head -1)
if [[ -n $core ]] && ! ls wheelhouse | grep -q "pydantic_core-${core#pydantic-core==}-"; then
    rm -f wheelhouse/pydantic_core-*.whl
    quiet .venv/bin/pip download -q --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
        --implementation cp --no-deps -d wheelhouse "$core"
fi
du -sh wheelhouse
ls wheelhouse
