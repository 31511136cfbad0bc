"""Classifier sweeps: the studies that train with the shared trainer.

`study(name, title, ...)` makes such a study; the runner (bn_lab.runner)
calls its validate, load_data and run. Every combination of the study's
axes (bn_lab.sweep) is one compiled program in which all its runs (seeds x
swept values) train together, vmapped, epoch by epoch
(`train_combination`), with the measurements the study hands the trainer
(`train.Measurement`). Written to the workdir:

  config.json          the resolved config
  metrics.jsonl        one line per combination, run and epoch, appended and
                       synced every epoch
  steps.jsonl          the training loss and accuracy of every
                       config.log_every_steps steps, per run
  tensorboard/<combo>/run<i>/  the same curves and the run's hyperparameters
                       for `tensorboard --logdir`
  checkpoints/<combo>/ orbax checkpoints of the runs' state; rerunning the
                       same command resumes from them (bn_lab.checkpoints)
  results.json         the study, the data's origin, each combination's times

With `config.nan_guard` (the default), a NaN or inf loss, parameter or BN
statistic, or a training loss above `config.divergence_factor` x ln(10),
stops the run with `NonFiniteError` before anything of that epoch is
written.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Any

from absl import logging
import jax
import numpy as np

from bn_lab import checkpoints
from bn_lab import data as data_lib
from bn_lab import page
from bn_lab import parallel
from bn_lab import progress
from bn_lab import runner
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib

# Per-run metrics of every epoch (metrics.jsonl, TensorBoard).
METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
           "test_accuracy_batch_stats")


def metric_names(config) -> tuple[str, ...]:
  """The per-run metrics of every epoch under `config`."""
  return (METRICS
          + (train.VALIDATION_METRICS if config.get("validation_examples")
             else ())
          + (train.TRAIN_EVAL_METRICS if config.eval_train else ())
          + ((train.PRECISE_METRIC, train.PRECISE_LOSS_METRIC,
              *train.STALENESS_METRICS)
             if config.precise_bn.num_batches
             or config.precise_bn.num_examples else ()))


def load_data(config) -> tuple[train.DeviceData, str]:
  dataset = data_lib.load_dataset(config.dataset,
                                  data_dir=config.data_dir or None,
                                  source=config.data_source)
  try:
    train_images, train_labels, val_images, val_labels = (
        data_lib.validation_split(dataset.train_images, dataset.train_labels,
                                  config.get("validation_examples", 0)))
    train_images, train_labels = data_lib.train_subset(
        train_images, train_labels, config.get("train_examples"))
  except ValueError as e:
    raise sweep.ConfigError(f"config.{e}") from e
  # uint8 on the device; each batch is scaled (config.input_scaling) in the
  # compiled step (train.model_inputs).
  device_data = train.to_device(
      data_lib.flatten_pixels(train_images), train_labels,
      data_lib.flatten_pixels(dataset.test_images), dataset.test_labels,
      validation=None if val_images is None else (
          data_lib.flatten_pixels(val_images), val_labels))
  return device_data, dataset.origin


def _initial_states(spec, runs, manager, recorded: int):
  """The runs' stacked states, (epoch, states): from the newest checkpoint
  that loads, up to the `recorded` epochs of metrics rows, else fresh
  (`checkpoints.restore_or_create`)."""
  seeds = [r["seed"] for r in runs]
  hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE
             if runs[0]["hparams"][n] is not None}
  return checkpoints.restore_or_create(manager, functools.partial(
      train.create_sweep_states, spec, seeds, hparams), recorded)


def train_combination(combo: sweep.Combination, data: train.DeviceData,
                      workdir: Path, writer, mesh=None,
                      measurements: tuple[train.Measurement, ...] = (),
                      ) -> dict[str, Any]:
  """Trains all runs of one combination, resuming from its checkpoints.

  `writer` (a workdir.MetricsWriter, or None in processes that do not
  write) gets each epoch's rows. With a `mesh` (from `parallel.setup`),
  each epoch is data-parallel over it; `measurements` are taken during
  training (`train.Measurement`). Returns the combination's entry of
  results.json.
  """
  config = combo.config
  runs = sweep.run_grid(config)
  spec = sweep.make_spec(config, data.train_images.shape[0], measurements)
  epoch_fn = parallel.sweep_epoch_fn(spec, mesh, config.bn_stats)
  with contextlib.closing(checkpoints.manager(
      workdir / "checkpoints" / combo.name,
      config.keep_checkpoints)) as manager:
    # Every process reads the rows (the workdir is shared): all restore
    # the same epoch.
    recorded = workdir_lib.recorded_epochs(
        workdir_lib.read_jsonl(workdir / "metrics.jsonl"), combo.name,
        len(runs))
    return _train_epochs(combo, runs, spec, epoch_fn, data, manager, writer,
                         recorded)


def _train_epochs(combo, runs, spec, epoch_fn, data, manager, writer,
                  recorded):
  """train_combination's loop: resume, then train, write, save each epoch."""
  config = combo.config
  start_epoch, states = _initial_states(spec, runs, manager, recorded)
  kept = (writer.forget_after(combo.name, start_epoch, spec.steps_per_epoch)
          if writer else [])
  wall = kept[-1]["wall_time"] if kept else 0.0
  if start_epoch:
    logging.info("[%s] resumed from checkpoint at epoch %d", combo.name,
                 start_epoch)
  for i, run in enumerate(runs):
    if writer:
      writer.start_run(combo.name, i, {**combo.values, "seed": run["seed"],
                                       **run["hparams"]})
  compile_time = last_epoch = None
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    started = time.perf_counter()
    with progress.Epoch(f"{combo.name} epoch {epoch}/{config.num_epochs}",
                        spec.steps_per_epoch, config.progress_seconds,
                        config.num_epochs - epoch, last_epoch):
      states, metrics = epoch_fn(states, data)
      metrics = jax.device_get(metrics)  # the one host sync per epoch
    if spec.nan_guard:  # checked before anything of the epoch is written
      error = train.nonfinite_error(combo.name, runs, epoch, spec,
                               metrics.pop("first_nonfinite_step"),
                               metrics.pop("nonfinite"), manager.directory,
                               metrics.pop("guard_loss", None))
      if error is not None and not spec.freeze_diverged:
        raise error
      if error is not None:  # nan_guard="record": those runs are frozen
        logging.warning("%s\nThose runs are frozen at their last finite "
                        "state (nan_guard='record'); the others go on.",
                        str(error).split("\n(A non-finite")[0])
    diverged_at = metrics.pop("diverged_at", None)
    measured = {m.name: metrics.pop(m.name) for m in spec.measurements}
    windows = {k: metrics.pop(k) for k in train.WINDOW_METRICS
               if k in metrics}
    last_epoch = time.perf_counter() - started
    if compile_time is None and epoch == start_epoch + 1:
      compile_time = last_epoch  # compile + one epoch
    wall += last_epoch
    if writer:
      writer.write([{
          **combo.values, "combo": combo.name, "run": i, "seed": run["seed"],
          **run["hparams"], "epoch": epoch,
          "step": epoch * spec.steps_per_epoch, "wall_time": wall,
          **{k: float(metrics[k][i]) for k in metric_names(config)},
          **({} if diverged_at is None else {"diverged_at": (
              int(diverged_at[i]) if diverged_at[i] >= 0 else None)}),
          **_row_fields(spec, measured, i)}
                    for i, run in enumerate(runs)],
                   _step_rows(combo.name, runs, epoch, spec, windows))
    checkpoints.save(manager, epoch, states)
    accuracy = np.asarray(metrics["test_accuracy"])
    precise = (f", precise BN {np.mean(metrics[train.PRECISE_METRIC]):.4f}"
               if train.PRECISE_METRIC in metrics else "")
    logging.info(
        "[%s] epoch %d/%d  train loss %.4f  test acc %.4f +- %.4f "
        "(batch stats %.4f%s)  %.1f s", combo.name, epoch, config.num_epochs,
        np.mean(metrics["train_loss"]), accuracy.mean(), accuracy.std(),
        np.mean(metrics["test_accuracy_batch_stats"]), precise, last_epoch)
  if writer:
    writer.close()  # this combination's TensorBoard files, complete
  return {"combo": combo.name, **combo.values, "runs": len(runs),
          "epochs": config.num_epochs, "wall_time": wall,
          "compile_time": compile_time}


