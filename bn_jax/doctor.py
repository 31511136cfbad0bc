"""A diagnosis of a model's BatchNorm layers: what is wrong, and the fix.

    report = doctor.diagnose(model, variables, batches, steps_trained=2000)
    print(doctor.format_report(report))
    variables = doctor.recompute(model, variables, batches)  # the gap
    variables = doctor.drop_bias(model, variables, batches[0])  # BN's twin
    folded = doctor.fold(model, variables, batches[0])  # for inference

`model` is a flax linen Module applied as `model.apply(variables, x,
train=...)` (other keywords: `train_kwargs`, `eval_kwargs`), or a flax nnx
Module called as `model(x)` (its variables live in it: pass None).
`batches` are a few batches of real inputs, (N, B, ...) or a list of (B,
...) arrays. The BN layers are `bn_jax.nn.BatchNorm` and
`flax.linen.BatchNorm` (linen), `bn_jax.nnx.BatchNorm` and
`flax.nnx.BatchNorm` (nnx).

The checks (`CHECKS`), each finding with a severity ("error", "warning",
"info") and a fix in one line:
  gap             running statistics against the data's, per layer: the
                  mean z-score of the mean, mean_f |mu_data - mu_run| /
                  sqrt(var_run + eps), and the mean log variance ratio,
                  mean_f log((var_data + eps) / (var_run + eps)) (over
                  the features that vary: var_data >= eps), with the
                  data's statistics those each layer sees in a training
                  pass (batch statistics), pooled over all the batches. The
                  layers are ranked by how much the eval-mode outputs move
                  (mean |delta|) when that one layer's running statistics
                  are replaced by the data's.
  never_updated   mean 0 and var 1 as initialized, an update count of 0,
                  or a NaN or inf.
  few_values      values per channel (N * H * W) of a training batch, and
                  of a partial last batch (`train_batch_size`,
                  `train_examples`).
  momentum        an averaging window 1 / (1 - momentum) longer than the
                  steps trained (`steps_trained`) or than the steps since a
                  weight average (`steps_since_average`): a problem where
                  the layer's statistics are off (a gap or never updated),
                  else a note; a PyTorch-style momentum (below 0.5).
  bias_before_bn  a Dense or Conv bias feeding a BN that normalizes with
                  batch statistics, which subtracts it again.
  frozen_bn       running statistics in a training pass while the layer's
                  scale and bias train (it is not in `frozen`), or batch
                  statistics in a layer marked frozen (Keras #9522:
                  `trainable=False` is not `training=False`).
  fold            for each Dense or Conv directly followed by a BN: the
                  largest difference, on the data, between the two layers
                  in eval mode and the one folded layer
                  (`bn_jax.core.fold_into_preceding`).

Linen only (the nnx report lists them under "not checked"): few_values,
bias_before_bn, frozen_bn, fold, and the fixes. They need every module
call's input and output, which `flax.linen.intercept_methods` shows during
a trace; nnx has no such hook. Only module calls are seen: a Dense whose
output also feeds a plain jnp expression (a residual sum written inline)
looks unshared.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
from flax import nnx
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import core
from bn_jax import nn as bn_nn
from bn_jax import nnx as bn_nnx
from bn_jax import precise

SEVERITIES = ("error", "warning", "info")
CHECKS = {
    "gap": "train/eval gap",
    "never_updated": "statistics never updated",
    "few_values": "too few values per channel",
    "momentum": "momentum too slow for the run",
    "bias_before_bn": "a bias before BN that BN cancels",
    "frozen_bn": "frozen-BN misuse",
    "fold": "folding for inference",
}
LINEN_ONLY = ("few_values", "bias_before_bn", "frozen_bn", "fold")
LINEN_BATCH_NORMS = (bn_nn.BatchNorm, nn.BatchNorm)
NNX_BATCH_NORMS = (bn_nnx.BatchNorm, nnx.BatchNorm)

# A gap worth a warning: the running mean off by a quarter of a standard
# deviation on average, or the running variance off by a factor e^0.25
# (28%). A model whose statistics were recomputed on the same data is at 0;
# one trained a few hundred steps at momentum 0.99 is well below both.
GAP_Z = 0.25
GAP_LOG_VAR = 0.25
# The relative standard deviation of a variance estimated from n values is
# about sqrt(2 / (n - 1)): 37% at 16 values. Below, a batch's statistics
# are mostly noise; at 1 value the variance is 0 and BN outputs its bias.
FEW_VALUES = 16
# PyTorch's momentum p is flax's 1 - p (0.1 -> 0.9); a value below this is
# most likely one written in PyTorch's convention.
PYTORCH_MOMENTUM = 0.5
# Initial values weighing more than this after the run mean the averages
# are mostly still their initialization: an error, not a warning.
MOSTLY_INITIAL = 0.5
# Folding is exact when the folded layer's output differs from Dense -> BN
# by float rounding only: relative to the largest output.
FOLD_TOLERANCE = 1e-4

ModulePath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Finding:
  """One problem (or note) of one layer (None: of the whole model)."""
  check: str  # a CHECKS key
  severity: str  # a SEVERITIES value
  layer: str | None
  message: str  # what is wrong, with its numbers
  fix: str  # one line


@dataclasses.dataclass(frozen=True)
class Layer:
  """One BN layer's row: its statistics against the data's.

  `data_mean` and `data_var` (per feature, float64) are what the layer saw
  in training passes over the given batches, pooled (the biased variance of
  all values); `mean_z`, `log_var_ratio` and `logit_change` as in the
  module docstring. `values_per_channel` (linen only): N * H * W of one
  training batch.
  """
  name: str
  kind: str
  features: int
  mean_z: float
  log_var_ratio: float
  logit_change: float
  momentum: float | None
  values_per_channel: int | None
  data_mean: np.ndarray = dataclasses.field(repr=False)
  data_var: np.ndarray = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Report:
  """What `diagnose` found: rows ranked by logit change, findings with
  errors first, and the checks that could not run (and why)."""
  frontend: str  # "linen" or "nnx"
  layers: tuple[Layer, ...]
  findings: tuple[Finding, ...]
  examples: int  # the examples the data's statistics pool
  not_checked: tuple[str, ...] = ()

  def problems(self) -> tuple[Finding, ...]:
    """The errors and warnings."""
    return tuple(f for f in self.findings if f.severity != "info")

  def flagged(self, check: str) -> tuple[Finding, ...]:
    """The errors and warnings of one check."""
    return tuple(f for f in self.problems() if f.check == check)


class FoldedLayer(NamedTuple):
  """A Dense or Conv with the BN after it folded in: x @ kernel + bias
  (kernel in the layer's own layout) is BN(layer(x)) in eval mode."""
  batch_norm: str  # the BN layer's name, "a/b"
  kernel: jax.Array
  bias: jax.Array


def _name(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


# ----------------------------------------------------------------------------
# Input checks.


def _as_batches(batches) -> list[jax.Array]:
  """(N, B, ...) array or a sequence of (B, ...) arrays -> list of arrays."""
  if isinstance(batches, (jax.Array, np.ndarray)):
    if batches.ndim < 2:
      raise ValueError(
          f"batches has shape {batches.shape}; give (N, B, ...) batches of "
          "inputs, or a list of (B, ...) arrays.")
    batches = list(batches)
  batches = [jnp.asarray(b) for b in batches]
  if not batches:
    raise ValueError("batches is empty; give at least one batch of real "
                     "inputs.")
  if len({b.shape[1:] for b in batches}) > 1 or batches[0].ndim < 1:
    raise ValueError(
        f"batches have shapes {sorted({b.shape for b in batches})}; give "
        "batches of one input shape.")
  return batches


def _kwargs(model: nn.Module, given, default: dict[str, Any], name: str):
  """train_kwargs / eval_kwargs, checked against model.__call__'s
  signature where the defaults are taken."""
  if given is not None:
    return dict(given)
  params = inspect.signature(type(model).__call__).parameters
  if "train" not in params and not any(
      p.kind == p.VAR_KEYWORD for p in params.values()):
    raise ValueError(
        f"{type(model).__name__}.__call__ takes no `train`; pass {name}= "
        "(the keywords that select its training and eval modes, e.g. "
        "{'use_running_average': False}).")
  return default


def _check_non_negative(name: str, value) -> None:
  if value is not None and (not isinstance(value, (int, np.integer))
                            or isinstance(value, bool) or value < 0):
    raise ValueError(f"{name}={value!r}; give a non-negative int (or None "
                     "to skip its check).")


# ----------------------------------------------------------------------------
# Linen: the model's structure, from one traced training pass.


@dataclasses.dataclass(frozen=True)
class _LinenBN:
  """A BN call of the training pass, as plain data."""
  path: ModulePath
  kind: str
  feature_axes: tuple[int, ...]
  input_shape: tuple[int, ...]
  trains: bool  # normalizes with batch statistics in the training pass
  momentum: float | None
  epsilon: float
  virtual_batch_size: int | None
  has_affine: bool  # a scale or a bias to train
  reports_moments: bool  # bn_jax.nn.BatchNorm: PreciseBN can recompute it
  linear: ModulePath | None = None  # the Dense/Conv whose output is x
  linear_module: nn.Module | None = None  # unbound clone, for folding
  linear_has_bias: bool = False
  linear_shared_with: tuple[str, ...] = ()  # other calls taking its output

  @property
  def name(self) -> str:
    return _name(self.path)

  @property
  def last_axis_only(self) -> bool:
    """Features on the last axis only, as a Dense's or Conv's outputs."""
    return self.feature_axes == (len(self.input_shape) - 1,)


def _subtree(tree, path: ModulePath):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _is_linear(params, out) -> bool:
  """A Dense/Conv by its variables: params `kernel` (and `bias`) only, the
  kernel's last axis the output's features."""
  if not isinstance(params, Mapping) or "kernel" not in params:
    return False
  if not set(params) <= {"kernel", "bias"} or not hasattr(out, "shape"):
    return False
  return bool(out.shape) and params["kernel"].shape[-1] == out.shape[-1]


def _concrete_float(value) -> float | None:
  if value is None:
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None  # traced: unknown here


def _mode(args, kwargs, module) -> bool:
  """The resolved use_running_average of a BN call (as nn.merge_param)."""
  value = args[1] if len(args) > 1 else kwargs.get("use_running_average")
  return bool(module.use_running_average if value is None else value)


def _describe_calls(calls, params) -> list[_LinenBN]:
  """The BN calls of a trace (module, args, kwargs, out; in call order)."""
  linears = [(m, out) for m, _, _, out in calls
             if _is_linear(_subtree(params, m.path), out)]
  layers, seen = [], set()
  for module, args, kwargs, _ in calls:
    if not isinstance(module, LINEN_BATCH_NORMS):
      continue
    if module.path in seen:
      raise ValueError(
          f"BatchNorm layer {_name(module.path)} is called more than once "
          "per forward pass; its statistics are not one population's. Give "
          "each use its own layer.")
    seen.add(module.path)
    x = args[0]
    feeder = next(((m, out) for m, out in linears if out is x), None)
    fields = {}
    if feeder is not None:
      linear, out = feeder
      # Calls that take the Dense's output other than this BN and the
      # modules that contain it (which pass it on to the BN).
      shared = tuple(_name(m.path) for m, a, k, _ in calls
                     if m.path != module.path
                     and m.path != module.path[:len(m.path)]
                     and any(v is out for v in (*a, *k.values())))
      fields = dict(linear=linear.path,
                    linear_module=linear.clone(parent=None),
                    linear_has_bias="bias" in _subtree(params, linear.path),
                    linear_shared_with=shared)
    layers.append(_LinenBN(
        path=module.path,
        kind=f"{type(module).__module__}.{type(module).__name__}".replace(
            "flax.linen.normalization", "flax.linen"),
        feature_axes=core.feature_axes(x.ndim, module.axis),
        input_shape=tuple(x.shape), trains=not _mode(args, kwargs, module),
        momentum=_concrete_float(module.momentum),
        epsilon=float(module.epsilon),
        virtual_batch_size=getattr(module, "virtual_batch_size", None),
        has_affine=bool(module.use_scale or module.use_bias),
        reports_moments=isinstance(module, bn_nn.BatchNorm), **fields))
  return layers


def _linen_apply(model, kwargs, rngs, train: bool):
  """fn(variables, x) -> the model's output, in training mode (statistics
  updates discarded) or eval mode."""
  def apply(variables, x):
    if train:
      out, _ = model.apply(variables, x, mutable=["batch_stats"], rngs=rngs,
                           **kwargs)
      return out
    return model.apply(variables, x, **kwargs)
  return apply


def _linen_structure(model, variables, x, train_kwargs, rngs
                     ) -> list[_LinenBN]:
  """The BN layers of the training pass, in call order (a trace, no
  computation)."""
  layers = []

  def trace(v, batch):
    calls = []

    def record(next_fun, args, kwargs, context):
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      index = len(calls)
      calls.append(None)  # call order: a parent before its children
      out = next_fun(*args, **kwargs)
      calls[index] = (context.module, args, kwargs, out)
      return out

    with nn.intercept_methods(record):
      _linen_apply(model, train_kwargs, rngs, train=True)(v, batch)
    layers.extend(_describe_calls(calls, variables.get("params", {})))

  jax.eval_shape(trace, variables, x)
  return layers


def _moments(x, feature_axes, shape):
  """Mean and biased variance per feature, float32, two passes."""
  reduce = tuple(a for a in range(x.ndim) if a not in feature_axes)
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, reduce, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), reduce)
  return mean.reshape(shape), var.reshape(shape)


