"""flax.nnx front end: BatchNorm and the per-example norms as nnx Modules.

Drop-ins for `flax.nnx.BatchNorm`, `LayerNorm`, `GroupNorm`, `InstanceNorm`
and `RMSNorm`: the same constructor arguments and defaults, the same
variables under the same attribute names (`nnx.Param` scale and bias;
`nnx.BatchStat` mean and var), so `nnx.state` trees and checkpoints carry
over, and the same switching between training and evaluation
(`use_running_average` in the constructor or the call, `model.train()` /
`model.eval()`, `nnx.view(model, use_running_average=...)`).

The arithmetic is bn_jax's, shared with `bn_jax.nn`: BatchNorm calls
`bn_jax.core.apply`, the others the functions in `bn_jax.norms`.

The BN-free family of `bn_jax.free`, with bn_jax.nn's names, arguments
and variables: `WSConv` (flax.nnx.Conv with a weight-standardized kernel),
`FRN`, `EvoNormB0` (running variance an nnx.BatchStat, switched by
`use_running_average` as BatchNorm), `EvoNormS0` and `SkipInit`.

`PowerNorm` (Shen et al., 2020) calls `bn_jax.power.apply`; it has no flax
counterpart. Its nu is updated from the gradient of a `PowerProbe`
variable: differentiate `PARAMS_AND_PROBES` and pass the gradients through
`fold_power_probe_grads` (see `bn_jax.power`).

Differences from flax.nnx:
  * BatchNorm takes bn_jax's options (`unbiased_running_var`,
    `stats_method`, `grad`, `impl`; batch renorm, ghost batches, sampled
    statistics; see `bn_jax.core.apply`) instead of `use_fast_variance`
    (flax's fast variance is `stats_method="one_pass"`, its
    `use_fast_variance=False` is "two_pass"; the default "shifted" is
    accurate at one read of x). Options that keep more state add
    BatchStats, named as bn_jax.nn.BatchNorm's batch_stats: `count`
    (`momentum=None`, an exact cumulative average; a renorm schedule;
    randomly sampled statistics), `renorm_mean` and `renorm_stddev`,
    `nonfinite_skips` (`skip_nonfinite_updates=True`).
    `num_features` may be a tuple for several feature axes.
  * BatchNorm normalizes with float32 running statistics even with
    `dtype=bfloat16` (flax.nnx rounds them to `dtype` first); x, scale and
    bias are promoted by `promote_dtype` as in flax.
  * The per-example norms accept and ignore a `use_running_average`
    keyword, so a model can call any norm as it calls BatchNorm.
  * GroupNorm with `reduction_axes` that keep spatial axes repeats each
    group's statistics along the channels (flax.linen's behaviour), where
    flax.nnx repeats them along axis 1.
"""

from __future__ import annotations

import inspect
import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
import jax.numpy as jnp

from bn_jax import core
from bn_jax import free
from bn_jax import norms
from bn_jax import power

Axes = int | Sequence[int]
Initializer = Callable[..., jax.Array]
_NO_METADATA = MappingProxyType({})


def _affine_params(feature_shape, *, use_scale, use_bias, scale_init,
                   bias_init, param_dtype, rngs, scale_metadata,
                   bias_metadata):
  """(scale, bias) as flax.nnx makes them: Params, one key each in this
  order (so random initializers draw the same values), None if unused."""
  scale = (nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype),
                     **scale_metadata) if use_scale else nnx.data(None))
  bias = (nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype),
                    **bias_metadata) if use_bias else nnx.data(None))
  return scale, bias


def _value(variable):
  return None if variable is None else variable[...]


def _as_feature_shape(module, value, x_shape, feature_axes):
  """A (num_features,) param reshaped to x's feature axes, as flax.nnx
  broadcasts it, with an error naming both shapes when they disagree."""
  if value is None:
    return None
  shape = norms.feature_shape(x_shape, feature_axes)
  if value.size != math.prod(shape):
    raise ValueError(
        f"{type(module).__name__} has num_features={module.num_features} "
        f"but x of shape {tuple(x_shape)} has {math.prod(shape)} features "
        f"on feature_axes={feature_axes} (shape {shape}); construct it with "
        f"num_features={math.prod(shape)}.")
  return value.reshape(shape)


