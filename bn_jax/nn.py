"""Flax linen wrappers around the pure functions of `bn_jax.core`,
`bn_jax.power` and `bn_jax.norms` (`bn_jax.nnx` wraps the same functions
for flax.nnx).

`BatchNorm` and its variants (batch renormalization, ghost batches,
sampled statistics), `PowerNorm` (Shen et al., 2020; its probe and
batch_stats are described in `bn_jax.power`), and `LayerNorm`,
`GroupNorm`, `InstanceNorm` and `RMSNorm` with flax.linen's arguments,
defaults and variable names; these four also accept (and ignore)
`use_running_average`, so that a model can put any of them where it puts a
BatchNorm. The BN-free family of `bn_jax.free`: `WSConv` (a
flax.linen.Conv with a weight-standardized kernel), `FRN`, `EvoNormB0`
(running variance in batch_stats), `EvoNormS0` and `SkipInit`.

`BatchNorm` is a drop-in for `flax.linen.BatchNorm`: same core arguments,
same variable names (params `scale`, `bias`; batch_stats `mean`, `var`), so
model code and checkpoints written for flax carry over. Extra variables
exist only for the options that need them: batch_stats `count`
(momentum=None, a renorm schedule, randomly sampled statistics),
`renorm_mean`, `renorm_stddev` (renorm=True) and `nonfinite_skips`
(skip_nonfinite_updates=True). `init` behaves as flax's: with
use_running_average=False it normalizes with the local batch's plain
statistics (no axis_name, so it runs outside the named axis; no ghost
batches, subset or renorm correction; a batch of one example gives
y = bias) and leaves the variables at their initial values, so
`init_with_output`'s y is flax's. Complex x, which flax normalizes, is
rejected.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax import core
from bn_jax import free
from bn_jax import norms
from bn_jax import power


def check_float32_reductions(force_float32_reductions: bool) -> None:
  """flax's `force_float32_reductions`: True is what bn_jax always does."""
  if force_float32_reductions is not True:
    raise ValueError(
        f"force_float32_reductions={force_float32_reductions!r}: bn_jax "
        "always computes the statistics in float32 (flax's default, True); "
        "leave it out or pass True.")


