"""Batch normalization as pure functions with explicit state.

The whole algorithm of Ioffe & Szegedy (2015) in three functions:

    params, state = init(feature_shape)
    y, state = apply(params, state, x, training=True)    # Algorithm 1 + update
    y, _ = apply(params, state, x, training=False)       # Algorithm 2

Nothing is hidden: `params` (gamma, beta) are what you differentiate,
`state` (running mean, running variance, update count) is what you thread.

Conventions (see the README for the table beside flax and PyTorch):
  * momentum: flax's convention, `running = m * running + (1 - m) * batch`,
    default 0.99. PyTorch's `momentum` is the weight of the *new* value:
    `m_torch = 1 - m` (so flax/bn_jax 0.99 == PyTorch 0.01; PyTorch's default
    0.1 == bn_jax 0.9). `momentum=None` keeps an exact cumulative average
    over all updates (PyTorch's `momentum=None`), which is how population
    statistics are recomputed after training.
  * running variance: biased (divides by m, as flax and Keras) by default so
    that state and checkpoints match `flax.linen.BatchNorm`;
    `unbiased_running_var=True` stores m/(m-1) * var as the paper's
    Algorithm 2 and PyTorch do. Normalization in training always uses the
    biased batch variance (Algorithm 1), in every framework.
  * statistics are computed in float32 whatever x's dtype; y has x's dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Axes = int | Sequence[int]

STATS_METHODS = ("shifted", "two_pass", "one_pass")


class BNParams(NamedTuple):
  """Learned affine parameters; `None` where disabled (use_scale/use_bias)."""
  scale: jax.Array | None  # gamma
  bias: jax.Array | None  # beta


class BNState(NamedTuple):
  """Running (population) statistics, threaded explicitly through training."""
  mean: jax.Array
  var: jax.Array
  count: jax.Array  # number of updates so far (int32 scalar)


def init(feature_shape: int | Sequence[int], dtype: Any = jnp.float32, *,
         use_scale: bool = True, use_bias: bool = True,
         ) -> tuple[BNParams, BNState]:
  """Returns fresh params (gamma = 1, beta = 0) and state (mean 0, var 1).

  Args:
    feature_shape: shape of the normalized features, e.g. `x.shape[-1]` for
      `axis=-1`, or `(x.shape[1], x.shape[3])` for `axis=(1, 3)`.
    dtype: dtype of gamma and beta. Running statistics are always float32.
    use_scale, use_bias: whether gamma / beta exist.
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(
      feature_shape)
  params = BNParams(
      scale=jnp.ones(shape, dtype) if use_scale else None,
      bias=jnp.zeros(shape, dtype) if use_bias else None)
  state = BNState(mean=jnp.zeros(shape, jnp.float32),
                  var=jnp.ones(shape, jnp.float32),
                  count=jnp.zeros((), jnp.int32))
  return params, state


# ----------------------------------------------------------------------------
# Validation (all at trace time, on static shapes and Python numbers).