def _jit_static(fn):
  """fn(*arrays, **static) jitted, compiled once per distinct static values
  (every `diagnose` of one model reuses it) where they hash; a model with
  an array among its attributes does not, and is compiled per call."""
  jitted = jax.jit(fn, static_argnames=tuple(
      p.name for p in inspect.signature(fn).parameters.values()
      if p.kind == p.KEYWORD_ONLY))

  def call(*args, **static):
    try:
      hash(tuple(static.values()))
    except TypeError:
      return jax.jit(functools.partial(fn, **static))(*args)
    return jitted(*args, **static)
  return call


@_jit_static
def _linen_moments(variables, x, rngs, *, model, kwargs, layers):
  """{name: (mean, var)} of every BN layer's input in the training pass."""
  by_path = {layer.path: layer for layer in layers}
  shapes = {path: _subtree(variables["batch_stats"], path)["mean"].shape
            for path in by_path}
  found = {}

  def record(next_fun, args, call_kwargs, context):
    path = context.module.path
    if context.method_name == "__call__" and path in by_path and (
        isinstance(context.module, LINEN_BATCH_NORMS)):
      found[_name(path)] = _moments(args[0], by_path[path].feature_axes,
                                    shapes[path])
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(record):
    _linen_apply(model, dict(kwargs), rngs, train=True)(variables, x)
  return found