class BatchNorm(nn.Module):
  """Batch normalization with state in the `batch_stats` collection.

  Attributes: every one of flax.linen.BatchNorm's, in its order, with its
  default and meaning, of which two are computed another way:
  `use_fast_variance` (flax: E[x^2] - E[x]^2 when True, its default)
  leaves bn_jax's `stats_method` ("shifted": the same value from a shifted
  sum of squares, without its cancellation for a large mean), and False
  asks for flax's mean of squared deviations (`stats_method="two_pass"`;
  an explicit other `stats_method` wins); `force_float32_reductions`
  (True) is what bn_jax always does, and False, reductions in a half
  dtype, is refused (`ValueError`). Then bn_jax's own, see
  `bn_jax.core.apply`: `unbiased_running_var`, `stats_method` (a
  `core.STATS_METHODS` name), `grad` (how it is differentiated, a
  `core.GRAD_MODES` name), `impl` (how the passes are written for the
  compiler, a `core.IMPL_CHOICES` name; "auto" by the backend), and the
  variants of training: batch
  renormalization (`renorm`, `renorm_clipping`, `renorm_momentum`,
  `renorm_schedule` in steps), ghost batches (`virtual_batch_size`) and
  sampled statistics (`stats_fraction` or `stats_examples`,
  `stats_sampling`); and `skip_nonfinite_updates`, which keeps the
  batch_stats of a batch whose statistics are not finite (an overflow in
  float16) and counts it. `renorm_clipping` may be a Mapping or (key, value)
  pairs; either is stored as sorted pairs, so that the module stays
  hashable (a static argument of jit) and equal modules compare equal.

  Variables: params `scale`, `bias`; batch_stats `mean`, `var`, then
  `count` (int32, updates so far) where the layer reads it: momentum=None,
  a renorm_schedule (the step of the schedule), or sampled statistics with
  stats_sampling="random" (the subset's key); and `renorm_mean`,
  `renorm_stddev` (Keras's names) with renorm=True; `nonfinite_skips`
  (int32, updates skipped) with skip_nonfinite_updates=True.

  Training (use_running_average=False) outside `init`:
    * batch_stats are updated only where that collection is mutable: with
      it immutable, a pass normalizes with the batch's statistics and
      changes no state;
    * where the collection "batch_moments" is mutable, the batch's plain
      statistics are stored in it, float32: "mean" and "var" (biased) of
      the feature shape, and "count" (a scalar, values per feature; with a
      mask that differs between features, their mean). They are taken over
      every reduced axis of the whole batch (no ghost batches, no subset)
      and pooled over axis_name, for population statistics:
      `apply(variables, x, use_running_average=False,
      mutable=["batch_moments"])` returns them and updates nothing.
  """
  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., Any] = nn.initializers.zeros
  scale_init: Callable[..., Any] = nn.initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = False
  stats_method: str = "shifted"
  grad: str = "paper_jvp"  # "paper_jvp", "paper_vjp" or "autodiff"
  impl: str = "auto"  # "xla_cpu" on a CPU, "plain" on GPU and TPU
  renorm: bool = False
  renorm_clipping: Any = None  # keys among "rmin", "rmax", "dmax"
  renorm_momentum: float = 0.99
  renorm_schedule: tuple[int, int, int] | None = None
  virtual_batch_size: int | None = None
  stats_fraction: float | None = None
  stats_examples: int | None = None
  stats_sampling: str = "stride"  # "stride" or "random"
  skip_nonfinite_updates: bool = False

  def __post_init__(self):
    # One hashable spelling for every way of writing the same limits.
    object.__setattr__(self, "renorm_clipping",
                       core.renorm_clipping_pairs(self.renorm_clipping))
    check_float32_reductions(self.force_float32_reductions)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    axes = core.feature_axes(x.ndim, self.axis)
    reduction_axes = tuple(a for a in range(x.ndim) if a not in axes)
    feature_shape = tuple(x.shape[a] for a in axes)

    stats = {
        "mean": self.variable("batch_stats", "mean", jnp.zeros,
                              feature_shape, jnp.float32),
        "var": self.variable("batch_stats", "var", jnp.ones, feature_shape,
                             jnp.float32)}
    if core.reads_count(self.momentum, self.renorm_schedule,
                        self.stats_fraction, self.stats_examples,
                        self.stats_sampling):
      stats["count"] = self.variable("batch_stats", "count", jnp.zeros, (),
                                     jnp.int32)
    if self.renorm:
      stats["renorm_mean"] = self.variable(
          "batch_stats", "renorm_mean", jnp.zeros, feature_shape, jnp.float32)
      stats["renorm_stddev"] = self.variable(
          "batch_stats", "renorm_stddev", jnp.ones, feature_shape,
          jnp.float32)
    if self.skip_nonfinite_updates:
      stats["nonfinite_skips"] = self.variable(
          "batch_stats", "nonfinite_skips", jnp.zeros, (), jnp.int32)
    scale = (self.param("scale", self.scale_init, feature_shape,
                        self.param_dtype) if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feature_shape,
                       self.param_dtype) if self.use_bias else None)

    # y's dtype follows flax: `dtype`, else x promoted with the params.
    out_dtype = self.dtype or jnp.result_type(
        x, *(p for p in (scale, bias) if p is not None))
    # Widening x first is lossless; narrowing happens on y, as in flax, so
    # that f32 activations with dtype=bfloat16 still give f32 statistics.
    x = x.astype(jnp.promote_types(x.dtype, out_dtype))
    state = core.BNState(**{"count": jnp.zeros((), jnp.int32), **{
        name: variable.value for name, variable in stats.items()}})
    options = {name: getattr(self, name) for name in core.MODULE_OPTIONS}
    options["stats_method"] = stats_method = core.flax_stats_method(
        self.stats_method, self.use_fast_variance)
    options["mask"] = mask
    params = core.BNParams(scale=scale, bias=bias)
    training = not use_running_average

    if training and self.is_initializing():
      # As flax: `init` normalizes with the plain statistics of the local
      # batch (axis_name is ignored, so init runs outside the named axis'
      # vmap or pmap; no ghost batches, subset or renorm correction, so any
      # dummy batch fits) and never updates the state. A dummy batch of one
      # example has variance 0 and gives y = bias, as in flax.
      batch_mean, batch_var, _ = core.moments(
          x, reduction_axes, mask=mask, stats_method=stats_method,
          impl=self.impl)
      batch_state = state._replace(mean=batch_mean.reshape(feature_shape),
                                   var=batch_var.reshape(feature_shape))
      y, _ = core.apply(params, batch_state, x, training=False, **options)
      return y.astype(out_dtype)

    y, new_state = core.apply(params, state, x, training=training,
                              axis_name=self.axis_name, **options)
    if training and self.is_mutable_collection("batch_stats"):
      for name, variable in stats.items():
        variable.value = getattr(new_state, name)
    if training and self.is_mutable_collection("batch_moments"):
      batch_mean, batch_var, count = jax.lax.stop_gradient(core.moments(
          x, reduction_axes, mask=mask, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups,
          stats_method=stats_method, impl=self.impl))
      for name, value in (("mean", batch_mean.reshape(feature_shape)),
                          ("var", batch_var.reshape(feature_shape)),
                          ("count", jnp.mean(count))):
        self.put_variable("batch_moments", name, value.astype(jnp.float32))
    return y.astype(out_dtype)


