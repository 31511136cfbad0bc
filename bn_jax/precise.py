"""Exact and adapted BN statistics: recomputed over data, weights frozen.

    stats = recompute_statistics(model, variables, batches)  # (N, B, 784)
    variables = {**variables, "batch_stats": stats}

Three uses of the same computation:
  * PreciseBN (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): on
    training data after training. The running averages mix statistics of
    weights from many past steps (EMA with momentum 0.99 spans ~100 of
    them); recomputed with the final weights they are those of the model
    that is evaluated.
  * AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain
    Adaptation", 2016): on unlabeled data of the target domain (a shifted
    test set, `bn_lab.data.shift_images`), so that every BN layer normalizes
    with the target's statistics. An affine shift a * x + b (a > 0) of what
    a BN layer sees is then undone exactly (up to epsilon).
  * After averaging weights (SWA, Izmailov et al. 2018; an EMA of the
    weights): the running statistics belong to none of the averaged
    weights, so `average_and_recompute` averages parameter snapshots and
    recomputes the statistics with the average, as PyTorch's
    `AveragedModel` followed by `torch.optim.swa_utils.update_bn`.

Estimators (per feature, over N batches; m_i values per feature in batch i,
mu_i and s2_i its mean and biased variance):
  "mean"    mean = (1/N) sum_i mu_i,
            var  = (1/N) sum_i s2_i * m_i / (m_i - 1):
            fvcore's `update_bn_stats` until May 2021 (and the BN paper,
            Sec. 3.1). fvcore sets every BN's momentum to 1.0, so that after
            a batch PyTorch's running_mean / running_var hold that batch's
            mean and Bessel-corrected variance, and averages those itself,
            `avg += (value - avg) / k` at batch k: every batch weighs the
            same, whatever its size.
  "pooled"  the mean and biased variance of all sum_i m_i values,
            E[x^2] - E[x]^2 pooled with weights m_i: fvcore's
            `update_bn_stats` since May 2021 (`_PopulationVarianceEstimator`:
            it undoes the Bessel correction with the batch size and weighs
            batches by it), better with small batches. Computed here by Chan
            et al.'s pairwise update, the same quantity without cancelling
            E[x^2] against E[x]^2, and >= 0 by construction.
m_i counts every reduced position (B * H * W for a conv layer), as fvcore
does.
bn_jax's BatchNorm stores the biased variance (`unbiased_running_var=False`,
as flax), the convention of "pooled"; "mean" stores a mean of unbiased
variances, as fvcore and PyTorch.

PyTorch's `update_bn(loader, model)` resets every BN's running statistics,
sets its momentum to None (a cumulative average, every batch weighing the
same) and runs the loader through the model in train mode: each BN's
running_mean is the mean of the batch means, its running_var the mean of
the Bessel-corrected batch variances, with every layer normalizing with
its batch's statistics. That is the estimator "mean" with
`layerwise=False`, the defaults here, whatever `unbiased_running_var`
the layers use for their own running average (the recomputed variance is
the estimator's, unbiased for "mean"; "pooled" gives the biased variance
of all the values, bn_jax's convention). What differs: `update_bn` leaves
`num_batches_tracked` at the number of batches and a BN layer that no
batch reaches at mean 0, var 1, where `recompute_statistics` keeps `count`
(and `nonfinite_skips`) and the statistics of layers that do not run.

The BN layers report their batch's statistics through the `batch_moments`
collection of `bn_jax.nn.BatchNorm` (only in training mode, only when the
collection is mutable); a forward pass with only that collection mutable
changes no state. "Training mode" is the model's own: with batch
renormalization or ghost batches, the layers below a BN layer transform
their inputs as they do in training (`layerwise=True` runs them as in
evaluation). With a mask that differs between features, m_i is the mean
count over the features.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from bn_jax import nn as bn_nn

ESTIMATORS = ("mean", "pooled")
# The collection where bn_jax.nn.BatchNorm reports its batch's statistics.
MOMENTS = "batch_moments"

# A module's names from the root (flax's Module.path), as in batch_stats.
ModulePath = tuple[str, ...]


def _train_apply(model) -> Callable[..., Any]:
  if isinstance(model, nn.Module):
    return functools.partial(model.apply, train=True)
  if callable(model):
    return model
  raise ValueError(
      f"model={model!r}; pass a flax Module whose __call__ takes `train=` "
      "(bn_lab.models) or apply_fn(variables, x, mutable=...) running the "
      "model with its BatchNorm layers in training mode.")


def _is_bn_call(context: nn.module.InterceptorContext) -> bool:
  return (context.method_name == "__call__"
          and isinstance(context.module, bn_nn.BatchNorm))


def _bn_call_order(apply_fn, variables, batch) -> list[ModulePath]:
  """Module paths of the BatchNorm layers that report batch moments, in the
  order the forward pass calls them. Costs a trace, no computation."""
  calls = []

  def record(next_fun, args, kwargs, context):
    if _is_bn_call(context):
      calls.append(context.module.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, mutated = jax.eval_shape(
        lambda v, x: apply_fn(v, x, mutable=[MOMENTS]), variables, batch)
  reported = {path[:-1] for path in traverse_util.flatten_dict(
      flax.core.unfreeze(mutated.get(MOMENTS, {})))}
  order = [path for path in calls if path in reported]
  repeated = sorted({p for p in order if order.count(p) > 1})
  if repeated:
    raise ValueError(
        f"BatchNorm layers {['/'.join(p) for p in repeated]} are called more "
        "than once per forward pass; their statistics are not one "
        "population's. Give each use its own layer.")
  return order


def _eval_mode(paths: frozenset[ModulePath]):
  """An interceptor that runs the BatchNorm layers at `paths` in eval mode
  (running statistics, no moments reported)."""
  def interceptor(next_fun, args, kwargs, context):
    if _is_bn_call(context) and context.module.path in paths:
      # use_running_average may come second positionally; x comes first.
      return next_fun(args[0], **{**kwargs, "use_running_average": True})
    return next_fun(*args, **kwargs)
  return interceptor


def _accumulate(estimator: str, carry, mean, var, count):
  """One batch's (mean, biased var, count) into the running estimate."""
  count = jnp.asarray(count, jnp.float32)
  if estimator == "mean":
    # fvcore's cumulative average: avg += (value - avg) / k.
    k, avg_mean, avg_var = carry
    k = k + 1.0
    unbiased = var * (count / (count - 1.0))
    return (k, avg_mean + (mean - avg_mean) / k,
            avg_var + (unbiased - avg_var) / k)
  # Chan et al.: merge (n, mean, M2) with the batch's (count, mean, var *
  # count); M2 / n is the pooled biased variance.
  n, pooled_mean, m2 = carry
  total = n + count
  delta = mean - pooled_mean
  return (total, pooled_mean + delta * (count / total),
          m2 + var * count + jnp.square(delta) * (n * count / total))


