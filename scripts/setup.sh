#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with bn_jax and test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
