"""Config-driven experiments: BN placements x runs, with outputs in a workdir.

`run_experiment(config, workdir)` is the one entry point; `experiments/main.py`
only parses flags and calls it. For each placement, all runs (seeds x swept
hyperparameters) train together as one vmapped program. Written to workdir:

  config.json          the resolved config
  metrics.jsonl        one line per placement, run and epoch
  results.json         final metrics per run and the per-placement summary
  summary.md           the summary table (also printed)
  learning_curves.png  placements compared (mean over runs, std band)
  curves_<placement>.png   every run of one placement
  checkpoints/<placement>/ orbax checkpoints; rerunning resumes from them
                     (one that does not load is moved to
                     checkpoints/<placement>.corrupt/, the one before used)

Every file is written to a temporary name and renamed, so none is ever
half-written. With `config.nan_guard` (the default), a NaN or inf loss,
parameter or BN statistic stops the run with `NonFiniteError` before that
epoch is saved.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict
import numpy as np

from bn_jax import core
from bn_jax import data as data_lib
from bn_jax import models
from bn_jax import parallel
from bn_jax import train


def default_config() -> ml_collections.ConfigDict:
  """Every field an experiment reads, with the reference Keras model's values.

  Config files in configs/ start from this and change what they study.
  """
  c = ml_collections.ConfigDict()
  c.dataset = "mnist"  # mnist | fashion_mnist | kmnist
  c.data_dir = ""  # directory with the four IDX files; "" = $BN_JAX_DATA_DIR,
  # then the cache, then a download (see bn_jax.data.load_dataset)
  c.data_source = "auto"  # auto | idx | download | tfds
  c.input_scaling = "unit"  # unit ([0, 1]) | standardize (MNIST mean/std)

  c.model = "mlp"  # mlp | cnn
  c.placements = ("after_activation",)
  c.activation = "relu"
  c.widths = (50,)
  c.channels = (32, 64)  # cnn only

  c.bn = ml_collections.ConfigDict()
  c.bn.momentum = 0.99  # flax convention; PyTorch momentum = 1 - this
  c.bn.epsilon = 1e-3  # Keras' default, as in the reference model
  c.bn.unbiased_running_var = False
  c.bn.stats_method = "shifted"
  c.bn.analytic_grad = True

  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.schedule = "constant"
  c.warmup_steps = 0
  c.weight_decay = 0.0
  c.batch_size = 128
  c.num_epochs = 10

  c.seeds = (0, 1, 2)
  # None: each run's data order follows its seed. An int: every run sees the
  # batches (and order) that seed gives, so runs differ only in the init
  # seed and swept values; the sweep also trains faster (each batch gathered
  # once, the runs' first-layer matmuls fused into one).
  c.data_seed = config_dict.placeholder(int)
  # Numeric sweeps: a tuple of values per field multiplies the runs; () keeps
  # the single value above. All runs of a placement train as one program.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.learning_rate = ()
  c.sweep.bn_momentum = ()
  c.sweep.bn_epsilon = ()

  c.target_accuracy = 0.97  # "epochs to reach" column of the summary
  c.heartbeat_seconds = 30.0  # progress line while a long epoch runs
  c.keep_checkpoints = 2
  # Stop at the first NaN/inf loss, parameter or BN statistic (flags computed
  # on device, read once per epoch); False skips the flags for speed.
  c.nan_guard = True

  # Data parallelism (bn_jax.parallel): each step's global batch of
  # batch_size examples is split over mesh_devices devices.
  c.mesh_devices = config_dict.FieldReference(1, field_type=object)
  # ^ 1 (single-device code path) | N | "auto" (every device)
  c.bn_stats = "sync"  # sync: global-batch BN statistics | per_device:
  # ghost batches of batch_size / devices (running stats: mean over devices)
  c.distributed = ml_collections.ConfigDict()  # several hosts; see parallel
  c.distributed.coordinator_address = ""  # "host:port" of process 0; ""
  # keeps one process (no jax.distributed.initialize)
  c.distributed.num_processes = config_dict.placeholder(int)  # None: detect
  c.distributed.process_id = config_dict.placeholder(int)  # (Slurm, MPI)
  return c


# ----------------------------------------------------------------------------
# Runs and specs.


def run_grid(config) -> list[dict[str, Any]]:
  """Seeds x swept values: one dict (seed + hparams) per run."""
  base = {"learning_rate": config.learning_rate,
          "bn_momentum": config.bn.momentum, "bn_epsilon": config.bn.epsilon}
  axes = {name: tuple(config.sweep[name]) or (base[name],)
          for name in train.SWEEPABLE}
  runs = []
  for seed, *values in itertools.product(tuple(config.seeds),
                                         *axes.values()):
    runs.append({"seed": int(seed),
                 "hparams": {n: float(v) for n, v in zip(axes, values)}})
  return runs


def make_spec(config, placement: str, num_train: int) -> train.TrainSpec:
  return train.TrainSpec(
      model=config.model, placement=placement, activation=config.activation,
      widths=tuple(config.widths), channels=tuple(config.channels),
      optimizer=config.optimizer, schedule=config.schedule,
      warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
      batch_size=config.batch_size,
      steps_per_epoch=num_train // config.batch_size,
      num_epochs=config.num_epochs,
      unbiased_running_var=config.bn.unbiased_running_var,
      stats_method=config.bn.stats_method,
      analytic_grad=config.bn.analytic_grad,
      nan_guard=config.nan_guard, data_seed=config.data_seed,
      input_scaling=config.input_scaling)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def validate_config(config) -> None:
  """Rejects bad values before anything is loaded or compiled."""
  def choice(field, value, valid):
    if value not in valid:
      raise ConfigError(f"config.{field}={value!r} is not valid; choose one "
                        f"of {tuple(valid)}.")
  choice("model", config.model, models.MODELS)
  choice("activation", config.activation, tuple(models.ACTIVATIONS))
  choice("optimizer", config.optimizer, train.OPTIMIZERS)
  choice("schedule", config.schedule, train.SCHEDULES)
  choice("data_source", config.data_source, data_lib.SOURCES)
  choice("input_scaling", config.input_scaling, data_lib.SCALINGS)
  choice("bn.stats_method", config.bn.stats_method, core.STATS_METHODS)
  for field in ("bn.unbiased_running_var", "bn.analytic_grad", "nan_guard"):
    section, _, name = field.rpartition(".")
    value = (config[section] if section else config)[name]
    if not isinstance(value, bool):
      raise ConfigError(f"config.{field}={value!r} must be True or False.")
  if not config.heartbeat_seconds >= 0:
    raise ConfigError(f"config.heartbeat_seconds={config.heartbeat_seconds!r}"
                      " must be >= 0 (0 turns the progress line off).")
  if not 0 < config.target_accuracy <= 1:
    raise ConfigError(f"config.target_accuracy={config.target_accuracy!r} "
                      "must be in (0, 1].")
  if not config.placements:
    raise ConfigError("config.placements is empty; give at least one of "
                       f"{models.PLACEMENTS}.")
  for placement in config.placements:
    choice("placements", placement, models.PLACEMENTS)
  def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)
  for field in ("batch_size", "num_epochs", "keep_checkpoints"):
    if not is_int(config[field]) or config[field] <= 0:
      raise ConfigError(f"config.{field}={config[field]!r} must be a "
                         "positive integer.")
  if not is_int(config.warmup_steps) or config.warmup_steps < 0:
    raise ConfigError(f"config.warmup_steps={config.warmup_steps!r} must be "
                       "an integer >= 0.")
  for field in ("widths", "channels"):
    if not all(is_int(n) and n > 0 for n in config[field]):
      raise ConfigError(f"config.{field}={tuple(config[field])!r} must hold "
                         "positive integers (layer sizes).")
  if not config.weight_decay >= 0:
    raise ConfigError(f"config.weight_decay={config.weight_decay!r} must be "
                       ">= 0.")
  try:
    parallel.check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if not config.seeds:
    raise ConfigError("config.seeds is empty; give at least one seed.")
  if config.data_seed is not None and not (is_int(config.data_seed)
                                           and 0 <= config.data_seed < 2**31):
    raise ConfigError(f"config.data_seed={config.data_seed!r} must be None "
                      "(each run's order follows its seed) or an integer in "
                      "[0, 2**31).")
  for run in run_grid(config):
    momentum, epsilon = (run["hparams"]["bn_momentum"],
                         run["hparams"]["bn_epsilon"])
    if not 0.0 <= momentum <= 1.0:
      raise ConfigError(f"BN momentum {momentum} (config.bn.momentum or "
                         "config.sweep.bn_momentum) is outside [0, 1].")
    if not epsilon > 0:
      raise ConfigError(f"BN epsilon {epsilon} (config.bn.epsilon or "
                         "config.sweep.bn_epsilon) must be > 0.")
    if not run["hparams"]["learning_rate"] > 0:
      raise ConfigError("learning rate "
                         f"{run['hparams']['learning_rate']} (config."
                         "learning_rate or config.sweep.learning_rate) must "
                         "be > 0.")


def validate_data_size(config, num_train: int, num_test: int) -> None:
  """Rejects a batch larger than the data (known once the data are loaded,
  still before anything is compiled)."""
  if config.batch_size > num_train:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than "
                       f"the training set ({num_train} examples).")
  if config.batch_size > num_test:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is larger than the test set "
        f"({num_test} examples); the batch-statistics evaluation needs at "
        "least one full batch.")


# ----------------------------------------------------------------------------
# Files: atomic writes, checkpoints.


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w"):
  """Yields a temporary file beside `path`; once written and synced to disk
  it is renamed to `path`, so `path` is never half-written."""
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, mode) as f:
    yield f
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
  with atomic_file(path) as f:
    f.write(text)


def _checkpoint_manager(directory: Path, keep: int):
  import orbax.checkpoint as ocp  # slow import; only runs need it
  return ocp.CheckpointManager(
      directory.absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=False,
          # Removes what a killed save left behind (orbax writes each step
          # to a temporary directory and renames it when complete).
          cleanup_tmp_directories=True))


def _save(manager, epoch: int, states, history) -> None:
  import orbax.checkpoint as ocp
  manager.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(states),
      history=ocp.args.JsonSave({"rows": history})))
  manager.wait_until_finished()


def _move_aside(path: Path) -> Path:
  """Renames a step directory to `<manager dir>.corrupt/<step>[-n]`, outside
  the manager's directory, where a later save of the step cannot meet it."""
  corrupt = path.parent.with_name(f"{path.parent.name}.corrupt")
  corrupt.mkdir(parents=True, exist_ok=True)
  dest, n = corrupt / path.name, 0
  while dest.exists():
    n += 1
    dest = corrupt / f"{path.name}-{n}"
  os.replace(path, dest)
  return dest


