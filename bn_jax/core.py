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
  * statistics are computed in float32 for float32 and narrower x (float64
    x, under jax_enable_x64, keeps float64); y has x's dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Axes = int | Sequence[int]

STATS_METHODS = ("shifted", "two_pass", "one_pass")
# How training-mode BN is differentiated (same derivatives, see `apply`):
# "paper_jvp", the paper's backward pass through custom JVPs of the
# full-size steps (fewest passes, every nesting and order); "paper_vjp", a
# custom VJP that calls batch_norm_backward (no forward mode over it);
# "autodiff", plain autodiff of the forward formula.
GRAD_MODES = ("paper_jvp", "paper_vjp", "autodiff")
# How the passes are written for the compiler (same mathematics):
# "xla_cpu" with the devices of the note "Performance on XLA:CPU" below,
# "plain" without them, for backends that fuse well on their own.
IMPLS = ("xla_cpu", "plain")


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


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
  # A string first: an array must not reach `in`, and the old boolean
  # modes (grad=True) must fail.
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name}={value!r}; choose one of {choices}.")


def _check_hyperparameters(momentum, epsilon) -> None:
  # Traced values (a vmapped sweep over momentum or epsilon) are not checked
  # here; the experiment config is validated before anything is traced.
  if isinstance(momentum, numbers.Real) and not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"momentum={momentum} is outside [0, 1]. bn_jax uses flax's "
        "convention running = momentum * running + (1 - momentum) * batch; "
        "a PyTorch momentum p corresponds to 1 - p.")
  if isinstance(epsilon, numbers.Real) and not epsilon > 0:
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
#
# Performance on XLA:CPU (see benchmarks/README.md). A training step reads
# x in four reductions (sum and sum of squares; sum(dy) and
# sum(dy * (x - mean)) in the backward pass) and writes only y and dx; what
# decides its time is how many full-size tensors are written. XLA makes each
# reduction its own kernel and writes to memory any full-size value that a
# reduction shares with another kernel, even a broadcast per-feature vector.
# So every full-size expression below appears in one kernel only: the shifts
# that keep float32 sums accurate use different reference examples, the
# first (sum of x), the last (sum of squares), the second, called the anchor
# (y and, in the backward pass, dx), and the mean (the backward reduction);
# for bfloat16 x each kernel converts x to float32 itself (`_own_copy`); and
# per-feature vectors are computed once (`_per_feature`). With impl="plain"
# these two devices are identities and the same code is plain jnp: the
# devices constrain compilers that fuse well on their own (GPU, TPU).


def _stats_dtype(dtype):
  """float32 for bfloat16, float16 and float32 inputs; float64 stays."""
  return jnp.promote_types(dtype, jnp.float32)


def _psum(values, axis_name, axis_index_groups):
  if axis_name is None:
    return values
  return lax.psum(values, axis_name, axis_index_groups=axis_index_groups)


def _own_copy(x, tag, impl):
  """x as a value that XLA cannot identify with other uses of x; a no-op
  at run time. Kernels that each convert their own copy of bfloat16 x read
  it directly instead of sharing one float32 copy written to memory. `tag`,
  a small array particular to the caller, keeps XLA from merging this
  barrier with another one. impl="plain": x itself."""
  if impl == "plain":
    return x
  return lax.optimization_barrier((x, tag))[0]


def _per_feature(impl, *values):
  """Per-feature vectors computed once, before the full-size passes that use
  them (and, under jax.grad, so are their cotangents); impl="plain": the
  values themselves.

  XLA fuses every elementwise op on per-feature vectors into the full-size
  loop that consumes them and repeats it for every element; a chain of ~20
  such ops (the backward pass's) slows the loop measurably. A reduction is
  computed once, on its own: here a sum over a stack of v and zeros, exact.
  """
  if impl == "plain":
    return values
  return _reduced_once(*values)


@jax.custom_jvp
def _reduced_once(*values):
  return tuple(jnp.stack([v, jnp.zeros_like(v)]).sum(0) for v in values)


@_reduced_once.defjvp
def _reduced_once_jvp(primals, tangents):
  # The tangent, broadcast then sliced, is v itself; transposed (jax.grad),
  # the broadcast becomes the sum that computes the cotangent once.
  return _reduced_once(*primals), tuple(
      jnp.broadcast_to(t, (2,) + t.shape)[0] for t in tangents)


