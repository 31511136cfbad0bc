"""Transfer learning with normalization layers: pretrain on some classes,
then learn others from a few labeled examples with a new readout.

    python -m experiments.main --config=studies/transfer/config.py --workdir=workdirs/transfer

(`studies.transfer.STUDY`, run by bn_lab.runner: `validate_config`,
`load_data`, `run`; the report is its page section, studies.transfer.page.)

The study (the source article's outlook): a network is
pretrained on MNIST digits 0-4 (`config.source_classes`), its readout is
replaced by a fresh Dense layer for digits 5-9 (`config.target_classes`,
relabeled 5..9 -> 0..4: a 5-way readout, so that no logit of a source class
competes), and the new task is learned from a small labeled budget (100 or
1,000 examples of 5-9, the same number of each class). Variants
(`VARIANTS`), for each normalization of the hidden layers (`NORMS`):

  frozen       the pretrained layers, and BN's running statistics, fixed;
               only the new readout trains, the hidden layers in eval mode
               (the features it learns from are exactly those it is tested
               on).
  recomputed   as frozen, but every BN layer's statistics recomputed first
               on the labeled budget's images (no other data), layer by
               layer as the evaluated network sees them (exact population
               mean and biased variance: bn_jax.precise, "pooled",
               layerwise). BN only.
  recomputed_unlabeled  the same on all the target classes' training
               images outside the validation part, their labels unused
               (AdaBN's operation; semi-supervised: more images than the
               labeled budget). BN only. 0-4 -> 5-9 is a label shift, not
               the covariate shift of the same classes AdaBN assumes.
  trained      fine-tune everything (new readout included) with
               bn_lab.train.train_step: BN in training mode, its running
               statistics updated by the moving average.
  scratch      the same network from a fresh initialization, trained on the
               budget alone: what pretraining is worth.

Each seed has its own pretrained network (pretraining is vmapped over
seeds), its own labeled subset, readout initialization and data order, so
the spread over seeds includes all three; every cell's seed i uses the
same labeled subset (the page pairs cells seed by seed). Adam throughout;
the readout-only variants with their own learning rate (config.transfer.
readout_learning_rate): a linear readout on fixed features converges slowly
at the fine-tuning one. For that reason each readout-only variant is also
scored by a convex probe (`probe_runs`, studies.transfer.probe): logistic
regression on the frozen features solved to a gradient tolerance, its
penalty cross-validated on the budget; beside it the features' rank and
saturation.

The target's training images are split once (`hold_out_validation`): a
validation part, on which the page picks each norm's best variant and the
features are measured, and the rest, from which the budgets are drawn and
which recomputed_unlabeled reads. The test images give the final numbers
only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_lab import data as data_lib
from bn_lab import models
from bn_jax import precise
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from studies.transfer import probe

ConfigError = sweep.ConfigError

NORMS = ("batch", "layer", "none")
VARIANTS = ("frozen", "recomputed", "recomputed_unlabeled", "trained",
            "scratch")
# Variants that only exist for a network with running statistics.
STATISTICS_VARIANTS = ("recomputed", "recomputed_unlabeled")
# Variants in which only the new readout trains (hidden layers in eval mode).
READOUT_ONLY = ("frozen", "recomputed", "recomputed_unlabeled")
READOUT = "readout"  # the Dense layer bn_lab.models names so
# The transfer runs' seeds are the pretraining's plus this: the new readout's
# initialization and the data order come from keys pretraining did not use.
TRANSFER_SEED_OFFSET = 1000
PLACEMENTS = ("before_activation", "after_activation")
BN_FIELDS = ("momentum", "epsilon")


@dataclasses.dataclass(frozen=True)
class TransferSpec(train.TrainSpec):
  """A TrainSpec whose classifier has `num_classes` outputs (TrainSpec's
  models have 10), so train_step, evaluate and create_train_state work
  unchanged on a 5-way task."""
  num_classes: int = 10

  def make_model(self, bn_hparams: dict[str, Any]):
    return super().make_model(bn_hparams).clone(num_classes=self.num_classes)


# ----------------------------------------------------------------------------
# Data: class subsets and the labeled budget.


def class_subset(images, labels, classes: Sequence[int]):
  """The examples whose label is in `classes`, in their order, labels
  replaced by their index in `classes` (5..9 -> 0..4 for (5, ..., 9))."""
  labels = np.asarray(labels)
  lookup = np.full(max(int(labels.max()), *classes) + 1, -1, np.int32)
  lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
  new = lookup[labels]
  keep = new >= 0
  return np.asarray(images)[keep], new[keep]


def labeled_budget(labels, budget: int, seed: int) -> np.ndarray:
  """Indices of `budget` examples, budget / C of each of the C classes
  0..C-1 of `labels`, drawn without replacement by `seed`; sorted."""
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1
  if budget % num_classes:
    raise ValueError(f"budget {budget} is not a multiple of the "
                     f"{num_classes} classes.")
  rng = np.random.default_rng(seed)
  per_class = budget // num_classes
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in range(num_classes)]
  return np.sort(np.concatenate(chosen))


def hold_out_validation(split: dict[str, np.ndarray], size: int, seed: int,
                        ) -> dict[str, np.ndarray]:
  """`split` with `size` of its training examples, drawn by `seed`, moved
  to validation_images / validation_labels (the rest stay, in their
  order): labeled budgets and the unlabeled pool come from the rest, and
  any selection among variants reads the validation part, never the
  test set."""
  order = np.random.default_rng(seed).permutation(
      split["train_labels"].shape[0])
  held, kept = np.sort(order[:size]), np.sort(order[size:])
  return {**split,
          "train_images": split["train_images"][kept],
          "train_labels": split["train_labels"][kept],
          "validation_images": split["train_images"][held],
          "validation_labels": split["train_labels"][held]}


# ----------------------------------------------------------------------------
# Specs and states.


def make_spec(config, *, norm: str, batch_size: int, steps_per_epoch: int,
              num_epochs: int) -> TransferSpec:
  """The network of `config` with `norm` in its hidden layers ("none": no
  normalization), trained by Adam in batches of `batch_size`."""
  return TransferSpec(
      model="mlp", placement="none" if norm == "none" else config.placement,
      activation=config.activation, widths=tuple(config.widths), norm=norm,
      bn=tuple((k, config.bn[k]) for k in BN_FIELDS) + (("impl", "auto"),),
      optimizer="adam", batch_size=batch_size,
      steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
      input_scaling=config.input_scaling,
      num_classes=len(config.target_classes))


def transfer_state(spec: TransferSpec, variables, seed, learning_rate, *,
                   readout_only: bool) -> train.TrainState:
  """A transfer run's start: the pretrained `variables` (params and
  batch_stats) with a fresh readout from `seed`, Adam's state over the
  readout only (`readout_only`) or over every parameter."""
  fresh = train.create_train_state(spec, seed, {"learning_rate":
                                                 learning_rate})
  params = {**variables["params"], READOUT: fresh.params[READOUT]}
  trained = params[READOUT] if readout_only else params
  return fresh._replace(
      params=params, batch_stats=variables["batch_stats"],
      opt_state=train.make_optimizer(spec, jnp.asarray(
          learning_rate, jnp.float32)).init(trained))


def readout_step(state: train.TrainState, images, labels, *,
                 spec: TransferSpec) -> tuple[train.TrainState, dict]:
  """One Adam step on the readout alone; the hidden layers run in eval mode
  (BN with `state.batch_stats`), so neither they nor the statistics change:
  the gradient is taken with respect to the readout only, and the other
  parameters are passed through untouched (bitwise)."""
  model = spec.make_model(state.bn_hparams)
  inputs = train.model_inputs(images, spec)

  def loss_fn(readout):
    params = {**state.params, READOUT: readout}
    logits = model.apply({"params": params, "batch_stats": state.batch_stats},
                         inputs, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           labels).mean()
    return loss, logits

  readout = state.params[READOUT]
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(readout)
  updates, opt_state = train.make_optimizer(spec).update(
      grads, state.opt_state, readout)
  params = {**state.params, READOUT: optax.apply_updates(readout, updates)}
  metrics = {"loss_sum": loss * labels.shape[0],
             "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
             "count": jnp.asarray(labels.shape[0], jnp.int32)}
  return state._replace(step=state.step + 1, params=params,
                        opt_state=opt_state), metrics


def train_and_test(state: train.TrainState, images, labels, validation,
                   test, *, spec: TransferSpec, readout_only: bool,
                   ) -> tuple[train.TrainState, dict[str, jax.Array]]:
  """`spec.num_epochs` epochs over (images, labels) (one run's labeled
  budget) as one scan of `readout_step` or `bn_lab.train.train_step`, then
  the validation and the test set ((images, labels) each) in eval mode.
  Returns the state and the last epoch's train loss and accuracy with the
  validation and test loss and accuracy."""
  n = images.shape[0]
  batches = jax.vmap(lambda e: train.epoch_batches(state.data_key, e, n,
                                                   spec))(
      jnp.arange(spec.num_epochs))
  step = readout_step if readout_only else train.train_step

  def body(state, indices):
    state, metrics = step(state, images[indices], labels[indices], spec=spec)
    return state, {k: metrics[k] for k in ("loss_sum", "correct", "count")}

  state, metrics = jax.lax.scan(body, state, batches.reshape(
      -1, spec.batch_size))
  last = jax.tree.map(lambda m: jnp.sum(m[-spec.steps_per_epoch:]), metrics)
  out = {"train_loss": last["loss_sum"] / last["count"],
         "train_accuracy": last["correct"] / last["count"]}
  for name, (eval_images, eval_labels) in (("validation", validation),
                                           ("test", test)):
    sums = train.evaluate(state, eval_images, eval_labels, spec=spec)
    out[f"{name}_loss"] = sums["loss_sum"] / sums["count"]
    out[f"{name}_accuracy"] = sums["correct"] / sums["count"]
  return state, out


@functools.partial(jax.jit, static_argnames=("spec", "readout_only"))
def train_and_test_runs(states, images, labels, validation, test, *,
                        spec: TransferSpec, readout_only: bool):
  """`train_and_test` of K stacked runs, each on its own labeled budget
  ((K, budget, 784) images), vmapped; the validation and test sets are
  shared."""
  return jax.vmap(functools.partial(train_and_test, spec=spec,
                                    readout_only=readout_only),
                  in_axes=(0, 0, 0, None, None))(
                      states, images, labels, validation, test)


def hidden_activations(spec: TransferSpec, variables, images,
                       ) -> tuple[jax.Array, ...]:
  """Each hidden layer's output (after its activation) on `images`, the
  network in eval mode (BN with `variables`' batch_stats): the features a
  readout-only variant learns from are the last of them."""
  model = spec.make_model({})
  is_hidden = lambda module, method: (
      method == "__call__" and isinstance(module.name, str)
      and module.name.startswith("hidden_"))
  _, captured = model.apply(variables, train.model_inputs(images, spec),
                            train=False, capture_intermediates=is_hidden,
                            mutable=["intermediates"])
  layers = captured["intermediates"]
  return tuple(layers[f"hidden_{i}"]["__call__"][0]
               for i in range(len(spec.widths)))


@functools.partial(jax.jit, static_argnames=("spec", "shared"))
def _activations_runs(variables, images, *, spec: TransferSpec,
                      shared: bool):
  """`hidden_activations` of K stacked networks, on one (N, 784) set of
  images (`shared`) or on each run's own (K, N, 784)."""
  return jax.vmap(functools.partial(hidden_activations, spec),
                  in_axes=(0, None if shared else 0))(variables, images)


def recompute_statistics(spec: TransferSpec, variables, batches):
  """Every BN layer's mean and biased variance over all the images of
  `batches` ((N, B, 784) pixels or inputs), each layer's with the layers
  before it normalizing by their recomputed statistics, as the evaluated
  network does (bn_jax.precise: "pooled", layerwise). Returns batch_stats
  ({} for a network without BN)."""
  model = spec.make_model({})

  def apply_fn(v, x, mutable):
    return model.apply(v, train.model_inputs(x, spec), train=True,
                       mutable=mutable)
  return precise.recompute_statistics(apply_fn, variables, batches,
                                      estimator="pooled", layerwise=True)


@functools.partial(jax.jit, static_argnames="spec")
def _recompute_runs(variables, batches, *, spec: TransferSpec):
  """`recompute_statistics` for K stacked runs; `batches` (K, N, B, 784),
  one set per run."""
  return jax.vmap(functools.partial(recompute_statistics, spec))(variables,
                                                                 batches)


@functools.partial(jax.jit, static_argnames="spec")
def _recompute_shared(variables, batches, *, spec: TransferSpec):
  """`recompute_statistics` for K stacked runs on the same (N, B, 784)
  batches."""
  return jax.vmap(functools.partial(recompute_statistics, spec),
                  in_axes=(0, None))(variables, batches)


@functools.partial(jax.jit, static_argnames=("spec", "readout_only"))
def _transfer_states(variables, seeds, learning_rate, *, spec: TransferSpec,
                     readout_only: bool):
  return jax.vmap(lambda v, s: transfer_state(
      spec, v, s, learning_rate, readout_only=readout_only))(variables, seeds)


# ----------------------------------------------------------------------------
# The config.


def _check_ints(field: str, values, minimum: int = 0, maximum=None,
                distinct: bool = True) -> None:
  ok = (isinstance(values, (tuple, list)) and len(values) > 0
        and all(sweep.is_int(v) and v >= minimum
                and (maximum is None or v <= maximum) for v in values)
        and (not distinct or len(set(values)) == len(values)))
  sweep.check(ok, field, values, "must be a non-empty tuple of "
              + ("distinct " if distinct else "") + f"integers >= {minimum}"
              + (f" and <= {maximum}" if maximum is not None else ""))


def validate_config(config) -> None:
  """Raises ConfigError, one line naming the field, for a config that cannot
  run; the checks that need the data come after loading
  (`validate_data_size`)."""
  sweep.check_choices("norms", config.norms, NORMS)
  sweep.check_choices("transfer.variants", config.transfer.variants, VARIANTS)
  _check_ints("source_classes", config.source_classes, 0, 9)
  _check_ints("target_classes", config.target_classes, 0, 9)
  sweep.check(not set(config.source_classes) & set(config.target_classes),
              "target_classes", config.target_classes,
              f"shares classes with source_classes {config.source_classes}")
  sweep.check(config.placement in PLACEMENTS, "placement", config.placement,
              f"is not valid; choose one of {PLACEMENTS}")
  sweep.check(config.activation in models.ACTIVATIONS, "activation",
              config.activation,
              f"is not valid; choose one of {tuple(models.ACTIVATIONS)}")
  sweep.check(config.input_scaling in ("unit", "standardize", "raw"),
              "input_scaling", config.input_scaling,
              "is not valid; choose one of ('unit', 'standardize', 'raw')")
  sweep.check(config.data_source in data_lib.SOURCES, "data_source",
              config.data_source, f"is not valid; choose one of "
              f"{data_lib.SOURCES}")
  _check_ints("widths", config.widths, 1, distinct=False)
  _check_ints("seeds", config.seeds)
  _check_ints("transfer.budgets", config.transfer.budgets, 1)
  for budget in config.transfer.budgets:
    sweep.check(budget % len(config.target_classes) == 0, "transfer.budgets",
                tuple(config.transfer.budgets),
                f"has {budget}, not a multiple of the "
                f"{len(config.target_classes)} target classes (each class gets "
                "the same share)")
    sweep.check(budget >= 2 * len(config.target_classes), "transfer.budgets",
                tuple(config.transfer.budgets),
                f"has {budget}: fewer than 2 per class, and the probe's "
                "penalty is cross-validated on the budget")
  for field in ("pretrain.batch_size", "pretrain.num_epochs",
                "transfer.batch_size", "transfer.steps",
                "transfer.recompute_chunk", "transfer.validation_images"):
    value = sweep.get_dotted(config, field)
    sweep.check(sweep.is_int(value) and value > 0, field, value,
                "must be a positive integer")
  for field in ("pretrain.batch_size", "transfer.batch_size"):
    value = sweep.get_dotted(config, field)
    sweep.check(value >= 2, field, value,
                "must be at least 2 (batch statistics of one example are 0)")
  grid = config.transfer.probe_l2_grid
  sweep.check(isinstance(grid, (tuple, list)) and len(grid) > 0
              and all(sweep.is_number(v) and v > 0 for v in grid),
              "transfer.probe_l2_grid", grid,
              "must be a non-empty tuple of numbers > 0")
  folds = config.transfer.probe_folds
  sweep.check(sweep.is_int(folds) and folds >= 2, "transfer.probe_folds",
              folds, "must be an integer >= 2")
  for field in ("pretrain.learning_rate", "transfer.learning_rate",
                "transfer.readout_learning_rate", "bn.epsilon"):
    value = sweep.get_dotted(config, field)
    sweep.check(sweep.is_number(value) and value > 0, field, value,
                "must be a number > 0")
  seed = config.transfer.validation_seed
  sweep.check(sweep.is_int(seed) and seed >= 0, "transfer.validation_seed",
              seed, "must be an integer >= 0")
  momentum = config.bn.momentum
  sweep.check(sweep.is_number(momentum) and 0 <= momentum < 1, "bn.momentum",
              momentum, "must be a number in [0, 1)")
  unread = sorted(set(config.bn) - set(BN_FIELDS))
  sweep.check(not unread, "bn", unread, "has fields this study does not "
              f"read; it reads {BN_FIELDS}")


def transfer_batch_size(config, budget: int) -> int:
  """The batch size on a labeled budget: config.transfer.batch_size, or the
  whole budget where it is smaller."""
  return min(config.transfer.batch_size, budget)


def validate_data_size(config, num_source: int, num_target: int,
                       target_counts: Sequence[int]) -> None:
  """The checks that need the data's class sizes."""
  sweep.check(config.pretrain.batch_size <= num_source, "pretrain.batch_size",
              config.pretrain.batch_size,
              f"is more than the {num_source} training images of the source "
              "classes")
  for budget in config.transfer.budgets:
    per_class = budget // len(config.target_classes)
    sweep.check(per_class <= min(target_counts), "transfer.budgets",
                tuple(config.transfer.budgets),
                f"has {budget}: {per_class} per class, more than the "
                f"{min(target_counts)} training images of the smallest target "
                "class")
  sweep.check(config.transfer.recompute_chunk <= num_target,
              "transfer.recompute_chunk", config.transfer.recompute_chunk,
              f"is more than the {num_target} target training images")


# ----------------------------------------------------------------------------
# The study.


def pretraining_fields(config) -> dict[str, Any]:
  """What the pretrained networks depend on: a saved one is reused only when
  these match."""
  return {k: json.loads(json.dumps(v)) for k, v in {
      "dataset": config.dataset, "source_classes": config.source_classes,
      "target_classes": config.target_classes,
      "placement": config.placement, "activation": config.activation,
      "widths": config.widths, "input_scaling": config.input_scaling,
      "bn": config.bn.to_dict(), "pretrain": config.pretrain.to_dict(),
      "seeds": config.seeds}.items()}


def pretrain(config, norm: str, source: train.DeviceData, directory: Path,
             ) -> tuple[Any, dict[str, Any]]:
  """The K seeds' networks trained on the source classes (vmapped), as
  stacked variables {"params", "batch_stats"} and a summary; loaded from
  `directory` where a run of the same pretraining fields saved them."""
  variables_path = directory / f"{norm}.msgpack"
  summary_path = directory / f"{norm}.json"
  fields = pretraining_fields(config)
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    if summary["fields"] != fields:
      differ = sorted(k for k in fields if summary["fields"].get(k)
                      != fields[k])
      raise workdir_lib.ConfigMismatch(
          f"{summary_path} was pretrained with other {', '.join(differ)}; "
          "use a new --workdir or delete that directory.")
    variables = flax.serialization.msgpack_restore(
        variables_path.read_bytes())
    logging.info("[%s] pretrained networks loaded from %s (test accuracy on "
                 "the source classes %s)", norm, directory,
                 " ".join(f"{a:.4f}" for a in summary["test_accuracy"]))
    return jax.device_put(variables), summary
  num = source.train_images.shape[0]
  batch = config.pretrain.batch_size
  spec = dataclasses.replace(
      make_spec(config, norm=norm, batch_size=batch,
                steps_per_epoch=num // batch,
                num_epochs=config.pretrain.num_epochs),
      num_classes=len(config.source_classes))
  started = time.perf_counter()
  seeds = list(config.seeds)
  states = train.create_sweep_states(
      spec, seeds, {"learning_rate": [config.pretrain.learning_rate]
                    * len(seeds)})
  for epoch in range(1, spec.num_epochs + 1):
    states, metrics = train.sweep_epoch(states, source, spec=spec)
    metrics = jax.device_get(metrics)
    if np.any(metrics["first_nonfinite_step"] >= 0):
      raise train.NonFiniteError(f"[{norm}] pretraining diverged "
                                  f"(non-finite loss) in epoch {epoch}.")
    logging.info("[%s] pretraining epoch %d/%d  train loss %.4f  source test "
                 "accuracy %.4f (mean of %d seeds), %.0f s", norm, epoch,
                 spec.num_epochs, np.mean(metrics["train_loss"]),
                 np.mean(metrics["test_accuracy"]), len(seeds),
                 time.perf_counter() - started)
  variables = {"params": states.params, "batch_stats": states.batch_stats}
  summary = {"fields": fields, "steps": spec.total_steps,
             "batch_size": batch,
             "test_accuracy": [float(a) for a in metrics["test_accuracy"]],
             "train_time": time.perf_counter() - started}
  directory.mkdir(parents=True, exist_ok=True)
  with workdir_lib.atomic_file(variables_path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(
        jax.tree.map(np.asarray, jax.device_get(variables))))
  # Written last: it marks a complete save.
  workdir_lib.write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
  return variables, summary


def probe_runs(config, spec: TransferSpec, variables, images, labels,
               target: dict[str, Any]) -> dict[str, Any]:
  """A readout-only cell's convex probe and its features, per seed: the K
  networks `variables` in eval mode give features on their budgets (images
  (K, budget, 784), labels (K, budget)), the validation and the test
  images; on each budget a multinomial logistic regression is solved to
  convergence, its penalty cross-validated on that budget (probe.
  select_and_fit), and scored on the validation and test images. The
  features' effective and numerical rank (last hidden layer) and each
  layer's saturated fraction (sigmoid only) are measured on the validation
  images (target training images outside every budget)."""
  on_budget = _activations_runs(variables, images, spec=spec, shared=False)
  on_validation = _activations_runs(variables, target["validation_images"],
                                    spec=spec, shared=True)
  on_test = _activations_runs(variables, target["test_images"], spec=spec,
                              shared=True)
  on_budget, on_validation, on_test = jax.device_get(
      (on_budget[-1], on_validation, on_test[-1]))
  labels = np.asarray(labels)
  validation_labels = np.asarray(target["validation_labels"])
  test_labels = np.asarray(target["test_labels"])
  classes = len(config.target_classes)
  out = {k: [] for k in ("l2", "cv_log_loss", "train_accuracy",
                         "train_loss", "validation_accuracy",
                         "test_accuracy", "test_loss", "gradient_norm",
                         "iterations", "converged",
                         "least_penalty_train_accuracy",
                         "least_penalty_converged")}
  features = {"effective_rank": [], "numerical_rank": [], "saturated": []}
  for k, seed in enumerate(config.seeds):
    fitted, scores = probe.select_and_fit(
        on_budget[k], labels[k], seed + TRANSFER_SEED_OFFSET,
        grid=tuple(config.transfer.probe_l2_grid),
        folds=config.transfer.probe_folds, num_classes=classes)
    # How much of the budget the features can fit at all: the fit at the
    # grid's smallest penalty (the chosen one trades fit for held-out
    # loss, so its training accuracy is no ceiling).
    with probe.single_threaded_blas():
      least = probe.fit(on_budget[k], labels[k],
                        min(config.transfer.probe_l2_grid), classes,
                        start=fitted)
    for key, value in (
        ("l2", fitted.l2), ("cv_log_loss", scores[fitted.l2]),
        ("train_accuracy", fitted.accuracy(on_budget[k], labels[k])),
        ("train_loss", fitted.mean_log_loss(on_budget[k], labels[k])),
        ("validation_accuracy", fitted.accuracy(on_validation[-1][k],
                                                validation_labels)),
        ("test_accuracy", fitted.accuracy(on_test[k], test_labels)),
        ("test_loss", fitted.mean_log_loss(on_test[k], test_labels)),
        ("gradient_norm", fitted.gradient_norm),
        ("iterations", fitted.iterations), ("converged", fitted.converged),
        ("least_penalty_train_accuracy", least.accuracy(on_budget[k],
                                                        labels[k])),
        ("least_penalty_converged", least.converged)):
      out[key].append(value)
    last = on_validation[-1][k]
    features["effective_rank"].append(probe.effective_rank(last))
    features["numerical_rank"].append(probe.numerical_rank(last))
    features["saturated"].append(
        [probe.saturated_fraction(layer[k]) for layer in on_validation]
        if config.activation == "sigmoid" else None)
  return {"probe": out, "features": features}


def transfer_runs(config, norm: str, variant: str, budget: int, pretrained,
                  target: dict[str, np.ndarray], budgets: np.ndarray,
                  ) -> dict[str, Any]:
  """One (norm, variant, budget) cell: the K seeds' transfer runs, each on
  its labeled subset `budgets` (K, budget) of the target training images;
  returns their accuracies (lists over seeds), and for a readout-only
  variant its convex probe and features (`probe_runs`)."""
  batch = transfer_batch_size(config, budget)
  steps_per_epoch = budget // batch
  spec = make_spec(config, norm=norm, batch_size=batch,
                   steps_per_epoch=steps_per_epoch,
                   num_epochs=-(-config.transfer.steps // steps_per_epoch))
  seeds = jnp.asarray(config.seeds, jnp.int32) + TRANSFER_SEED_OFFSET
  readout_only = variant in READOUT_ONLY
  lr = (config.transfer.readout_learning_rate if readout_only
        else config.transfer.learning_rate)
  images = target["train_images"][budgets]  # (K, budget, 784) uint8
  labels = target["train_labels"][budgets]
  variables = None
  if variant == "scratch":
    states = train.create_sweep_states(spec, seeds,
                                       {"learning_rate": [lr] * len(seeds)})
  else:
    variables = pretrained
    if variant == "recomputed":
      variables = {**pretrained, "batch_stats": _recompute_runs(
          pretrained, images[:, None], spec=spec)}
    elif variant == "recomputed_unlabeled":
      chunk = config.transfer.recompute_chunk
      pool = target["train_images"]
      pool = pool[:pool.shape[0] // chunk * chunk].reshape(-1, chunk,
                                                           pool.shape[-1])
      variables = {**pretrained, "batch_stats": _recompute_shared(
          pretrained, pool, spec=spec)}
    states = _transfer_states(variables, seeds, lr, spec=spec,
                              readout_only=readout_only)
  _, metrics = train_and_test_runs(
      states, images, labels,
      (target["validation_images"], target["validation_labels"]),
      (target["test_images"], target["test_labels"]),
      spec=spec, readout_only=readout_only)
  metrics = jax.device_get(metrics)
  result = {"norm": norm, "variant": variant, "budget": budget,
            "steps": spec.total_steps, "batch_size": batch,
            "learning_rate": lr,
            **{k: [float(v) for v in metrics[k]] for k in
               ("test_accuracy", "test_loss", "validation_accuracy",
                "validation_loss", "train_accuracy", "train_loss")}}
  if readout_only:
    result.update(probe_runs(config, spec, variables, images, labels,
                             target))
  return result


def cells(config) -> list[tuple[str, str, int]]:
  """(norm, variant, budget) of every cell of the study, in order; the
  statistics variants only for BN."""
  return [(norm, variant, budget) for norm in config.norms
          for budget in config.transfer.budgets
          for variant in config.transfer.variants
          if norm == "batch" or variant not in STATISTICS_VARIANTS]


def load_split(config) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                str]:
  """(source, target, origin): the source and the target classes' training
  and test images ((N, 784) uint8) and labels (relabeled 0..C-1)."""
  dataset = data_lib.load_dataset(config.dataset,
                                  data_dir=config.data_dir or None,
                                  source=config.data_source)
  splits = []
  for classes in (config.source_classes, config.target_classes):
    train_images, train_labels = class_subset(
        data_lib.flatten_pixels(dataset.train_images), dataset.train_labels,
        classes)
    test_images, test_labels = class_subset(
        data_lib.flatten_pixels(dataset.test_images), dataset.test_labels,
        classes)
    splits.append({"train_images": train_images,
                   "train_labels": train_labels,
                   "test_images": test_images, "test_labels": test_labels})
  return splits[0], splits[1], dataset.origin


def load_data(config) -> tuple[tuple[dict[str, np.ndarray],
                                     dict[str, np.ndarray]], str]:
  """The study's `load_data`: ((source, target), origin), the class splits
  of `load_split`, the target's validation part held out
  (`hold_out_validation`), checked against the config's batch sizes and
  budgets."""
  source, target, origin = load_split(config)
  num_target = target["train_labels"].shape[0]
  sweep.check(config.transfer.validation_images < num_target,
              "transfer.validation_images",
              config.transfer.validation_images,
              f"leaves none of the {num_target} target training images")
  target = hold_out_validation(target, config.transfer.validation_images,
                               config.transfer.validation_seed)
  validate_data_size(
      config, source["train_images"].shape[0],
      target["train_images"].shape[0],
      np.bincount(target["train_labels"],
                  minlength=len(config.target_classes)))
  logging.info("data: %s from %s; source classes %s: %d train / %d test, "
               "target classes %s: %d train / %d validation / %d test",
               config.dataset, origin, tuple(config.source_classes),
               source["train_images"].shape[0],
               source["test_images"].shape[0],
               tuple(config.target_classes),
               target["train_images"].shape[0],
               target["validation_images"].shape[0],
               target["test_images"].shape[0])
  return (source, target), origin


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`: the transfer study of `context.config` in
  `context.workdir` (bn_lab.runner.run has checked the config and the
  workdir, holds its lock, loaded the data and written config.json; it
  writes results.json from what this returns). Written here:

    pretrained/<norm>.msgpack, <norm>.json  the pretrained networks (all
                         seeds) and their summary: a rerun of the same
                         pretraining loads them

  Returns results.json's study part: every cell's accuracies per seed and
  the pretraining summaries. Raises train.NonFiniteError where
  pretraining diverges.
  """
  # One process: the study neither shards nor splits its writes.
  assert context.writes, "the transfer study runs in one process"
  config, workdir = context.config, context.workdir
  started = time.perf_counter()
  source, target = context.data
  source_data = train.to_device(**source)
  target = {k: jax.device_put(v) for k, v in target.items()}
  budgets = {b: np.stack([labeled_budget(
      np.asarray(target["train_labels"]), b, seed)
      for seed in config.seeds]) for b in config.transfer.budgets}
  all_cells = cells(config)
  pretraining, results = {}, []
  for norm in config.norms:
    pretrained, pretraining[norm] = pretrain(
        config, norm, source_data, workdir / "pretrained")
    for i, (n, variant, budget) in enumerate(all_cells, 1):
      if n != norm:
        continue
      cell_started = time.perf_counter()
      result = transfer_runs(config, norm, variant, budget, pretrained,
                             target, budgets[budget])
      result["time"] = time.perf_counter() - cell_started
      results.append(result)
      acc = result["test_accuracy"]
      logging.info("[%s] %s, budget %d (%d/%d): target test accuracy %.4f "
                   "+- %.4f over %d seeds, %.1f s", norm, variant, budget,
                   i, len(all_cells), np.mean(acc),
                   np.std(acc, ddof=1) if len(acc) > 1 else 0.0, len(acc),
                   result["time"])
  return {
      "study": config.study, "dataset": config.dataset,
      "data_origin": context.origin,
      "source_classes": list(config.source_classes),
      "target_classes": list(config.target_classes),
      "seeds": list(config.seeds), "norms": list(config.norms),
      "budgets": list(config.transfer.budgets),
      "network": {"widths": list(config.widths),
                  "activation": config.activation,
                  "placement": config.placement, **config.bn.to_dict()},
      "pretrain": {"learning_rate": config.pretrain.learning_rate,
                   **{n: {k: v for k, v in s.items() if k != "fields"}
                      for n, s in pretraining.items()}},
      "transfer": {"learning_rate": config.transfer.learning_rate,
                   "readout_learning_rate":
                       config.transfer.readout_learning_rate,
                   "steps": config.transfer.steps,
                   "batch_size": config.transfer.batch_size,
                   "recompute_chunk": config.transfer.recompute_chunk,
                   "validation_seed": config.transfer.validation_seed,
                   "target_train_images": int(
                       target["train_images"].shape[0]),
                   "target_validation_images": int(
                       target["validation_images"].shape[0]),
                   "target_test_images": int(
                       target["test_images"].shape[0]),
                   "probe": {"l2_grid": list(
                                 config.transfer.probe_l2_grid),
                             "folds": config.transfer.probe_folds,
                             "gradient_tolerance": probe.GRADIENT_TOLERANCE,
                             "max_iterations": probe.MAX_ITERATIONS,
                             "saturation": probe.SATURATION}},
      # The study's cells, named "variants" as the GAN study's.
      "variants": results,
      "wall_time": time.perf_counter() - started}