def _step_rows(combo: str, runs: list[dict], epoch: int,
               spec: train.TrainSpec, windows: dict[str, Any]) -> list[dict]:
  """steps.jsonl's rows of one epoch: each run's training loss and accuracy
  over each window of `spec.log_every_steps` steps, at the window's last
  step."""
  if not windows:
    return []
  first = (epoch - 1) * spec.steps_per_epoch
  ends = train.window_ends(spec.steps_per_epoch, spec.log_every_steps)
  return [{"combo": combo, "run": i, "seed": run["seed"],
           "step": first + end,
           **{name: float(windows[f"window_{name}"][i][w])
              for name in workdir_lib.STEP_SCALARS}}
          for i, run in enumerate(runs) for w, end in enumerate(ends)]


def _row_fields(spec: train.TrainSpec, measured: dict[str, Any],
                run: int) -> dict[str, Any]:
  """Run `run`'s fields of every measurement the epoch took."""
  fields = {}
  for m in spec.measurements:
    values = jax.tree.map(lambda x: x[run], measured[m.name])
    fields.update(m.row_fields(values, spec) if m.row_fields
                  else train.measurement_fields(m.name, values))
  return fields


def _setup_classifier(config, check=None, measure=None) -> None:
  """The classifier studies' `validate`: JAX's distributed runtime first,
  then the config (the shared fields, then the study's `check`)."""
  try:
    # Before any other JAX call (the config checks compute a little), and
    # after its own fields' checks: a bad process id or address stops every
    # process at once instead of leaving the others waiting for it.
    parallel.initialize_distributed(config.distributed, config.mesh_devices)
  except ValueError as e:
    raise sweep.ConfigError(str(e)) from e
  sweep.validate_config(config)
  if check is not None:
    check(config)
  if measure is not None:
    sweep.check_measurements(config, measure(config))
  try:
    parallel.check_devices(config)  # the machine's fault, after the config's
  except ValueError as e:
    raise sweep.ConfigError(str(e)) from e


