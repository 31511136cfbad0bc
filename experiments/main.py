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

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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

_OWN_CODE = (os.sep + "bn_jax" + os.sep, os.sep + "experiments" + os.sep)


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


def _only_own_info(record: py_logging.LogRecord) -> bool:
  """INFO lines from bn_jax and experiments (progress), warnings from all:
  orbax logs hundreds of INFO lines per run that would bury the progress."""
  return (record.levelno >= py_logging.WARNING
          or any(part in record.pathname for part in _OWN_CODE))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_only_own_info)
  try:
    experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(report.write_report([_WORKDIR.value], _WORKDIR.value), flush=True)
  except (study.ConfigError, data.DataError, experiment.NonFiniteError,
          workdir_lib.WorkdirError) as e:
    # Problems the user can fix: the message says how; no traceback needed.
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
