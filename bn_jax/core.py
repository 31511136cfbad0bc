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
    x, under jax_enable_x64, keeps float64); y has x's dtype. x must be
    real: complex x is rejected (flax normalizes it, bn_jax does not).

Variants of training-mode BN, options of `apply` that combine with the
others (see `apply` for the few combinations that are rejected):
  * batch renormalization (Ioffe, 2017), `renorm=True`: Keras's
    `BatchNormalization(renorm=True)` step for step, with the state's
    `renorm_mean` and `renorm_stddev` (create them with
    `init(..., renorm=True)`) and an optional schedule of the clipping
    limits by update count (`renorm_limits`);
  * ghost batches (Hoffer et al., 2017), `virtual_batch_size`: statistics
    per chunk of consecutive examples, as with one device per chunk;
  * sampled statistics (after Chen et al., 2019), `stats_fraction` or
    `stats_examples`: statistics from a subset of the examples, applied to
    all of them.
And one option that guards the state rather than changing the
normalization: `skip_nonfinite_updates`, which keeps the state of a batch
whose statistics are not finite and counts it in `state.nonfinite_skips`
(create it with `init(..., skip_nonfinite_updates=True)`).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

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
# What `impl` may also be: "auto", the flax front ends' default, chooses by
# the backend (`resolve_impl`).
IMPL_CHOICES = ("auto", *IMPLS)
# Which examples sampled statistics read (see `apply`).
STATS_SAMPLINGS = ("stride", "random")
RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# The options of `apply` that the flax front ends (bn_jax.nn, bn_jax.nnx)
# hold as attributes of the same names and pass on as they are.
MODULE_OPTIONS = ("axis", "momentum", "epsilon", "unbiased_running_var",
                  "axis_index_groups", "stats_method", "grad", "impl",
                  "renorm", "renorm_clipping", "renorm_momentum",
                  "renorm_schedule", "virtual_batch_size", "stats_fraction",
                  "stats_examples", "stats_sampling",
                  "skip_nonfinite_updates")


class BNParams(NamedTuple):
  """Learned affine parameters; `None` where disabled (use_scale/use_bias)."""
  scale: jax.Array | None  # gamma
  bias: jax.Array | None  # beta


class BNState(NamedTuple):
  """Running (population) statistics, threaded explicitly through training.

  `mean` and `var` are what evaluation normalizes with. The last three
  fields exist only for the options that need them (None otherwise, so
  `BNState(mean, var, count)` is a complete plain state): for batch
  renormalization (`init(..., renorm=True)`), Keras's `renorm_mean` and
  `renorm_stddev`, the moving averages (with `renorm_momentum`) that the
  corrections r and d compare the batch with; for
  `skip_nonfinite_updates` (`init(..., skip_nonfinite_updates=True)`),
  `nonfinite_skips`, how many updates were skipped because the batch's
  statistics were not finite.
  """
  mean: jax.Array
  var: jax.Array
  count: jax.Array  # number of updates so far (int32 scalar)
  renorm_mean: jax.Array | None = None
  renorm_stddev: jax.Array | None = None
  nonfinite_skips: jax.Array | None = None  # int32 scalar


def init(feature_shape: int | Sequence[int], dtype: Any = jnp.float32, *,
         use_scale: bool = True, use_bias: bool = True, renorm: bool = False,
         skip_nonfinite_updates: bool = False,
         ) -> tuple[BNParams, BNState]:
  """Returns fresh params (gamma = 1, beta = 0) and state (mean 0, var 1).

  Args:
    feature_shape: shape of the normalized features, e.g. `x.shape[-1]` for
      `axis=-1`, or `(x.shape[1], x.shape[3])` for `axis=(1, 3)`.
    dtype: dtype of gamma and beta. Running statistics are always float32.
    use_scale, use_bias: whether gamma / beta exist.
    renorm: also create the batch-renorm statistics, renorm_mean 0 and
      renorm_stddev 1 (Keras's initial values: the square root of the
      initial variance).
    skip_nonfinite_updates: also create the counter of skipped updates,
      `nonfinite_skips` = 0, that `apply(..., skip_nonfinite_updates=True)`
      needs.
  """
  shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(
      feature_shape)
  params = BNParams(
      scale=jnp.ones(shape, dtype) if use_scale else None,
      bias=jnp.zeros(shape, dtype) if use_bias else None)
  state = BNState(mean=jnp.zeros(shape, jnp.float32),
                  var=jnp.ones(shape, jnp.float32),
                  count=jnp.zeros((), jnp.int32))
  if renorm:
    state = state._replace(renorm_mean=jnp.zeros(shape, jnp.float32),
                           renorm_stddev=jnp.ones(shape, jnp.float32))
  if skip_nonfinite_updates:
    state = state._replace(nonfinite_skips=jnp.zeros((), jnp.int32))
  return params, state


# ----------------------------------------------------------------------------
# Validation (all at trace time, on static shapes and Python numbers).