def _classifier_data(config, measure=None):
  """The classifier studies' `load_data`: the data set on the device(s),
  checked against the config's batch sizes (and its measurements')."""
  data, origin = load_data(config)
  num_train = data.train_images.shape[0]
  sweep.validate_data_size(config, num_train, data.test_images.shape[0],
                           measure(config) if measure else ())
  logging.info("data: %s from %s; %d train / %d test examples",
               config.dataset, origin, num_train, data.test_images.shape[0])
  return data, origin


def train_sweeps(context: study_lib.RunContext,
                 measure=None) -> dict[str, Any]:
  """The classifier studies' `run`: every combination of the study's axes,
  its seeds and sweeps vmapped into one program, data parallel over the
  mesh (config.mesh_devices), with the measurements `measure(config)`
  gives. Returns results.json's study part."""
  config, workdir = context.config, context.workdir
  combos = sweep.combinations(config)
  try:
    mesh = parallel.setup(config, [c.config.batch_size for c in combos])
  except ValueError as e:  # e.g. more mesh_devices than devices
    raise sweep.ConfigError(str(e)) from e
  data = parallel.replicate(context.data, mesh)
  logging.info("%d combination(s) x %d run(s) x %d epoch(s) on %s",
               len(combos), len(sweep.run_grid(config)), config.num_epochs,
               jax.devices()[0].platform)
  writer = workdir_lib.MetricsWriter(workdir, metric_names(config)) if (
      context.writes) else None
  with workdir_lib.closing_after_error(writer):
    trained = [train_combination(
        combo, data, workdir, writer, mesh,
        measure(combo.config) if measure else ()) for combo in combos]
  # In the order trained (not sorted): the report's columns follow it.
  return {
      "study": config.study, "dataset": config.dataset,
      "data_origin": context.origin,
      "target_accuracy": config.target_accuracy,
      "num_epochs": config.num_epochs,
      "axes": {field: list(dict.fromkeys(c.values[field] for c in combos))
               for field in sweep.row_axes(config)},
      "combos": trained}


def extension_refusal(saved: dict[str, Any], config: dict[str, Any],
                      ) -> str | None:
  """Why a finished classifier run (config.json `saved`) cannot be trained
  on to `config`'s larger num_epochs, or None: a schedule laid out over
  num_epochs would have been another one for the epochs already trained,
  unless config.schedule_epochs fixed its length from the start."""
  del saved  # the same but for num_epochs (workdir.check_resumable)
  if config.get("schedule_epochs") is not None:
    return None
  laid_out = []
  if config["schedule"] != "constant":
    laid_out.append(f"the learning-rate schedule ({config['schedule']})")
  if "renorm" in (config["norm"], *config.get("norms", ())) and (
      config["bn"].get("renorm_schedule") is not None
      and config["bn"].get("renorm_schedule_unit") == "fraction"):
    laid_out.append("Batch Renorm's schedule (in fractions of the run)")
  if not laid_out:
    return None
  return (f"{' and '.join(laid_out)} is laid out over num_epochs, so the "
          "epochs already trained followed another one; to extend a run, "
          "start it with --config.schedule_epochs=FINAL_EPOCHS, or use a "
          "new --workdir")


def study(name: str, title: str, *, check=None, measure=None,
          report_extras=(), **fields) -> study_lib.Study:
  """A study of classifier sweeps with the shared trainer.

  Args:
    name, title: as `Study`'s.
    check: config -> None, the study's own config checks (its own fields),
      after the shared ones; raises sweep.ConfigError.
    measure: config -> tuple of `train.Measurement`: what the trainer
      measures during training for this study.
    report_extras: the study's additions to a run's summary.md
      (`report.write_report`'s extras); its page section is appended too
      (`page.write_run_report`).
    **fields: `Study`'s other fields (section, commands, ...).
  """
  return study_lib.Study(
      name=name, title=title,
      validate=functools.partial(_setup_classifier, check=check,
                                 measure=measure),
      load_data=functools.partial(_classifier_data, measure=measure),
      run=functools.partial(train_sweeps, measure=measure),
      report=functools.partial(page.write_run_report, extras=report_extras,
                               section=fields.get("section")),
      **{"extension_refusal": extension_refusal, **fields})


# Any config outside a study folder (lab/bn_lab/config.py itself, a
# user's own): its sweeps with the generic summary.
GENERIC = study("classifier", "Classifier sweeps")


def train_and_evaluate(config, workdir: str | os.PathLike,
                       command: str | None = None) -> dict[str, Any]:
  """`runner.run` of a classifier config as the generic study."""
  return runner.run(GENERIC, config, workdir, command)
