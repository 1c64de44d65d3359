#!/usr/bin/env bash
# Create ./.venv and install tlr-triton with what the tests and the benchmarks need.
# Without a GPU this installs the CPU build of torch: `torch==2.13.0` is taken from the
# local wheel cache where one exists; elsewhere set TORCH_INDEX_URL, for example
# https://download.pytorch.org/whl/cpu, to pull a CPU build instead of PyPI's CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" torch --index-url "$TORCH_INDEX_URL"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" "torch>=2.4"
    else
        "${PIP[@]}" "torch==2.13.0"
    fi
fi
"${PIP[@]}" -e ".[test,bench,integrations]"
# Triton 3.6.0, the GPU machines' release, beside the newest one: tests/test_gpu_compile.py
# compiles every kernel with both (put first on the compile step's PYTHONPATH).
if [ "$(uname -s)" = Linux ] && [ ! -d .venv/triton-3.6.0/triton ]; then
    "${PIP[@]}" --no-deps --target .venv/triton-3.6.0 "triton==3.6.0"
fi
