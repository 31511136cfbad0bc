"""The BN doctor (bn_jax.doctor) on a lab workdir's trained runs.

    python -m experiments.doctor --workdir=workdirs/placements

restores one run of a combination from its newest checkpoint that loads
(`checkpoints.restore_newest`), takes the first batches of its training
data, and diagnoses its BN layers with what the run's config says: steps
trained, batch size and data set size (the trainer drops a partial last
batch: `sweep.make_spec` trains num_train // batch_size steps an epoch).
The classifier report (`report.write_report`) writes `doctor.md`, every
combination's first run, beside summary.md (`report_files`).

Read only: nothing in the workdir is written, except what a resumed run
would also do to its checkpoints (`checkpoints.manager`,
`restore_newest`): a checkpoint that does not load is moved aside, a
killed save's temporary directory removed. Why not `restore_or_create` (or
classifier's `_initial_states`): a run without a checkpoint must be an
error here, not fresh states; and bn_lab.classifier imports the report
toolkit, which imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bn_jax import doctor as bn_doctor
from bn_lab import checkpoints
from bn_lab import config as base_config
from bn_lab import data as data_lib
from bn_lab import sweep
from bn_lab import train

DOCTOR_FILE = "doctor.md"
# Training batches the statistics are computed over (of the run's size).
DEFAULT_BATCHES = 8


class DoctorError(ValueError):
  """A workdir or run the doctor cannot read; the message says what to do."""


def run_config(workdir: Path) -> ml_collections.ConfigDict:
  """The base config with the workdir's config.json over it, so that fields
  added since the run keep the values it ran with (workdir.ADDED_FIELDS'
  defaults are the base config's)."""
  path = Path(workdir) / "config.json"
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DoctorError(f"{path} is missing or not JSON ({e}); give the "
                      "workdir of a finished (or resumed) training run.") from e
  config = base_config.get_config()
  with config.unlocked():
    config.update(saved)
  return config


def combinations(workdir: Path) -> list[sweep.Combination]:
  """The workdir's combinations that have a checkpoints directory."""
  combos = sweep.combinations(run_config(workdir))
  trained = [c for c in combos
             if (Path(workdir) / "checkpoints" / c.name).is_dir()]
  if not trained:
    raise DoctorError(f"{workdir} has no checkpoints/<combination> "
                      "directory; train the run first (experiments.main).")
  return trained


def pick_run(runs: list[dict[str, Any]], run: int | None = None,
             seed: int | None = None) -> int:
  """The index of a run of the grid: `run`, else the first with `seed`,
  else 0."""
  if run is not None:
    if not 0 <= run < len(runs):
      raise DoctorError(f"--run={run}; the combination has runs 0 to "
                        f"{len(runs) - 1}.")
    return run
  if seed is not None:
    found = [i for i, r in enumerate(runs) if r["seed"] == seed]
    if not found:
      raise DoctorError(f"--seed={seed}; the runs' seeds are "
                        f"{sorted({r['seed'] for r in runs})}.")
    return found[0]
  return 0


def restore_run(workdir: Path, combo: sweep.Combination, num_train: int,
                index: int):
  """(spec, the run's TrainState, epoch) from the combination's newest
  checkpoint that loads."""
  config = combo.config
  runs = sweep.run_grid(config)
  spec = sweep.make_spec(config, num_train)
  seeds = [r["seed"] for r in runs]
  hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE
             if runs[0]["hparams"][n] is not None}
  abstract = jax.eval_shape(functools.partial(
      train.create_sweep_states, spec, seeds, hparams))
  # Read only: a report may run while the run is still saving.
  with contextlib.closing(checkpoints.manager(
      Path(workdir) / "checkpoints" / combo.name,
      config.keep_checkpoints, read_only=True)) as manager:
    restored = checkpoints.restore_newest(manager, abstract,
                                          move_aside=False)
  if restored is None:
    raise DoctorError(f"no checkpoint of {combo.name} in {workdir} loads; "
                      "train (or resume) the run first.")
  epoch, states = restored
  return spec, jax.tree.map(lambda x: x[index], states), epoch