def canonical_axes(ndim: int, axes: Axes, name: str = "axis",
                   ) -> tuple[int, ...]:
  """`axes` of an ndim array as sorted non-negative ints; out-of-range and
  repeated axes are errors naming the argument `name`."""
  axes = ((axes,) if isinstance(axes, numbers.Integral)
          else tuple(int(a) for a in axes))
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name} {a} is out of range for x with {ndim} dimensions; valid "
          f"axes are {-ndim}..{ndim - 1}.")
  normalized = tuple(sorted({a % ndim for a in axes}))
  if len(normalized) != len(axes):
    raise ValueError(f"{name}={axes} names the same dimension twice.")
  return normalized


def feature_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
  """Normalizes `axis` to sorted non-negative feature axes of an ndim array."""
  axes = canonical_axes(ndim, axis)
  if not axes:
    raise ValueError("axis must name at least one feature axis, got ().")
  return axes


def resolve_impl(impl: str) -> str:
  """The `impl` that "auto" stands for on the default backend: "xla_cpu" on
  a CPU, "plain" on GPU and TPU (whose compilers fuse the passes well on
  their own); any other value as it is."""
  if impl != "auto":
    return impl
  return "xla_cpu" if jax.default_backend() == "cpu" else "plain"


def flax_stats_method(stats_method: str, use_fast_variance: bool) -> str:
  """The stats_method that flax's `use_fast_variance` asks for (the flax
  front ends' argument of that name): False,
  flax's mean of squared deviations, is "two_pass" unless another method
  than the default was named; True keeps `stats_method` (the default,
  "shifted", gives E[x^2] - E[x]^2's value without its cancellation)."""
  if not use_fast_variance and stats_method == "shifted":
    return "two_pass"
  return stats_method


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
  # A string first: an array must not reach `in`, and the old boolean
  # modes (grad=True) must fail.
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name}={value!r}; choose one of {choices}.")


# The smallest epsilon a normalization takes: float32's smallest normal
# number (1.1754944e-38). A subnormal one is flushed to 0 on CPUs and GPUs
# (XLA sets flush-to-zero), so a constant feature (variance 0) would be
# divided by sqrt(0): inf and NaN outputs, not an error.
MIN_EPSILON = float(np.finfo(np.float32).tiny)
# The largest: float32's largest finite number (a larger one rounds to inf).
MAX_EPSILON = float(np.finfo(np.float32).max)


def epsilon_problem(epsilon) -> str | None:
  """Why a concrete `epsilon` cannot keep 1/sqrt(var + epsilon) finite (the
  end of a sentence that starts with its name and value), or None if it
  can, or if it is not a concrete number (a traced value, swept under a
  vmap, is checked where its values are known: the experiment config)."""
  if isinstance(epsilon, np.ndarray) and epsilon.ndim == 0:
    epsilon = epsilon.item()
  if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
    return None
  if MIN_EPSILON <= epsilon <= MAX_EPSILON:  # False for NaN
    return None
  return (f"must be > 0, finite and at least float32's smallest "
          f"normal number {MIN_EPSILON:.8g} (a smaller one is flushed to 0 "
          "and 1/sqrt(var + epsilon) turns inf where a feature is constant)"
          "; the usual value is 1e-5")


def check_epsilon(epsilon) -> None:
  """ValueError unless a concrete `epsilon` is a usable normalization epsilon
  (`epsilon_problem`); every layer and function of bn_jax that takes one
  checks it here."""
  problem = epsilon_problem(epsilon)
  if problem is not None:
    raise ValueError(f"epsilon={epsilon} {problem}.")


def _check_hyperparameters(momentum, epsilon) -> None:
  # Traced values (a vmapped sweep over momentum or epsilon) are not checked
  # here; the experiment config is validated before anything is traced.
  if isinstance(momentum, numbers.Real) and not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"momentum={momentum} is outside [0, 1]. bn_jax uses flax's "
        "convention running = momentum * running + (1 - momentum) * batch; "
        "a PyTorch momentum p corresponds to 1 - p.")
  check_epsilon(epsilon)


def _check_shapes(params: BNParams, state: BNState, feature_shape) -> None:
  named = [("params.scale", params.scale), ("params.bias", params.bias),
           ("state.mean", state.mean), ("state.var", state.var),
           ("state.renorm_mean", state.renorm_mean),
           ("state.renorm_stddev", state.renorm_stddev)]
  for name, value in named:
    if value is not None and tuple(value.shape) != feature_shape:
      raise ValueError(
          f"{name} has shape {tuple(value.shape)} but x's feature shape is "
          f"{feature_shape}; create params and state with "
          f"init({feature_shape}) or pass the matching `axis`.")


def _check_dtype(x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"x has dtype {x.dtype}; bn_jax normalizes real floating-point x "
        "(bfloat16, float16, float32 or float64). Complex x is not supported "
        "(flax.linen.BatchNorm normalizes it with a real variance); cast "
        "integers to a float dtype first.")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def renorm_clipping_pairs(clipping):
  """`renorm_clipping` as sorted (key, value) pairs without None values: one
  hashable spelling of the same limits, for module attributes and static
  configs. A value that is not a mapping is returned as it is, for
  `apply`'s error."""
  if not (isinstance(clipping, (tuple, list)) or hasattr(clipping, "items")):
    return clipping  # (a ConfigDict is no Mapping, but has items)
  try:
    return tuple(sorted((k, v) for k, v in dict(clipping).items()
                        if v is not None))
  except (TypeError, ValueError):
    return clipping


