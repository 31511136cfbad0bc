"""train_and_evaluate(config, workdir): a study's runs, checkpointed, logged.

`experiments/main.py` parses flags, calls `train_and_evaluate`, then the
report (experiments/report.py). Every combination of the study's axes
(bn_jax.study) is one compiled program in which all its runs (seeds x
swept values) train together, vmapped. Written to the workdir:

  config.json          the resolved config
  metrics.jsonl        one line per combination, run and epoch, appended and
                       synced every epoch
  tensorboard/<combo>/run<i>/  the same curves for `tensorboard --logdir`
  checkpoints/<combo>/ orbax checkpoints of the runs' state; rerunning the
                       same command resumes from them (bn_jax.checkpoints)
  results.json         the study, the data's origin, each combination's times

Files are written atomically (bn_jax.workdir): none is ever half-written,
and a full disk stops the run with one line naming the file. One process at
a time may write a workdir (a lock). With `config.nan_guard` (the default), a
NaN or inf loss, parameter or BN statistic stops the run with
`NonFiniteError` before anything of that epoch is written.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

from absl import logging
import flax
import jax
import numpy as np

from bn_jax import checkpoints
from bn_jax import data as data_lib
from bn_jax import landscape
from bn_jax import parallel
from bn_jax import study
from bn_jax import train
from bn_jax import workdir as workdir_lib

# Per-run metrics of every epoch (metrics.jsonl, TensorBoard).
METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
           "test_accuracy_batch_stats")


def metric_names(config) -> tuple[str, ...]:
  """The per-run metrics of every epoch under `config`."""
  return (METRICS
          + (train.TRAIN_EVAL_METRICS if config.eval_train else ())
          + ((train.PRECISE_METRIC, *train.STALENESS_METRICS)
             if config.precise_bn.num_batches
             or config.precise_bn.num_examples else ()))


class NonFiniteError(FloatingPointError):
  """A run's loss, parameters or BN statistics became NaN or inf (the NaN
  guard, `config.nan_guard`); nothing of that epoch was written."""


def _nonfinite_error(combo: str, runs: list[dict], epoch: int,
                     spec: train.TrainSpec, first_step, flags,
                     checkpoint_dir) -> NonFiniteError | None:
  """The NaN guard's error for an epoch's per-run flags, or None if all runs
  stayed finite. `first_step[i]` is run i's first bad global step or -1."""
  bad = [i for i, step in enumerate(first_step) if step >= 0]
  if not bad:
    return None
  lines = []
  for i in bad:
    step = int(first_step[i])
    hparams = ", ".join(f"{k}={v}" for k, v in runs[i]["hparams"].items())
    lines.append(
        f"  run {i} (seed {runs[i]['seed']}, {hparams}): non-finite "
        f"{train.describe_nonfinite(flags[i])} at global step {step} (step "
        f"{step - (epoch - 1) * spec.steps_per_epoch} of "
        f"{spec.steps_per_epoch} in epoch {epoch})")
  kept = (f"the last good checkpoint (epoch {epoch - 1}) is in "
          f"{checkpoint_dir} and metrics.jsonl holds the epochs before"
          if epoch > 1 else "nothing of this combination was written")
  return NonFiniteError(
      f"[{combo}] NaN guard: training diverged in epoch {epoch}:\n"
      + "\n".join(lines) + "\n"
      "(A non-finite loss can come from the update of the step before: the "
      "guard checks losses and BN statistics every step, parameters after "
      "the epoch's last step.) "
      f"Nothing of epoch {epoch} was saved; {kept}. To fix: lower the "
      "learning rate (config.learning_rate / config.sweep.learning_rate), "
      "raise BN epsilon (config.bn.epsilon), or check the input data for "
      "NaN/inf, and rerun in a new --workdir. To freeze the diverging runs "
      "and train the others on (a learning-rate range), set "
      "--config.nan_guard=record; to train on regardless (no checks, a "
      "little faster), --config.nan_guard=False.")


@contextlib.contextmanager
def _progress(seconds: float, label: str, expected: float | None):
  """Logs a line every `seconds` while an epoch (or its compile) runs, with
  the time so far and, once an epoch has been timed, the share done."""
  if seconds <= 0:
    yield
    return
  stop, start = threading.Event(), time.perf_counter()

  def report():
    while not stop.wait(seconds):
      elapsed = time.perf_counter() - start
      done = (f", about {min(elapsed / expected, 0.99):.0%} done by the "
              "last epoch's time" if expected else " (compiling, training)")
      logging.info("[%s] ... %.0f s%s", label, elapsed, done)

  threading.Thread(target=report, daemon=True).start()
  try:
    yield
  finally:
    stop.set()


def load_data(config) -> tuple[train.DeviceData, str]:
  dataset = data_lib.load_dataset(config.dataset,
                                  data_dir=config.data_dir or None,
                                  source=config.data_source)
  # uint8 on the device; each batch is scaled (config.input_scaling) in the
  # compiled step (train.model_inputs).
  device_data = train.to_device(
      data_lib.flatten_pixels(dataset.train_images), dataset.train_labels,
      data_lib.flatten_pixels(dataset.test_images), dataset.test_labels)
  return device_data, dataset.origin