def _restore(manager, abstract_states, num_runs: int):
  """(epoch, states, history) of the newest checkpoint that loads, or None.

  A checkpoint that does not load (a truncated or garbled file; orbax and
  TensorStore raise many kinds of errors) or whose history does not match
  its epoch is reported, moved aside (`_move_aside`), and the next older one
  is tried.
  """
  import orbax.checkpoint as ocp
  for epoch in sorted(manager.all_steps(), reverse=True):
    path = Path(manager.directory) / str(epoch)
    try:
      restored = manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_states),
          history=ocp.args.JsonRestore()))
      history = restored.history["rows"]
      if len(history) != epoch * num_runs or history[-1]["epoch"] != epoch:
        raise ValueError(f"its history has {len(history)} rows, expected "
                         f"{epoch * num_runs} ending at epoch {epoch}")
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).strip().splitlines() or [""])[0][:300]
      aside = _move_aside(path)
      print(f"WARNING: checkpoint {path} is corrupt or incomplete and was "
            f"not used ({type(e).__name__}: {reason}). Moved it to {aside}; "
            "trying the previous checkpoint.", file=sys.stderr, flush=True)
      manager.reload()
      continue
    return epoch, restored.state, history
  return None


# ----------------------------------------------------------------------------
# Training one placement.