def _finish(estimator: str, carry):
  if estimator == "mean":
    _, mean, var = carry
    return mean, var
  n, mean, m2 = carry
  return mean, m2 / n


def _estimate(apply_fn, variables, batches, *, estimator: str,
              paths: list[ModulePath], eval_paths: frozenset[ModulePath],
              feature_shapes: dict[ModulePath, tuple[int, ...]],
              ) -> dict[ModulePath, tuple[jax.Array, jax.Array]]:
  """One pass over `batches`: {path: (mean, var)} for the layers at `paths`,
  with the layers at `eval_paths` in eval mode."""
  def step(carry, batch):
    with nn.intercept_methods(_eval_mode(eval_paths)):
      _, mutated = apply_fn(variables, batch, mutable=[MOMENTS])
    moments = traverse_util.flatten_dict(flax.core.unfreeze(mutated[MOMENTS]))
    return {p: _accumulate(estimator, carry[p], moments[p + ("mean",)],
                           moments[p + ("var",)], moments[p + ("count",)])
            for p in paths}, None

  zeros = lambda p: jnp.zeros(feature_shapes[p], jnp.float32)
  init = {p: (jnp.zeros((), jnp.float32), zeros(p), zeros(p)) for p in paths}
  carry, _ = lax.scan(step, init, batches)
  return {p: _finish(estimator, carry[p]) for p in paths}