def _initial_states(spec, runs, manager):
  """The runs' stacked states, (epoch, states): from the newest checkpoint
  that loads, else fresh (`checkpoints.restore_or_create`)."""
  seeds = [r["seed"] for r in runs]
  hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE
             if runs[0]["hparams"][n] is not None}
  return checkpoints.restore_or_create(manager, functools.partial(
      train.create_sweep_states, spec, seeds, hparams))


def train_combination(combo: study.Combination, data: train.DeviceData,
                      workdir: Path, writer, mesh=None) -> dict[str, Any]:
  """Trains all runs of one combination, resuming from its checkpoints.

  `writer` (a workdir.MetricsWriter, or None in processes that do not
  write) gets each epoch's rows. With a `mesh` (from `parallel.setup`),
  each epoch is data-parallel over it. Returns the combination's entry of
  results.json.
  """
  config = combo.config
  runs = study.run_grid(config)
  spec = study.make_spec(config, data.train_images.shape[0])
  epoch_fn = parallel.sweep_epoch_fn(spec, mesh, config.bn_stats)
  with contextlib.closing(checkpoints.manager(
      workdir / "checkpoints" / combo.name,
      config.keep_checkpoints)) as manager:
    return _train_epochs(combo, runs, spec, epoch_fn, data, manager, writer)


def _train_epochs(combo, runs, spec, epoch_fn, data, manager, writer):
  """train_combination's loop: resume, then train, write, save each epoch."""
  config = combo.config
  start_epoch, states = _initial_states(spec, runs, manager)
  kept = (writer.forget_after(combo.name, start_epoch, spec.steps_per_epoch)
          if writer else [])
  wall = kept[-1]["wall_time"] if kept else 0.0
  if start_epoch:
    logging.info("[%s] resumed from checkpoint at epoch %d", combo.name,
                 start_epoch)
  compile_time = last_epoch = None
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    started = time.perf_counter()
    with _progress(config.progress_seconds,
                   f"{combo.name} epoch {epoch}/{config.num_epochs}",
                   last_epoch):
      states, metrics = epoch_fn(states, data)
      metrics = jax.device_get(metrics)  # the one host sync per epoch
    if spec.nan_guard:  # checked before anything of the epoch is written
      error = _nonfinite_error(combo.name, runs, epoch, spec,
                               metrics.pop("first_nonfinite_step"),
                               metrics.pop("nonfinite"), manager.directory)
      if error is not None and not spec.freeze_diverged:
        raise error
      if error is not None:  # nan_guard="record": those runs are frozen
        logging.warning("%s\nThose runs are frozen at their last finite "
                        "state (nan_guard='record'); the others go on.",
                        str(error).split("\n(A non-finite")[0])
    diverged_at = metrics.pop("diverged_at", None)
    probed = metrics.pop("probe", None)
    probe_steps = ([(epoch - 1) * spec.steps_per_epoch + (j + 1)
                    * spec.probe_every for j in range(probed.shape[1])]
                   if probed is not None else None)
    measured = {name: metrics.pop(name) for name in ("ics", "landscape")
                if name in metrics}
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
          **({} if probed is None else {
              "probe_steps": probe_steps,
              "probe_percentiles": np.round(probed[i], 6).tolist()}),
          **measurement_fields(measured, i, spec)}
                    for i, run in enumerate(runs)])
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


def _significant(values, digits: int = 7):
  """An array as nested lists of floats rounded to `digits` significant
  digits (a float32's precision, without float64's noise digits)."""
  return np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[float])(
      np.asarray(values, np.float64)).tolist()


def measurement_fields(measured: dict[str, Any], run: int,
                       spec: train.TrainSpec) -> dict[str, Any]:
  """A metrics row's fields for run `run` of the epoch's ICS and landscape
  measurements (`train.measure_ics`, `train.measure_landscape`, stacked
  over the epoch's measurements): `<name>_steps` (updates taken before
  each) and `<name>_<field>` per measurement; "ics_layers" names the
  layers of the ICS arrays' last axis, "landscape_step_sizes" the grid
  (the same at every measurement)."""
  fields = {}
  for name, values in measured.items():
    fields[f"{name}_steps"] = [int(s) for s in values["step"][run]]
    for field, value in values.items():
      if field == "step_sizes":
        fields[f"{name}_{field}"] = _significant(value[run][0])
      elif field != "step":
        fields[f"{name}_{field}"] = _significant(value[run])
  if "ics" in measured:
    fields["ics_layers"] = list(landscape.classifier_layers(
        spec.make_model({})))
  return fields


def _check_workdir_path(workdir: str | os.PathLike) -> Path:
  if not str(workdir).strip():
    raise study.ConfigError("--workdir is empty; give the directory for the "
                            "run's files, e.g. --workdir=workdirs/NAME.")
  workdir = Path(workdir)
  for path in (workdir, *workdir.parents):
    if path.exists() and not path.is_dir():
      raise study.ConfigError(f"--workdir {workdir}: {path} is a file; give "
                              "a directory.")
  return workdir


