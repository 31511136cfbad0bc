"""The BN-free and batch-independent family, as pure functions.

Alternatives to batch normalization that normalize the weights instead of
the activations, normalize each example on its own, or drop normalization:

    w_hat = weight_standardize(kernel, eps=1e-6)                 # WS
    w_hat = weight_standardize(kernel, eps=1e-6, scaled=True,    # Scaled WS
                               gain=gain, gamma=1.7139)
    y = frn_tlu(x, scale, bias, tau, epsilon=1e-5)               # FRN + TLU
    y, running_var = evonorm_b0(x, scale, bias, v, running_var,  # EvoNorm-B0
                                training=True)
    y = evonorm_s0(x, scale, bias, v, num_groups=32)             # EvoNorm-S0

  * Weight Standardization (Qiao et al., 2019): each output channel of a
    conv kernel standardized over its fan-in, W_hat = (W - mean) /
    sqrt(var + eps); Scaled Weight Standardization (Brock et al., 2021,
    NF-ResNets) multiplies by gain * gamma / sqrt(fan_in), gamma being the
    activation's constant (e.g. 1.7139 for ReLU).
  * Filter Response Normalization with a Thresholded Linear Unit (Singh &
    Krishnan, 2020): nu2 = mean(x^2) over the spatial axes of each example
    and channel, y = max(gamma * x / sqrt(nu2 + eps) + beta, tau).
  * EvoNorm-B0 and EvoNorm-S0 (Liu et al., 2020), normalization and
    activation in one layer: B0 divides by max(sqrt(var_batch + eps),
    v * x + sqrt(var_instance + eps)) and keeps a running variance like BN;
    S0 multiplies by sigmoid(v * x) and divides by the group standard
    deviation, with no batch statistics.
  * SkipInit (De & Smith, 2020) is a residual branch's learned scalar,
    initialized at 0: a module only (`bn_jax.nn.SkipInit`,
    `bn_jax.nnx.SkipInit`).

`bn_jax.nn` and `bn_jax.nnx` wrap these as `WSConv`, `FRN`, `EvoNormB0`,
`EvoNormS0` and `SkipInit`.

Conventions, as `bn_jax.core` and `bn_jax.norms`: channels last (NHWC, the
feature axis is -1, every axis between the first and the last is spatial;
flax conv kernels are (H, W, in, out)); statistics in float32 for bfloat16,
float16 and float32 inputs (float64 stays float64); y in `dtype`, or else in
x's dtype promoted with the parameters' (flax's rule); momentum in flax's
convention, `running = momentum * running + (1 - momentum) * batch`.

The reference is timm (timm/layers/std_conv.py, filter_response_norm.py,
evo_norm.py): each function computes the timm layer's formula, with these
differences, all of layout or rounding:
  * layout: timm is NCHW with OIHW kernels, bn_jax NHWC with HWIO kernels;
  * names: timm's `weight` is `scale` (gamma), `eps` is `epsilon` (except
    in `weight_standardize`), `running_var` is the state `var`;
  * EvoNorm-B0's momentum: timm's `momentum` p is the weight of the new
    value, bn_jax's is `1 - p` (timm's default 0.1 is 0.9 here);
  * precision: timm rounds its statistics back to x's dtype and computes
    the rest in it; bn_jax computes everything in the statistics' dtype
    (float32 for bfloat16 x) and rounds y once;
  * timm's `apply_act=False` (FRN without TLU: pass `tau=None`; EvoNorm
    without `v`, which timm turns into an affine layer with no
    normalization at all) is `tau=None` for FRN and not offered for
    EvoNorm.
The FRN paper's learned epsilon (for 1x1 activations) is not implemented:
FRN needs at least 2 spatial values per example and channel.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import core
from bn_jax import norms


class FRNParams(NamedTuple):
  """FRN's parameters; `None` where disabled."""
  scale: jax.Array | None  # gamma (timm: weight)
  bias: jax.Array | None  # beta
  tau: jax.Array | None  # TLU's threshold; None: plain FRN


