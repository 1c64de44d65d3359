#!/usr/bin/env bash
# Set up ./.venv, then train the paper's MNIST network on scikit-learn's digits with TLR and SGD side by side.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python bench/train_digits.py "$@"