class PowerNorm(nn.Module):
  """Power normalization (Shen et al., 2020) computed by
  `bn_jax.power.apply`; see that module for the algorithm and the reference
  code's names.

  Attributes: `use_running_average` as BatchNorm's (True: inference, x /
  sqrt(psi2 + epsilon); False: training), `axis`, `momentum` (the paper's
  alpha, 0.9), `backward_momentum` (nu's alpha; None: momentum),
  `epsilon`, `warmup_steps` (0: the paper's algorithm), and BatchNorm's
  `dtype`, `param_dtype`, `use_bias`, `use_scale`, `bias_init`,
  `scale_init`.

  Variables: params `scale`, `bias`; batch_stats `psi2` (1), `nu` (0),
  `count` (int32); and the probe, "nu" in the collection "power_probe"
  (zeros, never changed): the train step passes it with the other
  variables, differentiates the loss with respect to it as well as the
  params, and folds its gradient into batch_stats with
  `bn_jax.power.fold_probe_grads` (module notes of `bn_jax.power`). A
  training pass with batch_stats mutable and no "power_probe" collection
  is an error, since its nu could never be updated. `init` leaves the
  variables at their initial values (its y divides by sqrt(1 + epsilon)).
  """
  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float = 0.9
  backward_momentum: float | None = None
  epsilon: float = 1e-5
  warmup_steps: int = 0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., Any] = nn.initializers.zeros
  scale_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    power.check_options(self.momentum, self.backward_momentum, self.epsilon,
                        self.warmup_steps)
    axes = core.feature_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in axes)
    stats = {
        "psi2": self.variable("batch_stats", "psi2", jnp.ones,
                              feature_shape, jnp.float32),
        "nu": self.variable("batch_stats", "nu", jnp.zeros, feature_shape,
                            jnp.float32),
        "count": self.variable("batch_stats", "count", jnp.zeros, (),
                               jnp.int32)}
    probe = None
    if (self.is_initializing()
        or self.has_variable(power.PROBE_COLLECTION, "nu")):
      probe = self.variable(power.PROBE_COLLECTION, "nu", jnp.zeros,
                            feature_shape, jnp.float32).value
    scale = (self.param("scale", self.scale_init, feature_shape,
                        self.param_dtype) if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feature_shape,
                       self.param_dtype) if self.use_bias else None)
    out_dtype = self.dtype or jnp.result_type(
        x, *(p for p in (scale, bias) if p is not None))
    x = x.astype(jnp.promote_types(x.dtype, out_dtype))
    training = not use_running_average
    updating = (training and not self.is_initializing()
                and self.is_mutable_collection("batch_stats"))
    if updating and probe is None:
      raise ValueError(
          "PowerNorm is training with batch_stats mutable but got no "
          f"'{power.PROBE_COLLECTION}' collection, so its nu could never be "
          f"updated; pass variables['{power.PROBE_COLLECTION}'] to apply, "
          "differentiate the loss with respect to it and fold the gradient "
          "with bn_jax.power.fold_probe_grads.")
    state = power.PNState(**{name: v.value for name, v in stats.items()})
    options = {name: getattr(self, name) for name in power.MODULE_OPTIONS}
    y, new_state = power.apply(
        core.BNParams(scale=scale, bias=bias), state, x, training=training,
        probe=probe if training else None, mask=mask, **options)
    if updating:
      stats["psi2"].value = new_state.psi2
      stats["count"].value = new_state.count
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------
# Per-example norms: drop-ins for flax.linen's LayerNorm, GroupNorm,
# InstanceNorm and RMSNorm over the pure functions in `bn_jax.norms`, with
# flax's attributes, defaults and params ("scale", "bias" of flax's shapes),
# so variables load either way. They keep no statistics; `__call__` accepts
# and ignores `use_running_average` so that a model can put one wherever a
# BatchNorm goes: `norm(name=...)(x, use_running_average=not train)`.