class EvoNormParams(NamedTuple):
  """EvoNorm-B0's and -S0's parameters (timm: weight, bias, v)."""
  scale: jax.Array  # gamma
  bias: jax.Array  # beta
  v: jax.Array  # v1 of the paper, initialized at 1


def init_frn(num_features: int, dtype: Any = jnp.float32, *,
             use_tau: bool = True) -> FRNParams:
  """scale = 1, bias = 0 and tau = 0 (None without TLU), timm's values."""
  return FRNParams(scale=jnp.ones((num_features,), dtype),
                   bias=jnp.zeros((num_features,), dtype),
                   tau=jnp.zeros((num_features,), dtype) if use_tau else None)


def init_evonorm(num_features: int, dtype: Any = jnp.float32,
                 ) -> EvoNormParams:
  """scale = 1, bias = 0 and v = 1 (timm's values) for B0 or S0."""
  return EvoNormParams(scale=jnp.ones((num_features,), dtype),
                       bias=jnp.zeros((num_features,), dtype),
                       v=jnp.ones((num_features,), dtype))


def init_running_var(num_features: int) -> jax.Array:
  """EvoNorm-B0's running variance: ones, float32 (timm's value)."""
  return jnp.ones((num_features,), jnp.float32)


# ----------------------------------------------------------------------------
# Validation (at trace time, on static shapes and Python numbers).


def _check_x(function: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{function}: x has dtype {x.dtype}; pass real "
                     "floating-point x (cast integers to a float dtype).")
  if x.ndim < 2:
    raise ValueError(f"{function} needs x of shape (N, ..., C), channels "
                     f"last; got shape {tuple(x.shape)}.")


def _check_channel_params(function: str, x, **params) -> None:
  channels = x.shape[-1]
  for name, value in params.items():
    if value is not None and tuple(value.shape) != (channels,):
      raise ValueError(
          f"{function}'s {name} has shape {tuple(value.shape)} but x has "
          f"{channels} channels (its last axis); give it shape "
          f"({channels},).")


def _spatial_axes(function: str, x, why: str) -> tuple[int, ...]:
  """The axes between the batch and the channels, with at least 2 values
  per example and channel (a statistic over 1 value is degenerate)."""
  axes = tuple(range(1, x.ndim - 1))
  if math.prod(x.shape[a] for a in axes) < 2:
    raise ValueError(
        f"{function} takes its statistics over the spatial axes of each "
        f"example and channel, and x of shape {tuple(x.shape)} has fewer "
        f"than 2 values there; {why}")
  return axes


def _check_epsilon(name: str, epsilon) -> None:
  problem = core.epsilon_problem(epsilon)
  if problem is not None:
    raise ValueError(f"{name}={epsilon} {problem}.")


def _dtypes(x, dtype, *params):
  """(statistics dtype, y's dtype), as `bn_jax.norms`: y in `dtype` or x's
  dtype promoted with the parameters'; statistics at least float32."""
  stats_dtype = jnp.promote_types(
      jnp.result_type(x) if dtype is None else dtype, jnp.float32)
  out_dtype = dtype if dtype is not None else jnp.result_type(
      x, *(p for p in params if p is not None))
  return stats_dtype, out_dtype


def _per_channel(value, ndim, dtype):
  """A (C,) vector shaped (1, ..., 1, C) to broadcast against x."""
  if value is None:
    return None
  return value.astype(dtype).reshape((1,) * (ndim - 1) + (-1,))


def _mean_var(x, axes, *, axis_name=None, axis_index_groups=None):
  """Mean and biased variance over `axes`, dims kept: the mean of squared
  deviations (timm's `var(unbiased=False)`), summed over `axis_name`."""
  return norms._compute_stats(  # pylint: disable=protected-access
      x, axes, dtype=None, axis_name=axis_name,
      axis_index_groups=axis_index_groups, use_mean=True,
      use_fast_variance=False, mask=None, force_float32_reductions=True)


# ----------------------------------------------------------------------------
# Weight Standardization.


