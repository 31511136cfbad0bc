"""A real domain shift: nets trained on printed digits, tested on MNIST, and
the reverse; BN adapted to the target four ways, GN and LN as references.

Printed digits (bn_lab.synthetic: 28x28 renders of 0-9 from Debian fonts)
and MNIST (handwriting) share the image format and the labels but not the
strokes: a synthetic-to-real shift like SynDigits -> SVHN, not an affine
map that BN undoes by algebra (studies.domain_shift). For each direction
(`DIRECTIONS`) the run trains the residual CNN (bn_lab.resnet) on the
source with each norm of config.norms, all seeds vmapped, through the
lab's trainer (`bn_lab.classifier.train_combination`: checkpoints and
metrics in the workdir's source/<source>/, so that a rerun resumes), then
evaluates every net on a fixed random subset of the target test set
(`eval_indices`), the BN nets with each of `METHODS`:

  source      eval mode: the running statistics of the source (what a
              deployed net uses);
  adabn       the statistics recomputed over unlabeled target *training*
              images, weights frozen (AdaBN, Li et al. 2016;
              studies.domain_shift.domain_shift.adapted_statistics, the
              pooled mean and biased variance): never an evaluated image;
  test_batch  each target batch of B normalized with its own statistics
              (training-mode BN, bn_lab.train.evaluate), at every B of
              config.adapt.batch_sizes;
  tent        TENT (Wang et al. 2021; bn_lab.adapt.tent): on each target
              batch of B, in training mode, predict, then one Adam step on
              the mean entropy of those predictions over BN's scale and bias
              only; online (config.adapt.episodic False: the adaptation
              carries over from batch to batch, one pass over the stream),
              the accuracy that of the predictions made as the stream is
              adapted, every image counted.

A control: the BN nets' statistics recomputed the same way over the first
source training images (`SOURCE_PRECISE`, on the target, and
`IN_DOMAIN_PRECISE`, on the source test set): the moving averages lag
behind the weights after a short training, and AdaBN's gain over them
would otherwise mix that lag with the domain.

GN and LN nets normalize each example on its own: nothing about them
depends on the target batch, so they are evaluated as they are (method
"source"). Every net is also evaluated on all of its own source test set
(method "in_domain"): the in-domain accuracy, and for the reverse direction
the ceiling (a net trained on the target domain).

Why the batch size matters: test-batch statistics and TENT estimate each
BN feature's mean and variance from the B images of a batch (B x H x W
values per feature); at B = 1 that is one image's spatial statistics, an
instance norm the net never trained with. TENT's step size is scaled with
B (`tent_learning_rate`), so that one pass moves the parameters about as
far at every B.

Results: rows (direction, norm, seed, method, batch_size, accuracy) in
results.json, read by studies.real_shift.page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bn_lab import adapt
from bn_lab import checkpoints
from bn_lab import classifier
from bn_lab import config as base_config
from bn_lab import data as data_lib
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from studies.domain_shift import domain_shift

# direction -> (source data set, target data set)
DIRECTIONS = {
    "printed_digits_to_mnist": ("printed_digits", "mnist"),
    "mnist_to_printed_digits": ("mnist", "printed_digits"),
}
NORMS = ("batch", "group", "layer")
METHODS = ("source", "adabn", "test_batch", "tent")
BATCHED = ("test_batch", "tent")  # methods that depend on the batch size
IN_DOMAIN = "in_domain"
# BN's statistics recomputed over source training images (PreciseBN, Wu &
# Johnson 2021), weights frozen: how much of AdaBN's gain is only the
# running averages' lag behind the weights, on the target and in-domain.
SOURCE_PRECISE = "source_precise"
IN_DOMAIN_PRECISE = "in_domain_precise"
TENT_LR_SCALINGS = ("linear", "none")
ConfigError = sweep.ConfigError


# ----------------------------------------------------------------------------
# Pure pieces.


def train_config(config, source: str) -> ml_collections.ConfigDict:
  """The lab config (lab/bn_lab/config.py) of one direction's source nets:
  the residual CNN on `source`, one combination per norm of config.norms
  (the `norms` axis), config.seeds vmapped in each."""
  c = base_config.get_config()
  t = config.train
  c.study = f"real shift: the source nets on {source}"
  c.dataset = source
  c.model = "resnet"
  c.placement = "before_activation"  # the resnet's norm after every conv
  c.channels = tuple(t.channels)
  c.resnet.blocks_per_stage = t.blocks_per_stage
  c.resnet.stem_stride = t.stem_stride
  c.bn.num_groups = t.num_groups
  c.bn.momentum = t.bn_momentum
  c.optimizer = t.optimizer
  c.learning_rate = t.learning_rate
  c.batch_size = t.batch_size
  c.num_epochs = t.num_epochs
  c.seeds = tuple(config.seeds)
  c.norms = tuple(config.norms)
  c.target_accuracy = 0.9  # reporting only
  return c


def tent_learning_rate(config, batch_size: int) -> float:
  """TENT's Adam step size at `batch_size`: config.adapt.tent_learning_rate
  at tent_reference_batch, scaled linearly with the batch (or not)."""
  a = config.adapt
  if a.tent_lr_scaling == "none":
    return float(a.tent_learning_rate)
  return float(a.tent_learning_rate) * batch_size / a.tent_reference_batch


def eval_indices(num_test: int, num: int, seed: int) -> np.ndarray:
  """The evaluated target test images, in stream order: `num` of
  `num_test`, a random permutation's first from `seed` (MNIST's test set
  is in writer order; the stream's order matters to TENT)."""
  return np.random.default_rng(seed).permutation(num_test)[:num]


