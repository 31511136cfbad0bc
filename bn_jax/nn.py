"""Flax linen wrapper around the pure functions in `bn_jax.core`.

A drop-in for `flax.linen.BatchNorm`: same core arguments, same variable
names (params `scale`, `bias`; batch_stats `mean`, `var`), so model code and
checkpoints written for flax carry over. The only extra variable is
batch_stats `count`, created only when `momentum=None` (cumulative average).
One difference: during `init` the output is normalized with the fresh
running statistics (mean 0, var 1), not the batch's, so `init` accepts a
batch of one example and runs outside a named axis; the variables it creates
are flax's, and `init_with_output`'s y differs from flax's.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from bn_jax import core


class BatchNorm(nn.Module):
  """Batch normalization with state in the `batch_stats` collection.

  Attributes mirror flax.linen.BatchNorm; see `bn_jax.core.apply` for the
  extra options: `unbiased_running_var`, `stats_method` (a
  `core.STATS_METHODS` name), `grad` (how it is differentiated, a
  `core.GRAD_MODES` name) and `impl` (how the passes are written for the
  compiler, a `core.IMPLS` name).
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
  unbiased_running_var: bool = False
  stats_method: str = "shifted"
  grad: str = "paper_jvp"  # "paper_jvp", "paper_vjp" or "autodiff"
  impl: str = "xla_cpu"  # "xla_cpu" or "plain" (GPU, TPU)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    axes = core.feature_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in axes)

    mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape,
                         jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, feature_shape,
                        jnp.float32)
    count = (self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
             if self.momentum is None else None)
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
    state = core.BNState(
        mean=mean.value, var=var.value,
        count=count.value if count is not None else jnp.zeros((), jnp.int32))
    # `init` only creates the variables and, as in flax, never updates them.
    # It normalizes with the fresh running statistics, so it accepts a dummy
    # batch of one example and runs outside the named axis' vmap or pmap.
    training = not use_running_average and not self.is_initializing()
    y, new_state = core.apply(
        core.BNParams(scale=scale, bias=bias), state, x, training=training,
        axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
        unbiased_running_var=self.unbiased_running_var,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask, stats_method=self.stats_method,
        grad=self.grad, impl=self.impl)
    if training:
      mean.value, var.value = new_state.mean, new_state.var
      if count is not None:
        count.value = new_state.count
    return y.astype(out_dtype)
