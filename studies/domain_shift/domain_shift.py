"""Trained classifiers on shifted inputs: three ways to get BN's statistics.

No training: the runs are a finished study's checkpoints (the placement
study's by default), restored as they were saved, and evaluated on the
test set shifted by `bn_lab.data.shift_images` (brightness, contrast,
Gaussian noise, translation, at severities 1..5). Every BN layer
normalizes with one of `STATISTICS`:

  running     the moving averages kept in training (eval mode): what a
              deployed model uses, blind to the shift;
  adapted     recomputed over unlabeled shifted inputs, weights frozen
              (AdaBN, Li et al. 2016; `bn_jax.precise`, the "pooled"
              estimator: the mean and biased variance of all of them): here
              the first `adapt_examples` *training* images, shifted the
              same way (the noise from another seed), so that no evaluated
              image or label is seen;
  test_batch  each test batch of `test_batch_size` normalized with its own
              statistics, as in training (the last partial batch is left
              out).

Why adapted statistics undo some shifts exactly: brightness and contrast
(unclipped, `shift_images`' default) map every pixel by the same affine
x -> a x + b (a > 0). BN on the input sees, per pixel, a x + b; a
bias-free Dense before BN sees W(a x + b) = a h + b W1, per feature again
a * h + c. BN with statistics recomputed on the shifted data then
normalizes (a h + c - (a mu + c)) / sqrt(a^2 var + eps) = (h - mu) /
sqrt(var + eps / a^2): the clean (h - mu) / sqrt(var + eps) exactly for
brightness (a = 1), and for contrast (a < 1) only where var is large against
eps / a^2 (input BN's near-constant border pixels are not). After a ReLU the
shift is no longer affine (relu(a h + c) is not a * relu(h) + c'), and a
network without BN has nothing to adapt. Clipping to [0, 1] (`clip=True`)
saturates the brightest pixels, which breaks the affine map; noise and
translation are not of the form a x + b at all.

The results are rows, one per (combination, run, shift, severity, clip,
statistics), each with its test accuracy, in results.json in the workdir:
the study (`studies.domain_shift.STUDY`) runs through bn_lab.runner,
`validate` (the config and its source), `load_data` (the data set and the
source's runs) and `run` (the evaluations):

    python -m experiments.main --config=studies/domain_shift/config.py --workdir=workdirs/domain_shift
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_lab import config as base_config
from bn_lab import data as data_lib
from bn_jax import precise
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import train

STATISTICS = ("running", "adapted", "test_batch")
# The unshifted test set, as a row's shift (severity 0).
CLEAN = "clean"
ConfigError = sweep.ConfigError
SOURCE_COMMAND = ("python -m experiments.main "
                  "--config=studies/placements/config.py --workdir={workdir}")


# ----------------------------------------------------------------------------
# Pure pieces.


def shifted_inputs(pixels, shift: str, severity: int, *, clip: bool,
                   seed: int) -> np.ndarray:
  """(N, 784) float32 model inputs in the unit scale: the pixels shifted by
  `shift` at `severity`, or as they are for shift CLEAN."""
  if shift == CLEAN:
    return data_lib.scale_pixels(np.asarray(pixels), "unit")
  return data_lib.shift_images(pixels, shift, severity, clip=clip, seed=seed)


def adapted_statistics(model, variables, inputs, batch_size: int):
  """Every BN layer's mean and biased variance over `inputs` (N, D), in
  batches of `batch_size` (N a multiple of it), weights frozen: AdaBN's
  statistics, returned as a batch_stats tree; {} for a model without BN."""
  batches = inputs.reshape(-1, batch_size, *inputs.shape[1:])
  return precise.recompute_statistics(model, variables, batches,
                                      estimator="pooled")


def run_accuracies(state: train.TrainState, adapt_inputs, test_inputs,
                   test_labels, *, spec: train.TrainSpec,
                   adapt_batch_size: int, test_batch_size: int,
                   ) -> dict[str, jax.Array]:
  """One run's test accuracy with each of STATISTICS (float inputs)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  adapted = adapted_statistics(spec.make_model(state.bn_hparams), variables,
                               adapt_inputs, adapt_batch_size)
  evaluate = functools.partial(train.evaluate, images=test_inputs,
                               labels=test_labels)
  results = {
      "running": evaluate(state, spec=spec),
      "adapted": evaluate(state._replace(batch_stats=adapted), spec=spec),
      "test_batch": evaluate(state, spec=dataclasses.replace(
          spec, batch_size=test_batch_size), use_batch_stats=True)}
  return {k: v["correct"] / v["count"] for k, v in results.items()}