def _with_statistics(batch_stats, stats: dict[ModulePath, tuple[Any, Any]]):
  """batch_stats with the mean and var of the layers in `stats` replaced,
  in the tree and dtypes of `batch_stats`."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  for path, (mean, var) in stats.items():
    for name, value in (("mean", mean), ("var", var)):
      flat[path + (name,)] = value.astype(flat[path + (name,)].dtype)
  new = traverse_util.unflatten_dict(flat)
  return flax.core.freeze(new) if isinstance(
      batch_stats, flax.core.FrozenDict) else new


def recompute_statistics(model, variables, batches, *,
                         estimator: str = "mean", layerwise: bool = False):
  """Every BN layer's running mean and variance, recomputed over `batches`.

  The weights are frozen and no state changes: the BN layers normalize each
  batch with its own statistics (training mode) and report them, and the
  estimator combines them (see the module docstring). A pure function of
  its arrays: it runs under `jax.jit` (with `model` static, e.g. through
  `functools.partial`) and under `jax.vmap` over stacked runs (a sweep's
  variables), since the batches are iterated by `lax.scan`.

  Args:
    model: a flax Module taking `train=` (bn_lab.models: applied with
      train=True), or apply_fn(variables, x, mutable=...) -> (out, mutated)
      that runs the model with its BatchNorm layers in training mode. The
      layers are bn_jax.nn.BatchNorm; for `layerwise`, they must take
      `use_running_average` at call time (as bn_lab.models' do).
    variables: the model's variables: params and batch_stats (and any other
      collections the model reads).
    batches: (N, B, ...) array, N batches of the model's inputs.
    estimator: one of ESTIMATORS: "mean" (fvcore's original PreciseBN,
      stores a mean of unbiased batch variances) or "pooled" (the mean and
      biased variance of all N * B inputs, as bn_jax stores).
    layerwise: False: one pass, every layer in training mode. True: layer l
      gets its statistics with the layers before it (in call order) in eval
      mode with their recomputed statistics, as the evaluated model runs
      them; costs one pass over the batches per BN layer.

  Returns:
    batch_stats of the tree structure of `variables["batch_stats"]`, with
    `mean` and `var` replaced in every layer that ran in training mode;
    other variables (`count`) and layers not called are kept. A model
    without BN layers gets its (empty) batch_stats back.

  Raises:
    ValueError: unknown estimator; no BN layer ran in training mode; a BN
      layer called twice in one forward pass.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}.")
  batch_stats = variables.get("batch_stats", {})
  if not batch_stats:
    return batch_stats
  apply_fn = _train_apply(model)
  order = _bn_call_order(apply_fn, variables, jax.tree.map(
      lambda b: b[0], batches))
  if not order:
    raise ValueError(
        "No BatchNorm layer reported its batch's statistics, so none ran in "
        "training mode; pass the model (applied with train=True) or an "
        "apply_fn that runs its bn_jax.nn.BatchNorm layers in training "
        "mode.")
  flat = traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  missing = [p for p in order if p + ("mean",) not in flat]
  if missing:
    raise ValueError(
        f"BatchNorm layers {['/'.join(p) for p in missing]} have no mean "
        "in variables['batch_stats']; pass the variables of this model.")
  feature_shapes = {p: flat[p + ("mean",)].shape for p in order}
  estimate = functools.partial(_estimate, apply_fn, batches=batches,
                               estimator=estimator,
                               feature_shapes=feature_shapes)
  if not layerwise:
    stats = estimate(variables, paths=order, eval_paths=frozenset())
  else:
    stats = {}
    for i, path in enumerate(order):
      current = {**variables,
                 "batch_stats": _with_statistics(batch_stats, stats)}
      stats.update(estimate(current, paths=[path],
                            eval_paths=frozenset(order[:i])))
  return _with_statistics(batch_stats, stats)


