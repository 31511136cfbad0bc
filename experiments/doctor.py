r"""The BN doctor on a trained run of a workdir: a table of its BN layers.

    python -m experiments.doctor --workdir=workdirs/placements

prints bn_jax.doctor's report (train/eval gap, statistics never updated,
values per channel, momentum, a bias before BN, frozen BN, folding) of one
run, restored from its newest checkpoint, on the first batches of its
training data: the first combination's first run, or the one named:

    python -m experiments.doctor --workdir=workdirs/placements \
        --combo=placement=before_activation --seed=1

The report of a run (experiments.main, experiments.report) writes the same
for every combination into the workdir's doctor.md. This file is kept
short: the work is in bn_lab.doctor.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from bn_lab import data
from bn_lab import doctor
from bn_lab import sweep


def _flag_values() -> flags.FlagValues:
  """Flags of their own: experiments.main's global --workdir would clash
  where both are imported (tests)."""
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "A trained run's workdir "
                      "(config.json, checkpoints/).", flag_values=values)
  flags.DEFINE_string("combo", None, "The combination, e.g. "
                      "placement=before_activation; default the first.",
                      flag_values=values)
  flags.DEFINE_integer("run", None, "The run's index in the combination "
                       "(seeds x swept values); default the first.",
                       flag_values=values)
  flags.DEFINE_integer("seed", None, "The first run with this seed, instead "
                       "of --run.", flag_values=values)
  flags.DEFINE_integer("batches", doctor.DEFAULT_BATCHES, "Training batches "
                       "the statistics are computed over.", flag_values=values)
  return values


def main(argv: Sequence[str]) -> None:
  """The command line: argv[0] is the program name. A problem the user can
  fix ends in a one-line `sys.exit` message, no traceback."""
  values = _flag_values()
  try:
    extra = values(list(argv))[1:]
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  if extra or not values["workdir"].value:
    sys.exit("FATAL give --workdir=DIR (and optionally --combo, --run or "
             "--seed, --batches).")
  if values["run"].value is not None and values["seed"].value is not None:
    sys.exit("FATAL give --run or --seed, not both.")
  if values["batches"].value < 1:
    sys.exit("FATAL --batches must be at least 1.")
  try:
    print(doctor.run_markdown(
        values["workdir"].value, combo=values["combo"].value,
        run=values["run"].value, seed=values["seed"].value,
        num_batches=values["batches"].value), end="", flush=True)
  except (doctor.DoctorError, sweep.ConfigError, data.DataError) as e:
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  main(sys.argv)