@functools.partial(jax.jit, static_argnames=("spec", "adapt_batch_size",
                                             "test_batch_size"))
def accuracies(states: train.TrainState, adapt_inputs, test_inputs,
               test_labels, *, spec: train.TrainSpec, adapt_batch_size: int,
               test_batch_size: int) -> dict[str, jax.Array]:
  """`run_accuracies` for K stacked runs of one combination: (K,) each."""
  one_run = functools.partial(run_accuracies, spec=spec,
                              adapt_batch_size=adapt_batch_size,
                              test_batch_size=test_batch_size)
  return jax.vmap(one_run, in_axes=(0, None, None, None))(
      states, adapt_inputs, test_inputs, test_labels)


def shift_cases(config) -> list[tuple[str, int, bool]]:
  """(shift, severity, clip) of every evaluated data set: clean first, then
  each shift at each severity (with config.clip), then the shifts of
  config.clipped_shifts again, clipped to [0, 1]."""
  cases = [(CLEAN, 0, False)]
  cases += [(s, v, bool(config.clip)) for s in config.shifts
            for v in config.severities]
  if not config.clip:
    cases += [(s, v, True) for s in config.clipped_shifts
              for v in config.severities]
  return cases


# ----------------------------------------------------------------------------
# Checks.


def validate_config(config) -> None:
  """Rejects bad values in one line naming the field and what it takes."""
  if not isinstance(config.source_workdir, str) or not (
      config.source_workdir.strip()):
    raise ConfigError(
        f"config.source_workdir={config.source_workdir!r} must name the "
        "workdir of a finished study, e.g. workdirs/placement_study.")
  for field in ("shifts", "clipped_shifts", "severities"):
    if not isinstance(config[field], (tuple, list)):
      raise ConfigError(f"config.{field}={config[field]!r} must be a tuple, "
                        f"e.g. --config.{field}=\"('brightness','noise')\".")
  if not config.shifts:
    raise ConfigError("config.shifts=() is empty; give at least one of "
                      f"{data_lib.SHIFT_KINDS}.")
  for field in ("shifts", "clipped_shifts"):
    for shift in config[field]:
      try:
        data_lib.shift_images(np.zeros((1, 784), np.uint8), shift, 1)
      except ValueError as e:
        raise ConfigError(f"config.{field} has {shift!r}: {e}") from None
    if len(set(config[field])) < len(config[field]):
      raise ConfigError(f"config.{field}={tuple(config[field])!r} repeats a "
                        "shift.")
  extra = set(config.clipped_shifts) - set(config.shifts)
  if extra:
    raise ConfigError(f"config.clipped_shifts has {sorted(extra)}, not in "
                      f"config.shifts={tuple(config.shifts)!r}.")
  if not config.severities or any(
      not sweep.is_int(v) or v not in data_lib.SHIFT_SEVERITIES
      for v in config.severities) or len(set(config.severities)) < len(
          config.severities):
    raise ConfigError(f"config.severities={tuple(config.severities)!r} must "
                      "hold distinct severities from "
                      f"{data_lib.SHIFT_SEVERITIES}.")
  if not isinstance(config.clip, bool):
    raise ConfigError(f"config.clip={config.clip!r} must be True or False.")
  for field in ("adapt_examples", "adapt_batch_size", "test_batch_size"):
    if not (sweep.is_int(config[field]) and config[field] > 0):
      raise ConfigError(f"config.{field}={config[field]!r} must be a "
                        "positive integer.")
  if config.adapt_examples % config.adapt_batch_size:
    raise ConfigError(
        f"config.adapt_examples={config.adapt_examples} is not a multiple "
        f"of config.adapt_batch_size={config.adapt_batch_size}; the "
        "statistics are pooled over whole batches.")
  for field in ("adapt_noise_seed", "test_noise_seed"):
    if not (sweep.is_int(config[field]) and 0 <= config[field] < 2**32):
      raise ConfigError(f"config.{field}={config[field]!r} must be an "
                        "integer in [0, 2**32).")
  if config.adapt_noise_seed == config.test_noise_seed:
    raise ConfigError(
        f"config.adapt_noise_seed={config.adapt_noise_seed} equals "
        "config.test_noise_seed: training image i and test image i would "
        "get the same noise draw; choose another seed.")
  tolerance = config.exact_tolerance
  if isinstance(tolerance, bool) or not isinstance(
      tolerance, (int, float)) or not 0 <= tolerance < 1:
    raise ConfigError(f"config.exact_tolerance={tolerance!r} must be a "
                      "number in [0, 1) (a fraction of the test set).")


# ----------------------------------------------------------------------------
# The source study.