class _Heartbeat:
  """Prints a line every `seconds` while a long epoch (or compile) runs."""

  def __init__(self, seconds: float, label: str):
    self._seconds, self._label = seconds, label
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._start = time.perf_counter()

  def _run(self):
    while not self._stop.wait(self._seconds):
      print(f"  ... {self._label}: still running "
            f"({time.perf_counter() - self._start:.0f} s)", flush=True)

  def __enter__(self):
    if self._seconds > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()


class NonFiniteError(FloatingPointError):
  """A run's loss, parameters or BN statistics became NaN or inf (the NaN
  guard, `config.nan_guard`); nothing of that epoch was saved."""


def _nonfinite_error(placement: str, runs: list[dict], epoch: int,
                     spec: train.TrainSpec, first_step, flags,
                     checkpoint_dir: Path) -> NonFiniteError | None:
  """The NaN guard's error for an epoch's per-run flags, or None if all runs
  stayed finite. `first_step[i]` is run i's first bad global step or -1."""
  bad = [i for i, step in enumerate(first_step) if step >= 0]
  if not bad:
    return None
  lines = []
  for i in bad:
    step = int(first_step[i])
    hparams = ", ".join(f"{k}={v:g}" for k, v in runs[i]["hparams"].items())
    lines.append(
        f"  run {i} (seed {runs[i]['seed']}, {hparams}): non-finite "
        f"{train.describe_nonfinite(flags[i])} at global step {step} (step "
        f"{step - (epoch - 1) * spec.steps_per_epoch} of "
        f"{spec.steps_per_epoch} in epoch {epoch})")
  kept = (f"the last good checkpoint (epoch {epoch - 1}) is in "
          f"{checkpoint_dir} and metrics.jsonl holds the epochs before"
          if epoch > 1 else "nothing of this placement was written")
  return NonFiniteError(
      f"[{placement}] NaN guard: training diverged in epoch {epoch}:\n"
      + "\n".join(lines) + "\n"
      "(A non-finite loss can come from the update of the step before: the "
      "guard checks losses and BN statistics every step, parameters after "
      "the epoch's last step.) "
      f"Nothing of epoch {epoch} was saved; {kept}. To fix: lower the "
      "learning rate (config.learning_rate / config.sweep.learning_rate), "
      "raise BN epsilon (config.bn.epsilon), or check the input data for "
      "NaN/inf, and rerun in a new --workdir. To train on regardless (no "
      "checks, a little faster), set --config.nan_guard=False.")