def reads_count(momentum, renorm_schedule, stats_fraction=None,
                stats_examples=None, stats_sampling="stride") -> bool:
  """Whether `apply` reads the state's update count: the weight of the
  cumulative average (momentum None), the step of a renorm schedule, the
  key of randomly sampled statistics. Front ends create the variable only
  then."""
  sampled = stats_fraction is not None or stats_examples is not None
  return (momentum is None or renorm_schedule is not None
          or (sampled and stats_sampling == "random"))


def _renorm_clipping(clipping) -> dict[str, Any]:
  """`renorm_clipping` (a Mapping, or (key, value) pairs so that a module
  attribute stays hashable) as a dict without its None values (absent, as
  in Keras), checked as Keras checks it."""
  if clipping is None:
    return {}
  try:
    clipping = {k: v for k, v in dict(clipping).items() if v is not None}
  except (TypeError, ValueError):
    raise ValueError(
        f"renorm_clipping={clipping!r} must be a Mapping or (key, value) "
        f"pairs with keys among {RENORM_CLIPPING_KEYS}.") from None
  unknown = sorted(set(clipping) - set(RENORM_CLIPPING_KEYS))
  if unknown:
    raise ValueError(f"renorm_clipping has keys {unknown}; it takes "
                     f"{RENORM_CLIPPING_KEYS} (absent: rmax and dmax inf, "
                     "rmin 1 / rmax).")
  rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
  if (isinstance(rmin, numbers.Real) and isinstance(rmax, numbers.Real)
      and rmax < rmin):
    raise ValueError(f"renorm_clipping has rmax={rmax} < rmin={rmin}; r is "
                     "clipped to [rmin, rmax].")
  if isinstance(dmax, numbers.Real) and dmax < 0:
    raise ValueError(f"renorm_clipping has dmax={dmax} < 0; d is clipped to "
                     "[-dmax, dmax].")
  return clipping


def _check_renorm_schedule(schedule, clipping: dict[str, Any]) -> None:
  if not (isinstance(schedule, (tuple, list)) and len(schedule) == 3
          and all(_is_int(v) and v >= 0 for v in schedule)
          and schedule[0] <= min(schedule[1:])):
    raise ValueError(
        f"renorm_schedule={schedule!r} must be (hold_steps, rmax_steps, "
        "dmax_steps), non-negative integers with hold_steps <= rmax_steps "
        "and hold_steps <= dmax_steps, e.g. the paper's (5000, 40000, "
        "25000).")
  missing = [k for k in ("rmax", "dmax") if clipping.get(k) is None]
  if missing:
    raise ValueError(
        f"renorm_schedule={tuple(schedule)!r} needs the final limits it "
        f"rises to; renorm_clipping has no {' or '.join(missing)} (the "
        "paper: {'rmax': 3, 'dmax': 5}).")
  rmin, rmax = clipping.get("rmin"), clipping["rmax"]
  if isinstance(rmax, numbers.Real) and rmax < 1:
    raise ValueError(f"renorm_clipping has rmax={rmax} < 1; a schedule "
                     "relaxes rmax from 1 up to it.")
  if isinstance(rmin, numbers.Real) and not 0 <= rmin <= 1:
    raise ValueError(f"renorm_clipping has rmin={rmin} outside [0, 1]; a "
                     "schedule relaxes rmin from 1 down to it.")


def renorm_limits(step, clipping: Any = None,
                  schedule: tuple[int, int, int] | None = None):
  """The clipping limits (rmin, rmax, dmax) of batch renorm at `step`.

  Without a schedule these are `clipping`'s values; an absent rmax or dmax
  is inf (no clipping, as in Keras), an absent rmin is 1 / rmax, the
  paper's [1 / rmax, rmax] (Keras: no lower limit; the same when rmax is
  absent too), so that rmax = 1 with dmax = 0 is plain batch norm.

  With `schedule = (hold_steps, rmax_steps, dmax_steps)` (Ioffe, 2017: 5000,
  40000 and 25000 steps to rmax 3 and dmax 5), the limits start as plain
  batch norm, rmax = rmin = 1 and dmax = 0, until step `hold_steps`; then
  rmax rises linearly to clipping["rmax"], reached at step `rmax_steps`,
  and dmax to clipping["dmax"] at `dmax_steps`; both stay there after.
  rmin falls linearly from 1 to clipping["rmin"] along with rmax, or, when
  clipping has no "rmin", is 1 / rmax at every step, as in the paper (r is
  clipped to [1 / rmax, rmax]). A schedule needs "rmax" and "dmax".

  Args:
    step: the number of training updates so far (`state.count`); an int or
      a traced integer.
    clipping: a Mapping, or (key, value) pairs, with keys among "rmin",
      "rmax", "dmax".
    schedule: None or (hold_steps, rmax_steps, dmax_steps), Python ints.

  Returns:
    (rmin, rmax, dmax): Python floats without a schedule, float32 scalars
    with one.
  """
  clipping = _renorm_clipping(clipping)
  if schedule is None:
    rmax = clipping.get("rmax", math.inf)
    return (clipping.get("rmin", 1.0 / rmax), rmax,
            clipping.get("dmax", math.inf))
  _check_renorm_schedule(schedule, clipping)
  hold, rmax_steps, dmax_steps = schedule
  step = jnp.asarray(step).astype(jnp.float32)

  def progress(end):  # 0 until `hold`, then linear up to 1 at `end`
    if end == hold:
      return jnp.where(step >= hold, 1.0, 0.0)
    return jnp.clip((step - hold) / (end - hold), 0.0, 1.0)
  rmax = 1.0 + (clipping["rmax"] - 1.0) * progress(rmax_steps)
  dmax = clipping["dmax"] * progress(dmax_steps)
  if clipping.get("rmin") is None:
    rmin = 1.0 / rmax
  else:
    rmin = 1.0 + (clipping["rmin"] - 1.0) * progress(rmax_steps)
  return rmin, rmax, dmax