def weight_standardize(kernel: jax.Array, *, eps: float,
                       scaled: bool = False, gain: jax.Array | None = None,
                       gamma: float = 1.0) -> jax.Array:
  """A conv (or dense) kernel standardized over its fan-in.

  W_hat = (W - mean) / sqrt(var + eps), mean and biased variance taken for
  each output channel over all the kernel's axes but the last (a flax
  kernel is (H, W, in, out), so the fan-in is H * W * in; with
  `feature_group_count` g, H * W * in / g). scaled=True (Scaled WS):
  W_hat * gamma / sqrt(fan_in). `gain`, if given, multiplies each output
  channel (the NF-ResNets' learned gain).

  timm: `StdConv2d` (scaled=False, eps 1e-6) and `ScaledStdConv2d`
  (scaled=True, its `gain` and `gamma`, eps 1e-6), whose eps is added to
  the variance as here. DeepMind's NFNet code differs: it divides by
  sqrt(max(var * fan_in, 1e-4)).

  Args:
    kernel: of shape (..., fan-in axes, out), any float dtype; statistics
      in float32 (float64 stays float64), W_hat in kernel's dtype.
    eps: added to the variance before the square root.
    scaled: Scaled Weight Standardization (Brock et al., 2021).
    gain: None or of shape (out,).
    gamma: the activation's gamma (scaled=True only), e.g. 1.7139 for ReLU.
  """
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"weight_standardize: kernel has dtype {kernel.dtype}; "
                     "pass a real floating-point kernel.")
  if kernel.ndim < 2:
    raise ValueError(
        f"weight_standardize needs a kernel of shape (..., in, out), got "
        f"shape {tuple(kernel.shape)}; for a flax conv kernel (H, W, in, "
        "out) it standardizes over (H, W, in).")
  _check_epsilon("eps", eps)
  fan_in = math.prod(kernel.shape[:-1])
  if fan_in < 2:
    raise ValueError(
        f"weight_standardize: a kernel of shape {tuple(kernel.shape)} has a "
        "fan-in of 1, so each standardized weight would be 0; standardize a "
        "kernel with more than one input per output channel.")
  if gain is not None and tuple(gain.shape) != (kernel.shape[-1],):
    raise ValueError(
        f"weight_standardize's gain has shape {tuple(gain.shape)} but the "
        f"kernel has {kernel.shape[-1]} output channels (its last axis); "
        f"give it shape ({kernel.shape[-1]},).")
  if isinstance(gamma, numbers.Real) and not (
      math.isfinite(gamma) and (scaled or gamma == 1.0)):
    raise ValueError(
        f"gamma={gamma}: gamma must be finite and scales only the scaled "
        "standardization; pass scaled=True or leave gamma at 1.0.")
  stats_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  w = kernel.astype(stats_dtype)
  mean, var = _mean_var(w, tuple(range(kernel.ndim - 1)))
  multiplier = lax.rsqrt(var + eps)
  if scaled:
    multiplier = multiplier * (gamma / math.sqrt(fan_in))
  if gain is not None:
    multiplier = multiplier * _per_channel(gain, kernel.ndim, stats_dtype)
  return ((w - mean) * multiplier).astype(kernel.dtype)


# ----------------------------------------------------------------------------
# Filter Response Normalization + TLU.


