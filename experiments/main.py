"""Runs a bn_jax study from a config file, then writes its report.

    python -m experiments.main --config=configs/placements.py --workdir=workdirs/placements

Fields of the config can be overridden as --config.FIELD=VALUE. Rerunning the
same command resumes from the workdir's checkpoints. This file is kept short:
training lives in bn_jax.experiment, the tables and plots in
experiments/report.py, each importable and testable.
"""

import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from bn_jax import data
from bn_jax import experiment
from bn_jax import study
from bn_jax import workdir as workdir_lib
from experiments import cli
from experiments import report

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config, metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])

def parse_flags(argv):
  return cli.parse_flags(argv, fields_file="configs/base.py")


def load_config():
  return cli.load_config(lambda: _CONFIG.value,
                         example="--config=configs/placements.py")


def main(argv):
  cli.start(argv)
  try:
    experiment.train_and_evaluate(
        load_config(), _WORKDIR.value,
        command=cli.command_line("experiments.main", sys.argv))
    if jax.process_index() == 0:  # the process that wrote the files
      print(report.write_report([_WORKDIR.value], _WORKDIR.value),
            flush=True)
  except (study.ConfigError, data.DataError, experiment.NonFiniteError,
          workdir_lib.WorkdirError, report.ReportError) as e:
    # Problems the user can fix: the message says how; no traceback needed.
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