def _stats_sample_size(batch: int, stats_fraction, stats_examples) -> int:
  """How many examples sampled statistics read from a batch of `batch`."""
  if stats_examples is not None:
    if stats_examples > batch:
      raise ValueError(
          f"stats_examples={stats_examples} is more than the {batch} "
          "examples of the batch (of each ghost batch with "
          "virtual_batch_size); use at most that many.")
    return stats_examples
  return max(1, round(stats_fraction * batch))


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
            impl: str = "auto",
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
  _check_dtype(x)
  _check_choice("stats_method", stats_method, STATS_METHODS)
  _check_choice("impl", impl, IMPL_CHOICES)
  impl = resolve_impl(impl)
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


def _vary_like(values, x):
  """Marks replicated gamma and beta as varying over the axes x varies over.

  Under shard_map a custom VJP must return cotangents of its inputs' type;
  gamma's and beta's (this device's sums) vary over every axis x varies
  over, synchronized (axis_name) or not (per-device statistics), so the
  inputs must too. JAX then psums them when transposing, as autodiff does.
  Elsewhere (vmap, pmap, outside shard_map) this is a no-op.
  """
  varying = _varying_axes(x)
  def vary(value):
    missing = tuple(n for n in varying if n not in _varying_axes(value))
    return lax.pcast(value, missing, to="varying") if missing else value
  return jax.tree.map(vary, values)


def _renorm_correction(mean, var, epsilon, renorm_mean, renorm_stddev,
                       limits):
  """Batch renorm's (r, d), as constants (Keras's
  `_renorm_correction_and_moments`): r = sigma_B / sigma clipped to
  [rmin, rmax], d = (mu_B - mu) / sigma clipped to [-dmax, dmax], with
  sigma_B = sqrt(var + epsilon) and sigma the renorm stddev, kept at least
  sqrt(epsilon) so that early steps never divide by ~0."""
  rmin, rmax, dmax = limits
  stddev = jnp.sqrt(var + epsilon)
  renorm_stddev = jnp.maximum(renorm_stddev, jnp.sqrt(epsilon))
  r = jnp.minimum(jnp.maximum(stddev / renorm_stddev, rmin), rmax)
  d = jnp.clip((mean - renorm_mean) / renorm_stddev, -dmax, dmax)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _compose_renorm(r, d, scale, bias):
  """(xhat * r + d) * gamma + beta = xhat * (r gamma) + (d gamma + beta):
  the corrected scale and bias (Keras's `_compose_transforms`). With r = 1
  and d = 0 these are gamma and beta exactly (a product by 1, a sum with
  0), so batch renorm at the start of a schedule computes what batch norm
  computes, bit for bit."""
  if scale is None:
    return r, d if bias is None else d + bias
  return r * scale, d * scale if bias is None else d * scale + bias