def _where(weight, values):
  """Zeroes masked-out (padding) values; weight None means no mask."""
  return values if weight is None else jnp.where(weight, values, 0.0)


def _references(x, weight, reduction_axes, axis_name, axis_index_groups):
  """Per-feature values near the mean: the first, last and second example.

  Subtracting one before summing avoids the catastrophic cancellation of
  E[x^2] - E[x]^2 when |mean| >> std, without a full-size centred copy.
  Examples are counted in row-major order over the reduced axes. They are
  constants to differentiation: no statistic depends on the choice.
  """
  if weight is not None:
    # Any fixed example may be padding (padding usually sits at the end), so
    # with a mask all three are the masked mean, at the cost of one more
    # read of x. Its float32 rounding (~1e-7 |mean|) is harmless in a shift.
    dtype = _stats_dtype(x.dtype)
    sums = (jnp.sum(jnp.where(weight, x.astype(dtype), 0.0), reduction_axes,
                    keepdims=True),
            jnp.sum(weight.astype(dtype), reduction_axes, keepdims=True))
    total, count = _psum(sums, axis_name, axis_index_groups)
    ref = lax.stop_gradient(total / jnp.maximum(count, 1.0))
    return [ref, ref, ref]
  reduced_shape = tuple(x.shape[a] for a in reduction_axes)
  size = math.prod(reduced_shape)
  refs = []
  for position in (0, size - 1, min(1, size - 1)):
    coords = []
    for extent in reversed(reduced_shape):
      position, coord = divmod(position, extent)
      coords.insert(0, coord)
    coords = iter(coords)
    index = tuple(next(coords) if a in reduction_axes else slice(None)
                  for a in range(x.ndim))
    ref = x[index].astype(_stats_dtype(x.dtype))
    refs.append(jnp.expand_dims(lax.stop_gradient(ref), reduction_axes))
  if axis_name is not None:  # every device must use the same references
    refs = lax.pmean(refs, axis_name, axis_index_groups=axis_index_groups)
  return refs


def _square_sum_fn(impl, reduction_axes, x, center, anchor, weight):
  """sum((x - center)^2) per feature, dims kept; `center` is a constant."""
  del anchor  # only the derivative uses it
  x32 = _own_copy(x, center, impl).astype(center.dtype)
  return jnp.sum(_where(weight, jnp.square(x32 - center)), reduction_axes,
                 keepdims=True)


_square_sum = jax.custom_jvp(_square_sum_fn, nondiff_argnums=(0, 1))


@_square_sum.defjvp
def _square_sum_jvp(impl, reduction_axes, primals, tangents):
  x, center, anchor, weight = primals
  # d/dx = 2 (x - center), written as 2 ((x - anchor) - (center - anchor)):
  # transposed (in jax.grad) it then shares x - anchor with y, not x - center
  # with the forward sum (see the note on XLA:CPU above).
  anchor, shift = _per_feature(impl, anchor, center - anchor)
  deviation = (_own_copy(x, anchor, impl).astype(center.dtype) - anchor
               ) - shift
  dsum = 2.0 * jnp.sum(
      _where(weight, tangents[0].astype(center.dtype) * deviation),
      reduction_axes, keepdims=True)
  return _square_sum_fn(impl, reduction_axes, *primals), dsum