def _affine_params(module: nn.Module, shape: tuple[int, ...]):
  """(scale, bias) params of `shape` as flax creates them; None if unused."""
  scale = (module.param("scale", module.scale_init, shape, module.param_dtype)
           if module.use_scale else None)
  bias = (module.param("bias", module.bias_init, shape, module.param_dtype)
          if getattr(module, "use_bias", False) else None)
  return scale, bias


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm computed by `bn_jax.norms.layer_norm`."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., Any] = nn.initializers.zeros
  scale_init: Callable[..., Any] = nn.initializers.ones
  reduction_axes: int | tuple[int, ...] = -1
  feature_axes: int | tuple[int, ...] = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None, use_running_average=None):
    del use_running_average  # no running statistics to choose
    scale, bias = _affine_params(
        self, norms.feature_shape(x.shape, self.feature_axes))
    return norms.layer_norm(
        x, scale, bias, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes, epsilon=self.epsilon,
        dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        use_fast_variance=self.use_fast_variance,
        force_float32_reductions=self.force_float32_reductions, mask=mask)


class RMSNorm(nn.Module):
  """flax.linen.RMSNorm computed by `bn_jax.norms.rms_norm`."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Callable[..., Any] = nn.initializers.ones
  reduction_axes: int | tuple[int, ...] = -1
  feature_axes: int | tuple[int, ...] = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None, use_running_average=None):
    del use_running_average  # no running statistics to choose
    scale, _ = _affine_params(
        self, norms.feature_shape(x.shape, self.feature_axes))
    return norms.rms_norm(
        x, scale, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes, epsilon=self.epsilon,
        dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        force_float32_reductions=self.force_float32_reductions, mask=mask)


class GroupNorm(nn.Module):
  """flax.linen.GroupNorm computed by `bn_jax.norms.group_norm`; scale and
  bias have one value per channel (x's last axis)."""
  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., Any] = nn.initializers.zeros
  scale_init: Callable[..., Any] = nn.initializers.ones
  reduction_axes: int | tuple[int, ...] | None = None
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None, use_running_average=None):
    del use_running_average  # no running statistics to choose
    scale, bias = _affine_params(self, (x.shape[-1],))
    return norms.group_norm(
        x, scale, bias, num_groups=self.num_groups,
        group_size=self.group_size, reduction_axes=self.reduction_axes,
        epsilon=self.epsilon, dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        use_fast_variance=self.use_fast_variance,
        force_float32_reductions=self.force_float32_reductions, mask=mask)