@functools.lru_cache(maxsize=None)
def _paper_vjp_normalize(reduction_axes, axis_name, axis_index_groups,
                         stats_method, impl, renorm):
  """Training-mode BN as a `jax.custom_vjp` whose backward pass is
  `batch_norm_backward`, the paper's formulas, literally.

  Returns f(x, scale, bias, epsilon, renorm_args) -> (y, mean, var, count);
  the caller stops the gradient of the statistics (state is never
  differentiated), so their cotangents are zero and ignored. With `renorm`,
  renorm_args are (renorm_mean, renorm_stddev, (rmin, rmax, dmax)) and y is
  corrected by the constants r and d (else renorm_args is ()). JAX runs a
  custom VJP's backward pass after a surrounding vmap's axis scope has
  ended, so with an `axis_name` under vmap take the gradient inside the
  vmap.
  """
  groups = None if axis_index_groups is None else [
      list(g) for g in axis_index_groups]

  def forward(x, scale, bias, epsilon, renorm_args):
    mean, var, count = moments(x, reduction_axes, axis_name=axis_name,
                               axis_index_groups=groups,
                               stats_method=stats_method, impl=impl)
    inv_std = lax.rsqrt(var + epsilon)
    r = d = None
    if renorm:
      r, d = _renorm_correction(mean, var, epsilon, *renorm_args)
      scale, bias = _compose_renorm(r, d, scale, bias)
    y = (x.astype(mean.dtype) - mean) * (inv_std * scale) + bias
    return ((y.astype(x.dtype), mean, var, count),
            (x, mean, inv_std, scale, r, d))

  def backward(residuals, cotangents):
    x, mean, inv_std, scale, r, d = residuals
    dx, dscale, dbias = batch_norm_backward(
        cotangents[0], x, mean, inv_std, scale, reduction_axes,
        axis_name=axis_name, axis_index_groups=groups)
    if renorm:  # through r gamma and d gamma + beta, r and d constants
      dscale = r * dscale + d * dbias
    return (dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype), None,
            None)

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
          grad: str = "paper_jvp", impl: str = "auto",
          renorm: bool = False, renorm_clipping: Any = None,
          renorm_momentum: float = 0.99,
          renorm_schedule: tuple[int, int, int] | None = None,
          virtual_batch_size: int | None = None,
          stats_fraction: float | None = None,
          stats_examples: int | None = None, stats_sampling: str = "stride",
          skip_nonfinite_updates: bool = False,
          ) -> tuple[jax.Array, BNState]:
  """Batch-normalizes x; returns (y, new_state).

  Args:
    params: BNParams from `init` (gamma, beta of the feature shape).
    state: BNState from `init` or a previous `apply`.
    x: input; a real float dtype. y has x's dtype; statistics are float32
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
    impl: how the passes are written for the compiler, one of IMPL_CHOICES;
      same mathematics and numbers (to rounding), with every stats_method,
      grad mode, mask and axis_name. "auto" (default) is "xla_cpu" on a
      CPU backend and "plain" on GPU and TPU (`resolve_impl`). "xla_cpu"
      adds devices that make XLA:CPU write fewer full-size tensors
      (optimization barriers so
      that each kernel converts x itself, per-feature vectors computed once
      by a reduction; see "Performance on XLA:CPU" in the source). "plain"
      leaves them out, plain jnp ops, for GPU and TPU, where the devices
      only constrain XLA's fusion.
    renorm: batch renormalization (Ioffe, 2017), as Keras's
      `BatchNormalization(renorm=True)`. Training gives
      y = ((x - mu_B) / sigma_B * r + d) * gamma + beta, with
      sigma_B = sqrt(var_B + epsilon), r = clip(sigma_B / sigma, rmin, rmax)
      and d = clip((mu_B - mu) / sigma, -dmax, dmax), where mu and sigma are
      the state's renorm_mean and renorm_stddev (sigma at least
      sqrt(epsilon)); r and d are constants to differentiation. The state
      needs those two fields: `init(..., renorm=True)`. Updates, as Keras:
      renorm_mean and renorm_stddev move towards mu_B and sigma_B with
      `renorm_momentum`; `mean` as without renorm; the variance is averaged
      as a standard deviation, s' = momentum s + (1 - momentum) sigma_B'
      with s = sqrt(var + epsilon) and sigma_B' = sqrt(var_B' + epsilon)
      (var_B' = var_B, or its unbiased version), then
      var = max(s'^2 - epsilon, 0). Evaluation is unchanged. Keras keeps s
      in its own variable `moving_stddev`, initialized to 1 beside a
      variance of 1, where bn_jax derives it from var: both agree from any
      state with moving_stddev = sqrt(moving_variance + epsilon), so after
      Keras's first update, but not at it from Keras's fresh variables.
    renorm_clipping: limits of r and d: a Mapping, or (key, value) pairs,
      with keys among "rmin", "rmax", "dmax"; absent (or None) rmax and
      dmax are inf, as in Keras, an absent rmin is 1 / rmax, the paper's
      (Keras: 0), see `renorm_limits`.
    renorm_momentum: momentum of renorm_mean and renorm_stddev, in the
      convention of `momentum` (Keras's default 0.99). It shapes training,
      unlike `momentum`.
    renorm_schedule: None, or (hold_steps, rmax_steps, dmax_steps): the
      limits relax with the update count `state.count`, from plain batch
      norm (rmin = rmax = 1, dmax = 0) until hold_steps to
      renorm_clipping's at rmax_steps and dmax_steps; see `renorm_limits`.
    virtual_batch_size: ghost batches (Hoffer et al., 2017): statistics per
      chunk of this many consecutive examples along axis 0, which must be
      reduced and a multiple of it. Each chunk is normalized with its own
      statistics (with renorm: its own r and d), and the new state is the
      mean over chunks of the states that each chunk's update gives (the
      count advances by 1): one device's version of bn_lab.parallel's
      bn_stats="per_device" (a chunk per device, the devices' new
      statistics averaged). With axis_name, chunk i is pooled with chunk i
      of every other member of the named axis. Evaluation ignores it.
    stats_fraction, stats_examples: sampled statistics (the "sparse" batch
      norm of Chen et al., 2019): mean and variance come from n examples
      along axis 0 (a reduced axis), n = stats_examples or
      round(stats_fraction * batch) (at least 1), and normalize every
      example; the gradient flows through the subset's statistics, and the
      running statistics are updated from them. At most one of the two. With
      virtual_batch_size the subset is taken in every ghost batch. Not with
      grad="paper_vjp", whose backward pass assumes whole-batch statistics.
    stats_sampling: which n examples: "stride" (default), the evenly spaced
      examples 0, s, ..., (n - 1) s with s = batch // n; "random", n
      distinct examples drawn at every update from the key
      `jax.random.fold_in(jax.random.key(0), state.count)`, so pure and
      reproducible: a given count gives the same positions, in every layer,
      every ghost batch and every member of a named axis (each sampling its
      own examples at those positions).
    skip_nonfinite_updates: where the batch's mean or variance is not
      finite in any feature (an Inf or NaN in x, or a variance that
      overflows float32), return the state as it was (running and renorm
      statistics, `count`) with `nonfinite_skips` + 1, as a mixed-precision
      loss scaler skips the step (and as `optax.apply_if_finite`): the
      whole layer skips, so that its statistics stay those of one set of
      steps. y is not changed. The state needs `nonfinite_skips`
      (`init(..., skip_nonfinite_updates=True)`). With virtual_batch_size,
      one non-finite ghost batch skips the update of all of them (one
      skip, not one per chunk); with axis_name, the statistics are pooled
      before the test, so every member of a group decides alike. A skipped
      update does not advance `count`, so the renorm schedule and the
      random subset's key stay where they were. Off (the default), a
      non-finite batch makes the running statistics non-finite, as in
      flax, Keras and PyTorch (pytorch/pytorch#88474).

  Returns:
    (y, new_state).
  """
  _check_dtype(x)
  axes = feature_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in axes)
  feature_shape = tuple(x.shape[a] for a in axes)
  _check_shapes(params, state, feature_shape)
  _check_hyperparameters(momentum, epsilon)
  _check_choice("stats_method", stats_method, STATS_METHODS)
  _check_choice("grad", grad, GRAD_MODES)
  _check_choice("impl", impl, IMPL_CHOICES)
  impl = resolve_impl(impl)
  _check_choice("stats_sampling", stats_sampling, STATS_SAMPLINGS)
  clipping = _check_variants(
      renorm, renorm_clipping, renorm_momentum, renorm_schedule,
      virtual_batch_size, stats_fraction, stats_examples, grad)
  # Per-feature arrays are reshaped to broadcast against x.
  expand = lambda v: None if v is None else jnp.expand_dims(
      v, reduction_axes)

  if not training:
    inv_std = lax.rsqrt(expand(state.var) + epsilon)
    y = _normalize(x, expand(state.mean), jnp.zeros_like(inv_std), inv_std,
                   expand(params.scale), expand(params.bias), "autodiff",
                   impl)
    return y, state

  sampled = stats_fraction is not None or stats_examples is not None
  _check_training_variants(
      state, x.shape, axis, reduction_axes, renorm, virtual_batch_size,
      sampled, skip_nonfinite_updates)
  limits = (renorm_limits(state.count, clipping, renorm_schedule)
            if renorm else None)
  full_shape = x.shape

  def normalize_batch(x, mask):
    """(y, new_state, finite) of one batch (one ghost batch, under the
    vmap); `finite`: whether its statistics are finite."""
    stats_x, stats_mask = x, mask
    notes = ""
    if virtual_batch_size is not None:
      notes += f" in ghost batches of {virtual_batch_size}"
    if sampled:
      n = _stats_sample_size(x.shape[0], stats_fraction, stats_examples)
      notes += f" sampled to {n} example(s)"
      if stats_sampling == "stride":
        stride = x.shape[0] // n
        take = lambda v: lax.slice_in_dim(v, 0, (n - 1) * stride + 1, stride)
      else:
        key = jax.random.fold_in(jax.random.key(0), state.count)
        index = jnp.sort(jax.random.permutation(key, x.shape[0])[:n])
        take = lambda v: jnp.take(v, index, axis=0)
      # Only the subset is read by the statistics' passes.
      stats_x = take(x)
      if mask is not None:
        stats_mask = take(jnp.broadcast_to(mask, x.shape))

    values_per_feature = math.prod(stats_x.shape[a] for a in reduction_axes)
    if axis_name is not None and axis_index_groups is None:
      values_per_feature *= lax.axis_size(axis_name)
    if values_per_feature < 2:
      raise ValueError(
          f"training-mode batch norm needs at least 2 values per feature to "
          f"estimate a variance, but x of shape {full_shape}{notes} with "
          f"feature axes {axes} has {values_per_feature}; use a batch larger "
          f"than 1 or training=False.")
    renorm_state = (expand(state.renorm_mean), expand(state.renorm_stddev),
                    limits) if renorm else ()

    if grad == "paper_vjp":
      if mask is not None:
        raise ValueError("grad='paper_vjp' does not take a mask; use "
                         "grad='paper_jvp' (the default) or 'autodiff'.")
      dtype = _stats_dtype(x.dtype)
      scale = (jnp.ones(feature_shape, dtype) if params.scale is None
               else params.scale.astype(dtype))
      bias = (jnp.zeros(feature_shape, dtype) if params.bias is None
              else params.bias.astype(dtype))
      scale, bias = _vary_like((expand(scale), expand(bias)), x)
      groups = None if axis_index_groups is None else tuple(
          tuple(g) for g in axis_index_groups)
      normalize = _paper_vjp_normalize(reduction_axes, axis_name, groups,
                                       stats_method, impl, bool(renorm))
      y, mean, var, count = normalize(
          x, scale, bias, jnp.asarray(epsilon, dtype),
          jax.tree.map(lambda v: jnp.asarray(v, dtype), renorm_state))
    else:
      anchor, mean_minus_anchor, var, count = _moments(
          stats_x, reduction_axes, stats_mask, axis_name, axis_index_groups,
          stats_method, grad, impl)
      mean = anchor + mean_minus_anchor
      scale, bias = expand(params.scale), expand(params.bias)
      if renorm:
        r, d = _renorm_correction(mean, var, epsilon, *renorm_state)
        scale, bias = _compose_renorm(r, d, scale, bias)
      y = _normalize(x, anchor, mean_minus_anchor, lax.rsqrt(var + epsilon),
                     scale, bias, grad, impl)

    new_state = update_running_stats(
        state, lax.stop_gradient(mean.reshape(feature_shape)),
        lax.stop_gradient(var.reshape(feature_shape)),
        jnp.broadcast_to(count, mean.shape).reshape(feature_shape),
        momentum=momentum, unbiased=unbiased_running_var,
        renorm_momentum=renorm_momentum if renorm else None, epsilon=epsilon)
    return y, new_state, _all_finite(mean, var)

  if virtual_batch_size is None:
    y, new_state, finite = normalize_batch(x, mask)
  else:
    chunks = x.shape[0] // virtual_batch_size
    split = lambda v: v.reshape((chunks, virtual_batch_size) + v.shape[1:])
    masks = None if mask is None else split(jnp.broadcast_to(mask, x.shape))
    ys, states, finites = jax.vmap(normalize_batch)(split(x), masks)
    y, finite = ys.reshape(x.shape), jnp.all(finites)
    # Each chunk updated the same state once; keep the mean of those states
    # (fields an update leaves alone are kept as they are, not averaged).
    new_state = jax.tree.map(lambda v: jnp.mean(v, axis=0), states)._replace(
        count=state.count + 1, nonfinite_skips=state.nonfinite_skips)
    if not renorm:
      new_state = new_state._replace(renorm_mean=state.renorm_mean,
                                     renorm_stddev=state.renorm_stddev)
  if skip_nonfinite_updates:
    new_state = _keep_if_nonfinite(state, new_state, finite)
  return y, new_state


