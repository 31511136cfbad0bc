#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with the library (bn_jax),
# the lab (bn_lab, lab/) and the test dependencies, both editable.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e . -e "./lab[test]"
