"""Layer, group, instance and RMS normalization as pure, stateless functions.

The per-example relatives of batch normalization (`bn_jax.core`): the same
normalize-then-affine step, with statistics over other axes and no running
state, so one function each suffices:

    params = init(x.shape[-1])
    y = layer_norm(x, *params)                # each example, all features
    y = group_norm(x, *params, num_groups=8)  # each example, channel groups
    y = instance_norm(x, *params)             # each example and channel
    y = rms_norm(x, params.scale)             # root mean square, no centring

Semantics and numerics are flax.linen's (`LayerNorm`, `GroupNorm`,
`InstanceNorm`, `RMSNorm`): the same axes arguments and defaults (epsilon
1e-6, `num_groups=32`), the same variance formula (`use_fast_variance=True`:
E[x^2] - E[x]^2, clamped at 0; False: E[(x - mean)^2]), statistics in float32
for float32 and narrower x (`force_float32_reductions`), y in `dtype` or else
x's dtype promoted with scale's and bias's. `bn_jax.nn` and `bn_jax.nnx` wrap
these functions as flax modules.

Departures from flax, all in cases where flax's result is silently
useless: a statistic over a single value (instance norm on an MLP's (N, C)
features, one channel per group without spatial axes) is a trace-time
error, as its output would be `bias` whatever x; with `mask` under
`axis_name` the devices' statistics are weighted by their unmasked counts
(flax averages the devices' means); and a statistic with every value masked
is 0, not NaN.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import core

Axes = int | Sequence[int]


class NormParams(NamedTuple):
  """Learned affine parameters; `None` where disabled (use_scale/use_bias)."""
  scale: jax.Array | None  # gamma
  bias: jax.Array | None  # beta


def init(feature_shape: int | Sequence[int], dtype: Any = jnp.float32, *,
         use_scale: bool = True, use_bias: bool = True) -> NormParams:
  """Returns scale = 1 and bias = 0 of `feature_shape` (flax's initializers).

  Args:
    feature_shape: `feature_shape(x.shape, feature_axes)` for layer, instance
      and RMS norm; `x.shape[-1]` (the channels) for group norm.
    dtype: dtype of the parameters.
    use_scale, use_bias: whether scale / bias exist (None otherwise). RMS
      norm takes no bias: `init(..., use_bias=False)`.
  """
  shape = ((feature_shape,) if isinstance(feature_shape, numbers.Integral)
           else tuple(feature_shape))
  return NormParams(scale=jnp.ones(shape, dtype) if use_scale else None,
                    bias=jnp.zeros(shape, dtype) if use_bias else None)


def feature_shape(x_shape: Sequence[int], feature_axes: Axes = -1,
                  ) -> tuple[int, ...]:
  """The shape of scale and bias for `feature_axes` of an x of `x_shape`."""
  axes = core.canonical_axes(len(x_shape), feature_axes, "feature_axes")
  return tuple(x_shape[a] for a in axes)


# ----------------------------------------------------------------------------
# Validation (at trace time, on static shapes and Python numbers).


def _check_param_shape(name: str, value, shape, feature_axes) -> None:
  if value is not None and tuple(value.shape) != shape:
    raise ValueError(
        f"{name} has shape {tuple(value.shape)} but x's feature shape (axes "
        f"{feature_axes}) is {shape}; create it with init({shape}) or pass "
        f"the feature axes it was made for.")


def _reduction_axes(function: str, ndim: int, axes: Axes) -> tuple[int, ...]:
  """Layer and RMS norm's reduction axes, canonical and not empty."""
  axes = core.canonical_axes(ndim, axes, "reduction_axes")
  if not axes:
    raise ValueError(f"{function} needs at least one reduction axis, got "
                     "reduction_axes=(); -1 normalizes over the features.")
  return axes


def _check_values_per_statistic(function: str, x_shape, reduction_axes,
                                extra: int = 1, axis_name=None) -> None:
  """A mean and variance over one value normalize x to exactly 0, so y is
  `bias` whatever x is and no gradient reaches x: always a mistake."""
  if axis_name is not None:  # more values live on the other devices
    return
  count = math.prod(x_shape[a] for a in reduction_axes) * extra
  if count < 2:
    raise ValueError(
        f"{function} would compute each mean and variance over {count} "
        f"value (x of shape {tuple(x_shape)}, reduced axes "
        f"{tuple(reduction_axes)}), so its output would be `bias` whatever "
        f"x is; reduce over more values.")


def num_groups_of(channels: int, num_groups: int | None,
                  group_size: int | None) -> int:
  """The number of groups from exactly one of num_groups and group_size.

  Raises a ValueError naming the bad value when both or neither are given,
  or when the groups do not split `channels` evenly.
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"group norm takes exactly one of num_groups and group_size, got "
        f"num_groups={num_groups}, group_size={group_size}; to give "
        f"group_size pass num_groups=None (its default is 32).")
  if group_size is not None:
    if (not isinstance(group_size, numbers.Integral) or group_size <= 0
        or channels % group_size):
      raise ValueError(
          f"group_size={group_size} does not divide the {channels} channels "
          f"(x.shape[-1]); choose a divisor of {channels}.")
    return channels // group_size
  if (not isinstance(num_groups, numbers.Integral) or num_groups <= 0
      or channels % num_groups):
    raise ValueError(
        f"num_groups={num_groups} does not divide the {channels} channels "
        f"(x.shape[-1]); choose a divisor of {channels}.")
  return int(num_groups)


# ----------------------------------------------------------------------------
# Statistics and the normalization they feed.


def _abs_sq(x):
  """|x|^2 elementwise (complex x included, as in flax)."""
  if jnp.iscomplexobj(x):
    return lax.square(lax.real(x)) + lax.square(lax.imag(x))
  return lax.square(x)


def _compute_stats(x, axes, *, dtype, axis_name, axis_index_groups,
                   use_mean, use_fast_variance, mask,
                   force_float32_reductions):
  """(mean, var) over `axes` of x, dims kept; flax's `_compute_stats`.

  Statistics are at least float32 (`force_float32_reductions`), so that
  bfloat16 activations do not lose their variance to rounding; float64
  stays float64. The fast variance E[|x|^2] - |E[x]|^2 reads x once but
  cancels when |mean| >> std; it is clamped at 0. Across devices the sums
  and counts are summed in one psum, so masked devices weigh by their counts.
  """
  stats_dtype = jnp.result_type(x) if dtype is None else dtype
  if force_float32_reductions:
    stats_dtype = jnp.promote_types(stats_dtype, jnp.float32)
  x = x.astype(stats_dtype)
  real_dtype = jnp.finfo(stats_dtype).dtype
  if mask is None:
    where = None
    count = jnp.asarray(math.prod(x.shape[a] for a in axes), real_dtype)
  else:
    where = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    count = jnp.sum(where, axes, keepdims=True, dtype=real_dtype)

  def means(*values):
    """Means over `axes` (and the devices): sums and count in one psum."""
    sums = [jnp.sum(v, axes, keepdims=True, where=where) for v in values]
    if axis_name is not None:
      sums, total_count = lax.psum((sums, count), axis_name,
                                   axis_index_groups=axis_index_groups)
    else:
      total_count = count
    # A statistic with every value masked (an all-padding example) is 0
    # rather than 0 / 0: a NaN there would reach every gradient, even where
    # the loss masks that example out.
    total_count = jnp.maximum(total_count, 1.0)
    return [s / total_count for s in sums]

  if not use_mean:  # RMS norm: the mean square, without centring
    var, = means(_abs_sq(x))
    return jnp.zeros_like(var), var
  if use_fast_variance:
    mean, mean_sq = means(x, _abs_sq(x))
    return mean, jnp.maximum(mean_sq - _abs_sq(mean), 0.0)
  mean, = means(x)
  var, = means(_abs_sq(x - mean))
  return mean, var


def _normalize(x, mean, var, scale, bias, feature_axes, epsilon, dtype):
  """y = (x - mean) * rsqrt(var + epsilon) * scale + bias; flax's order of
  operations, in the statistics' precision, rounded once to y's dtype."""
  broadcast = tuple(x.shape[a] if a in feature_axes else 1
                    for a in range(x.ndim))
  out_dtype = dtype if dtype is not None else jnp.result_type(
      x, *(p for p in (scale, bias) if p is not None))
  if not jnp.issubdtype(out_dtype, jnp.inexact):  # integer x
    out_dtype = jnp.promote_types(out_dtype, jnp.float32)
  multiplier = lax.rsqrt(var + epsilon)
  if scale is not None:
    multiplier = multiplier * scale.reshape(broadcast)
  y = (x - mean) * multiplier
  if bias is not None:
    y = y + bias.reshape(broadcast)
  return y.astype(out_dtype)


def _normalize_over(function, x, scale, bias, reduction_axes, feature_axes, *,
                    epsilon, dtype, axis_name, axis_index_groups, use_mean,
                    use_fast_variance, force_float32_reductions, mask):
  """The common body: checks, statistics over reduction_axes, normalize."""
  core._check_hyperparameters(None, epsilon)  # pylint: disable=protected-access
  shape = tuple(x.shape[a] for a in feature_axes)
  _check_param_shape(f"{function}'s scale", scale, shape, feature_axes)
  _check_param_shape(f"{function}'s bias", bias, shape, feature_axes)
  mean, var = _compute_stats(
      x, reduction_axes, dtype=dtype, axis_name=axis_name,
      axis_index_groups=axis_index_groups, use_mean=use_mean,
      use_fast_variance=use_fast_variance, mask=mask,
      force_float32_reductions=force_float32_reductions)
  return _normalize(x, mean, var, scale, bias, feature_axes, epsilon, dtype)


# ----------------------------------------------------------------------------
# The public functions. Common arguments:
#   epsilon: added to the variance before the square root.
#   dtype: y's dtype and the statistics' minimum precision (default: x's
#     dtype promoted with scale's and bias's, statistics at least float32).
#   axis_name, axis_index_groups: a named axis (pmap, shard_map, vmap) over
#     which x is split, so statistics are summed across it (as in flax,
#     needed only when one example's values live on several devices).
#   use_fast_variance: E[x^2] - E[x]^2 (one read of x, flax's default) or,
#     if False, E[(x - mean)^2] (accurate when |mean| >> std).
#   force_float32_reductions: False computes statistics in `dtype` or x's
#     dtype even if narrower than float32 (flax's switch; keep True).
#   mask: optional boolean array broadcastable to x; False entries do not
#     count in the statistics (they are still normalized).


def layer_norm(x: jax.Array, scale: jax.Array | None,
               bias: jax.Array | None, *, reduction_axes: Axes = -1,
               feature_axes: Axes = -1, epsilon: float = 1e-6,
               dtype: Any = None, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               force_float32_reductions: bool = True,
               mask: jax.Array | None = None) -> jax.Array:
  """Layer normalization (Ba et al., 2016): each example over its features.

  Args:
    x: input, any shape; any float dtype.
    scale, bias: of shape `feature_shape(x.shape, feature_axes)`, or None.
    reduction_axes: axes the mean and variance are taken over (the features
      of one example; -1 for (N, C), (1, 2, 3) for a whole NHWC example).
    feature_axes: axes with a separate scale and bias each.
    epsilon, dtype, axis_name, axis_index_groups, use_fast_variance,
    force_float32_reductions, mask: see the module notes above.

  Returns:
    y of x's shape.
  """
  reduction_axes = _reduction_axes("layer_norm", x.ndim, reduction_axes)
  _check_values_per_statistic("layer_norm", x.shape, reduction_axes,
                              axis_name=axis_name)
  return _normalize_over(
      "layer_norm", x, scale, bias, reduction_axes,
      core.canonical_axes(x.ndim, feature_axes, "feature_axes"),
      epsilon=epsilon,
      dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
      use_mean=True, use_fast_variance=use_fast_variance,
      force_float32_reductions=force_float32_reductions, mask=mask)


def rms_norm(x: jax.Array, scale: jax.Array | None, *,
             reduction_axes: Axes = -1, feature_axes: Axes = -1,
             epsilon: float = 1e-6, dtype: Any = None, axis_name: Any = None,
             axis_index_groups: Any = None, use_fast_variance: bool = True,
             force_float32_reductions: bool = True,
             mask: jax.Array | None = None) -> jax.Array:
  """RMS normalization (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps).

  No centring and no bias; arguments as in `layer_norm` (use_fast_variance
  is accepted for flax's signature and changes nothing: there is no mean).
  """
  del use_fast_variance  # the mean square has one formula
  reduction_axes = _reduction_axes("rms_norm", x.ndim, reduction_axes)
  return _normalize_over(
      "rms_norm", x, scale, None, reduction_axes,
      core.canonical_axes(x.ndim, feature_axes, "feature_axes"),
      epsilon=epsilon,
      dtype=dtype, axis_name=axis_name, axis_index_groups=axis_index_groups,
      use_mean=False, use_fast_variance=False,
      force_float32_reductions=force_float32_reductions, mask=mask)


def instance_norm(x: jax.Array, scale: jax.Array | None,
                  bias: jax.Array | None, *, feature_axes: Axes = -1,
                  epsilon: float = 1e-6, dtype: Any = None,
                  axis_name: Any = None, axis_index_groups: Any = None,
                  use_fast_variance: bool = True,
                  force_float32_reductions: bool = True,
                  mask: jax.Array | None = None) -> jax.Array:
  """Instance normalization (Ulyanov et al., 2016): each example and channel
  over its spatial axes.

  Axis 0 is the batch axis; every axis other than it and `feature_axes` is
  reduced, so x needs at least one such (spatial) axis: (N, H, W, C)
  conv features, not an MLP's (N, C). Other arguments as in `layer_norm`.
  """
  feature_axes = core.canonical_axes(x.ndim, feature_axes, "feature_axes")
  if 0 in feature_axes:
    raise ValueError(
        f"instance_norm's feature_axes={feature_axes} include axis 0, the "
        f"batch axis, which instance norm keeps (each example is normalized "
        f"on its own); name the channel axes, e.g. -1 for NHWC.")
  reduction_axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
  if not reduction_axes:
    raise ValueError(
        f"instance_norm needs spatial axes to normalize over, but x of shape "
        f"{tuple(x.shape)} has only the batch axis 0 and the feature axes "
        f"{feature_axes}; use it on conv features (N, H, W, C). For an MLP's "
        f"(N, C) features use layer_norm or group_norm.")
  _check_values_per_statistic("instance_norm", x.shape, reduction_axes,
                              axis_name=axis_name)
  return _normalize_over(
      "instance_norm", x, scale, bias, reduction_axes, feature_axes,
      epsilon=epsilon, dtype=dtype, axis_name=axis_name,
      axis_index_groups=axis_index_groups, use_mean=True,
      use_fast_variance=use_fast_variance,
      force_float32_reductions=force_float32_reductions, mask=mask)


def group_norm(x: jax.Array, scale: jax.Array | None,
               bias: jax.Array | None, *, num_groups: int | None = 32,
               group_size: int | None = None,
               reduction_axes: Axes | None = None, epsilon: float = 1e-6,
               dtype: Any = None, axis_name: Any = None,
               axis_index_groups: Any = None, use_fast_variance: bool = True,
               force_float32_reductions: bool = True,
               mask: jax.Array | None = None) -> jax.Array:
  """Group normalization (Wu & He, 2018): each example over groups of
  channels (the last axis) and its spatial axes.

  Args:
    x: input (N, ..., C); the last axis holds the channels.
    scale, bias: of shape (C,), or None.
    num_groups: number of channel groups (32, the paper's default), or None
      when `group_size` is given; exactly one of the two.
    group_size: channels per group (1 is instance norm over channels).
    reduction_axes: the axes reduced, which must include the last; default
      every axis but the first (the batch).
    epsilon, dtype, axis_name, axis_index_groups, use_fast_variance,
    force_float32_reductions, mask: see the module notes above.

  Returns:
    y of x's shape.
  """
  if x.ndim < 2:
    raise ValueError(f"group_norm needs x of shape (N, ..., C), got shape "
                     f"{tuple(x.shape)}.")
  channels = x.shape[-1]
  num_groups = num_groups_of(channels, num_groups, group_size)
  group_size = channels // num_groups
  if reduction_axes is None:
    reduction_axes = tuple(range(1, x.ndim))
  reduction_axes = core.canonical_axes(x.ndim, reduction_axes,
                                       "reduction_axes")
  if not reduction_axes or reduction_axes[-1] != x.ndim - 1:
    raise ValueError(
        f"group_norm's reduction_axes={reduction_axes} must include the last "
        f"axis ({x.ndim - 1}), the channels that form the groups; e.g. "
        f"{tuple(range(1, x.ndim))} (the default).")
  _check_values_per_statistic("group_norm", x.shape, reduction_axes[:-1],
                              extra=group_size, axis_name=axis_name)
  # Groups become an axis of their own: statistics over the spatial axes and
  # the channels within a group, then one (mean, var) per group for each of
  # its channels.
  grouped_shape = x.shape[:-1] + (num_groups, group_size)
  if mask is not None:
    mask = jnp.broadcast_to(mask, x.shape).reshape(grouped_shape)
  core._check_hyperparameters(None, epsilon)  # pylint: disable=protected-access
  feature_axes = (x.ndim - 1,)
  _check_param_shape("group_norm's scale", scale, (channels,), feature_axes)
  _check_param_shape("group_norm's bias", bias, (channels,), feature_axes)
  mean, var = _compute_stats(
      x.reshape(grouped_shape), reduction_axes[:-1] + (x.ndim,), dtype=dtype,
      axis_name=axis_name, axis_index_groups=axis_index_groups, use_mean=True,
      use_fast_variance=use_fast_variance, mask=mask,
      force_float32_reductions=force_float32_reductions)
  per_channel = lambda v: jnp.repeat(v[..., 0], group_size, axis=-1)
  return _normalize(x, per_channel(mean), per_channel(var), scale, bias,
                    feature_axes, epsilon, dtype)