def _check_variants(renorm, renorm_clipping, renorm_momentum,
                    renorm_schedule, virtual_batch_size, stats_fraction,
                    stats_examples, grad) -> dict[str, Any]:
  """Checks the options of the variants (training or not); returns the
  renorm clipping as a dict."""
  if not renorm:
    if renorm_clipping is not None or renorm_schedule is not None:
      raise ValueError(
          "renorm_clipping and renorm_schedule set batch renorm's limits; "
          "pass renorm=True, or leave them None.")
    clipping = {}
  else:
    clipping = _renorm_clipping(renorm_clipping)
    if renorm_schedule is not None:
      _check_renorm_schedule(renorm_schedule, clipping)
    if renorm_momentum is None or (
        isinstance(renorm_momentum, numbers.Real)
        and not 0.0 <= renorm_momentum <= 1.0):
      raise ValueError(
          f"renorm_momentum={renorm_momentum} must be in [0, 1] (same "
          "convention as momentum: renorm_mean = renorm_momentum * "
          "renorm_mean + (1 - renorm_momentum) * batch mean).")
  if virtual_batch_size is not None and not (
      _is_int(virtual_batch_size) and virtual_batch_size > 0):
    raise ValueError(f"virtual_batch_size={virtual_batch_size!r} must be a "
                     "positive integer (examples per ghost batch) or None.")
  if stats_fraction is not None and stats_examples is not None:
    raise ValueError(
        f"stats_fraction={stats_fraction} and stats_examples="
        f"{stats_examples} both choose the sampled statistics' examples; "
        "pass one of them.")
  if stats_fraction is not None and not (
      isinstance(stats_fraction, numbers.Real)
      and 0.0 < stats_fraction <= 1.0):
    raise ValueError(f"stats_fraction={stats_fraction!r} must be in (0, 1] "
                     "(the fraction of the batch the statistics read).")
  if stats_examples is not None and not (
      _is_int(stats_examples) and stats_examples > 0):
    raise ValueError(f"stats_examples={stats_examples!r} must be a positive "
                     "integer (examples the statistics read).")
  if grad == "paper_vjp" and (stats_fraction is not None
                              or stats_examples is not None):
    raise ValueError(
        "grad='paper_vjp' differentiates statistics of the whole batch, not "
        "sampled ones (stats_fraction, stats_examples); use "
        "grad='paper_jvp' (the default) or 'autodiff'.")
  return clipping