def training_batches(config, num_batches: int):
  """((N, B, 784) model inputs: the first N batches of the training set
  the run trained on (config.train_examples' subset, if set), scaled as
  the trainer scales them; that set's size)."""
  dataset = data_lib.load_dataset(config.dataset,
                                  data_dir=config.data_dir or None,
                                  source=config.data_source)
  images, _ = data_lib.train_subset(dataset.train_images,
                                    dataset.train_labels,
                                    config.get("train_examples"))
  num_train = len(images)
  count = max(1, min(num_batches, num_train // config.batch_size))
  pixels = data_lib.flatten_pixels(images[:count * config.batch_size])
  inputs = data_lib.scale_pixels(jnp.asarray(pixels), config.input_scaling)
  return inputs.reshape(count, config.batch_size, -1), num_train


def diagnose_run(workdir: Path, combo: sweep.Combination, index: int = 0,
                 num_batches: int = DEFAULT_BATCHES, data=None):
  """(bn_jax.doctor.Report, header line) of run `index` of `combo`.
  `data`: (batches, num_train) already loaded for this combination."""
  config = combo.config
  if data is None:
    data = training_batches(config, num_batches)
  batches, num_train = data
  spec, state, epoch = restore_run(workdir, combo, num_train, index)
  model = spec.make_model(state.bn_hparams)
  try:
    report = bn_doctor.diagnose(
        model, {"params": state.params, "batch_stats": state.batch_stats},
        batches, train_batch_size=config.batch_size,
        train_examples=num_train, drop_last=True,
        steps_trained=int(state.step), rngs=train.noise_rngs(state, spec))
  except ValueError as e:  # a model the doctor cannot read (a BN-LSTM)
    raise DoctorError(f"{combo.name}: not diagnosed: {e}") from e
  seed = sweep.run_grid(config)[index]["seed"]
  header = (f"{combo.name}: run {index} (seed {seed}), epoch {epoch}, "
            f"step {int(state.step)}; statistics of the first "
            f"{batches.shape[0]} training batches of {batches.shape[1]}")
  return report, header


def run_markdown(workdir: Path, combo: str | None = None,
                 run: int | None = None, seed: int | None = None,
                 num_batches: int = DEFAULT_BATCHES) -> str:
  """One run's report as Markdown: `combo` by name (default the first),
  its run by index or seed (default the first)."""
  combos = combinations(Path(workdir))
  if combo is None:
    chosen = combos[0]
  else:
    by_name = {c.name: c for c in combos}
    if combo not in by_name:
      raise DoctorError(f"--combo={combo!r}; the workdir's combinations are "
                        f"{sorted(by_name)}.")
    chosen = by_name[combo]
  index = pick_run(sweep.run_grid(chosen.config), run, seed)
  report, header = diagnose_run(Path(workdir), chosen, index, num_batches)
  return f"## {header}\n\n{bn_doctor.format_report(report)}"


def workdir_markdown(workdir: Path, num_batches: int = DEFAULT_BATCHES
                     ) -> tuple[str, str]:
  """(doctor.md's text, summary.md's line): every combination's first run.
  A combination the doctor cannot diagnose (a BN layer called at every
  step of a sequence model, say) gets its reason instead."""
  workdir = Path(workdir)
  sections, problems, notes = [], 0, []
  loaded = {}
  for combo in combinations(workdir):
    key = (combo.config.dataset, combo.config.batch_size,
           combo.config.input_scaling)
    try:
      if key not in loaded:
        loaded[key] = training_batches(combo.config, num_batches)
      report, header = diagnose_run(workdir, combo, 0, num_batches,
                                    loaded[key])
    except (ValueError, DoctorError, data_lib.DataError) as e:
      sections.append(f"## {combo.name}\n\nNot diagnosed: {e}\n")
      notes.append(combo.name)
      continue
    problems += len(report.problems())
    sections.append(f"## {header}\n\n{bn_doctor.format_report(report)}")
  text = (f"# BN doctor: {workdir.name}\n\n"
          "Each combination's first run, from its newest checkpoint "
          "(bn_jax.doctor; `python -m experiments.doctor "
          f"--workdir={workdir} --combo=NAME --run=I` for another).\n\n"
          + "\n".join(sections))
  line = (f"BN doctor: [{DOCTOR_FILE}]({DOCTOR_FILE}), {problems} error(s) "
          f"and warning(s)"
          + (f"; not diagnosed: {', '.join(notes)}" if notes else "") + ".")
  return text, line


def report_files(workdir: Path) -> tuple[str, str]:
  """(doctor.md's text, summary.md's line about it) for a trained workdir.
  Never raises for the doctor's own failures: the text then says what went
  wrong, so that the rest of the report stands."""
  if jax.process_count() > 1:  # orbax's restore is collective: all or none
    reason = (f"one of {jax.process_count()} processes; run `python -m "
              f"experiments.doctor --workdir={workdir}` after the run")
    return (f"# BN doctor: {Path(workdir).name}\n\nNot run: {reason}.\n",
            f"BN doctor: not run ({reason}).")
  try:
    return workdir_markdown(workdir)
  except Exception as e:  # pylint: disable=broad-except
    reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return (f"# BN doctor: {Path(workdir).name}\n\nCould not run: {reason}\n",
            f"BN doctor: could not run ({reason}); see "
            f"[{DOCTOR_FILE}]({DOCTOR_FILE}).")
