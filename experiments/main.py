"""Runs a study from a config file, then writes the run's report.

    python -m experiments.main --config=studies/placements/main_job.py --workdir=workdirs/placements

The study is the one whose folder holds the config file
(studies/registry.py); a config elsewhere runs as classifier sweeps.
Fields of the config can be overridden as --config.FIELD=VALUE. Rerunning
the same command resumes from the workdir's checkpoints. This file is
kept short: the protocol lives in bn_lab.runner, each study in its folder.
"""

import logging
import os
from pathlib import Path
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from bn_lab import cli
from bn_lab import data
from bn_lab import report
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from studies import registry

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file, e.g. "
    "studies/placements/config.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config, metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  return cli.parse_flags(argv, fields_file="the --config file and "
                         "lab/bn_lab/config.py")


def load_config():
  return cli.load_config(lambda: _CONFIG.value,
                         example="--config=studies/placements/main_job.py")


def files_written(workdir: str) -> str:
  """Where the run's files went: the report's, and the curves' command."""
  workdir = Path(workdir)
  names = sorted(p.name for p in workdir.iterdir()
                 if p.suffix in (".md", ".png", ".json", ".jsonl"))
  lines = [f"Wrote to {workdir}: {', '.join(names)}"]
  if (workdir / "tensorboard").is_dir():
    lines.append(f"Curves: tensorboard --logdir {workdir / 'tensorboard'}")
  return "\n".join(lines)


def main(argv):
  cli.start(argv, own_code=(registry.__file__,))
  config = load_config()
  study = registry.for_config_file(config_flags.get_config_filename(
      flags.FLAGS["config"]))
  try:
    runner.run(study, config, _WORKDIR.value,
               command=cli.command_line("experiments.main", sys.argv))
    if jax.process_index() == 0:  # the process that wrote the files
      print(study.report(_WORKDIR.value), flush=True)
      print(files_written(_WORKDIR.value), flush=True)
  except (sweep.ConfigError, data.DataError, train.NonFiniteError,
          workdir_lib.WorkdirError, report.ReportError) as e:
    # Problems the user can fix: the message says how; no traceback needed.
    sys.exit(f"{type(e).__name__}: {e}")
  except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's 130
    print(f"Interrupted: every finished epoch in {_WORKDIR.value} is kept; "
          "rerun the same command to resume.", file=sys.stderr, flush=True)
    # The workdir is closed (lock, files) by now. Leave at once: threads of
    # the libraries (orbax's event loop) still winding down would print
    # tracebacks at interpreter exit, after the one line.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(130)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