def _with_statistics(batch_stats, stats: Mapping[ModulePath, tuple]):
  """batch_stats with the mean and var of the layers in `stats` replaced
  (in each variable's dtype)."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  for path, (mean, var) in stats.items():
    for name, value in (("mean", mean), ("var", var)):
      old = flat[path + (name,)]
      new = jnp.asarray(value, old.dtype)
      # Placed as the variable it replaces: jit compiles anew for every
      # change of which arguments are committed to a device, so a new
      # array left uncommitted among committed ones would cost a compile
      # per layer probed.
      if getattr(old, "committed", False):
        new = jax.device_put(new, old.sharding)
      flat[path + (name,)] = new
  return traverse_util.unflatten_dict(flat)


def _output_change(outputs, reference) -> float:
  """Mean |a - b| over every output value (all leaves of the output)."""
  total, count = 0.0, 0
  for a, b in zip(outputs, reference):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      total += float(jnp.sum(jnp.abs(jnp.asarray(x, jnp.float32)
                                     - jnp.asarray(y, jnp.float32))))
      count += int(np.size(x))
  return total / max(count, 1)


def _pool(moments: Sequence[tuple[Any, Any]], weights: Sequence[float]):
  """Per-batch (mean, biased var) -> pooled (mean, var) of all values,
  float64; each batch weighs its number of values."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  means = np.stack([np.asarray(m, np.float64) for m, _ in moments])
  variances = np.stack([np.asarray(v, np.float64) for _, v in moments])
  w = w.reshape((-1,) + (1,) * (means.ndim - 1))
  mean = np.sum(w * means, axis=0)
  var = np.sum(w * (variances + np.square(means - mean)), axis=0)
  return mean, var


def _gap_numbers(data_mean, data_var, run_mean, run_var, epsilon):
  """(mean z over every feature, mean log variance ratio over the features
  that vary in the data), float64. Why not the constant ones (data var
  below epsilon, e.g. MNIST's border pixels): their eval output,
  (x - mu_run) / sqrt(var_run + eps), is z's business alone; a variance
  that decays slowly from its initial 1 there changes nothing."""
  run_mean = np.asarray(run_mean, np.float64)
  run_var = np.asarray(run_var, np.float64)
  varying = ~(np.asarray(data_var) < epsilon)  # NaN counts as varying
  with np.errstate(all="ignore"):  # NaN statistics give NaN numbers
    z = np.abs(data_mean - run_mean) / np.sqrt(run_var + epsilon)
    ratio = np.log((data_var + epsilon) / (run_var + epsilon))
  return float(np.mean(z)), (float(np.mean(ratio[varying]))
                             if np.any(varying) else 0.0)


