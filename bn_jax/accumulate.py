"""Exact batch norm under gradient accumulation.

Accumulating gradients over micro-batches is not the same as training on
the large batch when the model has BN: every BN layer normalizes each
micro-batch with that micro-batch's statistics, and the running statistics
take one update per micro-batch (pytorch/pytorch#46516, keras#16633). Here
every BN layer normalizes with the statistics of the whole batch, and the
gradient is the whole batch's, while only one micro-batch is ever in memory:

    def loss_fn(params, batch_stats, batch):   # one micro-batch
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, batch["x"],
          train=True, mutable=["batch_stats"])
      return cross_entropy(logits, batch["y"]), updates["batch_stats"]

    loss, grads, batch_stats = bn_jax.accumulate.value_and_grad(
        loss_fn, params, batch_stats, batch, micro_batches=16)

`loss`, `grads` and `batch_stats` are those of
`jax.value_and_grad(loss_fn, has_aux=True)` on the whole `batch` (to
float32 rounding): the mean loss, its gradient, and the running statistics
after one update with the whole batch's mean and variance. It is
synchronized BN (`axis_name`), but over a sequential axis.

How. The BN layers of the whole batch are a fixed point: layer l's
statistics s_l are sums over all micro-batches of functions of the
parameters and of the statistics of the layers before it, s = S(theta, s).
Forward: L passes over the micro-batches (L BN layers) settle s, each pass
making one more layer exact, and one more pass recomputes them about
accurate shifts (below). Backward, by the implicit function theorem,
dL/dtheta = dL/dtheta|_s + (dS/dtheta)^T lambda with
lambda = dL/ds + (dS/ds)^T lambda; dS/ds is strictly lower triangular (a
layer's statistics depend only on earlier layers'), so lambda is a sum of L
terms, one pass each. Every pass runs micro-batch by micro-batch under
`lax.scan`, its vector-Jacobian product taken inside the loop body, so
memory is that of one micro-batch.

Cost, against naive accumulation (one forward and backward pass over the
micro-batches): L + 1 forward passes, then L + 1 passes that each run a
forward and a backward pass; `passes` counts them, and benchmarks/README.md
has the measured time and memory.

The statistics are sums of (h - c) and (h - c)^2 about a constant shift c,
the previous pass's mean (see `_finalize`), so the variance does not lose
its digits to E[h^2] - E[h]^2 when |mean| >> std; it is clamped at 0. The
pass that makes layer l exact still shifts it by a mean that was computed
before the layers below it were: off by as much as the activations were
before normalization (a 0.5% error of the variance in the lab's MLP at
initialization), hence the extra pass, whose shifts are the exact means.

The BN layers are `bn_jax.nn.BatchNorm` and `flax.linen.BatchNorm`, found
by `flax.linen.intercept_methods`; layers in evaluation mode are left
alone. Their momentum (or None), unbiased_running_var and
skip_nonfinite_updates (a whole batch with non-finite statistics keeps the
state and counts once) apply to the one update of the step. Refused, with a one-line error: ghost batches, sampled statistics,
batch renormalization, a mask, `axis_name`, and a layer called twice in one
forward pass. flax.nnx models are not supported.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import core
from bn_jax import nn as bn_nn

# (loss, new_batch_stats) of one micro-batch, from (params, batch_stats,
# micro_batch).
LossFn = Callable[[Any, Any, Any], tuple[jax.Array, Any]]

# Options of bn_jax.nn.BatchNorm whose statistics are not the batch's mean
# and variance (or that need what a sequential axis does not give), with
# the value that turns each off.
_REFUSED_OPTIONS = {"virtual_batch_size": None, "stats_fraction": None,
                    "stats_examples": None, "renorm": False,
                    "axis_name": None}


def passes(num_bn_layers: int) -> dict[str, int]:
  """Passes over the micro-batches for a model with this many BN layers:
  forward-only passes, and passes with a forward and a backward pass."""
  return {"forward": num_bn_layers + 1, "forward_and_backward":
          num_bn_layers + 1}


def _is_bn(module) -> bool:
  return isinstance(module, (bn_nn.BatchNorm, nn.BatchNorm))


def _layer_name(module) -> str:
  return "/".join(module.path)


def _training(module, args, kwargs) -> bool:
  """Whether this BN call normalizes with the batch's statistics, as
  flax's merge_param decides."""
  at_call = kwargs.get("use_running_average",
                       args[1] if len(args) > 1 else None)
  value = (module.use_running_average
           if module.use_running_average is not None else at_call)
  return not value


def _check_layer(module, kwargs) -> None:
  name = _layer_name(module)
  for option, off in _REFUSED_OPTIONS.items():
    if getattr(module, option, off) != off:
      raise ValueError(
          f"BatchNorm {name!r} has {option}={getattr(module, option)!r}; "
          "exact accumulation computes the whole batch's plain mean and "
          f"variance, so build the layer with {option}={off!r} (or train "
          "without accumulation).")
  if kwargs.get("mask") is not None:
    raise ValueError(f"BatchNorm {name!r} was called with a mask, which "
                     "exact accumulation does not take; pass no mask.")