class SourceCombination(NamedTuple):
  combo: sweep.Combination
  spec: train.TrainSpec
  runs: list[dict[str, Any]]  # seed and hparams of each stacked run
  states: train.TrainState  # K stacked runs, as saved after the last epoch
  epoch: int


def source_config(source: Path, defaults: ml_collections.ConfigDict):
  """The source study's config: `defaults` (the current base config) with
  the source's config.json over it, so that fields added since it ran keep
  the values it ran with (bn_lab.workdir.ADDED_FIELDS' defaults)."""
  command = SOURCE_COMMAND.format(workdir=source)
  if not (source / "results.json").is_file():
    raise ConfigError(
        f"config.source_workdir={str(source)!r} holds no finished study (no "
        f"results.json); make it with: {command}")
  try:
    saved = json.loads((source / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.source_workdir={str(source)!r}: its "
                      f"config.json cannot be read ({e}); make the study "
                      f"again with: {command}") from None
  config = defaults.copy_and_resolve_references()
  with config.unlocked():
    config.update(saved)
  if config.input_scaling != "unit":
    raise ConfigError(
        f"config.source_workdir={str(source)!r} trained on "
        f"input_scaling={config.input_scaling!r} inputs; the shifts are "
        "defined on unit-scale pixels ([0, 1]): use a study trained with "
        "input_scaling='unit'.")
  if config.model not in ("mlp", "cnn"):
    raise ConfigError(f"config.source_workdir={str(source)!r} holds "
                      f"model={config.model!r} runs; the shifts are for the "
                      "image classifiers (mlp, cnn).")
  return config


def _newest_step(directory: Path) -> int | None:
  """The newest orbax step directory that finished writing (orbax writes
  commit_success.txt last), or None."""
  steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()
           and (p / "commit_success.txt").exists()]
  return max(steps) if steps else None


def restore_source(source: Path, config, num_train: int,
                   ) -> list[SourceCombination]:
  """Every combination's stacked runs from the checkpoint of its last
  epoch, read only: the source workdir is never written (no orbax manager,
  which would create, clean up or move aside files there).

  Only what evaluation reads is restored (step, params, batch_stats,
  bn_hparams, data_key; opt_state is None), from the saved tree itself, so
  a checkpoint written before TrainState gained a field still loads; the
  parameters' structure and shapes are checked against the source's
  config.
  """
  import orbax.checkpoint as ocp  # slow import
  restored = []
  for combo in sweep.combinations(config):
    directory = source / "checkpoints" / combo.name
    step = _newest_step(directory) if directory.is_dir() else None
    if step != combo.config.num_epochs:
      raise ConfigError(
          f"config.source_workdir={str(source)!r}: {combo.name} has no "
          f"checkpoint of its last epoch ({combo.config.num_epochs}) in "
          f"{directory}; finish the study with: "
          + SOURCE_COMMAND.format(workdir=source))
    runs = sweep.run_grid(combo.config)
    spec = sweep.make_spec(combo.config, num_train)
    hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE
               if runs[0]["hparams"][n] is not None}
    expected = jax.eval_shape(functools.partial(
        train.create_sweep_states, spec, [r["seed"] for r in runs],
        hparams))
    saved = ocp.StandardCheckpointer().restore(
        (directory / str(step) / "default").absolute())
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    for field in ("params", "batch_stats"):
      if shapes(saved[field]) != shapes(getattr(expected, field)):
        raise ConfigError(
            f"config.source_workdir={str(source)!r}: the {field} saved for "
            f"{combo.name} do not match its config.json's model; the "
            "checkpoints are of another study (make it again with: "
            + SOURCE_COMMAND.format(workdir=source) + ").")
    states = train.TrainState(
        step=saved["step"], params=saved["params"],
        batch_stats=saved["batch_stats"], opt_state=None,
        bn_hparams=saved["bn_hparams"], data_key=saved["data_key"])
    restored.append(SourceCombination(combo, spec, runs, states, step))
  return restored


# ----------------------------------------------------------------------------
# The study.


class ShiftData(NamedTuple):
  """What `load_data` gives `run`: the source study's config and runs, the
  images (uint8 (N, 784)) and the test labels."""
  source_config: ml_collections.ConfigDict
  sources: list[SourceCombination]
  train_pixels: np.ndarray
  test_pixels: np.ndarray
  test_labels: np.ndarray


def _source_config(config) -> ml_collections.ConfigDict:
  """`source_config` of config.source_workdir under the current base
  config (lab/bn_lab/config.py)."""
  return source_config(Path(config.source_workdir), base_config.get_config())