def _variables(state: train.TrainState):
  return {"params": state.params, "batch_stats": state.batch_stats}


def _accuracy(counts) -> jax.Array:
  return counts["correct"] / counts["count"]


@functools.partial(jax.jit, static_argnames="spec")
def eval_accuracies(states: train.TrainState, images, labels, *,
                    spec: train.TrainSpec) -> jax.Array:
  """(K,) eval-mode accuracies of K stacked runs (BN: the running
  statistics; GN, LN: the net as it is)."""
  return jax.vmap(lambda s: _accuracy(train.evaluate(
      s, images, labels, spec=spec)))(states)


@functools.partial(jax.jit, static_argnames=("spec", "chunk"))
def adabn_accuracies(states: train.TrainState, adapt_images, images, labels,
                     *, spec: train.TrainSpec, chunk: int) -> jax.Array:
  """(K,) accuracies with AdaBN's statistics: every BN layer's recomputed
  over `adapt_images` (unlabeled target images, uint8 (N, 784), N a
  multiple of `chunk`), weights frozen, then eval mode."""
  def one(state):
    inputs = train.model_inputs(adapt_images, spec)
    stats = domain_shift.adapted_statistics(
        spec.make_model(state.bn_hparams), _variables(state), inputs, chunk)
    return _accuracy(train.evaluate(state._replace(batch_stats=stats),
                                    images, labels, spec=spec))
  return jax.vmap(one)(states)


@functools.partial(jax.jit, static_argnames=("spec", "batch_size"))
def test_batch_accuracies(states: train.TrainState, images, labels, *,
                          spec: train.TrainSpec, batch_size: int,
                          ) -> jax.Array:
  """(K,) accuracies with each batch of `batch_size` normalized by its own
  statistics (bn_lab.train.evaluate's use_batch_stats; the images a
  multiple of the batch, so every one counts)."""
  spec = dataclasses.replace(spec, batch_size=batch_size)
  return jax.vmap(lambda s: _accuracy(train.evaluate(
      s, images, labels, spec=spec, use_batch_stats=True)))(states)


@functools.partial(jax.jit, static_argnames=("spec", "batch_size",
                                             "learning_rate", "episodic"))
def tent_accuracies(states: train.TrainState, images, labels, *,
                    spec: train.TrainSpec, batch_size: int,
                    learning_rate: float, episodic: bool) -> jax.Array:
  """(K,) accuracies of TENT's predictions (bn_lab.adapt.tent, Adam at
  `learning_rate`) over the images as one stream of batches of
  `batch_size`, in order, each predicted before its own step."""
  inputs = train.model_inputs(images, spec)
  batches = inputs.reshape(-1, batch_size, *inputs.shape[1:])
  targets = labels.reshape(-1, batch_size)

  def one(state):
    logits, _ = adapt.tent(spec.make_model(state.bn_hparams),
                           _variables(state), batches,
                           tx=optax.adam(learning_rate), episodic=episodic)
    return jnp.mean(jnp.argmax(logits, -1) == targets)
  return jax.vmap(one)(states)


# ----------------------------------------------------------------------------
# Checks.


def _positive_int(value) -> bool:
  return sweep.is_int(value) and value > 0


def _positive_number(value) -> bool:
  return sweep.is_number(value) and np.isfinite(value) and value > 0


