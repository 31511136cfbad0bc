"""Santurkar et al. (2018)'s measurements as trainer measurements
(`bn_lab.train.Measurement`), and noisy BN registered as a norm.

Internal covariate shift (`measure_ics`) and the loss landscape along the
gradient (`measure_landscape`) are taken on the training batch of every
k-th step, at the state before its update (config.ics.every_steps,
config.landscape.every_steps); the trainer calls them inside the epoch's
scan and writes them to metrics.jsonl as ics_* and landscape_* lists.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from bn_lab import models
from bn_lab import sweep
from bn_lab import train
from studies.why_bn import landscape

# Santurkar et al.'s noisy BN (their Algorithm 1): BN, then a random scale
# and shift redrawn every step (the trainer's "noise" rng stream); its
# noise constants come from config.noisy_bn.
models.register_norm(
    "noisy_batch", landscape.NoisyBN,
    models.NORM_FIELDS["batch"] + tuple(landscape.PAPER_NOISE),
    synced=True, draws_noise=True, config_group="noisy_bn")

LANDSCAPE_FIELDS = ("losses", "grad_changes", "beta_smoothness", "loss",
                    "grad_norm")


def _step_loss(state: train.TrainState, images, labels,
               spec: train.TrainSpec):
  """(model, the loss `train_step` differentiates at this state and batch,
  as a function of the parameters: same noise draw, statistics held)."""
  model = spec.make_model(state.bn_hparams)
  return model, landscape.training_loss(
      model, state.batch_stats, train.model_inputs(images, spec), labels,
      rngs=train.noise_rngs(state, spec))


def measure_ics(state: train.TrainState, images, labels, *,
                spec: train.TrainSpec) -> dict[str, jax.Array]:
  """Internal covariate shift (Santurkar et al. 2018, Definition 2.1) of
  the step `train_step(state, images, labels)` would take: per layer
  (`landscape.classifier_layers`, bottom to top), its gradient before and
  after the layers below take this step's update, the one the optimizer
  makes of this gradient and state (`landscape.internal_covariate_shift`).

  Returns {"step": updates taken before, "l2", "cosine", "grad_norm":
  (layers,) each}. The state is not changed.
  """
  model, loss_fn = _step_loss(state, images, labels, spec)
  grads = jax.grad(loss_fn)(state.params)
  updates, _ = train.make_optimizer(spec).update(grads, state.opt_state,
                                                 state.params)
  shift = landscape.internal_covariate_shift(
      loss_fn, state.params, updates, landscape.classifier_layers(model))
  return {"step": state.step, **shift._asdict()}


def landscape_step_sizes(state: train.TrainState, num_steps: int,
                         step_factors: tuple[float, float]) -> jax.Array:
  """The landscape's step sizes: `num_steps` points over `step_factors` x
  the run's (base, unscheduled) learning rate; steps along the raw
  gradient, as SGD's."""
  learning_rate = optax.tree_utils.tree_get(state.opt_state, "learning_rate")
  return landscape.step_sizes(learning_rate, num_steps, tuple(step_factors))


def measure_landscape(state: train.TrainState, images, labels, *,
                      spec: train.TrainSpec, num_steps: int = 8,
                      step_factors: tuple[float, float] = (
                          landscape.PAPER_STEP_FACTORS),
                      ) -> dict[str, jax.Array]:
  """The loss landscape along this step's gradient (Santurkar et al.,
  Sec. 3.2, Fig. 4; `landscape.gradient_landscape`) at the step sizes
  `landscape_step_sizes`.

  Returns {"step": updates taken before, "step_sizes": (k,), and
  `LANDSCAPE_FIELDS`: per step size the loss and the gradient's l2
  change ((k,) each), the effective beta-smoothness, the loss and the
  gradient's norm at the state}. The state is not changed.
  """
  _, loss_fn = _step_loss(state, images, labels, spec)
  etas = landscape_step_sizes(state, num_steps, step_factors)
  found = landscape.gradient_landscape(loss_fn, state.params, etas)._asdict()
  return {"step": state.step, "step_sizes": etas,
          **{k: found[k] for k in LANDSCAPE_FIELDS}}


def ics_row_fields(values: dict[str, Any],
                   spec: train.TrainSpec) -> dict[str, Any]:
  """A run's ICS fields, with "ics_layers" naming the arrays' last axis."""
  return {**train.measurement_fields("ics", values),
          "ics_layers": list(landscape.classifier_layers(
              spec.make_model({})))}


def landscape_row_fields(values: dict[str, Any],
                         spec: train.TrainSpec) -> dict[str, Any]:
  """A run's landscape fields; the step-size grid once (the same at every
  measurement of the epoch)."""
  del spec
  fields = train.measurement_fields(
      "landscape", {k: v for k, v in values.items() if k != "step_sizes"})
  fields["landscape_step_sizes"] = train.significant(
      np.asarray(values["step_sizes"])[0])
  return fields


def measurements(config) -> tuple[train.Measurement, ...]:
  """The measurements config.ics and config.landscape ask for."""
  found = []
  if config.ics.every_steps:
    found.append(train.Measurement("ics", config.ics.every_steps,
                                   measure_ics, row_fields=ics_row_fields))
  if config.landscape.every_steps:
    found.append(train.Measurement(
        "landscape", config.landscape.every_steps, measure_landscape,
        options=(("num_steps", config.landscape.num_step_sizes),
                 ("step_factors", tuple(config.landscape.step_factors))),
        row_fields=landscape_row_fields))
  return tuple(found)


def check_config(config) -> None:
  """config.ics, config.landscape and config.noisy_bn (Santurkar et al.),
  and what the measurements need of each combination."""
  for field in ("ics.every_steps", "landscape.every_steps"):
    value = sweep.get_dotted(config, field)
    if not (sweep.is_int(value) and value >= 0):
      raise sweep.ConfigError(f"config.{field}={value!r} must be an integer "
                              ">= 0 (0 turns the measurement off).")
  factors = config.landscape.step_factors
  if not (isinstance(factors, (tuple, list)) and len(factors) == 2
          and all(sweep.is_number(f) for f in factors)
          and 0 < factors[0] <= factors[1]):
    raise sweep.ConfigError(
        f"config.landscape.step_factors={factors!r} must be (low, high) "
        "with 0 < low <= high, e.g. the paper's (0.5, 4.0) (times the "
        "learning rate).")
  num = config.landscape.num_step_sizes
  if not (sweep.is_int(num) and num > 0):
    raise sweep.ConfigError(f"config.landscape.num_step_sizes={num!r} must "
                            "be a positive integer.")
  for name in landscape.PAPER_NOISE:
    value, low = config.noisy_bn[name], 1.0 if name == "n_sigma" else 0.0
    if not (sweep.is_number(value) and value >= low):
      raise sweep.ConfigError(
          f"config.noisy_bn.{name}={value!r} must be a number >= {low:g} "
          "(Santurkar et al.'s Algorithm 1).")
  for field in ("ics.every_steps", "landscape.every_steps"):
    if not sweep.get_dotted(config, field):
      continue
    for combo in sweep.combinations(config):
      if combo.config.model not in models.MODELS:
        raise sweep.ConfigError(
            f"config.{field} does not fit model={combo.config.model!r}: it "
            "reads the layers of a feed-forward classifier "
            f"({', '.join(models.MODELS)}); set it to 0.")