class InstanceNorm(nn.Module):
  """flax.linen.InstanceNorm computed by `bn_jax.norms.instance_norm`: for
  conv features (N, H, W, C); (N, C) features are a clear error."""
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Callable[..., Any] = nn.initializers.zeros
  scale_init: Callable[..., Any] = nn.initializers.ones
  feature_axes: int | tuple[int, ...] = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None, use_running_average=None):
    del use_running_average  # no running statistics to choose
    scale, bias = _affine_params(
        self, norms.feature_shape(x.shape, self.feature_axes))
    return norms.instance_norm(
        x, scale, bias, feature_axes=self.feature_axes, epsilon=self.epsilon,
        dtype=self.dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        use_fast_variance=self.use_fast_variance,
        force_float32_reductions=self.force_float32_reductions, mask=mask)


# ----------------------------------------------------------------------------
# The BN-free and batch-independent family (`bn_jax.free`): weight-
# standardized convolutions, FRN + TLU, EvoNorm-B0 and -S0, and SkipInit.
# The norms accept `use_running_average` as the per-example norms do;
# EvoNormB0 reads it, as BatchNorm does.


class WSConv(nn.Conv):
  """flax.linen.Conv whose kernel is weight-standardized
  (`bn_jax.free.weight_standardize`) over its fan-in (all axes but the
  last) at every call; scaled=True is Scaled Weight Standardization with a
  learned per-output-channel `gain`.

  Attributes: every one of flax.linen.Conv's (same params "kernel" and
  "bias", the raw kernel stored, standardized when used; a `mask` applies
  to the standardized kernel), then `scaled`, `gamma` (the activation's
  constant, scaled=True only), `epsilon` (timm's 1e-6) and `gain_init`.
  Variables: params `kernel`, `bias` as flax's, and `gain` (out,) with
  scaled=True. timm: `StdConv2d` / `ScaledStdConv2d` (NCHW, OIHW kernels);
  flax's use_bias=True is kept as the default (StdConv2d's is False).
  """
  scaled: bool = False
  gamma: float = 1.0
  epsilon: float = 1e-6
  gain_init: Callable[..., Any] = nn.initializers.ones

  @nn.nowrap
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    """flax's `param`; the kernel comes back standardized. (flax.linen.Conv
    reads its kernel through `self.param("kernel", ...)`, and the gain is
    created beside it.)"""
    value = super().param(name, init_fn, *init_args, unbox=unbox,
                          **init_kwargs)
    if name != "kernel" or not unbox:
      return value
    gain = (super().param("gain", self.gain_init, (value.shape[-1],),
                          self.param_dtype) if self.scaled else None)
    return free.weight_standardize(value, eps=self.epsilon,
                                   scaled=self.scaled, gain=gain,
                                   gamma=self.gamma)


def _channel_param(module: nn.Module, name: str, init, x):
  """A (C,) param of x's last axis, in param_dtype."""
  return module.param(name, init, (x.shape[-1],), module.param_dtype)