def train_placement(config, placement: str, data: train.DeviceData,
                    runs: list[dict], workdir: Path,
                    on_epoch=None, mesh=None) -> dict[str, Any]:
  """Trains all runs of one placement, resuming from its checkpoints.

  With a `mesh` (from `parallel.setup`), each epoch is data-parallel over it.

  Returns {"history": rows, "wall_time": s, "compile_time": s}.
  """
  spec = make_spec(config, placement, data.train_images.shape[0])
  sweep_epoch = parallel.sweep_epoch_fn(spec, mesh, config.bn_stats)
  seeds = [r["seed"] for r in runs]
  hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE}
  create = functools.partial(train.create_sweep_states, spec, seeds, hparams)
  manager = _checkpoint_manager(workdir / "checkpoints" / placement,
                                config.keep_checkpoints)
  # Fresh and restored states alike are committed to one device, so that a
  # resumed run executes the very program an uninterrupted one does. Shapes
  # only here: a resumed run does not compile the initialization.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = _restore(manager, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(create)), len(runs))
  history, start_epoch, wall = [], 0, 0.0
  if restored is None:
    states = jax.device_put(create(), device)
  else:
    start_epoch, states, history = restored
    wall = history[-1]["wall_time"] if history else 0.0
    print(f"[{placement}] resumed from checkpoint at epoch {start_epoch}",
          flush=True)
  compile_time = None
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    started = time.perf_counter()
    with _Heartbeat(config.heartbeat_seconds, f"{placement} epoch {epoch}"):
      states, metrics = sweep_epoch(states, data)
      metrics = jax.device_get(metrics)  # the one host sync per epoch
    if spec.nan_guard:  # checked before anything of the epoch is saved
      error = _nonfinite_error(placement, runs, epoch, spec,
                               metrics.pop("first_nonfinite_step"),
                               metrics.pop("nonfinite"), manager.directory)
      if error is not None:
        manager.close()
        raise error
    seconds = time.perf_counter() - started
    if compile_time is None and start_epoch == 0 and epoch == 1:
      compile_time = seconds  # first epoch: compile + one epoch
    wall += seconds
    for i, run in enumerate(runs):
      history.append({
          "placement": placement, "run": i, "seed": run["seed"],
          **run["hparams"], "epoch": epoch, "wall_time": wall,
          **{k: float(v[i]) for k, v in metrics.items()}})
    _save(manager, epoch, states, history)
    accuracy = np.asarray(metrics["test_accuracy"])
    print(f"[{placement}] epoch {epoch}/{config.num_epochs}  "
          f"train loss {np.mean(metrics['train_loss']):.4f}  "
          f"test acc {accuracy.mean():.4f} +- {accuracy.std():.4f} "
          f"(batch-stats {np.mean(metrics['test_accuracy_batch_stats']):.4f})"
          f"  {seconds:.1f} s", flush=True)
    if on_epoch is not None:
      on_epoch(history)
  manager.close()
  return {"history": history, "wall_time": wall, "compile_time": compile_time}