def _moments(x, reduction_axes, mask, axis_name, axis_index_groups,
             stats_method, grad="paper_jvp", impl="xla_cpu"):
  """Returns (anchor, mean - anchor, var, count), float32, dims kept.

  `anchor` is a per-feature value near the mean (the second example) and
  `mean - anchor` is computed from small numbers, so that y = (x - anchor)
  * m + o keeps the precision of x even where |mean| >> std and the mean
  itself does not round well to float32.

  Every variance below is sum((x - c)^2) / m - (mean - c)^2 for a constant
  shift c (stop_gradient), exact for any c, so its derivatives of every
  order are the variance's. (A centred sum of squares with the correction
  left out, because it is zero in value, has the right value and first
  derivative but not the right second derivative.)
  """
  dtype = _stats_dtype(x.dtype)
  weight = None if mask is None else jnp.broadcast_to(mask, x.shape)
  sum_ = lambda v: jnp.sum(_where(weight, v), reduction_axes, keepdims=True)
  square_sum = functools.partial(
      _square_sum_fn if grad == "autodiff" else _square_sum, impl,
      reduction_axes, x)
  per_feature = functools.partial(_per_feature, impl)
  if weight is None:
    local_count = jnp.asarray(
        math.prod(x.shape[a] for a in reduction_axes), dtype)
  else:
    local_count = sum_(jnp.ones(x.shape, dtype))
  first, last, anchor = _references(x, weight, reduction_axes, axis_name,
                                    axis_index_groups)
  x32 = _own_copy(x, first, impl).astype(dtype)  # the others convert theirs
  if stats_method == "one_pass":  # fastest; loses precision if |mean| >> std
    total, sq = per_feature(
        sum_(x32), square_sum(jnp.zeros_like(anchor), anchor, weight))
    total, sq, count = _psum((total, sq, local_count), axis_name,
                             axis_index_groups)
    mean = total / count
    var = sq / count - jnp.square(mean)
    return anchor, mean - anchor, jnp.maximum(var, 0.0), count
  total, = per_feature(sum_(x32 - first))
  total, count = _psum((total, local_count), axis_name, axis_index_groups)
  mean_minus_first = total / count
  if stats_method == "two_pass":
    # The shift c is the mean itself (as a constant), so the correction
    # (mean - c)^2 is exactly 0 and so is its first derivative; its second,
    # 2 dmean dmean, is what gives the variance its Hessian
    # 2 (delta_ij - 1/m) / m rather than 2 delta_ij / m.
    center = lax.stop_gradient(mean_minus_first)
    sq, = per_feature(square_sum(first + center, anchor, weight))
    var = (_psum(sq, axis_name, axis_index_groups) / count
           - jnp.square(mean_minus_first - center))
  else:  # shifted
    sq, = per_feature(square_sum(last, anchor, weight))
    sq = _psum(sq, axis_name, axis_index_groups)
    var = sq / count - jnp.square((first - last) + mean_minus_first)
  return (anchor, (first - anchor) + mean_minus_first, jnp.maximum(var, 0.0),
          count)


