"""Runs a bn_jax experiment from a config file.

    python -m experiments.main --config=configs/placements.py \
        --workdir=workdirs/placements --config.data_dir=../shared/data/mnist

Fields of the config can be overridden as --config.FIELD=VALUE. Rerunning the
same command resumes from the workdir's checkpoints. This file is kept short:
the logic lives in bn_jax.experiment, importable and testable.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bn_jax import data
from bn_jax import experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config, metrics, plots and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's parser, with ml_collections' bare KeyError/AttributeError for an
  unknown --config.FIELD turned into a message that says what is wrong."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    field = str(e.args[0] if e.args else e).strip("'\"")
    sys.exit(f"FATAL Flags parsing error: the config has no field '{field}'; see "
             "the config file (or bn_jax.experiment.default_config) for the "
             "valid fields.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs hundreds of INFO lines per run, burying the progress lines;
    # --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  try:
    experiment.run_experiment(_CONFIG.value, _WORKDIR.value)
  except (experiment.ConfigError, data.DataError,
          experiment.NonFiniteError) as e:
    # Problems the user can fix: the message says how; no traceback needed.
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