def feature_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
  """Normalizes `axis` to sorted non-negative feature axes of an ndim array."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if not axes:
    raise ValueError("axis must name at least one feature axis, got ().")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"axis {a} is out of range for x with {ndim} dimensions; valid "
          f"feature axes are {-ndim}..{ndim - 1}.")
  normalized = tuple(sorted({a % ndim for a in axes}))
  if len(normalized) != len(axes):
    raise ValueError(f"axis {axis} names the same dimension twice.")
  return normalized


def _check_hyperparameters(momentum, epsilon) -> None:
  # Traced values (a vmapped sweep over momentum or epsilon) are not checked
  # here; the experiment config is validated before anything is traced.
  if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"momentum={momentum} is outside [0, 1]. bn_jax uses flax's "
        "convention running = momentum * running + (1 - momentum) * batch; "
        "a PyTorch momentum p corresponds to 1 - p.")
  if isinstance(epsilon, (int, float)) and not epsilon > 0:
    raise ValueError(f"epsilon={epsilon} must be > 0 (it keeps 1/sqrt(var + "
                     "epsilon) finite); the usual value is 1e-5.")


def _check_shapes(params: BNParams, state: BNState, feature_shape) -> None:
  named = [("params.scale", params.scale), ("params.bias", params.bias),
           ("state.mean", state.mean), ("state.var", state.var)]
  for name, value in named:
    if value is not None and tuple(value.shape) != feature_shape:
      raise ValueError(
          f"{name} has shape {tuple(value.shape)} but x's feature shape is "
          f"{feature_shape}; create params and state with "
          f"init({feature_shape}) or pass the matching `axis`.")


# ----------------------------------------------------------------------------
# Statistics.


def _psum(values, axis_name, axis_index_groups):
  if axis_name is None:
    return values
  return lax.psum(values, axis_name, axis_index_groups=axis_index_groups)


def _reference(x32, reduction_axes, axis_name, axis_index_groups):
  """A per-feature value near the mean: the first example along the reduced
  axes. Subtracting it before squaring avoids the catastrophic cancellation
  of E[x^2] - E[x]^2 when |mean| >> std, without a full-size centred copy."""
  index = tuple(0 if a in reduction_axes else slice(None)
                for a in range(x32.ndim))
  ref = lax.stop_gradient(x32[index])
  if axis_name is not None:  # every device must use the same reference
    ref = lax.pmean(ref, axis_name, axis_index_groups=axis_index_groups)
  return jnp.expand_dims(ref, reduction_axes)


def moments(x: jax.Array, reduction_axes: tuple[int, ...], *,
            mask: jax.Array | None = None, axis_name=None,
            axis_index_groups=None, stats_method: str = "shifted",
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch mean and biased variance in float32, reduced keeping dims.

  Returns (mean, var, count): `count` is the number of values per feature
  (summed over `axis_name` if given), used for the unbiased correction.
  The variance is clamped at 0, so it can never be negative.
  """
  if stats_method not in STATS_METHODS:
    raise ValueError(f"stats_method={stats_method!r}; choose one of "
                     f"{STATS_METHODS}.")
  x32 = x.astype(jnp.float32)
  sum_ = lambda v: jnp.sum(v, axis=reduction_axes, keepdims=True)
  if mask is None:
    where = lambda v: v
    local_count = jnp.float32(
        math.prod(x.shape[a] for a in reduction_axes))
  else:
    weight = jnp.broadcast_to(mask, x.shape)
    where = lambda v: jnp.where(weight, v, 0.0)
    local_count = sum_(weight.astype(jnp.float32))
  total, count = _psum((sum_(where(x32)), local_count), axis_name,
                       axis_index_groups)
  mean = total / count
  if stats_method == "two_pass":
    sq = _psum(sum_(where(jnp.square(x32 - mean))), axis_name,
               axis_index_groups)
    var = sq / count
  elif stats_method == "shifted":
    ref = _reference(x32, reduction_axes, axis_name, axis_index_groups)
    sq = _psum(sum_(where(jnp.square(x32 - ref))), axis_name,
               axis_index_groups)
    var = sq / count - jnp.square(mean - ref)
  else:  # one_pass: fastest, loses precision when |mean| >> std
    sq = _psum(sum_(where(jnp.square(x32))), axis_name, axis_index_groups)
    var = sq / count - jnp.square(mean)
  return mean, jnp.maximum(var, 0.0), count


# ----------------------------------------------------------------------------
# Training-mode normalization with the paper's analytic backward pass.


def batch_norm_backward(dy, x, mean, inv_std, scale, reduction_axes, *,
                        axis_name=None, axis_index_groups=None):
  """Analytic (dx, dgamma, dbeta) of Ioffe & Szegedy (2015), compact form.

  With xhat = (x - mean) * inv_std over m values per feature:
      dbeta  = sum(dy)
      dgamma = sum(dy * xhat)
      dx     = gamma * inv_std * (dy - dbeta / m - xhat * dgamma / m)
  where the sums in dx run over the whole (possibly cross-device) batch.
  dx is computed in one pass as A * dy + B * x + C with per-feature A, B, C,
  recomputing xhat from x rather than storing it.

  dgamma and dbeta are this device's contributions, exactly what autodiff
  gives: under `pmap` average or sum them as for any other gradient; under
  `vmap(axis_name=...)` or `shard_map` JAX sums them for replicated params.

  Arrays `mean`, `inv_std`, `scale` are float32 with reduced dims kept.
  Returns dx in x's dtype and dgamma, dbeta in float32 with dims kept.
  """
  dy32 = dy.astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  xhat = (x32 - mean) * inv_std
  sum_dy = jnp.sum(dy32, axis=reduction_axes, keepdims=True)
  sum_dy_xhat = jnp.sum(dy32 * xhat, axis=reduction_axes, keepdims=True)
  local_count = jnp.float32(math.prod(x.shape[a] for a in reduction_axes))
  g_sum_dy, g_sum_dy_xhat, count = _psum(
      (sum_dy, sum_dy_xhat, local_count), axis_name, axis_index_groups)
  a = scale * inv_std
  b = -a * inv_std * g_sum_dy_xhat / count
  c = -a * g_sum_dy / count - b * mean
  dx = (a * dy32 + b * x32 + c).astype(x.dtype)
  return dx, sum_dy_xhat, sum_dy