def validate(config) -> None:
  """The study's `validate`: the config's values (its source, a finished
  study, is checked by `load_data`, before anything is written; a workdir
  the runner created for it is removed again). Raises ConfigError in one
  line."""
  validate_config(config)


def load_data(config) -> tuple[ShiftData, str]:
  """The study's `load_data`: the source study's data set (as it trained
  on it), checked against the config's sizes, and its runs restored from
  their last checkpoints (read only). Raises ConfigError (a missing or
  unfinished source) and data.DataError."""
  source = Path(config.source_workdir)
  train_config = _source_config(config)
  dataset = data_lib.load_dataset(
      train_config.dataset, data_dir=train_config.data_dir or None,
      source=train_config.data_source)
  train_pixels = data_lib.flatten_pixels(dataset.train_images)
  test_pixels = data_lib.flatten_pixels(dataset.test_images)
  if config.adapt_examples > len(train_pixels):
    raise ConfigError(
        f"config.adapt_examples={config.adapt_examples} is more than the "
        f"{len(train_pixels)} training images.")
  if config.test_batch_size > len(test_pixels):
    raise ConfigError(
        f"config.test_batch_size={config.test_batch_size} is more than "
        f"the {len(test_pixels)} test images.")
  sources = restore_source(source, train_config, len(train_pixels))
  logging.info("data: %s from %s; %d train / %d test images; %d "
               "combination(s) restored from %s", train_config.dataset,
               dataset.origin, len(train_pixels), len(test_pixels),
               len(sources), source)
  return ShiftData(train_config, sources, train_pixels, test_pixels,
                   np.asarray(dataset.test_labels)), dataset.origin


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`: evaluates every run of `config.source_workdir` on
  every shifted test set with each of STATISTICS (bn_lab.runner.run has
  checked the config and the workdir, holds its lock, restored the runs
  and written config.json; it writes results.json, with the provenance,
  from what this returns). Returns results.json's study part: the rows,
  one per (combination, run, shift, severity, clip, statistics)."""
  # One process: the study neither shards nor splits its writes.
  assert context.writes, "the domain-shift study runs in one process"
  config, data = context.config, context.data
  started = time.perf_counter()
  source = Path(config.source_workdir)
  sources = data.sources
  cases = shift_cases(config)
  logging.info("%d combination(s) from %s x %d data set(s) x %d "
               "statistics", len(sources), source, len(cases),
               len(STATISTICS))
  rows = []
  labels = jnp.asarray(data.test_labels, jnp.int32)
  for i, (shift, severity, clip) in enumerate(cases, 1):
    adapt = jnp.asarray(shifted_inputs(
        data.train_pixels[:config.adapt_examples], shift, severity,
        clip=clip, seed=config.adapt_noise_seed))
    test = jnp.asarray(shifted_inputs(data.test_pixels, shift, severity,
                                      clip=clip,
                                      seed=config.test_noise_seed))
    means = {s: [] for s in STATISTICS}
    for src in sources:
      result = jax.device_get(accuracies(
          src.states, adapt, test, labels, spec=src.spec,
          adapt_batch_size=config.adapt_batch_size,
          test_batch_size=config.test_batch_size))
      for statistics in STATISTICS:
        means[statistics].append(np.mean(result[statistics]))
      rows += [{**src.combo.values, "combo": src.combo.name, "run": k,
                "seed": run["seed"], "shift": shift, "severity": severity,
                "clip": clip, "statistics": statistics,
                "test_accuracy": float(result[statistics][k])}
               for k, run in enumerate(src.runs)
               for statistics in STATISTICS]
    logging.info(
        "[%d/%d] %s%s%s: accuracy running %.4f, adapted %.4f, test batch "
        "%.4f (mean over combinations); %.0f s", i, len(cases), shift,
        f" severity {severity}" if severity else "",
        " clipped" if clip else "",
        *(np.mean(means[s]) for s in STATISTICS),
        time.perf_counter() - started)
  return {
      "study": config.study,
      "domain_shift": {
          "source_workdir": str(source),
          "source_command": (json.loads((source / "results.json")
                                        .read_text()).get("command")),
          "source_config": data.source_config.to_dict(),
          "source_epochs": sources[0].epoch,
          "statistics": list(STATISTICS),
          "adapt_examples": config.adapt_examples,
          "adapt_batch_size": config.adapt_batch_size,
          "test_batch_size": config.test_batch_size,
          "test_examples": len(data.test_pixels),
          "exact_tolerance": config.exact_tolerance,
          "shift_parameters": {k: list(v) for k, v in
                               data_lib.SHIFT_PARAMETERS.items()},
          "rows": rows},
      "dataset": data.source_config.dataset,
      "wall_time": time.perf_counter() - started}