class BatchNorm(nnx.Module):
  """flax.nnx.BatchNorm computed by `bn_jax.core.apply`.

  Args:
    num_features: the number of features (an int), or the feature shape (a
      tuple) when `axis` names several axes.
    use_running_average: True normalizes with the running statistics
      (evaluation), False with the batch's, updating them (training); None
      requires it at call time. `model.train()` / `model.eval()` and
      `nnx.view(model, use_running_average=...)` set it.
    axis: the feature axis or axes; all others are reduced.
    momentum: `running = momentum * running + (1 - momentum) * batch`; None:
      exact cumulative average, with a `count` BatchStat.
    epsilon: added to the variance before the square root.
    dtype: y's dtype and what x, scale and bias are promoted to (default:
      inferred from them, as in flax).
    param_dtype: dtype of scale and bias.
    use_bias, use_scale: whether bias (beta) / scale (gamma) exist.
    bias_init, scale_init: their initializers.
    axis_name, axis_index_groups: synchronized statistics over a named axis.
    use_fast_variance: flax's; True (its default) keeps `stats_method`
      ("shifted" gives E[x^2] - E[x]^2's value without its cancellation),
      False asks for flax's mean of squared deviations ("two_pass", unless
      another `stats_method` is named), as bn_jax.nn.BatchNorm.
    promote_dtype: flax.nnx's dtype promotion hook, called with
      `(x, mean, var, scale, bias)`; its x, scale and bias are used.
    rngs: an `nnx.Rngs` with a `params` stream.
    bias_metadata, scale_metadata: metadata for the Params.
    unbiased_running_var, stats_method, grad, impl: bn_jax's options, see
      `bn_jax.core.apply` (impl "auto": by the backend).
    renorm, renorm_clipping, renorm_momentum, renorm_schedule: batch
      renormalization, see `bn_jax.core.apply`; renorm adds the BatchStats
      `renorm_mean` and `renorm_stddev`. renorm_clipping (a Mapping or
      (key, value) pairs) is stored as sorted pairs, as in bn_jax.nn.
    virtual_batch_size: ghost batches, see `bn_jax.core.apply`.
    stats_fraction, stats_examples, stats_sampling: sampled statistics, see
      `bn_jax.core.apply`.
    skip_nonfinite_updates: keep the BatchStats of a batch whose statistics
      are not finite and count it in the BatchStat `nonfinite_skips`, see
      `bn_jax.core.apply`.

  BatchStats: `mean`, `var` (as flax.nnx), then `count` (int32, updates so
  far) where the layer reads it: momentum=None, a renorm_schedule, or
  stats_sampling="random" with sampled statistics; and `renorm_mean`,
  `renorm_stddev` with renorm=True; `nonfinite_skips` (int32, updates
  skipped) with skip_nonfinite_updates=True. The same names as
  bn_jax.nn.BatchNorm's batch_stats, so `nnx.to_pure_dict` of the state is
  its variables.
  """

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float | None = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      unbiased_running_var: bool = False,
      stats_method: str = "shifted",
      grad: str = "paper_jvp",
      impl: str = "auto",
      renorm: bool = False,
      renorm_clipping: Any = None,
      renorm_momentum: float = 0.99,
      renorm_schedule: tuple[int, int, int] | None = None,
      virtual_batch_size: int | None = None,
      stats_fraction: float | None = None,
      stats_examples: int | None = None,
      stats_sampling: str = "stride",
      skip_nonfinite_updates: bool = False,
  ):
    core.check_epsilon(epsilon)  # at construction, as well as at the call
    feature_shape = ((num_features,) if isinstance(num_features, int)
                     else tuple(num_features))
    # Running statistics are float32 whatever param_dtype is (as in flax).
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    if core.reads_count(momentum, renorm_schedule, stats_fraction,
                        stats_examples, stats_sampling):
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    if renorm:
      self.renorm_mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
      self.renorm_stddev = nnx.BatchStat(
          jnp.ones(feature_shape, jnp.float32))
    if skip_nonfinite_updates:
      self.nonfinite_skips = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.scale, self.bias = _affine_params(
        feature_shape, use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata,
        bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype
    self.use_fast_variance = use_fast_variance
    self.unbiased_running_var = unbiased_running_var
    self.stats_method = stats_method
    self.grad = grad
    self.impl = impl
    self.renorm = renorm
    # One hashable spelling of the limits (graph metadata).
    self.renorm_clipping = core.renorm_clipping_pairs(renorm_clipping)
    self.renorm_momentum = renorm_momentum
    self.renorm_schedule = renorm_schedule
    self.virtual_batch_size = virtual_batch_size
    self.stats_fraction = stats_fraction
    self.stats_examples = stats_examples
    self.stats_sampling = stats_sampling
    self.skip_nonfinite_updates = skip_nonfinite_updates

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Normalizes x; in training also updates the BatchStats.

    Args:
      x: the input.
      use_running_average: overrides the attribute for this call.
      mask: optional boolean array broadcastable to x; False entries do not
        count in the batch statistics.

    Returns:
      y of x's shape.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          "BatchNorm needs use_running_average (True: running statistics, "
          "False: the batch's); pass it to the constructor or the call, or "
          "use model.train() / model.eval() or nnx.view(model, "
          "use_running_average=...).")
    training = not use_running_average
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], _value(self.scale),
         _value(self.bias)), dtype=self.dtype)
    stats = {name: getattr(self, name)[...] for name in self._stat_names()}
    state = core.BNState(**{"count": jnp.zeros((), jnp.int32), **stats})
    options = {name: getattr(self, name) for name in core.MODULE_OPTIONS}
    options["stats_method"] = core.flax_stats_method(
        self.stats_method, self.use_fast_variance)
    y, new_state = core.apply(
        core.BNParams(scale=scale, bias=bias), state, x, training=training,
        axis_name=self.axis_name, mask=mask, **options)
    if training:
      for name in self._stat_names():
        getattr(self, name)[...] = getattr(new_state, name)
    return y

  def _stat_names(self) -> tuple[str, ...]:
    """The BatchStats this layer has, by their BNState field names."""
    return tuple(name for name in core.BNState._fields if hasattr(self, name))

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class PowerProbe(nnx.Variable):
  """PowerNorm's probe: zeros that the forward pass does not read, whose
  gradient is nu's increment (see `bn_jax.power`). Differentiate it with the
  params (`PARAMS_AND_PROBES`) and fold it (`fold_power_probe_grads`)."""