def _fold_pair(layer: _LinenBN, variables):
  """(kernel, bias) of layer.linear with the BN folded in."""
  params = variables["params"]
  linear = _subtree(params, layer.linear)
  bn = _subtree(params, layer.path) or {}
  stats = _subtree(variables["batch_stats"], layer.path)
  return core.fold_into_preceding(
      linear["kernel"], linear.get("bias"),
      core.BNParams(scale=bn.get("scale"), bias=bn.get("bias")),
      core.BNState(mean=stats["mean"], var=stats["var"],
                   count=jnp.zeros((), jnp.int32)),
      epsilon=layer.epsilon)


def _apply_folded(layer: _LinenBN, kernel, bias, x):
  """The folded layer on x: the Dense/Conv itself with the new kernel."""
  params = {"kernel": kernel}
  if layer.linear_has_bias:
    params["bias"] = bias
  y = layer.linear_module.apply({"params": params}, x)
  if not layer.linear_has_bias:
    y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
  return y


def _foldable(layer: _LinenBN) -> bool:
  return (layer.linear is not None and layer.last_axis_only
          and not layer.linear_shared_with)


@_jit_static
def _linen_eval(variables, x, *, model, kwargs, pairs):
  """(eval outputs, {bn name: (max |folded - BN|, max |BN|)}) for the
  Dense/Conv -> BN `pairs` (`_foldable`)."""
  linear_paths = {layer.linear for layer in pairs}
  bn_paths = {layer.path for layer in pairs}
  inputs, outputs = {}, {}

  def record(next_fun, args, call_kwargs, context):
    out = next_fun(*args, **call_kwargs)
    if context.method_name == "__call__":
      if context.module.path in linear_paths:
        inputs[context.module.path] = args[0]
      if context.module.path in bn_paths:
        outputs[context.module.path] = out
    return out

  with nn.intercept_methods(record):
    result = _linen_apply(model, dict(kwargs), None, train=False)(
        variables, x)
  folds = {}
  for layer in pairs:
    kernel, bias = _fold_pair(layer, variables)
    folded = _apply_folded(layer, kernel, bias, inputs[layer.linear])
    reference = outputs[layer.path].astype(jnp.float32)
    folds[layer.name] = (
        jnp.max(jnp.abs(folded.astype(jnp.float32) - reference)),
        jnp.max(jnp.abs(reference)))
  return result, folds


# ----------------------------------------------------------------------------
# The checks: small pure functions of plain numbers.


# How each front end gets its statistics recomputed, and keeps updates.
# "linen_flax": a flax.linen.BatchNorm layer, which does not report its
# batch statistics, so recompute needs the drop-in first.
_RECOMPUTE = {"linen": "doctor.recompute",
              "linen_flax": "doctor.recompute, after replacing "
                            "flax.linen.BatchNorm by bn_jax.nn.BatchNorm, "
                            "which takes the same variables",
              "nnx": "PreciseBN; doctor.recompute takes linen models"}
_KEEP_UPDATES = {
    "linen": "make batch_stats mutable in the training step and keep the "
             "updates (apply(..., mutable=['batch_stats']))",
    "nnx": "train the module itself in training mode (model.train(), "
           "nnx.jit) or nnx.update it with the step's new state"}
_KEEP_UPDATES["linen_flax"] = _KEEP_UPDATES["linen"]


def _never_updated(name: str, mean, var, count, frontend: str,
                   ) -> Finding | None:
  mean, var = np.asarray(mean), np.asarray(var)
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
    return Finding(
        "never_updated", "error", name,
        "its running statistics hold NaN or inf: eval mode outputs NaN.",
        "find the step that diverged (a NaN guard), then recompute the "
        f"statistics from a finite checkpoint ({_RECOMPUTE[frontend]}).")
  problems = []
  if np.all(mean == 0) and np.all(var == 1):
    problems.append("mean 0 and var 1 exactly, as initialized")
  if count is not None and int(np.asarray(count)) == 0:
    problems.append("an update count of 0")
  if not problems:
    return None
  return Finding(
      "never_updated", "error", name,
      f"its running statistics were never updated ({' and '.join(problems)})"
      ": eval mode normalizes with the initial values.",
      f"{_KEEP_UPDATES[frontend]}, or recompute them "
      f"({_RECOMPUTE[frontend]}).")


def _gap(layer: Layer, frontend: str) -> Finding | None:
  big_z = layer.mean_z >= GAP_Z
  big_var = abs(layer.log_var_ratio) >= GAP_LOG_VAR
  if not (big_z or big_var):
    return None
  return Finding(
      "gap", "warning", layer.name,
      f"running statistics differ from the data's: mean z {layer.mean_z:.3f}"
      f", log variance ratio {layer.log_var_ratio:+.3f} (data / running); "
      f"with the data's, the outputs move by {layer.logit_change:.3g} on "
      "average.",
      "recompute the running statistics on training data with the final "
      f"weights ({_RECOMPUTE[frontend]}); on shifted data, AdaBN.")


def _few_values(name: str, per_example: float, batch: int, given: bool,
                train_examples: int | None, drop_last: bool,
                ) -> list[Finding]:
  """`batch` examples per normalization batch (the training batch, or the
  ghost batch), `per_example` values per channel each."""
  findings = []
  values = int(round(per_example * batch))
  source = "" if given else " (the given batches' size; pass train_batch_size)"
  if values < FEW_VALUES:
    findings.append(Finding(
        "few_values", "error" if values <= 1 else "warning", name,
        f"{values} value(s) per channel in a training batch of {batch}"
        f"{source}: " + ("the variance is 0 and BN outputs its bias."
                         if values <= 1 else
                         "the batch statistics are mostly noise."),
        f"train with at least {math.ceil(FEW_VALUES / per_example)} "
        "examples per batch, or use GroupNorm/LayerNorm, or batch "
        "renormalization."))
  if train_examples is not None and not drop_last:
    remainder = train_examples % batch
    last = int(round(per_example * remainder))
    if remainder and last < FEW_VALUES:
      findings.append(Finding(
          "few_values", "error" if last <= 1 else "warning", name,
          f"the last batch of each epoch has {remainder} example(s) "
          f"({train_examples} % {batch}): {last} value(s) per channel.",
          "drop the partial last batch (drop_remainder=True / "
          "drop_last=True), or pick a batch size that divides "
          f"{train_examples}."))
  return findings


