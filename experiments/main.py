"""Runs a bn_jax study from a config file, then writes its report.

    python -m experiments.main --config=configs/placements.py --workdir=workdirs/placements

Fields of the config can be overridden as --config.FIELD=VALUE. Rerunning the
same command resumes from the workdir's checkpoints. This file is kept short:
training lives in bn_jax.experiment, the tables and plots in
experiments/report.py, each importable and testable.
"""

import logging as py_logging
import os
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import bn_jax
from bn_jax import data
from bn_jax import experiment
from bn_jax import study
from bn_jax import workdir as workdir_lib
from experiments import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config, metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])

# The directories whose INFO lines are shown (progress, resumes, data).
_OWN_CODE = tuple(str(Path(module.__file__).resolve().parent) + os.sep
                  for module in (bn_jax, report))


def parse_flags(argv):
  """absl's parser, with a bad flag or config field reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections' bare error for an unknown --config.FIELD.
    field = str(e.args[0] if e.args else e).strip("'\"")
    sys.exit(f"FATAL Flags parsing error: the config has no field "
             f"'{field}'; see configs/base.py for the valid fields.")
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}")


def load_config():
  """The --config file (config_flags loads it on first use), or one line
  saying why it could not be loaded."""
  try:
    config = _CONFIG.value
    config.keys()  # a config that failed to load raises only when used
    return config
  except OSError as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"FATAL Flags parsing error: the --config file could not be "
             f"loaded ({reason[-1]}); give the path of a config file, e.g. "
             "--config=configs/placements.py.")


def _only_own_info(record: py_logging.LogRecord) -> bool:
  """INFO lines from bn_jax and experiments (progress), warnings from all:
  orbax logs hundreds of INFO lines per run that would bury the progress."""
  return (record.levelno >= py_logging.WARNING
          or str(Path(record.pathname).resolve()).startswith(_OWN_CODE))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_only_own_info)
  try:
    experiment.train_and_evaluate(load_config(), _WORKDIR.value)
    if jax.process_index() == 0:  # the process that wrote the files
      print(report.write_report([_WORKDIR.value], _WORKDIR.value),
            flush=True)
  except (study.ConfigError, data.DataError, experiment.NonFiniteError,
          workdir_lib.WorkdirError, report.ReportError) as e:
    # Problems the user can fix: the message says how; no traceback needed.
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