def frn_tlu(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
            tau: jax.Array | None, *, epsilon: float, dtype: Any = None,
            ) -> jax.Array:
  """FRN + TLU (Singh & Krishnan, 2020): max(gamma * x / sqrt(nu2 + eps)
  + beta, tau), nu2 = mean(x^2) over the spatial axes of each example and
  channel (no centring, no batch statistics).

  timm: `FilterResponseNormTlu2d` (weight, bias, tau; eps 1e-5, the
  paper's is 1e-6). Its `apply_act=False` is `tau=None`. The paper's
  learned epsilon, for 1x1 activations, is not implemented: x needs at
  least 2 spatial values per example and channel.

  Args:
    x: (N, ..., C), channels last, with spatial axes between N and C.
    scale, bias, tau: of shape (C,), or None (no scale, no bias, no TLU).
    epsilon: added to nu2 before the square root.
    dtype: y's dtype and the statistics' minimum precision (default: x's
      dtype promoted with the parameters', statistics at least float32).

  Returns:
    y of x's shape.
  """
  _check_x("frn_tlu", x)
  axes = _spatial_axes(
      "frn_tlu", x, "FRN is for conv features (N, H, W, C); the paper's "
      "learned epsilon for 1x1 maps is not implemented (use layer_norm).")
  _check_channel_params("frn_tlu", x, scale=scale, bias=bias, tau=tau)
  _check_epsilon("epsilon", epsilon)
  stats_dtype, out_dtype = _dtypes(x, dtype, scale, bias, tau)
  x = x.astype(stats_dtype)
  nu2 = jnp.mean(jnp.square(x), axes, keepdims=True)
  y = x * lax.rsqrt(nu2 + epsilon)
  if scale is not None:
    y = y * _per_channel(scale, x.ndim, stats_dtype)
  if bias is not None:
    y = y + _per_channel(bias, x.ndim, stats_dtype)
  if tau is not None:
    y = jnp.maximum(y, _per_channel(tau, x.ndim, stats_dtype))
  return y.astype(out_dtype)


# ----------------------------------------------------------------------------
# EvoNorm.


def evonorm_b0(x: jax.Array, scale: jax.Array, bias: jax.Array,
               v: jax.Array, running_var: jax.Array, *, training: bool,
               momentum: float = 0.9, epsilon: float = 1e-3,
               dtype: Any = None, axis_name: Any = None,
               axis_index_groups: Any = None,
               ) -> tuple[jax.Array, jax.Array]:
  """EvoNorm-B0 (Liu et al., 2020); returns (y, new running variance).

  y = x / max(sqrt(var + eps), v * x + sqrt(var_i + eps)) * gamma + beta,
  where var_i is the biased variance of each example and channel over the
  spatial axes, and var is, in training, the batch's biased variance of
  each channel (over the batch and spatial axes; the gradient flows
  through it), in evaluation the running variance. Training also returns
  the updated running variance, the batch's unbiased variance averaged in:
  `momentum * running_var + (1 - momentum) * var * n / (n - 1)` (n values
  per channel), not differentiated; evaluation returns `running_var` itself.

  timm: `EvoNorm2dB0` (weight, bias, v, running_var; eps 1e-3), whose
  momentum p is `1 - momentum` (timm's 0.1 is the default 0.9 here). timm's
  `apply_act=False` (no v: an affine layer, no normalization) is not
  offered.

  Args:
    x: (N, ..., C), channels last, with at least 2 spatial values per
      example and channel.
    scale, bias, v: of shape (C,).
    running_var: of shape (C,), float32 (`init_running_var`).
    training: batch variance and update (True) or running variance (False).
    momentum: in [0, 1], flax's convention (see above); no None.
    epsilon: added to both variances before the square roots.
    dtype: y's dtype and the statistics' minimum precision, as `frn_tlu`.
    axis_name, axis_index_groups: a named axis (vmap, pmap, shard_map) the
      batch is split over: the batch variance (training) is the whole
      batch's, as synchronized BN; the instance variance is per example.

  Returns:
    (y, new_running_var): y of x's shape; new_running_var of running_var's
    shape and dtype.
  """
  _check_x("evonorm_b0", x)
  spatial = _spatial_axes(
      "evonorm_b0", x, "EvoNorm-B0's instance variance is for conv "
      "features (N, H, W, C).")
  _check_channel_params("evonorm_b0", x, scale=scale, bias=bias, v=v,
                        running_var=running_var)
  if v is None or scale is None or bias is None:
    raise ValueError("evonorm_b0 needs scale, bias and v (timm's "
                     "apply_act=False, with no v, is an affine layer, not "
                     "EvoNorm-B0); create them with init_evonorm.")
  if momentum is None:
    raise ValueError(
        "evonorm_b0: momentum=None (a cumulative average) is not offered; "
        "give a number in [0, 1] (timm's momentum p is 1 - p, default 0.9).")
  core._check_hyperparameters(momentum, epsilon)  # pylint: disable=protected-access
  stats_dtype, out_dtype = _dtypes(x, dtype, scale, bias, v)
  x = x.astype(stats_dtype)
  if training:
    _, var = _mean_var(x, (0, *spatial), axis_name=axis_name,
                       axis_index_groups=axis_index_groups)
    count = math.prod(x.shape[a] for a in (0, *spatial))
    if axis_name is not None:
      count = lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
    batch_var = lax.stop_gradient(var).reshape(running_var.shape)
    new_running_var = (
        momentum * running_var
        + (1.0 - momentum) * batch_var * (count / (count - 1.0))
    ).astype(running_var.dtype)
  else:
    var = _per_channel(running_var, x.ndim, stats_dtype)
    new_running_var = running_var
  _, instance_var = _mean_var(x, spatial)
  left = jnp.sqrt(var + epsilon)
  right = x * _per_channel(v, x.ndim, stats_dtype) + jnp.sqrt(
      instance_var + epsilon)
  y = (x / jnp.maximum(left, right) * _per_channel(scale, x.ndim, stats_dtype)
       + _per_channel(bias, x.ndim, stats_dtype))
  return y.astype(out_dtype), new_running_var