def _momentum(name: str, momentum: float | None, steps_trained,
              steps_since_average, frontend: str, stale: bool,
              ) -> list[Finding]:
  """`stale`: the layer's statistics do not match the data (a gap or
  never-updated finding). A window longer than the run is the cause; where
  the effect is absent (statistics recomputed), it is a note for the next
  run, not a problem of this model."""
  if momentum is None:
    return []  # the exact cumulative average: no window
  findings = []
  if momentum >= 1.0:
    return [Finding(
        "momentum", "error", name,
        f"momentum={momentum}: the running statistics never move.",
        "use momentum 0.9 to 0.99 (flax's convention: the weight of the old "
        "average).")]
  window = 1.0 / (1.0 - momentum)
  if momentum < PYTORCH_MOMENTUM:
    findings.append(Finding(
        "momentum", "warning", name,
        f"momentum={momentum:g} keeps {momentum:.0%} of the old average: "
        f"the running statistics follow the last ~{window:.1f} batch(es).",
        f"flax's momentum is PyTorch's 1 - momentum: for PyTorch's "
        f"{momentum:g} write {1 - momentum:g}."))
  matched = ("" if stale else " The statistics match the data, though "
             "(recomputed?): a note for the next run.")
  if steps_trained is not None and window > steps_trained:
    initial = momentum ** steps_trained
    severity = "error" if initial > MOSTLY_INITIAL else "warning"
    findings.append(Finding(
        "momentum", severity if stale else "info", name,
        f"momentum={momentum:g} averages over ~{window:.0f} steps, but the "
        f"run trained {steps_trained}: the initial values still weigh "
        f"{initial:.0%}.{matched}",
        f"use momentum <= {1 - 1 / max(steps_trained, 1):.4g} "
        "(1 - 1/steps) for a run this long, or recompute the statistics "
        f"after training ({_RECOMPUTE[frontend]})."))
  if steps_since_average is not None and window > steps_since_average:
    findings.append(Finding(
        "momentum", "warning" if stale else "info", name,
        f"momentum={momentum:g} averages over ~{window:.0f} steps, but the "
        f"weights were averaged {steps_since_average} step(s) ago: the "
        f"statistics describe the weights before the average.{matched}",
        "recompute the statistics for the averaged weights "
        f"({_RECOMPUTE[frontend]}), as SWA does."))
  return findings


def _bias_before_bn(layer: _LinenBN) -> Finding | None:
  # A bias whose output also feeds another layer is not redundant there.
  if not (layer.linear_has_bias and layer.trains and layer.last_axis_only
          and not layer.linear_shared_with):
    return None
  return Finding(
      "bias_before_bn", "warning", layer.name,
      f"{_name(layer.linear)} adds a bias that this BN subtracts again with "
      "the batch mean: it never changes the output, and its gradient is 0 "
      "(up to rounding).",
      f"build {_name(layer.linear)} with use_bias=False (doctor.drop_bias "
      "moves a trained bias into the running mean).")


def _frozen_bn(layer: _LinenBN, frozen: bool) -> Finding | None:
  if frozen and layer.trains:
    return Finding(
        "frozen_bn", "error", layer.name,
        "marked frozen, but it normalizes with batch statistics in the "
        "training pass and updates its running statistics (Keras #9522: "
        "trainable=False is not training=False).",
        "call it with use_running_average=True in the training pass too.")
  if not frozen and not layer.trains and layer.has_affine:
    return Finding(
        "frozen_bn", "warning", layer.name,
        "it normalizes with its running statistics in the training pass "
        "while its scale and bias train: they fit statistics that no longer "
        "change, and nothing re-centers the layer's inputs.",
        "freeze its scale and bias too (and mark it frozen), or train it "
        "with use_running_average=False.")
  return None


def _fold(layer: _LinenBN, error: float | None, scale: float | None,
          ) -> Finding | None:
  if layer.linear is None:
    return None
  linear = _name(layer.linear)
  if layer.linear_shared_with:
    return Finding(
        "fold", "warning", layer.name,
        f"{linear}'s output also feeds {', '.join(layer.linear_shared_with)}"
        ": folding this BN into it would change that input too.",
        "fold into a copy of the layer used by this BN only, or do not "
        "fold.")
  if not layer.last_axis_only:
    return Finding(
        "fold", "info", layer.name,
        f"normalizes axes {layer.feature_axes}, not {linear}'s output "
        "features alone: fold_into_preceding does not apply.",
        "none needed; fold by hand if the axes match the kernel's.")
  relative = error / max(scale, 1.0)
  if relative > FOLD_TOLERANCE:
    return Finding(
        "fold", "warning", layer.name,
        f"folding into {linear} changes the outputs by up to {error:.3g} "
        f"(of {scale:.3g}): not exact.",
        "fold in float32 (or wider) and compare on real data before "
        "deploying the folded model.")
  return Finding(
      "fold", "info", layer.name,
      f"folds into {linear} exactly (largest difference {error:.2g} of "
      f"{scale:.3g}, float rounding).",
      "doctor.fold gives the folded kernel and bias.")


def _ranked(findings: list[Finding]) -> tuple[Finding, ...]:
  return tuple(sorted(findings, key=lambda f: SEVERITIES.index(f.severity)))


def _largest_change(layers: Sequence[Layer], frontend: str
                    ) -> Finding | None:
  finite = [l for l in layers if np.isfinite(l.logit_change)]
  if not finite:
    return None
  top = max(finite, key=lambda l: l.logit_change)
  return Finding(
      "gap", "info", top.name,
      f"its mismatch changes the outputs most: {top.logit_change:.3g} mean "
      "|delta| with the data's statistics in this layer alone.",
      f"the first layer to recompute ({_RECOMPUTE[frontend]} does all).")


# ----------------------------------------------------------------------------
# diagnose.