def _check_training_variants(state, shape, axis, reduction_axes, renorm,
                             virtual_batch_size, sampled,
                             skip_nonfinite_updates=False) -> None:
  """Checks what the variants need of the state and of x's shape."""
  if renorm and (state.renorm_mean is None or state.renorm_stddev is None):
    raise ValueError(
        "renorm=True needs state.renorm_mean and state.renorm_stddev; "
        "create the state with init(feature_shape, renorm=True) (or give "
        "BNState renorm_mean=zeros, renorm_stddev=ones).")
  if skip_nonfinite_updates and state.nonfinite_skips is None:
    raise ValueError(
        "skip_nonfinite_updates=True needs state.nonfinite_skips; create the "
        "state with init(feature_shape, skip_nonfinite_updates=True) (or "
        "give BNState nonfinite_skips=jnp.zeros((), jnp.int32)).")
  for name, used in (("virtual_batch_size", virtual_batch_size is not None),
                     ("stats_fraction/stats_examples", sampled)):
    if used and 0 not in reduction_axes:
      raise ValueError(
          f"{name} splits or samples the batch along axis 0, but axis="
          f"{axis} makes axis 0 a feature axis; put the batch first and "
          "reduce it.")
  if virtual_batch_size is not None and shape[0] % virtual_batch_size:
    raise ValueError(
        f"virtual_batch_size={virtual_batch_size} does not divide the batch "
        f"of {shape[0]} examples (x.shape[0]); use a batch that is a "
        f"multiple of {virtual_batch_size}, or a virtual_batch_size that "
        f"divides {shape[0]}.")