def provenance(command: str | None = None) -> dict[str, Any]:
  """What a recorded result needs to be reproduced and compared: the
  command that made it (None: not known), the machine and the software,
  the time it finished (UTC). results.json and the benchmarks' JSON carry
  it; the studies page prints it under each figure."""
  cpu = platform.processor() or platform.machine()
  try:  # the model name, e.g. "AMD EPYC 7B13" (Linux)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  device = jax.devices()[0]
  return {
      "command": command,
      "machine": {
          "cpu": cpu, "cpu_count": os.cpu_count(),
          "platform": device.platform, "device": device.device_kind,
          "device_count": jax.device_count(),
          "process_count": jax.process_count(),
          "jax": jax.__version__, "flax": flax.__version__,
          "python": platform.python_version()},
      "finished": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC")}


def train_and_evaluate(config, workdir: str | os.PathLike,
                       command: str | None = None) -> dict[str, Any]:
  """Trains every combination of the study; returns results.json's content
  (with `provenance(command)`: pass the command line that started it).

  Raises study.ConfigError, data.DataError, NonFiniteError and
  workdir.WorkdirError (in use, another config, a failed write) with
  messages that say what to fix; nothing already written is lost by any.
  """
  try:
    # Before any other JAX call (the config checks compute a little), and
    # after its own fields' checks: a bad process id or address stops every
    # process at once instead of leaving the others waiting for it.
    parallel.initialize_distributed(config.distributed, config.mesh_devices)
  except ValueError as e:
    raise study.ConfigError(str(e)) from e
  study.validate_config(config)
  combos = study.combinations(config)
  try:
    mesh = parallel.setup(config, [c.config.batch_size for c in combos])
  except ValueError as e:  # e.g. more mesh_devices than devices
    raise study.ConfigError(str(e)) from e
  workdir = _check_workdir_path(workdir)
  config_dict = config.to_dict()
  # One process writes the files; orbax's checkpointing is collective.
  writes = jax.process_index() == 0
  if not writes:
    refused = parallel.message_from_process0()  # its checks of the workdir
    if refused:
      raise workdir_lib.WorkdirError(f"process 0 stopped: {refused}")
    return _train_all(config, combos, workdir, mesh, writes, command)
  created = not workdir.exists()
  try:
    with contextlib.ExitStack() as lock:
      try:
        _claim_workdir(workdir, config_dict, lock)
      except Exception as e:
        parallel.message_from_process0(f"{type(e).__name__}: {e}")
        raise
      parallel.message_from_process0("")  # the others may start
      return _train_all(config, combos, workdir, mesh, writes, command)
  finally:
    if created and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()  # stopped before writing: leave nothing behind


def _create(workdir: Path) -> Path:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise study.ConfigError(f"--workdir {workdir} cannot be created "
                            f"({os.strerror(e.errno)}); give a directory "
                            "this user can write.") from e
  return workdir


def make_workdir(workdir: str | os.PathLike) -> Path:
  """An entry point's --workdir, created (parents too); study.ConfigError,
  one line, when it is empty, lies under a file or cannot be created."""
  return _create(_check_workdir_path(workdir))


def _claim_workdir(workdir: Path, config_dict, lock: contextlib.ExitStack):
  """Creates the workdir, takes its lock (held until `lock` closes) and
  checks that it holds no other experiment's run."""
  _create(workdir)
  lock.enter_context(workdir_lib.Lock(workdir))
  workdir_lib.check_resumable(workdir, config_dict)


def _train_all(config, combos, workdir: Path, mesh, writes: bool,
               command: str | None):
  data, origin = load_data(config)
  num_train = data.train_images.shape[0]
  study.validate_data_size(config, num_train, data.test_images.shape[0])
  data = parallel.replicate(data, mesh)
  logging.info("data: %s from %s; %d train / %d test examples",
               config.dataset, origin, num_train, data.test_images.shape[0])
  logging.info("%d combination(s) x %d run(s) x %d epoch(s) on %s",
               len(combos), len(study.run_grid(config)), config.num_epochs,
               jax.devices()[0].platform)
  if writes:  # only now: a run stopped by its data or config writes nothing
    workdir_lib.write_atomic(workdir / "config.json",
                             workdir_lib.config_json(config.to_dict()))
  writer = workdir_lib.MetricsWriter(workdir, metric_names(config)) if (
      writes) else None
  try:
    trained = [train_combination(combo, data, workdir, writer, mesh)
               for combo in combos]
  finally:
    if writer:
      writer.close()
  results = {
      "study": config.study, "dataset": config.dataset,
      "data_origin": origin, "target_accuracy": config.target_accuracy,
      "num_epochs": config.num_epochs,
      "axes": {field: list(dict.fromkeys(c.values[field] for c in combos))
               for field in study.AXES.values()},
      "combos": trained, **provenance(command)}
  if writes:
    # In the order trained (not sorted): the report's columns follow it.
    workdir_lib.write_atomic(workdir / "results.json",
                             json.dumps(results, indent=2) + "\n")
  return results
