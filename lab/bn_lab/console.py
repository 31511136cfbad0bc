"""The lab's console scripts: `bn-lab` (experiments.main: run a study),
`bn-lab-report` (experiments.report) and `bn-lab-doctor`
(experiments.doctor: the BN doctor on a trained run), from any directory.

The studies and the entry points live in the repository beside the lab
(studies/, experiments/), not in the installed package; scripts/setup.sh
installs the lab editable, so the repository is the one this file is in.
Another checkout can be named with BN_LAB_REPO. A --config path that does
not exist from the current directory is read from the repository, so

    bn-lab --config=studies/placements/main_job.py --workdir=/tmp/placements

runs anywhere; --workdir stays relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
import runpy
import sys


def repository() -> Path:
  """The checkout holding studies/ and experiments/: $BN_LAB_REPO, else the
  one this (editable) lab is installed from."""
  root = Path(os.environ.get("BN_LAB_REPO")
              or Path(__file__).resolve().parents[2])
  if not (root / "studies" / "registry.py").is_file():
    sys.exit(f"bn-lab: no studies/registry.py in {root}: the studies run "
             "from a clone of the repository; install the lab from it "
             "(bash scripts/setup.sh), or set BN_LAB_REPO=/path/to/clone.")
  return root


def config_argument(argument: str, root: Path) -> str:
  """--config=PATH[:variant], PATH taken from `root` where it is not a file
  from the current directory."""
  flag, value = argument.split("=", 1)
  path, colon, variant = value.partition(":")
  if not Path(path).is_file() and (root / path).is_file():
    value = f"{root / path}{colon}{variant}"
  return f"{flag}={value}"


def _run_module(module: str) -> None:
  root = repository()
  sys.path.insert(0, str(root))
  sys.argv = [module, *(config_argument(a, root)
                        if a.startswith(("--config=", "-config=")) else a
                        for a in sys.argv[1:])]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def run() -> None:
  _run_module("experiments.main")


def report() -> None:
  _run_module("experiments.report")


def doctor() -> None:
  _run_module("experiments.doctor")