def _normalize(x, mean, var, scale, bias, epsilon):
  """y = (x - mean) / sqrt(var + eps) * scale + bias as one fused pass."""
  inv_std = lax.rsqrt(var + epsilon)
  multiplier = inv_std if scale is None else inv_std * scale
  offset = -mean * multiplier
  if bias is not None:
    offset = offset + bias
  return (x.astype(jnp.float32) * multiplier + offset).astype(x.dtype)


def _varying_axes(value) -> frozenset:
  manual = getattr(jax.typeof(value), "manual_axis_type", None)
  return getattr(manual, "varying", frozenset())


def _vary_like_x(values, x, axis_name):
  """Marks replicated gamma and beta as varying over the axes x varies over.

  Under shard_map, gamma and beta are replicated but their cotangents (this
  device's sums) vary; once marked varying, JAX psums the cotangents when
  transposing, as autodiff does. Elsewhere (vmap, pmap) this is a no-op.
  """
  if axis_name is None:
    return values
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  x_varying = _varying_axes(x)
  def vary(value):
    missing = tuple(n for n in names
                    if n in x_varying and n not in _varying_axes(value))
    return lax.pcast(value, missing, to="varying") if missing else value
  return jax.tree.map(vary, values)


def _make_train_normalize(reduction_axes, axis_name, axis_index_groups,
                          stats_method):
  """custom_vjp of x, scale, bias, epsilon -> (y, mean, var).

  mean and var are returned under stop_gradient by the caller (running
  statistics are state, never differentiated), so their cotangents are
  zero and the backward pass ignores them.
  """

  @jax.custom_vjp
  def normalize(x, scale, bias, epsilon):
    mean, var, _ = moments(x, reduction_axes, axis_name=axis_name,
                           axis_index_groups=axis_index_groups,
                           stats_method=stats_method)
    return _normalize(x, mean, var, scale, bias, epsilon), mean, var

  def forward(x, scale, bias, epsilon):
    y, mean, var = normalize(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, lax.rsqrt(var + epsilon), scale, epsilon)

  def backward(residuals, cotangents):
    x, mean, inv_std, scale, epsilon = residuals
    dy, _, _ = cotangents
    dx, dscale, dbias = batch_norm_backward(
        dy, x, mean, inv_std, scale, reduction_axes, axis_name=axis_name,
        axis_index_groups=axis_index_groups)
    return (dx, dscale.reshape(scale.shape).astype(scale.dtype),
            dbias.reshape(scale.shape), jnp.zeros_like(epsilon))

  normalize.defvjp(forward, backward)
  return normalize


# ----------------------------------------------------------------------------
# The public apply.