def _reduction_axes(module, x) -> tuple[tuple[int, ...], tuple[int, ...]]:
  axes = core.feature_axes(x.ndim, module.axis)
  return axes, tuple(a for a in range(x.ndim) if a not in axes)


def _interceptor(stats, shifts, sums, counts, micro_batches: int):
  """Runs every training-mode BN layer with the whole batch's statistics
  `stats[name] = (mean, var)` (differentiable inputs), records into `sums`
  its input's shifted sums and into `counts` the whole batch's values per
  feature, and updates its running statistics with `stats` where
  batch_stats is mutable. With `stats` None (the first, shape-finding
  trace) the sums have the right shapes only."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not (context.method_name == "__call__" and _is_bn(module)
            and _training(module, args, kwargs)):
      return next_fun(*args, **kwargs)
    _check_layer(module, kwargs)
    name = _layer_name(module)
    if name in sums:
      raise ValueError(
          f"BatchNorm {name!r} is called more than once per forward pass, "
          "so its statistics are not one population's; give each use its "
          "own layer.")
    x = args[0]
    axes, reduction_axes = _reduction_axes(module, x)
    feature_shape = tuple(x.shape[a] for a in axes)
    dtype = core._stats_dtype(x.dtype)  # pylint: disable=protected-access
    expand = lambda v: jnp.expand_dims(v, reduction_axes)
    if stats is None:
      zero = jnp.zeros(feature_shape, dtype)
      mean, var, shift = zero, zero + 1, zero
    else:
      (mean, var), shift = stats[name], shifts[name]
    centred = x.astype(dtype) - expand(shift)
    sums[name] = (jnp.sum(centred, reduction_axes),
                  jnp.sum(jnp.square(centred), reduction_axes))
    counts[name] = micro_batches * math.prod(x.shape[a]
                                             for a in reduction_axes)

    scale = (module.get_variable("params", "scale") if module.use_scale
             else None)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    out_dtype = module.dtype or jnp.result_type(
        x, *(p for p in (scale, bias) if p is not None))
    # The layer's state: mean and var, and the counters it has.
    kept = [field for field in ("mean", "var", "count", "nonfinite_skips")
            if module.has_variable("batch_stats", field)]
    running = core.BNState(**{"count": jnp.zeros((), jnp.int32), **{
        field: module.get_variable("batch_stats", field) for field in kept}})
    y, _ = core.apply(core.BNParams(scale, bias),
                      core.BNState(mean, var, running.count), x,
                      training=False, axis=module.axis,
                      epsilon=module.epsilon)
    if module.is_mutable_collection("batch_stats"):
      new = core.update_running_stats(
          running, lax.stop_gradient(mean), lax.stop_gradient(var),
          jnp.asarray(counts[name], jnp.float32), momentum=module.momentum,
          unbiased=getattr(module, "unbiased_running_var", False),
          skip_nonfinite=getattr(module, "skip_nonfinite_updates", False))
      for field in kept:
        module.put_variable("batch_stats", field, getattr(new, field))
    return y.astype(out_dtype)
  return interceptor


def _finalize(sums, shifts, counts: dict[str, int]):
  """The whole batch's (mean, biased var) per layer from the summed
  shifted sums: mean = c + E[h - c], var = E[(h - c)^2] - E[h - c]^2,
  exact for any constant c and without cancellation when c is near the
  mean."""
  def one(total, shift, count):
    centred_sum, square_sum = total
    offset = centred_sum / count
    var = jnp.maximum(square_sum / count - jnp.square(offset), 0.0)
    return shift + offset, var
  return {name: one(sums[name], shifts[name], counts[name])
          for name in sums}


def _split(batch, micro_batches: int):
  """`batch` reshaped to (micro_batches, size / micro_batches, ...) per
  array, or a one-line ValueError."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch has no arrays; pass the inputs (and labels) of "
                     "the whole batch.")
  size = leaves[0].shape[0] if leaves[0].ndim else None
  if size is None or any(not leaf.ndim or leaf.shape[0] != size
                         for leaf in leaves):
    raise ValueError(
        "every array of batch needs the same leading (example) axis; got "
        f"shapes {[jnp.shape(leaf) for leaf in leaves]}.")
  if not (isinstance(micro_batches, int) and micro_batches >= 1
          and size % micro_batches == 0):
    raise ValueError(
        f"micro_batches={micro_batches!r} must be a positive integer that "
        f"divides the batch of {size} examples (equal micro-batches keep "
        "the mean loss the whole batch's).")
  return jax.tree.map(lambda v: v.reshape(
      (micro_batches, size // micro_batches) + v.shape[1:]), batch)


def value_and_grad(loss_fn: LossFn, params, batch_stats, batch, *,
                   micro_batches: int):
  """The whole batch's loss, gradient and updated running statistics,
  computed one micro-batch at a time.

  Args:
    loss_fn: (params, batch_stats, micro_batch) -> (mean loss over the
      micro-batch, new batch_stats): applies the model in training mode
      with batch_stats mutable, as for `jax.value_and_grad(...,
      has_aux=True)`.
    params: what is differentiated.
    batch_stats: the BN layers' running statistics before the step.
    batch: a pytree of arrays with the examples on axis 0.
    micro_batches: how many equal micro-batches to split `batch` into.

  Returns:
    (loss, grads, new_batch_stats): the mean loss of the whole batch, its
    gradient with respect to params, and batch_stats after one update with
    the whole batch's statistics.

  Raises:
    ValueError: micro_batches does not divide the batch; a BN layer with
      an option whose statistics are not the batch's (see the module
      docstring); a BN layer called twice; no BN layer in training mode
      (use plain accumulation then, it is exact).
  """
  micro = _split(batch, micro_batches)
  first = jax.tree.map(lambda v: v[0], micro)

  counts = {}

  def run(params, stats, shifts, one):
    sums = {}
    with nn.intercept_methods(_interceptor(stats, shifts, sums, counts,
                                           micro_batches)):
      loss, new_batch_stats = loss_fn(params, batch_stats, one)
    return loss, sums, new_batch_stats

  shapes = jax.eval_shape(lambda p, b: run(p, None, None, b)[1], params,
                          first)
  if not shapes:
    raise ValueError(
        "no BatchNorm layer ran in training mode, so accumulating the "
        "micro-batches' gradients is already exact; average them, or check "
        "that loss_fn applies the model with train=True.")
  num_layers = len(shapes)

  def summed(fn, carry_init):
    """Sums fn(one micro-batch) over the micro-batches under lax.scan."""
    def step(carry, one):
      return jax.tree.map(jnp.add, carry, fn(one)), None
    return lax.scan(step, carry_init, micro)[0]

  zeros_like = lambda tree: jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), tree)
  # Each pass makes one more layer exact (in call order); the last one
  # recomputes all of them about the exact means (see the module docstring).
  stats = {name: (jnp.zeros(s[0].shape, s[0].dtype),
                  jnp.ones(s[0].shape, s[0].dtype))
           for name, s in shapes.items()}
  for _ in range(num_layers + 1):
    shifts = {name: lax.stop_gradient(mean)
              for name, (mean, _) in stats.items()}
    sums = summed(lambda one: run(params, stats, shifts, one)[1],
                  zeros_like(shapes))
    stats = _finalize(sums, shifts, counts)
  shifts = {name: mean for name, (mean, _) in stats.items()}

  # dL/dparams at fixed statistics, and dL/ds; and the sums at the fixed
  # point, where _finalize's vector-Jacobian product is taken.
  def loss_part(one):
    def loss_only(p, s):
      loss, sums, _ = run(p, s, shifts, one)
      return loss / micro_batches, sums
    loss, vjp, sums = jax.vjp(loss_only, params, stats, has_aux=True)
    grad_params, grad_stats = vjp(jnp.ones_like(loss))
    return loss, grad_params, grad_stats, sums
  loss, grads, cotangent, sums = summed(
      loss_part, (jnp.zeros(()), zeros_like(params), zeros_like(stats),
                  zeros_like(shapes)))
  _, finalize_vjp = jax.vjp(lambda t: _finalize(t, shifts, counts), sums)
  # The new running statistics: one more forward with the final statistics
  # would give them, but the update only reads `stats`; take them from a
  # forward of the first micro-batch (cheap, and exactly the same update).
  new_batch_stats = run(params, stats, shifts, first)[2]

  # lambda = sum_k ((dS/ds)^T)^k dL/ds, and its (dS/dparams)^T; L terms.
  def through_statistics(cotangent, grads):
    # The cotangent of the summed sums, from that of the finalized stats.
    (sums_cotangent,) = finalize_vjp(cotangent)

    def part(one):
      _, vjp = jax.vjp(lambda p, s: run(p, s, shifts, one)[1], params, stats)
      return vjp(sums_cotangent)
    # Summed onto `grads` itself: one parameter-sized buffer fewer.
    return summed(part, (grads, zeros_like(stats)))

  for _ in range(num_layers):
    grads, cotangent = through_statistics(cotangent, grads)
  return loss, grads, new_batch_stats


def naive_value_and_grad(loss_fn: LossFn, params, batch_stats, batch, *,
                         micro_batches: int):
  """Plain gradient accumulation, what the frameworks do: every BN layer
  normalizes each micro-batch with its own statistics and its running
  statistics take one update per micro-batch, in sequence. For comparison
  with `value_and_grad`; the same signature and returns."""
  micro = _split(batch, micro_batches)

  def step(carry, one):
    loss_sum, grad_sum, stats = carry
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, one)
    return (loss_sum + loss / micro_batches,
            jax.tree.map(lambda a, g: a + g / micro_batches, grad_sum, grads),
            stats), None
  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads, batch_stats), _ = lax.scan(
      step, (jnp.zeros(()), zeros, batch_stats), micro)
  return loss, grads, batch_stats