def moments(x: jax.Array, reduction_axes: tuple[int, ...], *,
            mask: jax.Array | None = None, axis_name=None,
            axis_index_groups=None, stats_method: str = "shifted",
            impl: str = "xla_cpu",
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch mean and biased variance, reduced keeping dims.

  Statistics are float32 for float32 and narrower x (float64 for float64).
  Returns (mean, var, count): `count` is the number of values per feature
  (summed over `axis_name` if given), used for the unbiased correction.
  The variance is clamped at 0, so it can never be negative. `mask`,
  `axis_name`, `axis_index_groups`, `stats_method` and `impl` are as in
  `apply`; derivatives of every order are exact (the paper's backward pass
  for the first).
  """
  _check_choice("stats_method", stats_method, STATS_METHODS)
  _check_choice("impl", impl, IMPLS)
  anchor, mean_minus_anchor, var, count = _moments(
      x, reduction_axes, mask, axis_name, axis_index_groups, stats_method,
      impl=impl)
  return anchor + mean_minus_anchor, var, count


# ----------------------------------------------------------------------------
# Normalization and the paper's analytic backward pass.


def batch_norm_backward(dy, x, mean, inv_std, scale, reduction_axes, *,
                        axis_name=None, axis_index_groups=None):
  """Analytic (dx, dgamma, dbeta) of Ioffe & Szegedy (2015), compact form.

  With xhat = (x - mean) * inv_std over m values per feature:
      dbeta  = sum(dy)
      dgamma = sum(dy * xhat)
      dx     = gamma * inv_std * (dy - dbeta / m - xhat * dgamma / m)
  where the sums in dx run over the whole (possibly cross-device) batch.
  This is the closed form of what `jax.grad` of `apply` computes; it is
  exposed for custom kernels and for testing.

  dgamma and dbeta are this device's contributions, exactly what autodiff
  gives: under `pmap` average or sum them as for any other gradient; under
  `vmap(axis_name=...)` or `shard_map` JAX sums them for replicated params.

  Arrays `mean`, `inv_std`, `scale` are float32 with reduced dims kept.
  Returns dx in x's dtype and dgamma, dbeta in float32 with dims kept.
  """
  dtype = _stats_dtype(x.dtype)
  dy32 = dy.astype(dtype)
  xhat = (x.astype(dtype) - mean) * inv_std
  sum_dy = jnp.sum(dy32, axis=reduction_axes, keepdims=True)
  sum_dy_xhat = jnp.sum(dy32 * xhat, axis=reduction_axes, keepdims=True)
  local_count = jnp.asarray(math.prod(x.shape[a] for a in reduction_axes),
                            dtype)
  g_sum_dy, g_sum_dy_xhat, count = _psum(
      (sum_dy, sum_dy_xhat, local_count), axis_name, axis_index_groups)
  a = scale * inv_std
  dx = a * (dy32 - g_sum_dy / count - xhat * (g_sum_dy_xhat / count))
  return dx.astype(x.dtype), sum_dy_xhat, sum_dy


def _affine_fn(impl, x, anchor, mean_minus_anchor, multiplier, offset):
  """y = (x - anchor) * multiplier + offset in x's dtype, one pass over x.

  With an anchor near the mean, x - anchor is exact for x near it, so y
  keeps the precision of x where |mean| >> std (a constant feature gives
  exactly its bias). `anchor` is a constant; `mean_minus_anchor` only
  chooses how the derivative is written.
  """
  del impl, mean_minus_anchor  # only the derivative uses them
  dtype = jnp.promote_types(x.dtype, multiplier.dtype)
  return ((x.astype(dtype) - anchor) * multiplier + offset).astype(x.dtype)


_affine = jax.custom_jvp(_affine_fn, nondiff_argnums=(0,))


@_affine.defjvp
def _affine_jvp(impl, primals, tangents):
  x, anchor, mean_minus_anchor, multiplier, offset = primals
  dx, _, _, dmultiplier, doffset = tangents
  # (x - anchor) dm written as (x - mean) dm + (mean - anchor) dm:
  # transposed, dm's cotangent is the backward pass's own reduction
  # sum(dy * (x - mean)), which shares no full-size value with y or dx.
  mean = anchor + mean_minus_anchor
  dtype = jnp.promote_types(x.dtype, multiplier.dtype)
  dy = (dx.astype(dtype) * multiplier
        + (_own_copy(x, mean, impl).astype(dtype) - mean) * dmultiplier
        + (doffset + mean_minus_anchor * dmultiplier))
  return _affine_fn(impl, *primals), dy.astype(x.dtype)


def _normalize(x, anchor, mean_minus_anchor, inv_std, scale, bias, grad,
               impl):
  """y = (x - mean) * inv_std * scale + bias, with mean = anchor +
  mean_minus_anchor, as one fused pass over x."""
  multiplier = inv_std if scale is None else inv_std * scale
  offset = -mean_minus_anchor * multiplier
  if bias is not None:
    offset = offset + bias
  affine = _affine_fn if grad == "autodiff" else _affine
  return affine(impl, x, *_per_feature(impl, anchor, mean_minus_anchor,
                                       multiplier, offset))


def _varying_axes(value) -> frozenset:
  manual = getattr(jax.typeof(value), "manual_axis_type", None)
  return getattr(manual, "varying", frozenset())


def _vary_like(values, x, axis_name):
  """Marks replicated gamma and beta as varying over the axes x varies over.

  Under shard_map a custom VJP must return cotangents of its inputs' type;
  gamma's and beta's (this device's sums) vary over the axis, so the inputs
  must too. JAX then psums them when transposing, as autodiff does.
  Elsewhere (vmap, pmap, no axis) this is a no-op.
  """
  if axis_name is None:
    return values
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  varying = _varying_axes(x)
  def vary(value):
    missing = tuple(n for n in names
                    if n in varying and n not in _varying_axes(value))
    return lax.pcast(value, missing, to="varying") if missing else value
  return jax.tree.map(vary, values)


@functools.lru_cache(maxsize=None)
def _paper_vjp_normalize(reduction_axes, axis_name, axis_index_groups,
                         stats_method, impl):
  """Training-mode BN as a `jax.custom_vjp` whose backward pass is
  `batch_norm_backward`, the paper's formulas, literally.

  Returns f(x, scale, bias, epsilon) -> (y, mean, var, count); the caller
  stops the gradient of the statistics (state is never differentiated), so
  their cotangents are zero and ignored. JAX runs a custom VJP's backward
  pass after a surrounding vmap's axis scope has ended, so with an
  `axis_name` under vmap take the gradient inside the vmap.
  """
  groups = None if axis_index_groups is None else [
      list(g) for g in axis_index_groups]

  def forward(x, scale, bias, epsilon):
    mean, var, count = moments(x, reduction_axes, axis_name=axis_name,
                               axis_index_groups=groups,
                               stats_method=stats_method, impl=impl)
    inv_std = lax.rsqrt(var + epsilon)
    y = (x.astype(mean.dtype) - mean) * (inv_std * scale) + bias
    return (y.astype(x.dtype), mean, var, count), (x, mean, inv_std, scale)

  def backward(residuals, cotangents):
    x, mean, inv_std, scale = residuals
    dx, dscale, dbias = batch_norm_backward(
        cotangents[0], x, mean, inv_std, scale, reduction_axes,
        axis_name=axis_name, axis_index_groups=groups)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype), None

  normalize = jax.custom_vjp(lambda *args: forward(*args)[0])
  normalize.defvjp(forward, backward)
  return normalize


# ----------------------------------------------------------------------------
# The public apply.


def apply(params: BNParams, state: BNState, x: jax.Array, *,
          training: bool, axis: Axes = -1, momentum: float | None = 0.99,
          epsilon: float = 1e-5, unbiased_running_var: bool = False,
          axis_name: Any = None, axis_index_groups: Any = None,
          mask: jax.Array | None = None, stats_method: str = "shifted",
          grad: str = "paper_jvp", impl: str = "xla_cpu",
          ) -> tuple[jax.Array, BNState]:
  """Batch-normalizes x; returns (y, new_state).

  Args:
    params: BNParams from `init` (gamma, beta of the feature shape).
    state: BNState from `init` or a previous `apply`.
    x: input; any float dtype. y has x's dtype; statistics are float32
      (float64 for float64 x).
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
      averaged, i.e. synchronized ("cross-replica") batch norm. Gradients
      work in every nesting: `grad(vmap(f, axis_name=...))` (jitted or
      not), `vmap(grad(f), axis_name=...)`, pmap and shard_map.
    axis_index_groups: optional groups of axis indices, each synchronized
      separately (see `lax.psum`).
    mask: optional boolean array broadcastable to x; False entries (padding)
      do not count in the statistics (nor in the gradient through them).
    stats_method: "shifted" (default: examples of the batch are subtracted
      before summing, stable for large offsets, one read of x per sum),
      "two_pass" (the sum of squares is centred on the mean, so it waits for
      it) or "one_pass" (E[x^2] - E[x]^2, inaccurate when |mean| >> std).
    grad: how training-mode BN is differentiated, one of GRAD_MODES; the
      derivatives are the same (to rounding), the computation differs.
      "paper_jvp" (default): the full-size steps have custom JVPs, so that
      `jax.grad` runs the paper's backward pass (`batch_norm_backward`)
      with the fewest passes over x: two reductions, sum(dy) and
      sum(dy * (x - mean)), and one elementwise pass for dx that recomputes
      xhat from x. Everything works: forward and reverse mode, derivatives
      of any order, every nesting with named axes.
      "paper_vjp": a `jax.custom_vjp` whose backward pass calls
      `batch_norm_backward` itself (the paper's compact formulas, no mask).
      As for any custom VJP, forward mode over it (`jax.jvp`, `jacfwd`,
      and so forward-over-forward or reverse-over-forward) raises; reverse
      mode (`jax.grad`, `jax.vjp`) works, and so do second derivatives of
      it, reverse-over-reverse (`jacrev(jax.grad(f))`) and
      forward-over-reverse (`jax.hessian`). Under
      `vmap(axis_name=...)` take the gradient inside the vmap
      (`vmap(grad(f))`), as JAX runs a custom VJP's backward pass outside
      the vmap's axis scope; shard_map and pmap work.
      "autodiff": plain autodiff of the same forward pass, which on
      XLA:CPU writes two more full-size tensors.
    impl: how the passes are written for the compiler, one of IMPLS; same
      mathematics and numbers (to rounding), with every stats_method,
      grad mode, mask and axis_name. "xla_cpu" (default) adds devices that
      make XLA:CPU write fewer full-size tensors (optimization barriers so
      that each kernel converts x itself, per-feature vectors computed once
      by a reduction; see "Performance on XLA:CPU" in the source). "plain"
      leaves them out, plain jnp ops, for GPU and TPU, where the devices
      only constrain XLA's fusion.

  Returns:
    (y, new_state).
  """
  axes = feature_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in axes)
  feature_shape = tuple(x.shape[a] for a in axes)
  _check_shapes(params, state, feature_shape)
  _check_hyperparameters(momentum, epsilon)
  _check_choice("stats_method", stats_method, STATS_METHODS)
  _check_choice("grad", grad, GRAD_MODES)
  _check_choice("impl", impl, IMPLS)
  # Per-feature arrays are reshaped to broadcast against x.
  expand = lambda v: None if v is None else jnp.expand_dims(
      v, reduction_axes)

  if not training:
    inv_std = lax.rsqrt(expand(state.var) + epsilon)
    y = _normalize(x, expand(state.mean), jnp.zeros_like(inv_std), inv_std,
                   expand(params.scale), expand(params.bias), "autodiff",
                   impl)
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

  if grad == "paper_vjp":
    if mask is not None:
      raise ValueError("grad='paper_vjp' does not take a mask; use "
                       "grad='paper_jvp' (the default) or 'autodiff'.")
    dtype = _stats_dtype(x.dtype)
    scale = (jnp.ones(feature_shape, dtype) if params.scale is None
             else params.scale.astype(dtype))
    bias = (jnp.zeros(feature_shape, dtype) if params.bias is None
            else params.bias.astype(dtype))
    scale, bias = _vary_like((expand(scale), expand(bias)), x, axis_name)
    groups = None if axis_index_groups is None else tuple(
        tuple(g) for g in axis_index_groups)
    normalize = _paper_vjp_normalize(reduction_axes, axis_name, groups,
                                     stats_method, impl)
    y, mean, var, count = normalize(x, scale, bias,
                                    jnp.asarray(epsilon, dtype))
  else:
    anchor, mean_minus_anchor, var, count = _moments(
        x, reduction_axes, mask, axis_name, axis_index_groups, stats_method,
        grad, impl)
    y = _normalize(x, anchor, mean_minus_anchor, lax.rsqrt(var + epsilon),
                   expand(params.scale), expand(params.bias), grad, impl)
    mean = anchor + mean_minus_anchor

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
                        epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Folds eval-mode BN into the preceding Dense or Conv layer.

  For layer(x) = x @ kernel + bias followed by eval BN, returns
  (kernel', bias') with x @ kernel' + bias' == BN(layer(x)).

  Args:
    kernel: output features last: (in, out) for Dense, (H, W, in, out) for
      a flax Conv.
    bias: the layer's bias (out,), or None.
    params, state: the BN's params and running statistics.
    epsilon: the BN's epsilon, required: there is no safe default (flax and
      PyTorch use 1e-5, Keras 1e-3), and a wrong one gives folded weights
      that are wrong without any error.
  """
  _check_hyperparameters(None, epsilon)
  multiplier = lax.rsqrt(state.var + epsilon)
  if params.scale is not None:
    multiplier = multiplier * params.scale
  if bias is None:
    bias = jnp.zeros_like(state.mean)
  new_bias = (bias - state.mean) * multiplier
  if params.bias is not None:
    new_bias = new_bias + params.bias
  # Output features are the kernel's last axis; the rest broadcast.
  per_output = multiplier.reshape((1,) * (kernel.ndim - 1) + (-1,))
  return kernel * per_output.astype(kernel.dtype), new_bias.astype(
      kernel.dtype)