def apply(params: BNParams, state: BNState, x: jax.Array, *,
          training: bool, axis: Axes = -1, momentum: float | None = 0.99,
          epsilon: float = 1e-5, unbiased_running_var: bool = False,
          axis_name: Any = None, axis_index_groups: Any = None,
          mask: jax.Array | None = None, stats_method: str = "shifted",
          analytic_grad: bool = True,
          ) -> tuple[jax.Array, BNState]:
  """Batch-normalizes x; returns (y, new_state).

  Args:
    params: BNParams from `init` (gamma, beta of the feature shape).
    state: BNState from `init` or a previous `apply`.
    x: input; any float dtype. y has x's dtype; statistics are float32.
    training: True normalizes with the batch's mean and biased variance and
      updates the running statistics (Algorithm 1); False normalizes with the
      running statistics and returns `state` unchanged (Algorithm 2).
    axis: feature axis or axes, kept; all others are reduced (N, H, W for a
      channels-last conv activation with the default axis=-1).
    momentum: `running = momentum * running + (1 - momentum) * batch` (flax's
      convention; PyTorch's momentum is `1 - momentum`). None: exact
      cumulative average over all updates, `count` included.
    epsilon: added to the variance before the square root.
    unbiased_running_var: store var * m / (m - 1) in the running variance
      (paper, PyTorch) instead of the biased var (flax, Keras; default).
    axis_name: a named axis (vmap, pmap, shard_map) over which statistics are
      averaged, i.e. synchronized ("cross-replica") batch norm.
    axis_index_groups: optional groups of axis indices, each synchronized
      separately (see `lax.psum`).
    mask: optional boolean array broadcastable to x; False entries (padding)
      do not count in the statistics. Masked training uses autodiff.
    stats_method: "shifted" (default: a per-feature reference value is
      subtracted before squaring, stable for large offsets), "two_pass"
      (centre with the mean first) or "one_pass" (E[x^2] - E[x]^2, fastest,
      inaccurate when |mean| >> std).
    analytic_grad: use the paper's backward formulas as a custom VJP
      (default); False differentiates the forward formula with autodiff.

  Returns:
    (y, new_state).
  """
  axes = feature_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in axes)
  feature_shape = tuple(x.shape[a] for a in axes)
  _check_shapes(params, state, feature_shape)
  _check_hyperparameters(momentum, epsilon)
  # Per-feature arrays are reshaped to broadcast against x.
  expand = lambda v: None if v is None else jnp.expand_dims(
      v, reduction_axes)

  if not training:
    y = _normalize(x, expand(state.mean), expand(state.var),
                   expand(params.scale), expand(params.bias), epsilon)
    return y, state

  values_per_feature = math.prod(x.shape[a] for a in reduction_axes)
  if axis_name is not None and axis_index_groups is None:
    values_per_feature *= lax.axis_size(axis_name)
  if values_per_feature < 2:
    raise ValueError(
        f"training-mode batch norm needs at least 2 values per feature to "
        f"estimate a variance, but x of shape {x.shape} with feature axes "
        f"{axes} has {values_per_feature}; use a batch larger than 1 or "
        f"training=False.")

  use_custom = analytic_grad and mask is None
  if use_custom:
    scale = params.scale
    if scale is None:
      scale = jnp.ones(feature_shape, jnp.float32)
    bias = params.bias
    if bias is None:
      bias = jnp.zeros(feature_shape, jnp.float32)
    scale, bias = _vary_like_x((scale, bias), x, axis_name)
    normalize = _make_train_normalize(reduction_axes, axis_name,
                                      axis_index_groups, stats_method)
    y, mean, var = normalize(x, expand(scale.astype(jnp.float32)),
                             expand(bias.astype(jnp.float32)),
                             jnp.asarray(epsilon, jnp.float32))
    count = jnp.float32(values_per_feature)
  else:
    mean, var, count = moments(
        x, reduction_axes, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, stats_method=stats_method)
    y = _normalize(x, mean, var, expand(params.scale), expand(params.bias),
                   epsilon)

  new_state = update_running_stats(
      state, lax.stop_gradient(mean.reshape(feature_shape)),
      lax.stop_gradient(var.reshape(feature_shape)),
      jnp.broadcast_to(count, mean.shape).reshape(feature_shape),
      momentum=momentum, unbiased=unbiased_running_var)
  return y, new_state


def update_running_stats(state: BNState, batch_mean, batch_var, count, *,
                         momentum, unbiased: bool) -> BNState:
  """Exponential (or, with momentum=None, cumulative) running statistics."""
  if unbiased:
    batch_var = batch_var * count / jnp.maximum(count - 1.0, 1.0)
  new_count = state.count + 1
  if momentum is None:
    weight = 1.0 / new_count.astype(jnp.float32)  # exact cumulative average
  else:
    weight = 1.0 - jnp.asarray(momentum, jnp.float32)
  mean = state.mean + weight * (batch_mean - state.mean)
  var = state.var + weight * (batch_var - state.var)
  return BNState(mean=mean, var=var, count=new_count)


# ----------------------------------------------------------------------------
# Inference folding.


def fold_into_preceding(kernel: jax.Array, bias: jax.Array | None,
                        params: BNParams, state: BNState, *,
                        epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """Folds eval-mode BN into the preceding Dense or Conv layer.

  `kernel` has its output features last: (in, out) for Dense, (H, W, in, out)
  for a flax Conv. For layer(x) = x @ kernel + bias followed by eval BN,
  returns (kernel', bias') with x @ kernel' + bias' == BN(layer(x)).
  """
  multiplier = lax.rsqrt(state.var + epsilon)
  if params.scale is not None:
    multiplier = multiplier * params.scale
  if bias is None:
    bias = jnp.zeros_like(state.mean)
  new_bias = (bias - state.mean) * multiplier
  if params.bias is not None:
    new_bias = new_bias + params.bias
  return kernel * multiplier.astype(kernel.dtype), new_bias.astype(
      kernel.dtype)