def average_params(snapshots, *, decay: float | None = None, average=None,
                   num_averaged: int = 0):
  """Equal-weight (SWA) or exponential (EMA) average of parameter snapshots.

  `torch.optim.swa_utils.AveragedModel.update_parameters` once per snapshot,
  in order: into a fresh average (num_averaged 0) the first snapshot is
  copied; every later one is merged, with n the snapshots averaged so far,
    SWA (decay None, the default `get_swa_multi_avg_fn`):
      average += (snapshot - average) / (n + 1), so the mean of all of them;
    EMA (`get_ema_multi_avg_fn(decay)`):
      average = decay * average + (1 - decay) * snapshot.

  Args:
    snapshots: a sequence of parameter trees (`variables["params"]` at
      different steps) of one structure.
    decay: None for SWA, else the EMA's decay in [0, 1].
    average, num_averaged: a running average to continue and how many
      snapshots it holds (AveragedModel's parameters and `n_averaged`), or
      None and 0 to start one.

  Returns:
    (average, num_averaged + len(snapshots)).
  """
  snapshots = list(snapshots)
  if decay is not None and not 0.0 <= decay <= 1.0:
    raise ValueError(f"decay={decay} must be in [0, 1] (average = decay * "
                     "average + (1 - decay) * snapshot), or None for SWA.")
  if not (isinstance(num_averaged, int) and num_averaged >= 0
          and (average is None) == (num_averaged == 0)):
    raise ValueError(
        f"num_averaged={num_averaged!r} with average "
        f"{'None' if average is None else 'given'}: pass both (the running "
        "average and how many snapshots it holds, >= 1) or neither.")
  if average is None and not snapshots:
    raise ValueError("average_params got no snapshots and no average; pass "
                     "at least one parameter tree.")
  for snapshot in snapshots:
    if num_averaged == 0:
      average = snapshot
    else:
      weight = 1.0 / (num_averaged + 1) if decay is None else 1.0 - decay
      average = jax.tree.map(functools.partial(_lerp, weight=weight),
                             average, snapshot)
    num_averaged += 1
  return average, num_averaged


def _lerp(start, end, weight: float):
  """torch.lerp: start + weight * (end - start), in its two forms (the
  second for weight >= 0.5), so that the rounding is PyTorch's."""
  if weight < 0.5:
    return start + weight * (end - start)
  return end - (end - start) * (1.0 - weight)


def average_and_recompute(model, snapshots, variables, batches, *,
                          decay: float | None = None, average=None,
                          num_averaged: int = 0, estimator: str = "mean",
                          layerwise: bool = False):
  """Averaged weights with statistics recomputed for them, in one call.

  PyTorch's `AveragedModel` (SWA, or an EMA with
  `get_ema_multi_avg_fn(decay)`) updated with each snapshot, then
  `torch.optim.swa_utils.update_bn(batches, averaged_model)`:
  `average_params`, then `recompute_statistics` with the averaged params.
  With the defaults (estimator "mean", layerwise False) the statistics are
  update_bn's: the mean over batches of each BN's batch means and of its
  Bessel-corrected batch variances, every layer in training mode (see the
  module docstring for what differs).

  Args:
    model: as for `recompute_statistics`: a flax Module taking `train=`,
      or apply_fn(variables, x, mutable=...).
    snapshots, decay, average, num_averaged: as for `average_params`.
    variables: the model's variables; their batch_stats give the tree that
      comes back, other collections are passed on as they are, and
      `params` is replaced by the average.
    batches: (N, B, ...) array, N batches of the model's inputs (update_bn's
      loader).
    estimator, layerwise: as for `recompute_statistics`.

  Returns:
    `variables` with the averaged params and, where they have batch_stats,
    the recomputed batch_stats.
  """
  params, _ = average_params(snapshots, decay=decay, average=average,
                             num_averaged=num_averaged)
  averaged = flax.core.copy(variables, {"params": params})
  if "batch_stats" not in averaged:
    return averaged
  return flax.core.copy(averaged, {"batch_stats": recompute_statistics(
      model, averaged, batches, estimator=estimator, layerwise=layerwise)})