# What a training step differentiates in a model with PowerNorm layers:
# `nnx.grad(loss_fn, argnums=nnx.DiffState(0, PARAMS_AND_PROBES))`.
PARAMS_AND_PROBES = nnx.Any(nnx.Param, PowerProbe)


class PowerNorm(nnx.Module):
  """Power normalization (Shen et al., 2020) computed by
  `bn_jax.power.apply`; see that module for the algorithm, the probe and the
  reference code's names.

  Args:
    num_features: the number of features (an int), or the feature shape (a
      tuple) when `axis` names several axes.
    use_running_average: True: inference, x / sqrt(psi2 + epsilon); False:
      training; None requires it at call time. `model.train()` /
      `model.eval()` and `nnx.view` set it, as for BatchNorm.
    axis: the feature axis or axes; all others are reduced.
    momentum: the paper's alpha for psi2 (the reference's alpha_fwd, 0.9).
    backward_momentum: nu's alpha (alpha_bkw); None: `momentum`.
    epsilon: added to psi2 before the square root.
    warmup_steps: the reference's warmup (see `bn_jax.power`); 0: none.
    dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
    promote_dtype, rngs, bias_metadata, scale_metadata: as BatchNorm's.

  Variables: `scale`, `bias` (nnx.Param); `psi2` (1), `nu` (0) and `count`
  (int32), nnx.BatchStat, named as bn_jax.nn.PowerNorm's batch_stats; and
  `probe`, a `PowerProbe` of zeros. A training step that differentiates
  only nnx.Param leaves nu at its value: differentiate
  `PARAMS_AND_PROBES` and call `fold_power_probe_grads`:

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, PARAMS_AND_PROBES))(
        model, x)
    optimizer.update(model, fold_power_probe_grads(model, grads))
  """

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.9,
      backward_momentum: float | None = None,
      epsilon: float = 1e-5,
      warmup_steps: int = 0,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    power.check_options(momentum, backward_momentum, epsilon, warmup_steps)
    feature_shape = ((num_features,) if isinstance(num_features, int)
                     else tuple(num_features))
    self.psi2 = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.nu = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.probe = PowerProbe(jnp.zeros(feature_shape, jnp.float32))
    self.scale, self.bias = _affine_params(
        feature_shape, use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata,
        bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.backward_momentum = backward_momentum
    self.epsilon = epsilon
    self.warmup_steps = warmup_steps
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.promote_dtype = promote_dtype

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None):
    """Power-normalizes x; in training also updates psi2 and count (nu is
    updated from the probe's gradient by `fold_power_probe_grads`)."""
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          "PowerNorm needs use_running_average (True: inference, False: "
          "training); pass it to the constructor or the call, or use "
          "model.train() / model.eval().")
    training = not use_running_average
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.psi2[...], self.nu[...], _value(self.scale),
         _value(self.bias)), dtype=self.dtype)
    state = power.PNState(psi2=self.psi2[...], nu=self.nu[...],
                          count=self.count[...])
    options = {name: getattr(self, name) for name in power.MODULE_OPTIONS}
    y, new_state = power.apply(
        core.BNParams(scale=scale, bias=bias), state, x, training=training,
        probe=self.probe[...] if training else None, mask=mask, **options)
    if training:
      self.psi2[...] = new_state.psi2
      self.count[...] = new_state.count
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`, as BatchNorm's."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


def fold_power_probe_grads(model: nnx.Module, grads: nnx.State) -> nnx.State:
  """Adds each PowerNorm's probe gradient in `grads` to its `nu` (in place)
  and returns `grads` without the probes, for the optimizer.

  `grads`: the gradient of the loss with respect to `PARAMS_AND_PROBES` of
  `model`, `nnx.grad(loss_fn, argnums=nnx.DiffState(0,
  PARAMS_AND_PROBES))(model, ...)`, taken after the training pass (whose
  psi2 and count updates nnx.grad has written back to the model).
  """
  probe_grads, rest = nnx.split_state(grads, PowerProbe, ...)
  flat = {tuple(path): variable for path, variable in
          nnx.to_flat_state(probe_grads)}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, PowerNorm):
      grad = flat.pop((*path, "probe"), None)
      if grad is not None:
        module.nu[...] = module.nu[...] + jnp.asarray(grad[...]).astype(
            module.nu[...].dtype)
  if flat:
    raise ValueError(
        f"grads has probe gradients at {sorted(flat)} that match no "
        "PowerNorm of the model; pass the gradients of this model.")
  return rest


class _PerExampleNorm(nnx.Module):
  """The attributes that flax.nnx's LayerNorm, GroupNorm and InstanceNorm
  share; subclasses store their own axes and call their function."""

  def _init_common(self, feature_shape, *, epsilon, dtype, param_dtype,
                   use_bias, use_scale, bias_init, scale_init, axis_name,
                   axis_index_groups, use_fast_variance, promote_dtype, rngs,
                   bias_metadata, scale_metadata):
    core.check_epsilon(epsilon)  # at construction, as well as at the call
    self.scale, self.bias = _affine_params(
        feature_shape, use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata,
        bias_metadata=bias_metadata)
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def _promoted(self, x):
    """(x, scale, bias) promoted as flax.nnx does, before any statistic."""
    return self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                              dtype=self.dtype)

  def _common_options(self):
    return dict(epsilon=self.epsilon, dtype=self.dtype,
                axis_name=self.axis_name,
                axis_index_groups=self.axis_index_groups,
                use_fast_variance=self.use_fast_variance)


class LayerNorm(_PerExampleNorm):
  """flax.nnx.LayerNorm computed by `bn_jax.norms.layer_norm`.

  Arguments as flax.nnx.LayerNorm's: scale and bias have `num_features`
  values, as many as x has on `feature_axes`; `reduction_axes` are the axes
  of the statistics.
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    self._init_common(
        (num_features,), epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
        bias_init=bias_init, scale_init=scale_init, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        rngs=rngs, bias_metadata=bias_metadata,
        scale_metadata=scale_metadata)
    self.num_features = num_features
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes

  def __call__(self, x, *, mask: jax.Array | None = None,
               use_running_average: bool | None = None):
    """Layer-normalizes x (`use_running_average` is ignored)."""
    del use_running_average  # no running statistics to choose
    x, scale, bias = self._promoted(x)
    return norms.layer_norm(
        x, _as_feature_shape(self, scale, x.shape, self.feature_axes),
        _as_feature_shape(self, bias, x.shape, self.feature_axes),
        reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
        mask=mask, **self._common_options())


class RMSNorm(nnx.Module):
  """flax.nnx.RMSNorm computed by `bn_jax.norms.rms_norm`."""

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = nnx.initializers.ones,
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    core.check_epsilon(epsilon)  # at construction, as well as at the call
    self.scale, _ = _affine_params(
        (num_features,), use_scale=use_scale, use_bias=False,
        scale_init=scale_init, bias_init=None, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata,
        bias_metadata=_NO_METADATA)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, mask: jax.Array | None = None, *,
               use_running_average: bool | None = None):
    """RMS-normalizes x (`use_running_average` is ignored)."""
    del use_running_average  # no running statistics to choose
    x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
    return norms.rms_norm(
        x, _as_feature_shape(self, scale, x.shape, self.feature_axes),
        reduction_axes=self.reduction_axes, feature_axes=self.feature_axes,
        epsilon=self.epsilon, dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask)


class GroupNorm(_PerExampleNorm):
  """flax.nnx.GroupNorm computed by `bn_jax.norms.group_norm`.

  Exactly one of `num_groups` (default 32) and `group_size` (then pass
  `num_groups=None`); both are checked against `num_features` here and
  stored resolved, as in flax.nnx.
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      reduction_axes: Axes | None = None,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    self.num_groups = norms.num_groups_of(num_features, num_groups,
                                          group_size)
    self.group_size = num_features // self.num_groups
    self._init_common(
        (num_features,), epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
        bias_init=bias_init, scale_init=scale_init, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        rngs=rngs, bias_metadata=bias_metadata,
        scale_metadata=scale_metadata)
    self.num_features = num_features
    self.reduction_axes = reduction_axes

  def __call__(self, x, *, mask: jax.Array | None = None,
               use_running_average: bool | None = None):
    """Group-normalizes x (`use_running_average` is ignored)."""
    del use_running_average  # no running statistics to choose
    x, scale, bias = self._promoted(x)
    return norms.group_norm(
        x, scale, bias, num_groups=self.num_groups,
        reduction_axes=self.reduction_axes, mask=mask,
        **self._common_options())


class InstanceNorm(_PerExampleNorm):
  """flax.nnx.InstanceNorm computed by `bn_jax.norms.instance_norm`: for
  conv features (N, H, W, C); (N, C) features are a clear error."""

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros,
      scale_init: Initializer = nnx.initializers.ones,
      feature_axes: Axes = -1,
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    self._init_common(
        (num_features,), epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
        bias_init=bias_init, scale_init=scale_init, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        rngs=rngs, bias_metadata=bias_metadata,
        scale_metadata=scale_metadata)
    self.num_features = num_features
    self.feature_axes = feature_axes

  def __call__(self, x, *, mask: jax.Array | None = None,
               use_running_average: bool | None = None):
    """Instance-normalizes x (`use_running_average` is ignored)."""
    del use_running_average  # no running statistics to choose
    x, scale, bias = self._promoted(x)
    return norms.instance_norm(
        x, _as_feature_shape(self, scale, x.shape, self.feature_axes),
        _as_feature_shape(self, bias, x.shape, self.feature_axes),
        feature_axes=self.feature_axes, mask=mask, **self._common_options())


def _show_signature(cls) -> None:
  """help() and inspect.signature show the constructor's arguments (an
  nnx.Module's metaclass otherwise shows `(*args, **kwargs)`)."""
  parameters = list(inspect.signature(cls.__init__).parameters.values())
  cls.__signature__ = inspect.Signature(parameters[1:])  # without self


# ----------------------------------------------------------------------------
# The BN-free and batch-independent family (`bn_jax.free`), with the same
# names, arguments and variables as bn_jax.nn's: WSConv, FRN, EvoNormB0,
# EvoNormS0 and SkipInit.


def _channel_param(init, rngs, num_features, param_dtype, metadata):
  """A (num_features,) nnx.Param drawn from its own `params` key."""
  return nnx.Param(init(rngs.params(), (num_features,), param_dtype),
                   **metadata)


class WSConv(nnx.Conv):
  """flax.nnx.Conv whose kernel is weight-standardized
  (`bn_jax.free.weight_standardize`) over its fan-in (all axes but the
  last) at every call; scaled=True is Scaled Weight Standardization with a
  learned per-output-channel `gain`.

  Args: every one of flax.nnx.Conv's (passed on; the raw kernel is its
  `kernel` Param, standardized when used, and a `mask` applies to the
  standardized kernel), then `scaled`, `gamma` (the activation's constant,
  scaled=True only), `epsilon` (timm's 1e-6), `gain_init` (ones) and
  `gain_metadata`. Variables: `kernel`, `bias` as flax.nnx.Conv's, and
  `gain` (out_features,) with scaled=True, as bn_jax.nn.WSConv's.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: int | Sequence[int], strides: Any = 1, *,
               scaled: bool = False, gamma: float = 1.0,
               epsilon: float = 1e-6,
               gain_init: Initializer = nnx.initializers.ones_init(),
               gain_metadata: Mapping[str, Any] = _NO_METADATA,
               rngs: nnx.Rngs, **conv_kwargs):
    super().__init__(in_features, out_features, kernel_size, strides,
                     rngs=rngs, **conv_kwargs)
    # The arguments' errors at construction, as well as at the call.
    free.weight_standardize(jnp.zeros((2, 1)), eps=epsilon, scaled=scaled,
                            gamma=gamma)
    self.gain = (_channel_param(gain_init, rngs, out_features,
                                self.param_dtype, gain_metadata)
                 if scaled else nnx.data(None))
    self.scaled = scaled
    self.gamma = gamma
    self.epsilon = epsilon

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    """flax.nnx.Conv's call with the standardized kernel: run on a copy of
    this layer whose `kernel` is replaced (the layer is not changed)."""
    kernel = free.weight_standardize(
        self.kernel[...], eps=self.epsilon, scaled=self.scaled,
        gain=_value(self.gain), gamma=self.gamma)
    view = nnx.merge(*nnx.split(self))
    view.kernel = nnx.Param(kernel)
    return nnx.Conv.__call__(view, inputs, out_sharding=out_sharding)


class FRN(nnx.Module):
  """Filter Response Normalization with TLU, `bn_jax.free.frn_tlu`.

  Args: `num_features` (C), `epsilon` (timm's 1e-5), `use_tau` (False:
  plain FRN, no TLU), `dtype`, `param_dtype`, `scale_init`, `bias_init`,
  `tau_init`, `promote_dtype` (flax.nnx's hook, called with (x, scale,
  bias, tau)), `rngs`. Variables: nnx.Param `scale` (1), `bias` (0), `tau`
  (0; None without TLU), as bn_jax.nn.FRN's.
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-5,
      use_tau: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      scale_init: Initializer = nnx.initializers.ones_init(),
      bias_init: Initializer = nnx.initializers.zeros_init(),
      tau_init: Initializer = nnx.initializers.zeros_init(),
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    core.check_epsilon(epsilon)  # at construction, as well as at the call
    self.scale = _channel_param(scale_init, rngs, num_features, param_dtype,
                                _NO_METADATA)
    self.bias = _channel_param(bias_init, rngs, num_features, param_dtype,
                               _NO_METADATA)
    self.tau = (_channel_param(tau_init, rngs, num_features, param_dtype,
                               _NO_METADATA) if use_tau else nnx.data(None))
    self.num_features = num_features
    self.epsilon = epsilon
    self.use_tau = use_tau
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, use_running_average: bool | None = None):
    """FRN + TLU of x (`use_running_average` is ignored)."""
    del use_running_average  # no running statistics to choose
    x, scale, bias, tau = self.promote_dtype(
        (x, self.scale[...], self.bias[...], _value(self.tau)),
        dtype=self.dtype)
    return free.frn_tlu(x, scale, bias, tau, epsilon=self.epsilon,
                        dtype=self.dtype)


class _EvoNorm(nnx.Module):
  """scale, bias and v, the parameters EvoNorm-B0 and -S0 share."""

  def _init_params(self, num_features, *, epsilon, dtype, param_dtype,
                   scale_init, bias_init, v_init, promote_dtype, rngs):
    core.check_epsilon(epsilon)  # at construction, as well as at the call
    self.scale, self.bias, self.v = (
        _channel_param(init, rngs, num_features, param_dtype, _NO_METADATA)
        for init in (scale_init, bias_init, v_init))
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def _promoted(self, x):
    """(x, scale, bias, v) promoted as flax.nnx does."""
    return self.promote_dtype(
        (x, self.scale[...], self.bias[...], self.v[...]), dtype=self.dtype)


class EvoNormB0(_EvoNorm):
  """EvoNorm-B0, `bn_jax.free.evonorm_b0`, its running variance an
  nnx.BatchStat.

  Args: `num_features` (C), `use_running_average` as BatchNorm's (True:
  the running variance; False: the batch's, updating it; `model.train()`
  / `model.eval()` and `nnx.view` set it), `momentum` (flax's convention:
  timm's momentum 0.1 is 0.9, the default), `epsilon` (timm's 1e-3),
  `dtype`, `param_dtype`, `scale_init`, `bias_init`, `v_init`,
  `axis_name`, `axis_index_groups` (the batch variance synchronized over
  a named axis), `promote_dtype` (called with (x, scale, bias, v)),
  `rngs`. Variables: nnx.Param `scale` (1), `bias` (0), `v` (1);
  nnx.BatchStat `var` (1, float32), as bn_jax.nn.EvoNormB0's.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      momentum: float = 0.9,
      epsilon: float = 1e-3,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      scale_init: Initializer = nnx.initializers.ones_init(),
      bias_init: Initializer = nnx.initializers.zeros_init(),
      v_init: Initializer = nnx.initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    self.var = nnx.BatchStat(free.init_running_var(num_features))
    self._init_params(num_features, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, scale_init=scale_init,
                      bias_init=bias_init, v_init=v_init,
                      promote_dtype=promote_dtype, rngs=rngs)
    self.use_running_average = use_running_average
    self.momentum = momentum
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups

  def __call__(self, x, use_running_average: bool | None = None):
    """EvoNorm-B0 of x; in training also updates `var`."""
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          "EvoNormB0 needs use_running_average (True: running variance, "
          "False: the batch's); pass it to the constructor or the call, or "
          "use model.train() / model.eval().")
    training = not use_running_average
    x, scale, bias, v = self._promoted(x)
    y, new_var = free.evonorm_b0(
        x, scale, bias, v, self.var[...], training=training,
        momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)
    if training:
      self.var[...] = new_var
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`, as BatchNorm's."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class EvoNormS0(_EvoNorm):
  """EvoNorm-S0, `bn_jax.free.evonorm_s0` (no batch statistics).

  Args: `num_features` (C), `num_groups` (timm's 32) or `group_size` (then
  num_groups=None), checked against num_features here and stored
  resolved, `epsilon` (timm's 1e-5), `dtype`, `param_dtype`, `scale_init`,
  `bias_init`, `v_init`, `promote_dtype`, `rngs`. Variables: nnx.Param
  `scale` (1), `bias` (0), `v` (1), as bn_jax.nn.EvoNormS0's.
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      scale_init: Initializer = nnx.initializers.ones_init(),
      bias_init: Initializer = nnx.initializers.zeros_init(),
      v_init: Initializer = nnx.initializers.ones_init(),
      promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    self.num_groups = norms.num_groups_of(num_features, num_groups,
                                          group_size)
    self.group_size = num_features // self.num_groups
    self._init_params(num_features, epsilon=epsilon, dtype=dtype,
                      param_dtype=param_dtype, scale_init=scale_init,
                      bias_init=bias_init, v_init=v_init,
                      promote_dtype=promote_dtype, rngs=rngs)

  def __call__(self, x, *, use_running_average: bool | None = None):
    """EvoNorm-S0 of x (`use_running_average` is ignored)."""
    del use_running_average  # no running statistics to choose
    x, scale, bias, v = self._promoted(x)
    return free.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups,
                           epsilon=self.epsilon, dtype=self.dtype)


class SkipInit(nnx.Module):
  """SkipInit (De & Smith, 2020): y = gain * x, a learned scalar nnx.Param
  `gain` initialized at 0, for the end of a residual branch.

  Args: `gain_init` (zeros), `param_dtype`, `dtype` (y's dtype; default
  x's promoted with the gain's), `rngs` (optional: only an initializer
  that draws needs it). Variables: `gain` (), as bn_jax.nn.SkipInit's.
  """

  def __init__(self, *,
               gain_init: Initializer = nnx.initializers.zeros_init(),
               param_dtype: Any = jnp.float32, dtype: Any = None,
               rngs: nnx.Rngs | None = None):
    key = rngs.params() if rngs is not None else jax.random.key(0)
    self.gain = nnx.Param(gain_init(key, (), param_dtype))
    self.param_dtype = param_dtype
    self.dtype = dtype

  def __call__(self, x):
    gain = self.gain[...]
    out_dtype = self.dtype or jnp.result_type(x, gain)
    return (x * gain).astype(out_dtype)


for _layer in (BatchNorm, PowerNorm, LayerNorm, RMSNorm, GroupNorm,
               InstanceNorm, WSConv, FRN, EvoNormB0, EvoNormS0, SkipInit):
  _show_signature(_layer)