def _check_tuple(field: str, values, example: str) -> None:
  if not isinstance(values, (tuple, list)) or not values:
    raise ConfigError(f"config.{field}={values!r} must be a non-empty "
                      f"tuple, e.g. --config.{field}=\"{example}\".")
  if len(set(values)) < len(values):
    raise ConfigError(f"config.{field}={tuple(values)!r} repeats a value.")


def validate_config(config) -> None:
  """Rejects bad values in one line naming the field and what it takes."""
  _check_tuple("directions", config.directions,
               "('printed_digits_to_mnist',)")
  for d in config.directions:
    if d not in DIRECTIONS:
      raise ConfigError(f"config.directions has {d!r}; the directions are "
                        f"{', '.join(DIRECTIONS)}.")
  _check_tuple("norms", config.norms, "('batch','group')")
  for n in config.norms:
    if n not in NORMS:
      raise ConfigError(f"config.norms has {n!r}; choose from {NORMS}.")
  if "batch" not in config.norms:
    raise ConfigError(f"config.norms={tuple(config.norms)!r} has no "
                      "'batch': BN is the norm the study adapts; add it.")
  _check_tuple("seeds", config.seeds, "(0,1,2,3,4)")
  if not all(sweep.is_int(s) and 0 <= s < 2**31 for s in config.seeds):
    raise ConfigError(f"config.seeds={tuple(config.seeds)!r} must hold "
                      "integers in [0, 2**31).")
  t, a = config.train, config.adapt
  _check_tuple("train.channels", t.channels, "(8,16,32)")
  if not all(_positive_int(w) for w in t.channels):
    raise ConfigError(f"config.train.channels={tuple(t.channels)!r} must "
                      "hold positive integers (the stage widths).")
  for field in ("blocks_per_stage", "num_groups", "batch_size",
                "num_epochs", "train_examples"):
    if not _positive_int(t[field]):
      raise ConfigError(f"config.train.{field}={t[field]!r} must be a "
                        "positive integer.")
  if t.stem_stride not in (1, 2) or isinstance(t.stem_stride, bool):
    raise ConfigError(f"config.train.stem_stride={t.stem_stride!r} must be "
                      "1 or 2.")
  if "group" in config.norms and any(w % t.num_groups
                                     for w in t.channels):
    raise ConfigError(
        f"config.train.num_groups={t.num_groups} does not divide every "
        f"width of config.train.channels={tuple(t.channels)!r}; GN needs "
        "it to (e.g. --config.train.num_groups=4).")
  if not _positive_number(t.learning_rate):
    raise ConfigError(f"config.train.learning_rate={t.learning_rate!r} "
                      "must be a positive number.")
  if t.optimizer not in train.OPTIMIZERS:
    raise ConfigError(f"config.train.optimizer={t.optimizer!r}; choose "
                      f"from {train.OPTIMIZERS}.")
  if not (sweep.is_number(t.bn_momentum) and 0 <= t.bn_momentum < 1):
    raise ConfigError(f"config.train.bn_momentum={t.bn_momentum!r} must be "
                      "a number in [0, 1) (flax's convention).")
  if t.train_examples < t.batch_size:
    raise ConfigError(
        f"config.train.train_examples={t.train_examples} is fewer than one "
        f"batch (config.train.batch_size={t.batch_size}).")
  _check_tuple("adapt.batch_sizes", a.batch_sizes, "(1,4,16,64,256)")
  if not all(_positive_int(b) for b in a.batch_sizes):
    raise ConfigError(f"config.adapt.batch_sizes={tuple(a.batch_sizes)!r} "
                      "must hold positive integers.")
  for field in ("eval_examples", "adabn_examples", "adabn_chunk",
                "tent_reference_batch"):
    if not _positive_int(a[field]):
      raise ConfigError(f"config.adapt.{field}={a[field]!r} must be a "
                        "positive integer.")
  uneven = [b for b in a.batch_sizes if a.eval_examples % b]
  if uneven:
    raise ConfigError(
        f"config.adapt.eval_examples={a.eval_examples} is not a multiple of "
        f"the batch size(s) {uneven}: every method must see every image "
        "(e.g. 2048 for batch sizes up to 256).")
  if a.adabn_examples % a.adabn_chunk:
    raise ConfigError(
        f"config.adapt.adabn_examples={a.adabn_examples} is not a multiple "
        f"of config.adapt.adabn_chunk={a.adabn_chunk}.")
  if not (sweep.is_int(a.eval_seed) and 0 <= a.eval_seed < 2**32):
    raise ConfigError(f"config.adapt.eval_seed={a.eval_seed!r} must be an "
                      "integer in [0, 2**32).")
  if not _positive_number(a.tent_learning_rate):
    raise ConfigError(f"config.adapt.tent_learning_rate="
                      f"{a.tent_learning_rate!r} must be a positive number.")
  if a.tent_lr_scaling not in TENT_LR_SCALINGS:
    raise ConfigError(f"config.adapt.tent_lr_scaling={a.tent_lr_scaling!r}; "
                      f"choose from {TENT_LR_SCALINGS}.")
  if not isinstance(a.episodic, bool):
    raise ConfigError(f"config.adapt.episodic={a.episodic!r} must be True "
                      "or False.")
  for direction in config.directions:  # the lab's own checks of the nets
    sweep.validate_config(train_config(config, DIRECTIONS[direction][0]))