def _all_finite(*values) -> jax.Array:
  """Whether every element of every value is finite (a bool scalar)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in values]))


def _keep_if_nonfinite(state: BNState, new_state: BNState,
                       finite) -> BNState:
  """`new_state` where `finite`, else `state` with one more skip counted."""
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                      new_state, state)
  return kept._replace(nonfinite_skips=state.nonfinite_skips + jnp.where(
      finite, 0, 1).astype(state.nonfinite_skips.dtype))


def update_running_stats(state: BNState, batch_mean, batch_var, count, *,
                         momentum, unbiased: bool,
                         renorm_momentum: float | None = None,
                         epsilon: float | None = None,
                         skip_nonfinite: bool = False) -> BNState:
  """Exponential (or, with momentum=None, cumulative) running statistics.

  With `renorm_momentum` (batch renorm; needs `epsilon` and the state's
  renorm fields), Keras's updates: renorm_mean and renorm_stddev move
  towards the batch mean and sqrt(batch_var + epsilon) with
  renorm_momentum, and the variance is averaged as a standard deviation
  (see `apply`). Fields that an update does not concern are kept.

  With `skip_nonfinite` (needs the state's `nonfinite_skips`), a batch
  whose mean or variance is not finite in any feature leaves the state as
  it was, except `nonfinite_skips` + 1 (`apply`'s skip_nonfinite_updates).
  """
  if skip_nonfinite:
    if state.nonfinite_skips is None:
      raise ValueError(
          "skip_nonfinite=True needs state.nonfinite_skips; create the "
          "state with init(feature_shape, skip_nonfinite_updates=True).")
    new_state = update_running_stats(
        state, batch_mean, batch_var, count, momentum=momentum,
        unbiased=unbiased, renorm_momentum=renorm_momentum, epsilon=epsilon)
    return _keep_if_nonfinite(state, new_state,
                              _all_finite(batch_mean, batch_var))
  stored_var = batch_var
  if unbiased:
    stored_var = batch_var * count / jnp.maximum(count - 1.0, 1.0)
  new_count = state.count + 1
  if momentum is None:
    weight = 1.0 / new_count.astype(jnp.float32)  # exact cumulative average
  else:
    weight = 1.0 - jnp.asarray(momentum, jnp.float32)
  mean = state.mean + weight * (batch_mean - state.mean)
  if renorm_momentum is None:
    var = state.var + weight * (stored_var - state.var)
    return state._replace(mean=mean, var=var, count=new_count)
  # Keras averages the standard deviation (the paper's sigma), and derives
  # the variance from it; the max guards against rounding below 0.
  stddev = jnp.sqrt(state.var + epsilon)
  stddev = stddev + weight * (jnp.sqrt(stored_var + epsilon) - stddev)
  var = jnp.maximum(jnp.square(stddev) - epsilon, 0.0)
  renorm_weight = 1.0 - jnp.asarray(renorm_momentum, jnp.float32)
  renorm_mean = state.renorm_mean + renorm_weight * (
      batch_mean - state.renorm_mean)
  renorm_stddev = state.renorm_stddev + renorm_weight * (
      jnp.sqrt(batch_var + epsilon) - state.renorm_stddev)
  return state._replace(mean=mean, var=var, count=new_count,
                        renorm_mean=renorm_mean, renorm_stddev=renorm_stddev)


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