def evonorm_s0(x: jax.Array, scale: jax.Array, bias: jax.Array,
               v: jax.Array, *, num_groups: int | None = 32,
               group_size: int | None = None, epsilon: float = 1e-5,
               dtype: Any = None) -> jax.Array:
  """EvoNorm-S0 (Liu et al., 2020): y = x * sigmoid(v * x) /
  sqrt(var_g + eps) * gamma + beta, var_g the biased variance of each
  example over its channel group and spatial axes (no batch statistics).

  timm: `EvoNorm2dS0` (weight, bias, v; groups 32 or group_size; eps 1e-5).
  timm's `apply_act=False` (no v: an affine layer) is not offered.

  Args:
    x: (N, ..., C), channels last; (N, C) is allowed when each group has at
      least 2 channels.
    scale, bias, v: of shape (C,).
    num_groups, group_size: exactly one (num_groups=None to give
      group_size), as `bn_jax.norms.group_norm`; they must divide C.
    epsilon: added to the group variance before the square root.
    dtype: y's dtype and the statistics' minimum precision, as `frn_tlu`.

  Returns:
    y of x's shape.
  """
  _check_x("evonorm_s0", x)
  channels = x.shape[-1]
  num_groups = norms.num_groups_of(channels, num_groups, group_size)
  group_size = channels // num_groups
  spatial = tuple(range(1, x.ndim - 1))
  if math.prod(x.shape[a] for a in spatial) * group_size < 2:
    raise ValueError(
        f"evonorm_s0 would take each group's variance over 1 value (x of "
        f"shape {tuple(x.shape)}, {num_groups} groups of {group_size} "
        "channel); use fewer, larger groups or conv features.")
  _check_channel_params("evonorm_s0", x, scale=scale, bias=bias, v=v)
  if v is None or scale is None or bias is None:
    raise ValueError("evonorm_s0 needs scale, bias and v (timm's "
                     "apply_act=False, with no v, is an affine layer, not "
                     "EvoNorm-S0); create them with init_evonorm.")
  _check_epsilon("epsilon", epsilon)
  stats_dtype, out_dtype = _dtypes(x, dtype, scale, bias, v)
  x = x.astype(stats_dtype)
  # The groups become an axis of their own: (N, ..., groups, group_size).
  grouped = x.reshape(x.shape[:-1] + (num_groups, group_size))
  _, var = _mean_var(grouped, spatial + (x.ndim,))
  std = jnp.repeat(jnp.sqrt(var + epsilon)[..., 0], group_size, axis=-1)
  y = x * jax.nn.sigmoid(x * _per_channel(v, x.ndim, stats_dtype)) / std
  y = (y * _per_channel(scale, x.ndim, stats_dtype)
       + _per_channel(bias, x.ndim, stats_dtype))
  return y.astype(out_dtype)