# ----------------------------------------------------------------------------
# Data.


class Domain(NamedTuple):
  """One data set: (N, 784) uint8 pixels and int labels."""
  train_pixels: np.ndarray
  train_labels: np.ndarray
  test_pixels: np.ndarray
  test_labels: np.ndarray
  origin: str


def load_domain(name: str) -> Domain:
  dataset = data_lib.load_dataset(name)
  return Domain(data_lib.flatten_pixels(dataset.train_images),
                np.asarray(dataset.train_labels, np.int32),
                data_lib.flatten_pixels(dataset.test_images),
                np.asarray(dataset.test_labels, np.int32), dataset.origin)


def validate(config) -> None:
  """The study's `validate`: the config's values. Raises ConfigError."""
  validate_config(config)


def load_data(config) -> tuple[dict[str, Domain], str]:
  """The study's `load_data`: every data set a direction names, checked
  against the config's sizes. Raises ConfigError and data.DataError."""
  names = list(dict.fromkeys(n for d in config.directions
                             for n in DIRECTIONS[d]))
  domains = {n: load_domain(n) for n in names}
  for d in config.directions:
    source, target = (domains[n] for n in DIRECTIONS[d])
    checks = (("train.train_examples", config.train.train_examples,
               len(source.train_pixels), f"{DIRECTIONS[d][0]} training"),
              ("adapt.eval_examples", config.adapt.eval_examples,
               len(target.test_pixels), f"{DIRECTIONS[d][1]} test"),
              ("adapt.adabn_examples", config.adapt.adabn_examples,
               len(target.train_pixels), f"{DIRECTIONS[d][1]} training"))
    for field, wanted, have, what in checks:
      if wanted > have:
        raise ConfigError(f"config.{field}={wanted} is more than the "
                          f"{have} {what} images.")
  origin = "; ".join(f"{n}: {domains[n].origin}" for n in names)
  logging.info("data: %s", origin)
  return domains, origin


# ----------------------------------------------------------------------------
# The study.


def _trained_states(combo: sweep.Combination, spec: train.TrainSpec,
                    directory: Path) -> train.TrainState:
  """The combination's runs after their last epoch, from the checkpoint
  train_combination saved."""
  runs = sweep.run_grid(combo.config)
  hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE
             if runs[0]["hparams"][n] is not None}
  create = functools.partial(train.create_sweep_states, spec,
                             [r["seed"] for r in runs], hparams)
  with contextlib.closing(checkpoints.manager(
      directory / "checkpoints" / combo.name,
      combo.config.keep_checkpoints)) as manager:
    epoch, states = checkpoints.restore_or_create(
        manager, create, combo.config.num_epochs)
  if epoch != combo.config.num_epochs:
    raise RuntimeError(f"{directory}: {combo.name} has no checkpoint of its "
                       f"last epoch ({combo.config.num_epochs}).")
  return states


def train_sources(config, source: str, domain: Domain, directory: Path,
                  ) -> list[tuple[sweep.Combination, train.TrainSpec,
                                  train.TrainState, dict[str, Any]]]:
  """Trains (or resumes) the source nets of every norm on the first
  config.train.train_examples images of `domain`'s training set; returns
  (combination, spec, stacked states, training summary) per norm."""
  tc = train_config(config, source)
  n = config.train.train_examples
  device = train.to_device(domain.train_pixels[:n], domain.train_labels[:n],
                           domain.test_pixels, domain.test_labels)
  writer = workdir_lib.MetricsWriter(directory, classifier.metric_names(tc))
  out = []
  with workdir_lib.closing_after_error(writer):
    for combo in sweep.combinations(tc):
      summary = classifier.train_combination(combo, device, directory,
                                             writer)
      spec = sweep.make_spec(combo.config, n)
      out.append((combo, spec, _trained_states(combo, spec, directory),
                  summary))
  return out