class FRN(nn.Module):
  """Filter Response Normalization with TLU, `bn_jax.free.frn_tlu`.

  Attributes: `epsilon` (timm's 1e-5), `use_tau` (False: plain FRN, no
  TLU), `dtype`, `param_dtype`, `scale_init`, `bias_init`, `tau_init`.
  Variables: params `scale` (1), `bias` (0), `tau` (0) of shape (C,).
  """
  epsilon: float = 1e-5
  use_tau: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable[..., Any] = nn.initializers.ones
  bias_init: Callable[..., Any] = nn.initializers.zeros
  tau_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, *, use_running_average=None):
    del use_running_average  # no running statistics to choose
    scale = _channel_param(self, "scale", self.scale_init, x)
    bias = _channel_param(self, "bias", self.bias_init, x)
    tau = (_channel_param(self, "tau", self.tau_init, x) if self.use_tau
           else None)
    return free.frn_tlu(x, scale, bias, tau, epsilon=self.epsilon,
                        dtype=self.dtype)


class EvoNormB0(nn.Module):
  """EvoNorm-B0, `bn_jax.free.evonorm_b0`, with its running variance in
  the `batch_stats` collection.

  Attributes: `use_running_average` as BatchNorm's (True: the running
  variance; False: the batch's, updated where batch_stats is mutable),
  `momentum` (flax's convention: timm's momentum 0.1 is 0.9, the default),
  `epsilon` (timm's 1e-3), `dtype`, `param_dtype`, `scale_init`,
  `bias_init`, `v_init`, `axis_name` and `axis_index_groups` (the batch
  variance synchronized over a named axis). Variables: params `scale` (1),
  `bias` (0), `v` (1); batch_stats `var` (1, float32). `init` leaves `var`
  at 1 and, in training mode, uses the local batch's variance (as flax's
  BatchNorm, without axis_name).
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-3
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable[..., Any] = nn.initializers.ones
  bias_init: Callable[..., Any] = nn.initializers.zeros
  v_init: Callable[..., Any] = nn.initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    running_var = self.variable("batch_stats", "var", jnp.ones,
                                (x.shape[-1],), jnp.float32)
    scale = _channel_param(self, "scale", self.scale_init, x)
    bias = _channel_param(self, "bias", self.bias_init, x)
    v = _channel_param(self, "v", self.v_init, x)
    training = not use_running_average
    initializing = self.is_initializing()
    y, new_var = free.evonorm_b0(
        x, scale, bias, v, running_var.value, training=training,
        momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=None if initializing else self.axis_index_groups)
    if (training and not initializing
        and self.is_mutable_collection("batch_stats")):
      running_var.value = new_var
    return y


class EvoNormS0(nn.Module):
  """EvoNorm-S0, `bn_jax.free.evonorm_s0` (no batch statistics).

  Attributes: `num_groups` (timm's 32) or `group_size` (then
  num_groups=None), `epsilon` (timm's 1e-5), `dtype`, `param_dtype`,
  `scale_init`, `bias_init`, `v_init`. Variables: params `scale` (1),
  `bias` (0), `v` (1) of shape (C,).
  """
  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable[..., Any] = nn.initializers.ones
  bias_init: Callable[..., Any] = nn.initializers.zeros
  v_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, x, *, use_running_average=None):
    del use_running_average  # no running statistics to choose
    scale = _channel_param(self, "scale", self.scale_init, x)
    bias = _channel_param(self, "bias", self.bias_init, x)
    v = _channel_param(self, "v", self.v_init, x)
    return free.evonorm_s0(x, scale, bias, v, num_groups=self.num_groups,
                           group_size=self.group_size, epsilon=self.epsilon,
                           dtype=self.dtype)


class SkipInit(nn.Module):
  """SkipInit (De & Smith, 2020): y = gain * x, a learned scalar `gain`
  initialized at 0, for the end of a residual branch (so that each
  residual block starts as the identity).

  Attributes: `gain_init` (zeros), `param_dtype`, `dtype` (y's dtype;
  default x's promoted with the gain's). Variables: params `gain` ().
  """
  gain_init: Callable[..., Any] = nn.initializers.zeros
  param_dtype: Any = jnp.float32
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    gain = self.param("gain", self.gain_init, (), self.param_dtype)
    out_dtype = self.dtype or jnp.result_type(x, gain)
    return (x * gain).astype(out_dtype)
