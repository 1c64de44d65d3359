#!/usr/bin/env bash
# Set up ./.venv, then run the default configuration of the paper's experiments (bench/experiments.py; extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python bench/experiments.py "$@"