def evaluate_direction(config, direction: str, nets, source: Domain,
                       target: Domain, log) -> list[dict[str, Any]]:
  """Every net of one direction on the target subset (`METHODS` for BN,
  eval mode for the others) and on its whole source test set; the rows."""
  a = config.adapt
  picked = eval_indices(len(target.test_pixels), a.eval_examples,
                        a.eval_seed)
  images = jnp.asarray(target.test_pixels[picked])
  labels = jnp.asarray(target.test_labels[picked])
  adabn_images = jnp.asarray(target.train_pixels[:a.adabn_examples])
  rows = []

  def add(norm, method, batch_size, accuracies):
    accuracies = np.asarray(jax.device_get(accuracies), np.float64)
    rows.extend({"direction": direction, "norm": norm, "seed": seed,
                 "method": method, "batch_size": batch_size,
                 "accuracy": float(acc)}
                for seed, acc in zip(config.seeds, accuracies))
    log(f"{norm}, {method}" + (f" at batch {batch_size}" if batch_size
                               else "") + f": {accuracies.mean():.4f}")

  for combo, spec, states, _ in nets:
    norm = combo.values["norm"]
    add(norm, IN_DOMAIN, None, eval_accuracies(
        states, jnp.asarray(source.test_pixels),
        jnp.asarray(source.test_labels), spec=spec))
    add(norm, "source", None, eval_accuracies(states, images, labels,
                                              spec=spec))
    if norm != "batch":
      continue
    add(norm, "adabn", None, adabn_accuracies(
        states, adabn_images, images, labels, spec=spec, chunk=a.adabn_chunk))
    # The control for stale running averages: the same recomputation over
    # source training images (PreciseBN), on the target and in-domain.
    source_images = jnp.asarray(source.train_pixels[:a.adabn_examples])
    add(norm, SOURCE_PRECISE, None, adabn_accuracies(
        states, source_images, images, labels, spec=spec,
        chunk=a.adabn_chunk))
    add(norm, IN_DOMAIN_PRECISE, None, adabn_accuracies(
        states, source_images, jnp.asarray(source.test_pixels),
        jnp.asarray(source.test_labels), spec=spec, chunk=a.adabn_chunk))
    for b in a.batch_sizes:
      add(norm, "test_batch", b, test_batch_accuracies(
          states, images, labels, spec=spec, batch_size=b))
      add(norm, "tent", b, tent_accuracies(
          states, images, labels, spec=spec, batch_size=b,
          learning_rate=tent_learning_rate(config, b),
          episodic=a.episodic))
  return rows


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`: trains the source nets of every direction (or
  resumes them from source/<source>/ in the workdir), then evaluates them
  on the target. Returns results.json's study part."""
  assert context.writes, "the real-shift study runs in one process"
  config, workdir, domains = context.config, context.workdir, context.data
  started = time.perf_counter()

  def log(message):
    logging.info("[real_shift %.0f s] %s", time.perf_counter() - started,
                 message)

  rows, training, times = [], [], {}
  for i, direction in enumerate(config.directions, 1):
    source, target = DIRECTIONS[direction]
    log(f"direction {i}/{len(config.directions)}: {direction}: training "
        f"(or resuming) the source nets on {source}")
    t0 = time.perf_counter()
    nets = train_sources(config, source, domains[source],
                         workdir / "source" / source)
    t1 = time.perf_counter()
    training += [{"direction": direction, **summary}
                 for _, _, _, summary in nets]
    log(f"{direction}: trained in {t1 - t0:.0f} s; evaluating on {target}")
    rows += evaluate_direction(
        config, direction, nets, domains[source], domains[target],
        lambda m, d=direction: log(f"{d}: {m}"))
    times[direction] = {"train": t1 - t0,
                        "evaluate": time.perf_counter() - t1}
  return {
      "study": config.study,
      "real_shift": {
          "directions": {d: list(DIRECTIONS[d]) for d in config.directions},
          "norms": list(config.norms), "seeds": list(config.seeds),
          "train": config.train.to_dict(),
          "adapt": {**config.adapt.to_dict(),
                    "tent_learning_rates": {
                        str(b): tent_learning_rate(config, b)
                        for b in config.adapt.batch_sizes}},
          "test_examples": {n: len(d.test_pixels)
                            for n, d in domains.items()},
          "data_origin": context.origin,
          "training": training, "times": times, "rows": rows},
      "wall_time": time.perf_counter() - started}
