"""Exact conversion of BN weights and statistics: PyTorch, Keras 3, bn_jax.

The calls a user makes (arrays are numpy; the library imports neither torch
nor keras):

    from bn_jax import convert

    # PyTorch -> bn_jax: the layer's state_dict, its momentum and eps.
    sd = {k: v.numpy() for k, v in torch_bn.state_dict().items()}
    variables, options, report = convert.from_torch(sd, momentum=0.1,
                                                    eps=1e-5)
    y = bn_jax.nn.BatchNorm(**options).apply(variables, x,
                                             use_running_average=True)

    # bn_jax -> PyTorch: a state_dict and BatchNorm2d's keyword arguments.
    sd, torch_kwargs, report = convert.to_torch(variables, options)
    torch_bn = torch.nn.BatchNorm2d(**torch_kwargs)
    torch_bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})

    # Keras 3 <-> bn_jax: a built layer (or its weights by name and config).
    variables, options, report = convert.from_keras(keras_bn)
    weights, keras_kwargs, report = convert.to_keras(variables, options)
    keras_bn = keras.layers.BatchNormalization(**keras_kwargs)
    convert.load_keras(keras_bn, weights, input_shape=x.shape)

    # Whole models (dotted prefixes <-> nested flax trees), and the report.
    variables, options, report = convert.from_torch_model(model_sd)
    print(convert.report_markdown(report))

Every conversion (from_* and to_*) returns a `Conversion(variables,
options, report)`: the target's variables, the target's layer options
(bn_jax: keyword arguments of `bn_jax.nn.BatchNorm` and
`bn_jax.nnx.BatchNorm`; PyTorch: of `torch.nn.BatchNorm*d`; Keras: of
`keras.layers.BatchNormalization`), and the report: one line per thing
that does not map exactly, as "layer: item: what differs". Nothing is
dropped without a line.

Conventions (what makes outputs and future updates identical):
  * momentum: PyTorch's p weighs the new batch, bn_jax's and Keras's m the
    old value: m = 1 - p. PyTorch's momentum=None (cumulative average with
    weight 1 / num_batches_tracked) is bn_jax's momentum=None with `count`
    = num_batches_tracked; Keras has no cumulative average.
  * running variance: PyTorch stores and evaluates with the UNBIASED
    variance, so PyTorch layers convert to `unbiased_running_var=True`
    with running_var as `var` unchanged: the same eval outputs and the same
    updates. Keras and bn_jax's default store the biased one.
  * epsilon: the source's (PyTorch 1e-5, Keras 1e-3 by default).
  * affine=False (PyTorch), center/scale=False (Keras) are
    use_bias/use_scale=False.
  * Keras renorm: bn_jax derives Keras's `moving_stddev` from the variance,
    sqrt(var + epsilon), and an absent `rmin` means 1 / rmax in bn_jax but
    no lower limit in Keras, so it is written out both ways.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from bn_jax import core
from bn_jax import nn as bn_nn
from bn_jax import nnx as bn_nnx

TORCH_KEYS = ("weight", "bias", "running_mean", "running_var",
              "num_batches_tracked")
KERAS_KEYS = ("gamma", "beta", "moving_mean", "moving_variance",
              "moving_stddev", "renorm_mean", "renorm_stddev")
PARAM_NAMES = ("scale", "bias")
STAT_NAMES = ("mean", "var", "count", "renorm_mean", "renorm_stddev")
# PyTorch's and Keras's constructor defaults, used where the caller gives
# none.
TORCH_MOMENTUM, TORCH_EPS = 0.1, 1e-5
KERAS_DEFAULTS = {"axis": -1, "momentum": 0.99, "epsilon": 1e-3,
                  "center": True, "scale": True, "renorm": False,
                  "renorm_clipping": None, "renorm_momentum": 0.99,
                  "synchronized": False}
# Keras settings that are no part of BN's state or computation but change
# training; each one that is set gets a report line.
KERAS_EXTRAS = ("beta_regularizer", "gamma_regularizer", "beta_constraint",
                "gamma_constraint")
INT32_MAX = int(np.iinfo(np.int32).max)


class Conversion(NamedTuple):
  """What every conversion returns.

  Attributes:
    variables: the target's variables: flax `{"params": ..., "batch_stats":
      ...}` (nested for whole models), a PyTorch state_dict, or Keras
      weights by variable name; numpy arrays.
    options: the target layer's keyword arguments (for whole models, one
      dict per layer, keyed by its flax path or PyTorch prefix).
    report: one-line strings "layer: item: what differs", one for each
      thing that does not map exactly; `report_markdown` makes a table.
  """
  variables: dict[str, Any]
  options: dict[Any, Any]
  report: list[str]


def _option_defaults() -> dict[str, Any]:
  """bn_jax.nn.BatchNorm's attributes with their defaults, and the
  arguments only bn_jax.nnx.BatchNorm has: every option a converted layer
  may carry (read from the modules, so that new options are known)."""
  defaults = {f.name: f.default for f in dataclasses.fields(bn_nn.BatchNorm)
              if f.name not in ("parent", "name")}
  for name, parameter in inspect.signature(
      bn_nnx.BatchNorm.__init__).parameters.items():
    if name not in ("self", "num_features", "rngs"):
      defaults.setdefault(name, parameter.default)
  return defaults


# Options that change no number a conversion is about (how the values are
# computed or initialized, or call-time choices).
_NO_EFFECT = ("use_running_average", "stats_method", "grad", "impl",
              "use_fast_variance", "force_float32_reductions", "bias_init",
              "scale_init", "promote_dtype", "bias_metadata",
              "scale_metadata", "param_dtype", "axis_index_groups",
              "stats_sampling", "renorm_clipping", "renorm_momentum")


# ----------------------------------------------------------------------------
# Small pieces shared by every direction.


def _line(where: str, item: str, detail: str) -> str:
  return f"{where}: {item}: {detail}"


def _complement(momentum: float) -> float:
  # 1 - 0.1 is 0.9 but 1 - 0.9 is 0.09999999999999998: 15 significant
  # digits keep every decimal momentum exact across a round trip, far below
  # the float32 resolution in which all three frameworks update.
  return float(f"{1.0 - float(momentum):.15g}")


def _check_momentum(momentum, name: str, where: str, hint: str,
                    allow_none: bool) -> None:
  if momentum is None and allow_none:
    return
  if (momentum is None or isinstance(momentum, bool)
      or not isinstance(momentum, (int, float, np.floating, np.integer))
      or not 0.0 <= float(momentum) <= 1.0):
    raise ValueError(f"{where}: {name}={momentum!r} is outside [0, 1]; "
                     f"{hint}")


def _check_epsilon(epsilon, name: str, where: str) -> None:
  problem = core.epsilon_problem(epsilon)
  if problem is not None or isinstance(epsilon, bool) or not isinstance(
      epsilon, (int, float, np.floating)):
    raise ValueError(f"{where}: {name}={epsilon!r} "
                     f"{problem or 'must be a positive number'}; pass the "
                     "layer's own epsilon.")


def _is_float(dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _float_array(value, key: str, where: str) -> np.ndarray:
  array = np.asarray(value)
  if not _is_float(array.dtype):
    raise ValueError(f"{where}: {key} has dtype {array.dtype}; BN weights "
                     "and statistics are floating point (is it the right "
                     "entry?).")
  return array


def _narrow(array: np.ndarray, key: str, where: str, report: list[str],
            keep_narrow: bool) -> np.ndarray:
  """`array` as float32 (statistics), or in its own dtype where that is at
  most 32 bits and `keep_narrow` (params); a wider one is narrowed, with a
  report line, as JAX computes in float32 unless x64 is enabled."""
  if keep_narrow and np.dtype(array.dtype).itemsize <= 4:
    return array
  narrowed = array.astype(np.float32)
  if np.dtype(array.dtype).itemsize > 4:
    wide = array.astype(np.float64)
    change = float(np.max(np.abs(narrowed - wide) / np.maximum(
        np.abs(wide), np.finfo(np.float32).tiny), initial=0.0))
    report.append(_line(where, key, (
        f"{array.dtype} narrowed to float32 (relative change up to "
        f"{change:.1e})")))
  return narrowed


def _feature_count(arrays: Mapping[str, np.ndarray], where: str) -> int:
  """The one length that all per-feature arrays share; anything else is a
  shape error naming the two arrays."""
  (first, first_array), *rest = arrays.items()
  for key, array in arrays.items():
    if array.ndim != 1:
      raise ValueError(
          f"{where}: {key} has shape {array.shape}; PyTorch and Keras BN "
          "keep one value per channel (1-D): for several feature axes, "
          "reshape to one channel axis first.")
  for key, array in rest:
    if array.shape != first_array.shape:
      raise ValueError(
          f"{where}: {key} has shape {array.shape} but {first} has "
          f"{first_array.shape}; all entries of one BN layer have one value "
          "per channel: check the prefix or the checkpoint.")
  return first_array.shape[0]


def _count(value, key: str, where: str) -> int:
  array = np.asarray(value)
  if array.size != 1 or not jnp.issubdtype(array.dtype, jnp.integer):
    raise ValueError(f"{where}: {key} has shape {array.shape} and dtype "
                     f"{array.dtype}; it is an integer scalar (updates so "
                     "far).")
  count = int(array.reshape(()))
  if not 0 <= count <= INT32_MAX:
    raise ValueError(f"{where}: {key}={count} is outside bn_jax's int32 "
                     f"count [0, {INT32_MAX}]; pass a count in that range.")
  return count


def _bn_jax_options(options: Mapping[str, Any] | None, where: str
                    ) -> dict[str, Any]:
  """`options` over bn_jax.nn.BatchNorm's defaults; unknown names are an
  error (a typo would otherwise convert with a default)."""
  defaults = _option_defaults()
  options = dict(options or {})
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ValueError(f"{where}: options {unknown} are no bn_jax BatchNorm "
                     "arguments; pass the kwargs of bn_jax.nn.BatchNorm.")
  merged = {**defaults, **options}
  _check_momentum(merged["momentum"], "momentum", where,
                  "bn_jax's momentum weighs the old value (flax's "
                  "convention), or None for a cumulative average.", True)
  _check_epsilon(merged["epsilon"], "epsilon", where)
  if merged["renorm"]:
    _check_momentum(merged["renorm_momentum"], "renorm_momentum", where,
                    "it weighs the old renorm statistics.", False)
  return merged


def _split_flax(variables: Mapping[str, Any], where: str
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(params, batch_stats) of one bn_jax layer, from flax variables
  {"params": ..., "batch_stats": ...} or one flat dict (an nnx layer's
  `nnx.to_pure_dict(nnx.state(layer))`)."""
  if "params" in variables or "batch_stats" in variables:
    extra = sorted(set(variables) - {"params", "batch_stats"})
    if extra:
      raise ValueError(f"{where}: variables have collections {extra}; pass "
                       "only params and batch_stats.")
    params = dict(variables.get("params", {}))
    stats = dict(variables.get("batch_stats", {}))
  else:
    params = {k: v for k, v in variables.items() if k in PARAM_NAMES}
    stats = {k: v for k, v in variables.items() if k not in PARAM_NAMES}
  unknown = sorted(set(params) - set(PARAM_NAMES))
  if unknown:
    raise ValueError(f"{where}: params {unknown} are no BN params (scale, "
                     "bias); pass one BN layer's variables.")
  for key in ("mean", "var"):
    if key not in stats:
      raise ValueError(f"{where}: batch_stats have no {key!r}; pass the "
                       "layer's variables including its batch_stats.")
  return ({k: np.asarray(v) for k, v in params.items()},
          {k: np.asarray(v) for k, v in stats.items()})


def _unmapped_stats(stats: Mapping[str, np.ndarray], where: str,
                    target: str, renorm: bool) -> list[str]:
  """A line for each batch stat that no conversion knows (a newer bn_jax
  option's), and for renorm statistics of a layer whose options say
  renorm=False, as they are left out."""
  lines = [_line(where, f"batch_stats {name!r}",
                 f"no {target} counterpart; left out")
           for name in sorted(set(stats) - set(STAT_NAMES))]
  if not renorm:
    lines += [_line(where, f"batch_stats {name!r}", (
        "the options say renorm=False, so it is left out; pass the "
        "layer's options with renorm=True if it renormalizes"))
              for name in ("renorm_mean", "renorm_stddev") if name in stats]
  return lines


def _unmapped_options(opts: Mapping[str, Any], where: str, target: str,
                      mapped: Sequence[str]) -> list[str]:
  """Report lines for the bn_jax options that `target` cannot express:
  known ones with what differs, and any other non-default one."""
  lines = []
  if opts["axis_name"] is not None:
    sync = ("torch.nn.SyncBatchNorm (convert_sync_batchnorm)"
            if target == "PyTorch" else
            "synchronized=True, TensorFlow backend only")
    lines.append(_line(where, f"axis_name={opts['axis_name']!r}", (
        f"statistics synchronized over a named axis: in {target} that is "
        f"{sync}; not mapped")))
  if opts["virtual_batch_size"] is not None:
    lines.append(_line(where, "virtual_batch_size", (
        f"ghost batches of {opts['virtual_batch_size']}: {target} has none; "
        "training outputs and updates differ, eval is the same")))
  for name in ("stats_fraction", "stats_examples"):
    if opts[name] is not None:
      lines.append(_line(where, name, (
          f"sampled statistics ({name}={opts[name]}): {target} reads the "
          "whole batch; training outputs and updates differ, eval is the "
          "same")))
  if opts["dtype"] is not None:
    lines.append(_line(where, f"dtype={opts['dtype']}", (
        f"bn_jax returns y in this dtype; {target} in its own compute "
        "dtype: outputs round differently")))
  defaults = _option_defaults()
  handled = set(mapped) | set(_NO_EFFECT) | {
      "axis_name", "virtual_batch_size", "stats_fraction", "stats_examples",
      "dtype", "renorm_schedule"}
  for name in sorted(set(opts) - handled):
    if opts[name] != defaults[name]:
      lines.append(_line(where, f"{name}={opts[name]!r}",
                         f"no {target} counterpart; not mapped"))
  return lines


# ----------------------------------------------------------------------------
# PyTorch, one layer.


def _torch_where(prefix: str) -> str:
  return prefix.rstrip(".") or "(layer)"


def _layer_from_torch(entries: Mapping[str, Any], prefix: str, momentum,
                      eps, axis) -> tuple[dict, dict, dict, list[str]]:
  """(params, batch_stats, options, report) of one BN layer from its
  state_dict entries (keys without the prefix)."""
  where = _torch_where(prefix)
  _check_momentum(momentum, "momentum", where,
                  "PyTorch's momentum is the weight of the new batch "
                  "(default 0.1), or None for a cumulative average: pass "
                  "the layer's own.", True)
  _check_epsilon(eps, "eps", where)
  unknown = sorted(set(entries) - set(TORCH_KEYS))
  if unknown:
    raise ValueError(
        f"{where}: {[prefix + k for k in unknown]} are no BatchNorm "
        f"entries (it has {TORCH_KEYS}); check the prefix.")
  for pair in (("weight", "bias"), ("running_mean", "running_var")):
    present = [k for k in pair if k in entries]
    if len(present) == 1:
      missing, = set(pair) - set(present)
      raise ValueError(
          f"{where}: the state_dict has {prefix + present[0]!r} but no "
          f"{prefix + missing!r}; pass the BatchNorm's whole state_dict.")
  per_channel = {prefix + k: _float_array(entries[k], prefix + k, where)
                 for k in TORCH_KEYS[:4] if k in entries}
  if not per_channel:
    raise ValueError(
        f"{where}: no BatchNorm entries under prefix {prefix!r} (a layer "
        "with affine=False and track_running_stats=False has no state to "
        "convert); check the prefix.")
  features = _feature_count(per_channel, where)
  report: list[str] = []
  affine = "weight" in entries
  params = {}
  if affine:
    params = {"scale": _narrow(per_channel[prefix + "weight"],
                               prefix + "weight", where, report, True),
              "bias": _narrow(per_channel[prefix + "bias"], prefix + "bias",
                              where, report, True)}
  tracks = "running_mean" in entries
  if tracks:
    stats = {"mean": _narrow(per_channel[prefix + "running_mean"],
                             prefix + "running_mean", where, report, False),
             "var": _narrow(per_channel[prefix + "running_var"],
                            prefix + "running_var", where, report, False)}
  else:
    stats = {"mean": np.zeros(features, np.float32),
             "var": np.ones(features, np.float32)}
    report.append(_line(where, "track_running_stats=False", (
        "PyTorch normalizes with the batch's statistics in eval mode too; "
        "bn_jax evaluates with running statistics (here fresh: mean 0, var "
        "1): for PyTorch's eval outputs call the bn_jax layer in training "
        "mode with batch_stats immutable, which updates nothing")))
  key = prefix + "num_batches_tracked"
  count = (_count(entries["num_batches_tracked"], key, where)
           if "num_batches_tracked" in entries else None)
  if momentum is None and tracks:
    if count is None:
      raise ValueError(
          f"{where}: momentum=None (a cumulative average) weighs the next "
          f"batch by 1 / (updates + 1), but the state_dict has no {key!r}; "
          "pass the layer's whole state_dict.")
    stats["count"] = np.asarray(count, np.int32)
  elif count:
    report.append(_line(where, key, (
        f"{count} updates not kept: bn_jax keeps a count only where the "
        f"layer reads it (momentum=None, a renorm schedule, random sampled "
        f"statistics), and momentum={momentum} reads none")))
  options = {
      "axis": axis,
      "momentum": None if momentum is None else _complement(momentum),
      "epsilon": float(eps),
      "use_scale": affine,
      "use_bias": affine,
      # PyTorch stores (and evaluates with) the unbiased variance, and
      # updates it with the unbiased batch variance: bn_jax's
      # unbiased_running_var=True does both, so the running_var is kept
      # as it is and future updates agree.
      "unbiased_running_var": True,
  }
  if affine and params["scale"].dtype != np.float32:
    options["param_dtype"] = params["scale"].dtype
  return params, stats, options, report


def _flax_variables(params: dict, stats: dict) -> dict[str, Any]:
  # A layer without scale and bias has no params collection in flax.
  return {**({"params": params} if params else {}), "batch_stats": stats}


def _normalized_prefix(prefix: str) -> str:
  return prefix + "." if prefix and not prefix.endswith(".") else prefix


def from_torch(state_dict: Mapping[str, Any], *, prefix: str = "",
               momentum: float | None = TORCH_MOMENTUM,
               eps: float = TORCH_EPS, axis: Any = 1) -> Conversion:
  """One PyTorch BatchNorm1d/2d/3d's state_dict as bn_jax variables.

  Args:
    state_dict: `weight`, `bias` (absent with affine=False),
      `running_mean`, `running_var` (absent with
      track_running_stats=False), `num_batches_tracked`: numpy arrays (or
      anything `np.asarray` reads, such as CPU tensors).
    prefix: the layer's prefix in a model's state_dict ("layer1.0.bn1");
      other keys are ignored.
    momentum, eps: the layer's (`bn.momentum`, `bn.eps`); PyTorch's
      defaults 0.1 and 1e-5.
    axis: the bn_jax feature axis: 1 (default) takes PyTorch's channels-
      first x as it is; -1 for a channels-last flax model.

  Returns:
    Conversion(variables={"params": {"scale", "bias"}, "batch_stats":
    {"mean", "var"[, "count"]}}, options=kwargs of bn_jax.nn.BatchNorm /
    bn_jax.nnx.BatchNorm, report).
  """
  prefix = _normalized_prefix(prefix)
  entries = {k[len(prefix):]: v for k, v in state_dict.items()
             if k.startswith(prefix)}
  params, stats, options, report = _layer_from_torch(
      entries, prefix, momentum, eps, axis)
  return Conversion(_flax_variables(params, stats), options, report)


def _layer_to_torch(params: dict, stats: dict, opts: dict, prefix: str
                    ) -> tuple[dict, dict, list[str]]:
  """(state_dict entries, torch kwargs, report) of one bn_jax layer."""
  where = _torch_where(prefix)
  arrays = {f"{prefix}{k}": _float_array(v, k, where)
            for k, v in {**params, **stats}.items()
            if k in PARAM_NAMES or (k in STAT_NAMES and k != "count")}
  features = _feature_count(arrays, where)
  report = _unmapped_stats(stats, where, "PyTorch",
                           bool(opts["renorm"]))
  state_dict = {}
  if params:
    # PyTorch's affine has both or neither; the missing one is written
    # as its identity, which gives the same outputs.
    for name, torch_name, identity in (("scale", "weight", np.ones),
                                       ("bias", "bias", np.zeros)):
      if name in params:
        state_dict[prefix + torch_name] = params[name]
      else:
        state_dict[prefix + torch_name] = identity(
            features, params[next(iter(params))].dtype)
        report.append(_line(where, f"use_{name}=False", (
            f"PyTorch's affine has weight and bias: {torch_name} written "
            f"as {identity.__name__}, the same outputs, but PyTorch trains "
            "it")))
  state_dict[prefix + "running_mean"] = stats["mean"].astype(np.float32)
  state_dict[prefix + "running_var"] = stats["var"].astype(np.float32)
  if opts["momentum"] is None and "count" not in stats:
    raise ValueError(f"{where}: momentum=None (a cumulative average) needs "
                     "the batch_stats' 'count'; pass the layer's whole "
                     "batch_stats.")
  # Without a count (momentum not None), PyTorch never reads its
  # num_batches_tracked: 0 loses nothing.
  count = _count(stats["count"], "count", where) if "count" in stats else 0
  state_dict[prefix + "num_batches_tracked"] = np.asarray(count, np.int64)
  report += _torch_option_lines(opts, where)
  kwargs = {"num_features": features, "eps": float(opts["epsilon"]),
            "momentum": (None if opts["momentum"] is None
                         else _complement(opts["momentum"])),
            "affine": bool(params), "track_running_stats": True}
  return state_dict, kwargs, report


def _torch_option_lines(opts: Mapping[str, Any], where: str) -> list[str]:
  lines = []
  if tuple(np.atleast_1d(opts["axis"])) != (1,):
    lines.append(_line(where, f"axis={opts['axis']}", (
        "PyTorch's BatchNorm normalizes dim 1 (channels first): for x of "
        "more than 2 dims move the features there; the weights are the "
        "same")))
  if not opts["unbiased_running_var"]:
    lines.append(_line(where, "unbiased_running_var=False", (
        "bn_jax stores the biased variance, PyTorch updates running_var "
        "with the unbiased one (x m/(m-1)): eval outputs are the same now, "
        "the running variance after further PyTorch updates is larger")))
  if opts["renorm"]:
    lines.append(_line(where, "renorm=True", (
        "PyTorch has no batch renormalization: renorm_mean and "
        "renorm_stddev left out; training outputs differ, eval is the "
        "same")))
  mapped = ("axis", "momentum", "epsilon", "use_bias", "use_scale",
            "unbiased_running_var", "renorm")
  return lines + _unmapped_options(opts, where, "PyTorch", mapped)


def to_torch(variables: Mapping[str, Any],
             options: Mapping[str, Any] | None = None, *,
             prefix: str = "") -> Conversion:
  """One bn_jax BatchNorm's variables as a PyTorch state_dict.

  Args:
    variables: flax variables {"params": ..., "batch_stats": ...} of one
      layer, or an nnx layer's flat `nnx.to_pure_dict(nnx.state(layer))`.
    options: the layer's kwargs (bn_jax.nn.BatchNorm's; absent ones take
      its defaults).
    prefix: put before every key ("layer1.0.bn1.").

  Returns:
    Conversion(variables=a state_dict of numpy arrays (load it with
    `{k: torch.from_numpy(v)}`), options=kwargs of torch.nn.BatchNorm*d
    (num_features, eps, momentum, affine, track_running_stats), report).
    Exact (outputs and future updates) with unbiased_running_var=True;
    the report says what is not.
  """
  prefix = _normalized_prefix(prefix)
  where = _torch_where(prefix)
  opts = _bn_jax_options(options, where)
  params, stats = _split_flax(variables, where)
  state_dict, kwargs, report = _layer_to_torch(params, stats, opts, prefix)
  return Conversion(state_dict, kwargs, report)


# ----------------------------------------------------------------------------
# Keras 3, one layer.


def _keras_source(source, config) -> tuple[dict, Mapping | None]:
  """(weights by variable name, config) of a built Keras layer (read by
  duck typing: keras is not imported) or of a Mapping of weights."""
  if hasattr(source, "variables") and hasattr(source, "get_config"):
    if not source.variables:
      raise ValueError("the Keras layer has no variables yet; build it "
                       "(layer.build(input_shape)) or call it once first.")
    weights = {v.path.split("/")[-1]: np.asarray(v) for v in source.variables}
    return weights, source.get_config() if config is None else config
  # Full paths ("model/bn/gamma") are accepted as well as bare names.
  return ({str(k).split("/")[-1]: np.asarray(v) for k, v in source.items()},
          config)


def _keras_config(weights: Mapping[str, np.ndarray], config, where: str
                  ) -> tuple[dict[str, Any], list[str]]:
  """Keras's settings over its defaults; without a config, what the
  weights show (center, scale, renorm) and the defaults, reported."""
  report = []
  if config is None:
    config = {"center": "beta" in weights, "scale": "gamma" in weights,
              "renorm": "moving_stddev" in weights}
    report.append(_line(where, "config", (
        "none given: Keras's defaults assumed (axis -1, momentum 0.99, "
        "epsilon 0.001, renorm_momentum 0.99, no clipping); pass "
        "layer.get_config()")))
  settings = {**KERAS_DEFAULTS,
              **{k: config[k] for k in KERAS_DEFAULTS if k in config}}
  if settings["synchronized"]:
    report.append(_line(where, "synchronized=True", (
        "Keras synchronizes statistics across replicas (TensorFlow "
        "only); not mapped: in bn_jax pass axis_name=... under pmap, "
        "shard_map or a named vmap")))
  if not config.get("trainable", True):
    report.append(_line(where, "trainable=False", (
        "Keras runs a frozen BN in inference mode even with training=True; "
        "bn_jax follows use_running_average: pass True")))
  dtype = config.get("dtype")
  name = (dtype.get("config", {}).get("name") if isinstance(dtype, Mapping)
          else dtype)
  if name not in (None, "float32"):
    report.append(_line(where, f"dtype policy {name}", (
        "Keras normalizes in float32 and returns y in the policy's compute "
        "dtype; not mapped (bn_jax's dtype= rounds at other points)")))
  for extra in KERAS_EXTRAS:
    if config.get(extra) is not None:
      report.append(_line(where, extra, (
          "changes training, but is no part of BN's state or computation: "
          "not mapped; add it to the loss (regularizer) or apply it after "
          "each step (constraint)")))
  return settings, report


def _keras_clipping_to_bn_jax(clipping) -> dict[str, float]:
  clipping = {k: float(v) for k, v in dict(clipping or {}).items()
              if v is not None}
  # Keras has no lower limit for an absent rmin, bn_jax takes 1 / rmax.
  if "rmax" in clipping and "rmin" not in clipping:
    clipping["rmin"] = 0.0
  return clipping


def from_keras(layer_or_weights, config: Mapping[str, Any] | None = None,
               ) -> Conversion:
  """A Keras 3 BatchNormalization's variables as bn_jax variables.

  Args:
    layer_or_weights: a built `keras.layers.BatchNormalization`, or its
      weights by variable name (gamma, beta, moving_mean, moving_variance;
      with renorm also moving_stddev, renorm_mean, renorm_stddev) as arrays.
    config: `layer.get_config()` (read from the layer if not given). With
      weights and no config, Keras's defaults are assumed and reported.

  Returns:
    Conversion(variables={"params": {"scale", "bias"}, "batch_stats":
    {"mean", "var"[, "renorm_mean", "renorm_stddev"]}}, options=kwargs of
    bn_jax.nn.BatchNorm / bn_jax.nnx.BatchNorm, report).
  """
  weights, config = _keras_source(layer_or_weights, config)
  where = str((config or {}).get("name") or "(layer)")
  settings, report = _keras_config(weights, config, where)
  _check_momentum(settings["momentum"], "momentum", where,
                  "Keras's momentum weighs the old value (default 0.99).",
                  False)
  _check_epsilon(settings["epsilon"], "epsilon", where)
  renorm = bool(settings["renorm"])
  if renorm:
    _check_momentum(settings["renorm_momentum"], "renorm_momentum", where,
                    "it weighs the old renorm statistics (default 0.99).",
                    False)
  expected = ["moving_mean", "moving_variance"]
  expected += ["gamma"] if settings["scale"] else []
  expected += ["beta"] if settings["center"] else []
  expected += list(KERAS_KEYS[4:]) if renorm else []
  missing = [k for k in expected if k not in weights]
  extra = sorted(set(weights) - set(expected))
  if missing:
    raise ValueError(
        f"{where}: the Keras weights have no {missing} (config: scale="
        f"{settings['scale']}, center={settings['center']}, renorm="
        f"{renorm}); pass every variable of the layer.")
  if extra:
    raise ValueError(
        f"{where}: the Keras weights have {extra}, which the config (scale="
        f"{settings['scale']}, center={settings['center']}, renorm="
        f"{renorm}) does not create; pass the layer's own config.")
  arrays = {k: _float_array(weights[k], k, where) for k in expected}
  _feature_count(arrays, where)
  narrow = lambda k, keep: _narrow(arrays[k], k, where, report, keep)
  params = {}
  if settings["scale"]:
    params["scale"] = narrow("gamma", True)
  if settings["center"]:
    params["bias"] = narrow("beta", True)
  stats = {"mean": narrow("moving_mean", False),
           "var": narrow("moving_variance", False)}
  epsilon = float(settings["epsilon"])
  options = {"axis": int(settings["axis"]),
             "momentum": float(settings["momentum"]), "epsilon": epsilon,
             "use_scale": bool(settings["scale"]),
             "use_bias": bool(settings["center"]),
             # Keras stores and updates the biased variance, as bn_jax.
             "unbiased_running_var": False}
  if renorm:
    stats["renorm_mean"] = narrow("renorm_mean", False)
    stats["renorm_stddev"] = narrow("renorm_stddev", False)
    report += _moving_stddev_lines(narrow("moving_stddev", False),
                                   stats["var"], epsilon, where)
    options.update(renorm=True, renorm_clipping=_keras_clipping_to_bn_jax(
        settings["renorm_clipping"]),
                   renorm_momentum=float(settings["renorm_momentum"]))
  if "scale" in params and params["scale"].dtype != np.float32:
    options["param_dtype"] = params["scale"].dtype
  return Conversion(_flax_variables(params, stats), options, report)


def _moving_stddev_lines(moving_stddev, var, epsilon: float, where: str
                         ) -> list[str]:
  """A line where Keras's moving_stddev is not the sqrt(moving_variance +
  epsilon) that bn_jax derives: bn_jax keeps the variance (so eval agrees)
  and the next renorm update's variance differs."""
  derived = np.sqrt(var.astype(np.float64) + epsilon)
  # Keras derives its variance from moving_stddev in float32 at every
  # update; a few float32 roundings are agreement.
  off = ~np.isclose(moving_stddev, derived, rtol=1e-5, atol=0.0)
  if not off.any():
    return []
  worst = float(np.max(np.abs(moving_stddev - derived) / derived))
  return [_line(where, "moving_stddev", (
      f"differs from sqrt(moving_variance + epsilon) in {int(off.sum())} "
      f"of {off.size} features (relative up to {worst:.1e}; a fresh Keras "
      "layer has 1 beside a variance of 1): bn_jax derives it from the "
      "variance, kept as it is, so eval outputs agree and the next update's "
      "moving variance differs")) ]


def _layer_to_keras(params: dict, stats: dict, opts: dict, where: str
                    ) -> tuple[dict, dict, list[str]]:
  """(weights by name, Keras kwargs, report) of one bn_jax layer."""
  arrays = {k: _float_array(v, k, where) for k, v in {**params,
                                                        **stats}.items()
            if k in PARAM_NAMES or (k in STAT_NAMES and k != "count")}
  _feature_count(arrays, where)
  axes = tuple(np.atleast_1d(opts["axis"]))
  if len(axes) != 1:
    raise ValueError(f"{where}: axis={opts['axis']} names several feature "
                     "axes; Keras's BatchNormalization takes one: reshape "
                     "the features to one axis first.")
  report = _unmapped_stats(stats, where, "Keras",
                           bool(opts["renorm"]))
  f32 = lambda a: np.asarray(a, np.float32)
  weights = {"moving_mean": f32(stats["mean"]),
             "moving_variance": f32(stats["var"])}
  if "scale" in params:
    weights["gamma"] = f32(params["scale"])
  if "bias" in params:
    weights["beta"] = f32(params["bias"])
  epsilon = float(opts["epsilon"])
  momentum = opts["momentum"]
  if momentum is None:
    momentum = KERAS_DEFAULTS["momentum"]
    count = _count(stats.get("count", 0), "count", where)
    report.append(_line(where, "momentum=None", (
        f"Keras has no cumulative average (here over {count} updates): "
        f"Keras's default momentum {momentum} written; future updates "
        "differ, eval is the same")))
  elif "count" in stats:
    report.append(_line(where, "count", (
        f"{_count(stats['count'], 'count', where)} updates not kept: Keras "
        "keeps no update count")))
  if opts["unbiased_running_var"]:
    report.append(_line(where, "unbiased_running_var=True", (
        "Keras updates the biased variance: eval outputs are the same now, "
        "the moving variance after further Keras updates is smaller")))
  kwargs = {"axis": int(axes[0]), "momentum": float(momentum),
            "epsilon": epsilon, "center": "bias" in params,
            "scale": "scale" in params}
  if opts["renorm"]:
    for key in ("renorm_mean", "renorm_stddev"):
      if key not in stats:
        raise ValueError(f"{where}: renorm=True but batch_stats have no "
                         f"{key!r}; pass the renorm layer's variables.")
      weights[key] = f32(stats[key])
    # bn_jax derives Keras's moving_stddev from the variance.
    weights["moving_stddev"] = f32(np.sqrt(
        stats["var"].astype(np.float64) + epsilon))
    clipping = dict(core.renorm_clipping_pairs(opts["renorm_clipping"])
                    or ())
    # bn_jax's absent rmin is 1 / rmax; Keras's is no lower limit.
    if "rmax" in clipping and "rmin" not in clipping:
      clipping["rmin"] = 1.0 / float(clipping["rmax"])
    kwargs.update(renorm=True, renorm_clipping=clipping or None,
                  renorm_momentum=float(opts["renorm_momentum"]))
    if opts["renorm_schedule"] is not None:
      report.append(_line(where, "renorm_schedule", (
          f"Keras has no schedule: its layer clips with the final limits "
          f"from the start, where bn_jax relaxes them by update count "
          f"{opts['renorm_schedule']}")))
  mapped = ("axis", "momentum", "epsilon", "use_bias", "use_scale",
            "unbiased_running_var", "renorm")
  report += _unmapped_options(opts, where, "Keras", mapped)
  return weights, kwargs, report


def to_keras(variables: Mapping[str, Any],
             options: Mapping[str, Any] | None = None) -> Conversion:
  """One bn_jax BatchNorm's variables as Keras 3 BatchNormalization weights.

  Args:
    variables: flax variables of one layer (or an nnx layer's flat pure
      dict), as for `to_torch`.
    options: the layer's kwargs (bn_jax.nn.BatchNorm's defaults otherwise).

  Returns:
    Conversion(variables=weights by Keras variable name, options=kwargs of
    keras.layers.BatchNormalization, report). Give the weights to the
    built layer with `load_keras`.
  """
  where = "(layer)"
  opts = _bn_jax_options(options, where)
  params, stats = _split_flax(variables, where)
  return Conversion(*_layer_to_keras(params, stats, opts, where))


def load_keras(layer, weights: Mapping[str, Any],
               input_shape: Sequence[int | None] | None = None) -> None:
  """Assigns `weights` (by variable name, from `to_keras`) to a Keras
  BatchNormalization; every variable of the layer and every weight must
  be used, or nothing is assigned (ValueError).

  Args:
    layer: the Keras layer (built from `to_keras`'s options).
    weights: `to_keras`'s variables.
    input_shape: builds an unbuilt layer for it (Keras fixes the rank of
      its inputs at build); without it, an unbuilt layer must be built
      first.
  """
  if not layer.variables:
    if input_shape is None:
      raise ValueError("the Keras layer is not built; pass input_shape= "
                       "(e.g. (None, 32, 32, 16)) or build it first.")
    layer.build(tuple(input_shape))
  variables = {v.path.split("/")[-1]: v for v in layer.variables}
  if set(variables) != set(weights):
    raise ValueError(
        f"the layer has variables {sorted(variables)} but the weights are "
        f"{sorted(weights)}; build the layer with to_keras's options.")
  for name, variable in variables.items():
    if tuple(variable.shape) != np.shape(weights[name]):
      raise ValueError(f"{name}: the layer's shape {tuple(variable.shape)} "
                       f"is not the weights' {np.shape(weights[name])}; "
                       "build it for the converted number of features.")
  for name, variable in variables.items():
    variable.assign(np.asarray(weights[name], variable.dtype))


# ----------------------------------------------------------------------------
# Whole models: dotted PyTorch prefixes <-> nested flax trees.


def _as_path(value) -> tuple[str, ...]:
  return tuple(value.split("/")) if isinstance(value, str) else tuple(value)


def torch_bn_prefixes(state_dict: Mapping[str, Any]) -> list[str]:
  """The prefixes ("layer1.0.bn1", "" for a lone layer) of the BN layers
  with running statistics in a model's state_dict, in its order. Layers
  with track_running_stats=False look like any other weight and bias: name
  them in `from_torch_model(names=...)`."""
  prefixes = []
  for key in state_dict:
    head, _, tail = key.rpartition(".")
    if tail in TORCH_KEYS[2:] and head not in prefixes:
      prefixes.append(head)
  return prefixes


def _set_path(tree: dict, path: tuple[str, ...], value: dict, where: str
              ) -> None:
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
    if not isinstance(node, dict) or set(node) & set(STAT_NAMES):
      raise ValueError(f"{where}: flax path {'/'.join(path)} lies inside "
                       "another BN layer; give names that do not nest.")
  if path[-1] in node:
    raise ValueError(f"{where}: two layers map to flax path "
                     f"{'/'.join(path)}; give each its own name.")
  node[path[-1]] = value


def _left_out(keys: Sequence[str], what: str) -> list[str]:
  if not keys:
    return []
  shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
  return [_line("(model)", f"{len(keys)} {what}", f"left out: {shown}")]


def from_torch_model(state_dict: Mapping[str, Any], *,
                     names: Mapping[str, Any] | Callable[[str], Any] | None
                     = None,
                     momentum: float | None = TORCH_MOMENTUM,
                     eps: float = TORCH_EPS, axis: Any = 1,
                     layer_hparams: Mapping[str, Mapping[str, Any]] | None
                     = None) -> Conversion:
  """The BN layers of a PyTorch model's state_dict as a nested flax tree.

  Args:
    state_dict: the model's, numpy arrays.
    names: PyTorch prefix -> flax path ("layer1_0/bn1" or a tuple of keys):
      a Mapping (only the layers it names are converted; other BN layers
      are reported) or a function. Default: dots -> nested keys,
      "layer1.0.bn1" -> ("layer1", "0", "bn1").
    momentum, eps, axis: every layer's, as `from_torch`'s.
    layer_hparams: per-layer overrides by prefix, {"layer1.0.bn1":
      {"momentum": ..., "eps": ...}}; from the model: `{n: dict(momentum=
      m.momentum, eps=m.eps) for n, m in model.named_modules() if
      isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}`.

  Returns:
    Conversion(variables={"params": tree, "batch_stats": tree},
    options={flax path tuple: kwargs of bn_jax.nn.BatchNorm}, report with
    each line led by the layer's prefix, and one for the entries of other
    layers, which are left out).
  """
  if isinstance(names, Mapping):
    prefixes = [str(p) for p in names]
    missing = [p for p in torch_bn_prefixes(state_dict) if p not in names]
    report = [_line(p or "(layer)", "not in names", "BN layer left out")
              for p in missing]
  else:
    prefixes, report = torch_bn_prefixes(state_dict), []
  hparams = dict(layer_hparams or {})
  unknown = sorted(set(hparams) - set(prefixes))
  if unknown:
    raise ValueError(f"layer_hparams name {unknown}, which are no BN layers "
                     f"of the state_dict (those are {prefixes}).")
  variables = {"params": {}, "batch_stats": {}}
  options, used = {}, set()
  for prefix in prefixes:
    dotted = _normalized_prefix(prefix)
    entries = {k[len(dotted):]: v for k, v in state_dict.items()
               if k.startswith(dotted) and "." not in k[len(dotted):]}
    used.update(dotted + k for k in entries)
    layer = {"momentum": momentum, "eps": eps, **hparams.get(prefix, {})}
    params, stats, layer_options, lines = _layer_from_torch(
        entries, dotted, layer["momentum"], layer["eps"], axis)
    if callable(names) and not isinstance(names, Mapping):
      path = _as_path(names(prefix))
    elif names is not None:
      path = _as_path(names[prefix])
    else:
      path = tuple(prefix.split(".")) if prefix else ()
    if not path:
      raise ValueError("a BN layer at the top of the state_dict has no "
                       "flax path: use from_torch, or give it a name.")
    if params:
      _set_path(variables["params"], path, params, _torch_where(dotted))
    _set_path(variables["batch_stats"], path, stats, _torch_where(dotted))
    options[path] = layer_options
    report += lines
  report += _left_out([k for k in state_dict if k not in used],
                      "entries of other layers (not BN)")
  if not variables["params"]:
    del variables["params"]
  return Conversion(variables, options, report)


def _bn_layers(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
  """(path, stats) of each BN layer in a batch_stats tree: a dict with
  arrays `mean` and `var`."""
  if "mean" in tree and "var" in tree and not isinstance(tree["mean"],
                                                          Mapping):
    yield path, dict(tree)
    return
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _bn_layers(value, path + (key,))


def _leaf_paths(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, path + (key,))
    else:
      yield path + (key,)


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> dict:
  for key in path:
    tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
  return dict(tree)


def _layer_options(options, path: tuple[str, ...]) -> Mapping | None:
  """One layer's options: `options` itself when it is one layer's kwargs
  for all, else its entry by path (a tuple or "a/b")."""
  if options is None:
    return None
  known = set(_option_defaults())
  if all(isinstance(k, str) and k in known for k in options):
    return options
  by_path = {_as_path(k): v for k, v in options.items()}
  return by_path.get(path)


def to_torch_model(variables: Mapping[str, Any], options: Mapping | None
                   = None, *,
                   names: Mapping[str, Any] | Callable[[tuple], str] | None
                   = None) -> Conversion:
  """The BN layers of a nested flax tree as a PyTorch state_dict.

  Args:
    variables: {"params": tree, "batch_stats": tree}; a BN layer is a
      batch_stats dict with `mean` and `var`.
    options: one kwargs dict for every layer, or {flax path: kwargs} (as
      `from_torch_model` returns; absent layers take the defaults).
    names: the same Mapping as `from_torch_model`'s (PyTorch prefix ->
      flax path), inverted here, or a function from the flax path tuple to
      the prefix. Default: keys joined by dots.

  Returns:
    Conversion(variables=a state_dict of numpy arrays, options={prefix:
    kwargs of torch.nn.BatchNorm*d}, report; other params are left out,
    with a line).
  """
  stats_tree = variables.get("batch_stats", {})
  params_tree = variables.get("params", {})
  inverse = ({_as_path(v): str(k) for k, v in names.items()}
             if isinstance(names, Mapping) else None)
  state_dict, torch_options, report = {}, {}, []
  bn_paths = []
  for path, stats in _bn_layers(stats_tree):
    bn_paths.append(path)
    if inverse is not None:
      if path not in inverse:
        report.append(_line("/".join(path), "not in names",
                            "BN layer left out"))
        continue
      prefix = inverse[path]
    else:
      prefix = names(path) if callable(names) else ".".join(path)
    dotted = _normalized_prefix(prefix)
    where = _torch_where(dotted)
    opts = _bn_jax_options(_layer_options(options, path), where)
    params, stats = _split_flax({"params": _subtree(params_tree, path),
                                 "batch_stats": stats}, where)
    entries, kwargs, lines = _layer_to_torch(params, stats, opts, dotted)
    state_dict.update(entries)
    torch_options[prefix] = kwargs
    report += lines
  other = ["/".join(p) for p in _leaf_paths(params_tree)
           if not any(p[:len(b)] == b for b in bn_paths)]
  report += _left_out(other, "params of other layers (not BN)")
  return Conversion(state_dict, torch_options, report)


# ----------------------------------------------------------------------------
# The report.


def report_markdown(report: Sequence[str]) -> str:
  """The report as a Markdown table: layer, item, what differs."""
  rows = ["| layer | item | what is not exact |", "|---|---|---|"]
  for line in report:
    cells = (line.split(": ", 2) + ["", ""])[:3]
    rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells)
                + " |")
  if not report:
    rows.append("| (all) | - | everything maps exactly |")
  return "\n".join(rows) + "\n"
