#!/usr/bin/env bash
# The accelerator check: one short run of the bn_jax benchmarks that matter
# on a GPU, written as one Markdown table (benchmarks/accelerator.py says
# what each part measures; benchmarks/README.md has the recorded table).
#
#   benchmarks/accelerator.sh                # on a GPU, ~5-7 min
#   benchmarks/accelerator.sh --quick        # CPU smoke run, ~2 min
#   benchmarks/accelerator.sh --help
#
# The Python is $PYTHON if set, else the project's .venv, else python3 (a
# lent GPU machine has no .venv: its python3 has jax with CUDA).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
  else
    python=python3
  fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$repo/benchmarks/accelerator.py" "$@"