# ----------------------------------------------------------------------------
# Summary, plots.


def summarize(placement: str, result: dict, num_runs: int,
              target: float) -> dict[str, Any]:
  rows = result["history"]
  last_epoch = max(r["epoch"] for r in rows)
  final = [r for r in rows if r["epoch"] == last_epoch]
  acc = np.array([r["test_accuracy"] for r in final])
  acc_bs = np.array([r["test_accuracy_batch_stats"] for r in final])
  reached = []
  for run in range(num_runs):
    epochs = [r["epoch"] for r in rows
              if r["run"] == run and r["test_accuracy"] >= target]
    reached.append(min(epochs) if epochs else None)
  hit = [e for e in reached if e is not None]
  return {
      "placement": placement, "runs": num_runs, "epochs": last_epoch,
      "test_accuracy_mean": float(acc.mean()),
      "test_accuracy_std": float(acc.std()),
      "test_accuracy_batch_stats_mean": float(acc_bs.mean()),
      "train_loss_mean": float(np.mean([r["train_loss"] for r in final])),
      "epochs_to_target_mean": float(np.mean(hit)) if hit else None,
      "runs_reaching_target": len(hit),
      "wall_time": result["wall_time"],
      "compile_time": result["compile_time"],
  }


def summary_markdown(summaries: list[dict], target: float) -> str:
  lines = [
      "| placement | runs | test acc (eval mode) | test acc (batch stats) | "
      f"train loss | epochs to {target:.0%} | wall time (s) |",
      "|---|---|---|---|---|---|---|"]
  for s in summaries:
    to_target = ("not reached" if s["epochs_to_target_mean"] is None else
                 f"{s['epochs_to_target_mean']:.1f} "
                 f"({s['runs_reaching_target']}/{s['runs']} runs)")
    lines.append(
        f"| {s['placement']} | {s['runs']} | "
        f"{100 * s['test_accuracy_mean']:.2f} +- "
        f"{100 * s['test_accuracy_std']:.2f} | "
        f"{100 * s['test_accuracy_batch_stats_mean']:.2f} | "
        f"{s['train_loss_mean']:.4f} | {to_target} | {s['wall_time']:.1f} |")
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib  # slow import; only plots need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save_figure(fig, path: Path) -> None:
  with atomic_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  _pyplot().close(fig)


def plot_comparison(history: list[dict], path: Path) -> None:
  """Train loss and test accuracy per epoch, mean over runs, std band."""
  plt = _pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for placement in dict.fromkeys(r["placement"] for r in history):
    rows = [r for r in history if r["placement"] == placement]
    epochs = sorted({r["epoch"] for r in rows})
    for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
      values = np.array([[r[key] for r in rows if r["epoch"] == e]
                         for e in epochs])
      mean, std = values.mean(1), values.std(1)
      line, = ax.plot(epochs, mean, marker="o", ms=3, label=placement)
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                      color=line.get_color())
  ax_loss.set(xlabel="epoch", ylabel="train loss (training mode)",
              yscale="log", title="Training loss")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (eval mode)",
             title="Test accuracy")
  ax_acc.legend(title="BN placement")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  _save_figure(fig, path)


