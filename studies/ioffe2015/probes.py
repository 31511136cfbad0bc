"""What studies measure inside training: the inputs to a hidden activation.

Ioffe & Szegedy (2015), Figure 1(b, c): the 15th, 50th and 85th percentiles
of the input to a typical sigmoid of the last hidden layer, over training,
without and with BN, on a fixed set of test images:

    inputs = train.model_inputs(test_images, spec)  # fixed, (N, 784)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    p = probe(model, variables, inputs)  # (len(QS), units)

"The input to the sigmoid" is the argument of the last hidden layer's
activation (`activation_inputs`), in evaluation mode (running statistics):
  before_activation  the normalization layer's output, BN(W x): what the
                     sigmoid receives.
  none, input        the Dense layer's output, W x + b (with "input", x is
  after_activation   the previous layer's output, normalized where placed).

Every unit of the layer is returned. The figure plots one unit, `FIGURE_UNIT`
(a fixed index rather than a chosen one, so that "typical" is not picked
after the fact; the units of a layer are exchangeable at initialization);
the drift summaries take every unit: `drift` of the median (in units of the
final interquartile range) and `spread_drift` of the p15-p85 spread (as a
log ratio to the final spread), each 0 at the last probe by construction.

All functions are pure jnp: they run under `jax.jit` (the model static, e.g.
through `functools.partial`) and under `jax.vmap` over stacked variables (a
sweep's runs). Nothing here runs unless called: a trainer calls `probe`
every k steps only when the study asks for it.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
import numpy as np

from bn_lab import models
from bn_lab import sweep
from bn_lab import train

# Percentiles the probe takes by default: the figure's 15, 50, 85 and the
# quartiles 25, 75 of the drift summary's interquartile range, so that one
# probe per step serves both.
QS = (15, 25, 50, 75, 85)
FIGURE_QS = (15, 50, 85)
# The unit of the last hidden layer whose percentiles the figure plots.
FIGURE_UNIT = 0


def _last_block(model) -> str:
  widths = getattr(model, "widths", None)
  if widths is None or getattr(model, "placement", None) is None:
    raise ValueError(
        f"model={type(model).__name__}: pass a bn_lab.models classifier "
        "(make_model's MLP or CNN), which has `widths` and `placement`.")
  if not widths:
    raise ValueError(
        f"widths={tuple(widths)}: the model has no hidden layer whose "
        "activation could be probed; give it at least one width.")
  return f"hidden_{len(widths) - 1}"


def activation_inputs(model: nn.Module, variables: Any,
                      images: jax.Array) -> jax.Array:
  """The input to the last hidden layer's activation, per image and unit.

  Runs the model in evaluation mode (`train=False`: the normalization layers
  use their running statistics and no state changes) and captures, with
  flax's `capture_intermediates`, the output of the module whose output the
  activation receives (see the module docstring): the normalization layer
  of the last hidden block for placement "before_activation", its Dense
  layer for every other placement.

  Args:
    model: a bn_lab.models classifier (`make_model`: MLP or CNN); its last
      hidden block is `hidden_{len(widths) - 1}`.
    variables: the model's variables, {"params": ..., "batch_stats": ...}.
    images: the model's float32 inputs (`train.model_inputs`), (N, 784).

  Returns:
    (N, widths[-1]) float32: the activation's argument.
  """
  block = (_last_block(model),)
  normalized = model.placement == "before_activation"

  def captured(module: nn.Module, method_name: str) -> bool:
    # The block's direct children are its Dense layer and, where placed,
    # its normalization layer (bn_lab.models._NormBlock).
    return (method_name == "__call__" and module.path[:-1] == block
            and isinstance(module, nn.Dense) != normalized)

  _, state = model.apply(variables, images, train=False,
                         capture_intermediates=captured,
                         mutable=["intermediates"])
  outputs = [value for path, value in traverse_util.flatten_dict(
      flax.core.unfreeze(state["intermediates"])).items()
             if path[-1] == "__call__"]
  if len(outputs) != 1 or len(outputs[0]) != 1:
    raise ValueError(
        f"Found {sum(len(o) for o in outputs)} calls to the module that "
        f"feeds the activation of block {block[0]!r} (placement "
        f"{model.placement!r}), expected 1; pass a bn_lab.models classifier "
        "whose blocks call each layer once.")
  return outputs[0][0]


def _check_qs(qs: Sequence[float]) -> tuple[float, ...]:
  qs = tuple(qs)
  bad = [q for q in qs if not isinstance(q, numbers.Real) or not 0 <= q <= 100]
  if not qs or bad:
    raise ValueError(f"qs={qs}: give one or more percentiles in [0, 100] as "
                     "Python numbers, e.g. (15, 50, 85).")
  return qs


def percentiles(values: jax.Array, qs: Sequence[float] = QS) -> jax.Array:
  """Percentiles of each unit over the images.

  Args:
    values: (N, units), e.g. `activation_inputs`.
    qs: percentiles in [0, 100].

  Returns:
    (len(qs), units): row i holds percentile qs[i], interpolated linearly
    between order statistics (numpy.percentile's default, "linear").
  """
  qs = _check_qs(qs)
  return jnp.percentile(values, jnp.asarray(qs, jnp.float32), axis=0,
                        method="linear")


def probe(model: nn.Module, variables: Any, images: jax.Array,
          qs: Sequence[float] = QS) -> jax.Array:
  """`percentiles(activation_inputs(model, variables, images), qs)`:
  (len(qs), widths[-1]), the default `QS` serving the figure and `drift`."""
  return percentiles(activation_inputs(model, variables, images), qs)


def drift(p50_series: jax.Array, iqr_end: jax.Array) -> jax.Array:
  """How far the median input of the units is from where it ends, in units
  of its final spread: the median over units of
  |p50(t) - p50(end)| / IQR(end).

  Args:
    p50_series: (T, units), each unit's median input at each probe, the
      last row the end of training.
    iqr_end: (units,), each unit's interquartile range at the end of
      training, p75 - p25 of its inputs over the images.

  Returns:
    (T,): 0 at the end. A unit whose final IQR is 0 contributes inf (nan
    where its median did not move either), which propagates into the
    median rather than being hidden.
  """
  if p50_series.ndim != 2 or iqr_end.shape != p50_series.shape[1:]:
    raise ValueError(
        f"p50_series.shape={p50_series.shape}, iqr_end.shape="
        f"{iqr_end.shape}: pass (T, units) medians and (units,) final "
        "interquartile ranges.")
  distance = jnp.abs(p50_series - p50_series[-1:]) / iqr_end[None, :]
  return jnp.median(distance, axis=1)


def drift_of_probes(series: jax.Array, qs: Sequence[float] = QS,
                    ) -> jax.Array:
  """`drift` of a series of probes: (T, len(qs), units), stacked outputs of
  `probe` with percentiles `qs`, which must include 25, 50 and 75.
  Returns (T,)."""
  qs = _check_qs(qs)
  missing = [q for q in (25, 50, 75) if q not in qs]
  if missing:
    raise ValueError(f"qs={qs} lacks {missing}: drift needs the median and "
                     "the quartiles; probe with qs=QS.")
  at = lambda q: series[:, qs.index(q)]
  return drift(at(50), at(75)[-1] - at(25)[-1])


def spread_drift(low_series: jax.Array, high_series: jax.Array) -> jax.Array:
  """How far the spread of the units' inputs is from where it ends, as a
  factor: the median over units of |ln(spread(t) / spread(end))|, where
  spread = high - low (the figure's p85 - p15). The log makes a spread that
  doubles and one that halves the same distance (ln 2), and it is 0 at the
  end by construction.

  Args:
    low_series, high_series: (T, units), each unit's low and high
      percentile at each probe, the last row the end of training.

  Returns:
    (T,). A unit whose spread is 0 at some probe contributes inf (nan where
    it is 0 at both), which propagates rather than being hidden.
  """
  if low_series.ndim != 2 or high_series.shape != low_series.shape:
    raise ValueError(
        f"low_series.shape={low_series.shape}, high_series.shape="
        f"{high_series.shape}: pass two (T, units) percentile series.")
  spread = high_series - low_series
  return jnp.median(jnp.abs(jnp.log(spread / spread[-1:])), axis=1)


def spread_drift_of_probes(series: jax.Array, qs: Sequence[float] = QS,
                           ) -> jax.Array:
  """`spread_drift` of a series of probes (T, len(qs), units) between the
  figure's outer percentiles, p15 and p85, which qs must include.
  Returns (T,)."""
  qs = _check_qs(qs)
  low, high = FIGURE_QS[0], FIGURE_QS[-1]
  missing = [q for q in (low, high) if q not in qs]
  if missing:
    raise ValueError(f"qs={qs} lacks {missing}: the spread drift reads "
                     f"p{low} and p{high}; probe with qs=QS.")
  return spread_drift(series[:, qs.index(low)], series[:, qs.index(high)])


def early_mean(series: np.ndarray, steps: np.ndarray,
               fraction: float = 0.5) -> np.ndarray:
  """The mean of a drift series over the probes in the first `fraction` of
  training (steps <= fraction x the last step): one number per run, where
  the drift away from the end is not yet shrunk by the end's nearness.

  Args:
    series: (..., T), e.g. one `drift_of_probes` per run stacked.
    steps: (T,), the probes' steps, increasing.
  """
  steps = np.asarray(steps)
  if not 0 < fraction < 1 or series.shape[-1] != steps.size:
    raise ValueError(f"fraction={fraction}, series.shape={series.shape}, "
                     f"steps.shape={steps.shape}: give a fraction in (0, 1) "
                     "and one step per probe.")
  early = steps <= fraction * steps[-1]
  if not early.any():
    raise ValueError(f"no probe at or before {fraction:g} of step "
                     f"{steps[-1]}: probe more often.")
  return np.asarray(series)[..., early].mean(axis=-1)


# ----------------------------------------------------------------------------
# As a trainer measurement (bn_lab.train.Measurement).


def measure_probe(state, images, labels, *, spec) -> dict[str, jax.Array]:
  """`probe` of the run's state on `images` (raw test images, scaled as in
  training), at the step it has reached: {"step", "percentiles"}."""
  del labels
  return {"step": state.step, "percentiles": probe(
      spec.make_model(state.bn_hparams),
      {"params": state.params, "batch_stats": state.batch_stats},
      train.model_inputs(images, spec))}


def probe_row_fields(values, spec) -> dict[str, Any]:
  """A run's probe fields: the steps probed and the percentiles, rounded
  to 6 decimals."""
  del spec
  return {"probe_steps": [int(s) for s in values["step"]],
          "probe_percentiles": np.round(values["percentiles"], 6).tolist()}


def measurements(config) -> tuple[train.Measurement, ...]:
  """The probe config.probe asks for (none with every_steps 0)."""
  if not config.probe.every_steps:
    return ()
  return (train.Measurement(
      "probe", config.probe.every_steps, measure_probe, on="test_images",
      num_images=config.probe.num_images, row_fields=probe_row_fields),)


def check_config(config) -> None:
  """config.probe's fields, and what the probe needs of the model."""
  probe = config.probe
  for field in ("every_steps", "num_images"):
    if not (sweep.is_int(probe[field])
            and probe[field] >= (field == "num_images")):
      raise sweep.ConfigError(
          f"config.probe.{field}={probe[field]!r} must be an integer >= "
          + ("1." if field == "num_images" else "0 (0 turns the probe off)."))
  if not probe.every_steps:
    return
  if not config.widths:
    raise sweep.ConfigError("config.probe.every_steps needs a hidden layer "
                            "to probe: config.widths is empty.")
  for combo in sweep.combinations(config):
    c = combo.config
    if c.model not in ("mlp", "cnn"):
      raise sweep.ConfigError(
          f"config.probe.every_steps does not fit model={c.model!r} "
          f"(combination {combo.name}): the probe reads a feed-forward "
          "model's last hidden block; set it to 0.")
    if c.norm in models.NOISY_NORMS:
      raise sweep.ConfigError(
          f"config.probe.every_steps does not fit norm={c.norm!r}: the "
          "percentile probe reads a block that calls its norm once, and "
          "noisy BN calls BatchNorm inside; set probe.every_steps=0.")