def diagnose(model, variables, batches, *,
             train_batch_size: int | None = None,
             train_examples: int | None = None,
             drop_last: bool = False,
             steps_trained: int | None = None,
             steps_since_average: int | None = None,
             frozen: Sequence[str] = (),
             train_kwargs: Mapping[str, Any] | None = None,
             eval_kwargs: Mapping[str, Any] | None = None,
             rngs=None) -> Report:
  """Every check of the module docstring on `model`'s BN layers.

  Args:
    model: a flax linen Module (applied with `train_kwargs` / `eval_kwargs`,
      default train=True / train=False), or an nnx Module (`model(x)`; its
      BN layers switched with `nnx.view`).
    variables: the linen model's variables (params, batch_stats); None for
      an nnx model.
    batches: (N, B, ...) array or a list of (B, ...) arrays of real inputs.
    train_batch_size: the training batch size (default: B).
    train_examples: the training set's size, for the partial last batch.
    drop_last: the training loop drops a partial last batch.
    steps_trained: optimizer steps trained, for the momentum check.
    steps_since_average: steps since the weights were averaged (SWA, EMA
      weights), for the momentum check.
    frozen: names of BN layers (or of modules holding them, "backbone")
      whose scale and bias the fine-tune does not train (linen).
    train_kwargs, eval_kwargs: keywords of `model.apply` for a training and
      an eval pass (linen).
    rngs: `model.apply`'s rngs in the training pass (dropout).

  Returns:
    A `Report`.

  Raises:
    ValueError: unusable batches or arguments, linen variables without the
      batch_stats of a BN layer, a frozen name that matches no BN layer, a
      BN layer called twice per pass.
  """
  batches = _as_batches(batches)
  for name, value in (("train_batch_size", train_batch_size),
                      ("train_examples", train_examples),
                      ("steps_trained", steps_trained),
                      ("steps_since_average", steps_since_average)):
    _check_non_negative(name, value)
  if train_batch_size == 0:
    raise ValueError("train_batch_size=0; give the training batch size.")
  if isinstance(frozen, str):
    raise ValueError(f"frozen={frozen!r}; give a list of layer names, e.g. "
                     f"[{frozen!r}].")
  options = dict(steps_trained=steps_trained,
                 steps_since_average=steps_since_average)
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("an nnx model holds its variables; pass "
                       "variables=None.")
    if frozen or train_kwargs or eval_kwargs:
      raise ValueError("frozen, train_kwargs and eval_kwargs are for linen "
                       "models; an nnx model is switched with nnx.view.")
    return _diagnose_nnx(model, batches, **options)
  if not isinstance(model, nn.Module):
    raise ValueError(f"model={type(model).__name__}; pass a flax linen or "
                     "nnx Module.")
  return _diagnose_linen(
      model, variables, batches,
      train_kwargs=_kwargs(model, train_kwargs, {"train": True},
                           "train_kwargs"),
      eval_kwargs=_kwargs(model, eval_kwargs, {"train": False},
                          "eval_kwargs"),
      rngs=rngs, frozen=tuple(frozen), train_batch_size=train_batch_size,
      train_examples=train_examples, drop_last=drop_last, **options)


def _frozen_matches(name: str, frozen: Sequence[str]) -> bool:
  return any(name == f.rstrip("/") or name.startswith(f.rstrip("/") + "/")
             for f in frozen)


def _no_batch_norm(frontend: str, examples: int) -> Report:
  return Report(frontend, (), (Finding(
      "gap", "info", None, "the model has no BatchNorm layer.",
      "none needed."),), examples)


def _diagnose_linen(model, variables, batches, *, train_kwargs, eval_kwargs,
                    rngs, frozen, train_batch_size, train_examples,
                    drop_last, steps_trained, steps_since_average) -> Report:
  if not isinstance(variables, Mapping):
    raise ValueError(f"variables is a {type(variables).__name__}; pass the "
                     "model's variables dict (params, batch_stats).")
  layers = _linen_structure(model, variables, batches[0], train_kwargs, rngs)
  examples = sum(b.shape[0] for b in batches)
  if not layers:
    return _no_batch_norm("linen", examples)
  stats = {}
  for layer in layers:
    found = _subtree(variables.get("batch_stats", {}), layer.path)
    if not isinstance(found, Mapping) or "mean" not in found:
      raise ValueError(
          f"variables['batch_stats'] has no statistics for {layer.name}; "
          "pass the model's full variables (params and batch_stats).")
    stats[layer.path] = found
  unknown = [f for f in frozen
             if not any(_frozen_matches(l.name, [f]) for l in layers)]
  if unknown:
    raise ValueError(f"frozen names {unknown} match no BatchNorm layer; the "
                     f"layers are {[l.name for l in layers]}.")

  # The data's statistics: the training pass on each batch, pooled.
  train_static = dict(model=model, kwargs=tuple(sorted(train_kwargs.items())),
                      layers=tuple(layers))
  per_batch = [jax.device_get(_linen_moments(variables, b, rngs,
                                             **train_static))
               for b in batches]
  pooled = {l.path: _pool([m[l.name] for m in per_batch],
                          [b.shape[0] for b in batches]) for l in layers}

  # The outputs in eval mode (and folding's errors), then with one layer's
  # statistics the data's.
  eval_static = dict(model=model, kwargs=tuple(sorted(eval_kwargs.items())),
                     pairs=tuple(l for l in layers if _foldable(l)))
  probed = [_linen_eval(variables, b, **eval_static) for b in batches]
  reference = [outputs for outputs, _ in probed]
  changes = {}
  for layer in layers:
    replaced = {**variables, "batch_stats": _with_statistics(
        variables["batch_stats"], {layer.path: pooled[layer.path]})}
    changes[layer.path] = _output_change(
        [_linen_eval(replaced, b, **eval_static)[0] for b in batches],
        reference)
  fold_errors = {}
  for _, found in jax.device_get(probed):
    for name, (error, scale) in found.items():
      old = fold_errors.get(name, (0.0, 0.0))
      fold_errors[name] = (max(old[0], float(error)),
                           max(old[1], float(scale)))

  batch = batches[0].shape[0]
  rows, findings = [], []
  for layer in layers:
    run = stats[layer.path]
    data_mean, data_var = pooled[layer.path]
    mean_z, log_ratio = _gap_numbers(data_mean, data_var, run["mean"],
                                     run["var"], layer.epsilon)
    reduced = math.prod(n for a, n in enumerate(layer.input_shape)
                        if a not in layer.feature_axes)
    per_example = reduced / layer.input_shape[0]
    norm_batch = layer.virtual_batch_size or train_batch_size or batch
    row = Layer(
        name=layer.name, kind=layer.kind, features=int(np.size(data_mean)),
        mean_z=mean_z, log_var_ratio=log_ratio,
        logit_change=changes[layer.path], momentum=layer.momentum,
        values_per_channel=int(round(per_example * norm_batch)),
        data_mean=data_mean, data_var=data_var)
    rows.append(row)
    error, scale = fold_errors.get(layer.name, (None, None))
    fix = "linen" if layer.reports_moments else "linen_flax"
    never = _never_updated(layer.name, run["mean"], run["var"],
                           run.get("count"), fix)
    gap = _gap(row, fix)
    findings += [
        never, gap,
        *(_few_values(layer.name, per_example, norm_batch,
                      bool(train_batch_size or layer.virtual_batch_size),
                      None if layer.virtual_batch_size else train_examples,
                      drop_last) if layer.trains else ()),
        *_momentum(layer.name, layer.momentum, steps_trained,
                   steps_since_average, fix, stale=bool(never or gap)),
        _bias_before_bn(layer),
        _frozen_bn(layer, _frozen_matches(layer.name, frozen)),
        _fold(layer, error, scale)]
  findings.append(_largest_change(rows, "linen"))
  return Report("linen", _rank_rows(rows),
                _ranked([f for f in findings if f is not None]), examples)