def plot_runs(history: list[dict], placement: str, path: Path) -> None:
  """Every run of one placement: test accuracy, eval mode vs batch stats."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  rows = [r for r in history if r["placement"] == placement]
  for run in sorted({r["run"] for r in rows}):
    mine = [r for r in rows if r["run"] == run]
    line, = ax.plot([r["epoch"] for r in mine],
                    [r["test_accuracy"] for r in mine],
                    label=f"run {run} (seed {mine[0]['seed']})")
    ax.plot([r["epoch"] for r in mine],
            [r["test_accuracy_batch_stats"] for r in mine], ls="--",
            color=line.get_color())
  ax.set(xlabel="epoch", ylabel="test accuracy",
         title=f"{placement}: eval mode (solid) vs batch stats (dashed)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save_figure(fig, path)


# ----------------------------------------------------------------------------
# The entry point.


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


def _check_workdir(workdir: Path, config_json: str) -> None:
  for path in (workdir, *workdir.parents):
    if path.exists() and not path.is_dir():
      raise ConfigError(f"--workdir {workdir}: {path} is a file; give a "
                         "directory.")
  saved = workdir / "config.json"
  if saved.exists() and saved.read_text() != config_json:
    raise ConfigError(
        f"{workdir} holds a run with a different config ({saved}). Resuming "
        "needs the same config; use a new --workdir for a new experiment.")


def run_experiment(config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains every placement, writes all outputs, returns the results."""
  validate_config(config)
  try:
    mesh = parallel.setup(config)  # first JAX call (jax.distributed needs it)
  except ValueError as e:  # e.g. more mesh_devices than devices
    raise ConfigError(str(e)) from e
  workdir = Path(workdir)
  config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True,
                           default=list) + "\n"
  _check_workdir(workdir, config_json)

  data, origin = load_data(config)
  num_train = data.train_images.shape[0]
  validate_data_size(config, num_train, data.test_images.shape[0])
  data = parallel.replicate(data, mesh)
  # Only now: a run stopped by its data or config leaves no config.json to
  # block the corrected command.
  workdir.mkdir(parents=True, exist_ok=True)
  write_atomic(workdir / "config.json", config_json)
  runs = run_grid(config)
  print(f"data: {config.dataset} from {origin}; {num_train} train / "
        f"{data.test_images.shape[0]} test examples", flush=True)
  print(f"{len(config.placements)} placement(s) x {len(runs)} run(s) x "
        f"{config.num_epochs} epoch(s) on {jax.devices()[0].platform}",
        flush=True)

  history: list[dict] = []
  summaries = []

  def write_metrics(current: list[dict]) -> None:
    lines = [json.dumps(r) for r in history + current]
    write_atomic(workdir / "metrics.jsonl", "\n".join(lines) + "\n")

  for placement in config.placements:
    result = train_placement(config, placement, data, runs, workdir,
                             on_epoch=write_metrics, mesh=mesh)
    history += result["history"]
    write_metrics([])
    summaries.append(summarize(placement, result, len(runs),
                               config.target_accuracy))
    plot_runs(history, placement, workdir / f"curves_{placement}.png")

  table = summary_markdown(summaries, config.target_accuracy)
  print("\n" + table, flush=True)
  write_atomic(workdir / "summary.md",
               f"# {config.dataset}: BN placements\n\nData: {origin}\n\n"
               + table)
  plot_comparison(history, workdir / "learning_curves.png")
  results = {"data_origin": origin, "runs": runs, "summary": summaries,
             "final": [r for r in history
                       if r["epoch"] == config.num_epochs]}
  write_atomic(workdir / "results.json", json.dumps(results, indent=2) + "\n")
  return results