def _rank_rows(rows: list[Layer]) -> tuple[Layer, ...]:
  """Largest logit change first (NaN last), then largest z."""
  def key(row):
    change = row.logit_change if np.isfinite(row.logit_change) else -1.0
    return (-change, -np.nan_to_num(row.mean_z, nan=-1.0))
  return tuple(sorted(rows, key=key))


# ----------------------------------------------------------------------------
# nnx: the statistics checks.


def _nnx_batch_norms(model) -> list[tuple[str, Any]]:
  return [(_name(path), module) for path, module in nnx.iter_modules(model)
          if isinstance(module, NNX_BATCH_NORMS)]


def _nnx_moments_fn(model):
  """jit fn(state, x) -> {name: (mean, var)}: each BN's batch statistics in
  a training pass. Why momentum 0: the running statistics after one
  training call are then exactly the batch's (in the layer's convention);
  the copy's state is never written back."""
  probe = nnx.clone(model)
  for _, bn in _nnx_batch_norms(probe):
    bn.momentum = 0.0
  graphdef, state = nnx.split(nnx.view(probe, use_running_average=False))

  @jax.jit
  def moments(state, x):
    module = nnx.merge(graphdef, state)
    module(x)
    return {name: (bn.mean[...], bn.var[...])
            for name, bn in _nnx_batch_norms(module)}
  return moments, state


def _nnx_eval_fn(model):
  """jit fn(state, x, replace) -> eval outputs, with the BN layers named in
  `replace` ({name: (mean, var)}) given those statistics."""
  graphdef, state = nnx.split(nnx.view(nnx.clone(model),
                                       use_running_average=True))

  @jax.jit
  def evaluate(state, x, replace):
    module = nnx.merge(graphdef, state)
    layers = dict(_nnx_batch_norms(module))
    for name, (mean, var) in replace.items():
      layers[name].mean[...] = mean.astype(layers[name].mean[...].dtype)
      layers[name].var[...] = var.astype(layers[name].var[...].dtype)
    return module(x)
  return evaluate, state


def _diagnose_nnx(model, batches, *, steps_trained, steps_since_average,
                  ) -> Report:
  layers = _nnx_batch_norms(model)
  examples = sum(b.shape[0] for b in batches)
  not_checked = tuple(f"{CHECKS[c]} ({c}): linen only" for c in LINEN_ONLY)
  if not layers:
    return dataclasses.replace(_no_batch_norm("nnx", examples),
                               not_checked=not_checked)
  moments_fn, probe_state = _nnx_moments_fn(model)
  per_batch = [jax.device_get(moments_fn(probe_state, b)) for b in batches]
  weights = [b.shape[0] for b in batches]
  evaluate, eval_state = _nnx_eval_fn(model)
  reference = [evaluate(eval_state, b, {}) for b in batches]
  rows, findings = [], []
  for name, bn in layers:
    data_mean, data_var = _pool([m[name] for m in per_batch], weights)
    run_mean, run_var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    mean_z, log_ratio = _gap_numbers(data_mean, data_var, run_mean, run_var,
                                     bn.epsilon)
    replace = {name: (jnp.asarray(data_mean, jnp.float32),
                      jnp.asarray(data_var, jnp.float32))}
    change = _output_change([evaluate(eval_state, b, replace)
                             for b in batches], reference)
    momentum = _concrete_float(bn.momentum)
    row = Layer(name=name, kind=f"{type(bn).__module__}.{type(bn).__name__}"
                .replace("flax.nnx.nn.normalization", "flax.nnx"),
                features=int(run_mean.size), mean_z=mean_z,
                log_var_ratio=log_ratio, logit_change=change,
                momentum=momentum, values_per_channel=None,
                data_mean=data_mean, data_var=data_var)
    rows.append(row)
    count = bn.count[...] if hasattr(bn, "count") else None
    never = _never_updated(name, run_mean, run_var, count, "nnx")
    gap = _gap(row, "nnx")
    findings += [never, gap,
                 *_momentum(name, momentum, steps_trained,
                            steps_since_average, "nnx",
                            stale=bool(never or gap))]
  findings.append(_largest_change(rows, "nnx"))
  return Report("nnx", _rank_rows(rows),
                _ranked([f for f in findings if f is not None]), examples,
                not_checked)


# ----------------------------------------------------------------------------
# The report as text.


def _number(value: float | None, digits: int = 3, signed: bool = False
            ) -> str:
  if value is None:
    return "-"
  if not np.isfinite(value):
    return str(value)
  return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _momentum_text(momentum: float | None) -> str:
  if momentum is None:
    return "cumulative"
  if momentum >= 1.0:
    return f"{momentum:g} (never moves)"
  return f"{momentum:g} ({1 / (1 - momentum):.0f} steps)"


def format_report(report: Report) -> str:
  """The report as Markdown: a table of the layers (ranked by logit
  change), then every finding with its severity and fix."""
  counts = {s: sum(f.severity == s for f in report.findings)
            for s in SEVERITIES}
  lines = [
      f"BN doctor ({report.frontend}): {len(report.layers)} BatchNorm "
      f"layer(s), statistics of {report.examples} examples; "
      f"{counts['error']} error(s), {counts['warning']} warning(s), "
      f"{counts['info']} note(s).", ""]
  if report.layers:
    lines += [
        "| rank | layer | z (mean) | log var ratio | logit change | values "
        "per channel | momentum (window) | findings |",
        "|---:|---|---:|---:|---:|---:|---|---|"]
    for rank, row in enumerate(report.layers, 1):
      marks = [f"{f.severity} {f.check}" for f in report.problems()
               if f.layer == row.name]
      lines.append(
          f"| {rank} | {row.name} | {_number(row.mean_z)} | "
          f"{_number(row.log_var_ratio, signed=True)} | "
          f"{_number(row.logit_change, 4)} | "
          f"{'-' if row.values_per_channel is None else row.values_per_channel}"
          f" | {_momentum_text(row.momentum)} | "
          f"{', '.join(dict.fromkeys(marks)) or 'ok'} |")
    lines.append("")
  lines.append("Findings:")
  for f in report.findings:
    where = f"{f.layer}: " if f.layer else ""
    lines.append(f"- {f.severity} [{f.check}] {where}{f.message} "
                 f"Fix: {f.fix}")
  if report.not_checked:
    lines += ["", "Not checked: " + "; ".join(report.not_checked) + "."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The fixes (linen).


def _linen_layers_for_fix(model, variables, x, train_kwargs, rngs):
  if not isinstance(model, nn.Module) or isinstance(model, nnx.Module):
    raise ValueError(f"model={type(model).__name__}: the fixes take a flax "
                     "linen Module (nnx: not supported yet).")
  kwargs = _kwargs(model, train_kwargs, {"train": True}, "train_kwargs")
  return kwargs, _linen_structure(model, variables, jnp.asarray(x), kwargs,
                                  rngs)


def recompute(model, variables, batches, *, estimator: str = "pooled",
              layerwise: bool = False,
              train_kwargs: Mapping[str, Any] | None = None, rngs=None):
  """The variables with every BN layer's running statistics recomputed on
  `batches` (PreciseBN, `bn_jax.precise.recompute_statistics`): clears the
  gap finding on that data. "pooled" stores what the doctor compares with.

  Raises:
    ValueError: a flax.linen.BatchNorm layer (it does not report its batch
      statistics; bn_jax.nn.BatchNorm is its drop-in, same variables).
  """
  batches = _as_batches(batches)
  kwargs, layers = _linen_layers_for_fix(model, variables, batches[0],
                                         train_kwargs, rngs)
  foreign = [l.name for l in layers if not l.reports_moments]
  if foreign:
    raise ValueError(
        f"layers {foreign} are not bn_jax.nn.BatchNorm, which recompute "
        "needs (it reports its batch statistics); build them with "
        "bn_jax.nn.BatchNorm, a drop-in with the same variables.")

  def apply_fn(v, x, mutable):
    return model.apply(v, x, mutable=mutable, rngs=rngs, **kwargs)

  stats = precise.recompute_statistics(
      apply_fn, variables, jnp.stack(batches), estimator=estimator,
      layerwise=layerwise)
  return {**variables, "batch_stats": stats}


def fold(model, variables, x, *,
         train_kwargs: Mapping[str, Any] | None = None, rngs=None,
         ) -> dict[str, FoldedLayer]:
  """{Dense/Conv name: FoldedLayer} for each Dense or Conv directly followed
  by a BN that `fold_into_preceding` folds (features on the last axis, the
  layer's output feeding nothing else). `x` is one batch (for the trace).
  An inference model without those BN layers, whose Dense/Conv layers have
  a bias, takes each kernel and bias as they are."""
  _, layers = _linen_layers_for_fix(model, variables, x, train_kwargs, rngs)
  return {_name(l.linear): FoldedLayer(l.name, *_fold_pair(l, variables))
          for l in layers if _foldable(l)}


def drop_bias(model, variables, x, *,
              train_kwargs: Mapping[str, Any] | None = None, rngs=None):
  """The variables with each bias that a BN cancels set to 0 and moved into
  the BN's running mean (mean - bias; renorm_mean too), so that eval
  outputs are unchanged (and training outputs, where BN subtracts the batch
  mean, too). Rebuild those layers with use_bias=False and drop the zeros.
  `x` is one batch (for the trace)."""
  _, layers = _linen_layers_for_fix(model, variables, x, train_kwargs, rngs)
  params = traverse_util.flatten_dict(flax.core.unfreeze(
      variables["params"]))
  stats = traverse_util.flatten_dict(flax.core.unfreeze(
      variables["batch_stats"]))
  for layer in layers:
    if _bias_before_bn(layer) is None:
      continue
    bias = params[layer.linear + ("bias",)]
    for name in ("mean", "renorm_mean"):
      key = layer.path + (name,)
      if key in stats:
        stats[key] = (stats[key] - bias.astype(stats[key].dtype)).astype(
            stats[key].dtype)
    params[layer.linear + ("bias",)] = jnp.zeros_like(bias)
  return {**variables, "params": traverse_util.unflatten_dict(params),
          "batch_stats": traverse_util.unflatten_dict(stats)}
