"""Power normalization (Shen et al., 2020) as pure functions with state.

"PowerNorm: Rethinking Batch Normalization in Transformers" (ICML 2020),
the paper's algorithm "Power Normalization (Every Iteration)". Per feature,
with B the (unmasked) tokens of the batch and t the training step:

  forward    z = x / psi_{t-1}                       (the PREVIOUS running
             y = gamma * z + beta                     quadratic mean; no
             psi_t^2 = a psi_{t-1}^2 + (1 - a) psi_B^2   mean subtracted)
             with psi_B^2 = mean_B(x^2)
  backward   dL/dz = gamma * dL/dy
             dL/dx = (dL/dz - nu_{t-1} * z) / psi_{t-1}
             nu_t = nu_{t-1} (1 - (1 - a) Gamma_t) + (1 - a) Lambda_t
             with Gamma_t = mean_B(z^2), Lambda_t = mean_B(dL/dz * z)
  inference  y = gamma * x / psi + beta

The gradients of gamma and beta are the exact ones of the forward
(sum(dL/dy * z), sum(dL/dy)); dL/dx is the paper's approximation, which
treats psi_{t-1} as a constant and puts in its place the correction
-nu_{t-1} z, nu being a running estimate of the gradient through the
running statistic. Here psi = sqrt(psi^2 + epsilon) (as in the reference
code; the paper writes no epsilon).

    params, state = init(num_features)
    y, state = apply(params, state, x, training=True)    # psi^2, count
    y, _ = apply(params, state, x, training=False)       # inference

How nu gets its backward-pass statistic. JAX cannot change state in a
backward pass, so the backward pass hands its result out as a gradient:
`apply` takes a zero-valued `probe` (per feature, like nu) that the
forward pass does not use, and its custom VJP returns as the probe's
cotangent the increment of nu,

    d loss / d probe = nu_t - nu_{t-1} = (1 - a) (Lambda_t - nu_{t-1} Gamma_t)

so differentiating the loss with respect to the probe as well as the
params, then `update_nu(state, probe_grad)` (nu + probe_grad), completes
the step; the increment needs no hyperparameter at that point, so one
helper serves every layer (and an average of the probe gradients of
devices with equal numbers of real tokens is the increment of the pooled
Gamma and Lambda, both being means). A probe that is not differentiated
leaves nu where it is (0 from `init`: the backward pass is then
dL/dz / psi_{t-1}). Eval-mode calls read nu nowhere.

  Pure functions (the probe is an ordinary argument):

    def loss_fn(params, probe, state, x):
      y, new_state = power.apply(params, state, x, training=True,
                                 probe=probe)
      return loss(y), new_state
    (loss, state), (grads, probe_grad) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(
            params, power.zero_probe(state), state, x)
    state = power.update_nu(state, probe_grad)

  flax.linen (`bn_jax.nn.PowerNorm`): batch_stats `psi2`, `nu`, `count`;
  the probe is the variable "nu" of the collection "power_probe", zeros
  from `init` and never changed: pass it, differentiate it, fold:

    def loss_fn(params, probes):
      y, updates = model.apply(
          {"params": params, "batch_stats": batch_stats,
           "power_probe": probes}, x, use_running_average=False,
          mutable=["batch_stats"])
      return loss(y), updates["batch_stats"]
    (loss, batch_stats), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params,
                                               variables["power_probe"])
    batch_stats = power.fold_probe_grads(batch_stats, probe_grads)
    # then the optimizer update of params with grads, as usual

  flax.nnx (`bn_jax.nnx.PowerNorm`): the probe is a `bn_jax.nnx.PowerProbe`
  variable; differentiate it with the params and fold (the helper returns
  the params' gradients for the optimizer):

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(
        0, bn_jax.nnx.PARAMS_AND_PROBES))(model, x)
    optimizer.update(model, bn_jax.nnx.fold_power_probe_grads(model, grads))

Other choices: Lambda could instead be read off gamma's gradient
(Lambda = gamma * dL/dgamma / count, as dL/dz = gamma dL/dy), with no extra
input, but only with a scale, only if nothing between the loss and the
optimizer changes gamma's gradient, and with the count of unmasked tokens
at hand; the probe has none of these conditions.

Conventions (as `bn_jax.core`): `axis` names the feature axes, all others
are reduced (the tokens: (T, B, C) or (B, T, C) with axis=-1); `mask`,
broadcastable to x, marks the real tokens True and padding False: padding
counts in no statistic (psi_B^2, Gamma, Lambda) and gets no correction
term in dL/dx (dL/dz / psi: it reached no statistic), while its outputs
are computed as the others' and count in gamma's and beta's gradients.
A batch with no unmasked token for a feature leaves that feature's psi^2
and nu unchanged. Statistics are float32 for float32 and narrower x
(float64 stays), y has x's dtype. `momentum` is the paper's alpha in
flax's convention, running = momentum * running + (1 - momentum) * batch.
Statistics are per device (no axis_name): under pmap or shard_map average
psi2 and the probe gradients over the devices, as for per-device BN.

The reference code (github.com/sIncerass/powernorm,
fairseq/modules/norms/mask_powernorm.py, `MaskPowerNorm` and
`PowerFunction`), and what bn_jax does:

  names: running_phi = state.psi2 (psi^2, 1 at init); ema_gz = nu / (1 -
    abkw), i.e. nu = (1 - abkw) * ema_gz (its update ema_gz += mean((g -
    (1 - abkw) ema_gz z) z) is the paper's nu update divided by (1 - a));
    afwd (alpha_fwd) = momentum; abkw (alpha_bkw) = backward_momentum (the
    paper has one alpha for both: backward_momentum=None means momentum);
    warmup_iters = warmup_steps; iters = state.count; eps = epsilon (both
    1e-5 and inside the square root); weight, bias = params.scale,
    params.bias; pad_mask (B x T, True at padding) = ~mask.
  * backward divisor: the reference divides dL/dx by the current batch's
    sqrt(psi_B^2 + eps) at every step, also after warmup, where its
    forward divided by the running psi_{t-1}; the paper, and bn_jax,
    divide by the psi the forward pass divided by (psi_{t-1}; psi_B in
    warmup), so that the backward pass is the paper's approximation of
    the forward's.
  * masking: the reference takes psi_B^2 over the unpadded tokens only,
    but Gamma and Lambda (its ema_gz update) are means over all T x B
    positions, padding included (dividing by T x B), and padded positions
    get the -nu z correction too; bn_jax excludes padding from every
    statistic and from the correction (above).
  * warmup: not in the paper. The reference, for its first warmup_iters
    training forwards (iters = 1, 2, ... counts forwards, not optimizer
    updates), normalizes with the batch's psi_B (iters <= warmup_iters);
    while iters < warmup_iters it first replaces running_phi by the
    cumulative average running_phi (iters - 1) / iters + psi_B^2 / iters
    and then applies the EMA update as well (both, every warmup step).
    bn_jax's `warmup_steps` reproduces this update as written, the
    reference being its only definition (t = count + 1 for iters); the
    default 0 is the paper's algorithm. The reference's fairseq models pass
    the learning-rate schedule's --warmup-updates (8000 for IWSLT14).
    nu is updated in warmup steps too, as in the reference.
  * GroupScaling1D: the reference first divides each token by the root
    mean square of its channels in each of `group_num` groups (eps 1e-5;
    its transformers use group_num = the attention heads), a per-token
    RMS norm without scale that is not in the paper's algorithm. bn_jax
    leaves it out; compose it where wanted, e.g. for G groups of x (...,
    C): `norms.rms_norm(x.reshape(*x.shape[:-1], G, C // G), None,
    epsilon=1e-5).reshape(x.shape)` before `apply`.
  * layout: the reference takes (T, B, C) and reduces over T and B; bn_jax
    takes any layout with `axis`.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import core

Axes = int | Sequence[int]

# The linen collection of the probes (`bn_jax.nn.PowerNorm`).
PROBE_COLLECTION = "power_probe"
# The module options of `apply` that the flax front ends hold as attributes.
MODULE_OPTIONS = ("axis", "momentum", "backward_momentum", "epsilon",
                  "warmup_steps")

PNParams = core.BNParams  # gamma (scale) and beta (bias); None if unused


class PNState(NamedTuple):
  """Running statistics of power normalization, threaded explicitly.

  psi2: the running quadratic mean psi^2 per feature (float32; 1 at init),
    what training (after warmup) and evaluation divide by:
    sqrt(psi2 + epsilon). The reference's `running_phi`.
  nu: the running backward statistic per feature (float32; 0 at init),
    updated by `update_nu` from the probe's gradient. The reference's
    `(1 - alpha_bkw) * ema_gz`.
  count: training steps so far (int32 scalar), which the warmup reads.
  """
  psi2: jax.Array
  nu: jax.Array
  count: jax.Array


def init(feature_shape: int | Sequence[int], dtype: Any = jnp.float32, *,
         use_scale: bool = True, use_bias: bool = True,
         ) -> tuple[core.BNParams, PNState]:
  """Returns params (gamma = 1, beta = 0) and state (psi^2 = 1, nu = 0).

  Args:
    feature_shape: shape of the normalized features (`x.shape[-1]` for
      axis=-1).
    dtype: dtype of gamma and beta; the state is always float32.
    use_scale, use_bias: whether gamma / beta exist (None otherwise).
  """
  shape = _shape(feature_shape)
  params = core.BNParams(
      scale=jnp.ones(shape, dtype) if use_scale else None,
      bias=jnp.zeros(shape, dtype) if use_bias else None)
  state = PNState(psi2=jnp.ones(shape, jnp.float32),
                  nu=jnp.zeros(shape, jnp.float32),
                  count=jnp.zeros((), jnp.int32))
  return params, state


def zero_probe(state: PNState) -> jax.Array:
  """The probe to pass to `apply` and differentiate: zeros like state.nu."""
  return jnp.zeros_like(state.nu)


def update_nu(state: PNState, probe_grad: jax.Array) -> PNState:
  """The state with nu_t = nu_{t-1} + probe_grad, the gradient of the loss
  with respect to `apply`'s probe (nu_t - nu_{t-1}, see the module notes).
  Pass the state that `apply` returned in the same step."""
  probe_grad = jnp.asarray(probe_grad)
  if tuple(probe_grad.shape) != tuple(state.nu.shape):
    raise ValueError(
        f"probe_grad has shape {tuple(probe_grad.shape)} but state.nu has "
        f"{tuple(state.nu.shape)}; pass the gradient of the probe of this "
        "layer's apply.")
  return state._replace(nu=state.nu + probe_grad.astype(state.nu.dtype))


def fold_probe_grads(batch_stats: Mapping[str, Any],
                     probe_grads: Mapping[str, Any]) -> Mapping[str, Any]:
  """batch_stats with each PowerNorm's nu advanced by its probe gradient.

  For flax.linen (`bn_jax.nn.PowerNorm`): `probe_grads` is the gradient of
  the loss with respect to the "power_probe" collection (the same tree of
  module names, a leaf "nu" per layer), `batch_stats` the collection after
  the training step's forward pass; every probe's "nu" is added to the
  batch_stats entry of the same path. Other layers' entries (BatchNorm's)
  pass through unchanged.
  """

  def fold(stats, grads, path):
    if not isinstance(grads, Mapping) or not isinstance(stats, Mapping):
      raise ValueError(
          f"probe_grads at {'/'.join(path) or 'the root'} is not a "
          "collection of layers matching batch_stats; pass the gradient "
          "with respect to variables['power_probe'].")
    folded = dict(stats)
    for name, grad in grads.items():
      where = "/".join((*path, name))
      if name not in stats:
        raise ValueError(
            f"probe_grads has {where} but batch_stats has no such entry; "
            "pass the batch_stats of the same model.")
      if isinstance(grad, Mapping):
        folded[name] = fold(stats[name], grad, (*path, name))
      elif name == "nu":
        folded[name] = stats[name] + jnp.asarray(grad).astype(
            stats[name].dtype)
      else:
        raise ValueError(f"probe_grads has a leaf {where}; PowerNorm's "
                         "probes are named 'nu'.")
    return type(stats)(folded) if not isinstance(stats, dict) else folded

  return fold(batch_stats, probe_grads, ())


# ----------------------------------------------------------------------------
# Validation (at trace time, on static shapes and Python numbers).


def _shape(feature_shape) -> tuple[int, ...]:
  if isinstance(feature_shape, numbers.Integral):
    return (int(feature_shape),)
  return tuple(int(d) for d in feature_shape)


def _check_momentum(name: str, value) -> None:
  if value is None and name == "backward_momentum":
    return
  if isinstance(value, bool) or (isinstance(value, numbers.Real)
                                 and not 0.0 <= value <= 1.0):
    raise ValueError(
        f"{name}={value} is outside [0, 1]; it is the paper's alpha, "
        "running = momentum * running + (1 - momentum) * batch (the "
        "reference's alpha_fwd / alpha_bkw, default 0.9).")
  if value is None:
    raise ValueError(f"{name}=None; PowerNorm keeps an exponential average, "
                     "pass a number in [0, 1] (the paper's alpha).")


def check_options(momentum, backward_momentum, epsilon, warmup_steps,
                  ) -> None:
  """ValueError naming the first bad hyperparameter of `apply` (traced
  values, a vmapped sweep, are not checked)."""
  _check_momentum("momentum", momentum)
  _check_momentum("backward_momentum", backward_momentum)
  core.check_epsilon(epsilon)
  if not (isinstance(warmup_steps, numbers.Integral)
          and not isinstance(warmup_steps, bool) and warmup_steps >= 0):
    raise ValueError(
        f"warmup_steps={warmup_steps!r} must be a non-negative int (0: the "
        "paper's algorithm; the reference's warmup_iters).")


def _check_arrays(params, state, probe, feature_shape) -> None:
  if not isinstance(state, PNState):
    raise ValueError(
        f"state is a {type(state).__name__}, not a power.PNState; create "
        "it with bn_jax.power.init.")
  named = [("params.scale", params.scale), ("params.bias", params.bias),
           ("state.psi2", state.psi2), ("state.nu", state.nu),
           ("probe", probe)]
  for name, value in named:
    if value is not None and tuple(jnp.shape(value)) != feature_shape:
      raise ValueError(
          f"{name} has shape {tuple(jnp.shape(value))} but x's feature "
          f"shape is {feature_shape}; create params and state with "
          f"power.init({feature_shape}) or pass the matching `axis`.")


def _broadcast_mask(mask, shape):
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask has dtype {mask.dtype}; pass a boolean array "
                     "(True: a real token, False: padding).")
  try:
    return jnp.broadcast_to(mask, shape)
  except ValueError:
    raise ValueError(
        f"mask of shape {tuple(mask.shape)} does not broadcast to x's "
        f"shape {tuple(shape)}; e.g. (T, B, 1) for x of (T, B, C)."
    ) from None


# ----------------------------------------------------------------------------
# The training step's normalization and its approximate backward pass.


def _masked_mean(values, weight, count, reduction_axes):
  if weight is not None:
    values = jnp.where(weight, values, 0.0)
  return jnp.sum(values, reduction_axes, keepdims=True) / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_normalize(reduction_axes, x, scale, bias, probe, psi, nu, weight,
                     count, backward_momentum):
  """y = gamma * x / psi + beta (psi, nu expanded, float32); its VJP is the
  paper's backward pass, with nu's increment as `probe`'s cotangent."""
  del reduction_axes, probe, nu, weight, count, backward_momentum
  # (the backward pass's)
  return _affine(x, scale, bias, psi)


def _affine(x, scale, bias, psi):
  y = x.astype(psi.dtype) / psi
  if scale is not None:
    y = y * scale.astype(psi.dtype)
  if bias is not None:
    y = y + bias.astype(psi.dtype)
  return y.astype(x.dtype)


def _train_normalize_fwd(reduction_axes, x, scale, bias, probe, psi, nu,
                         weight, count, backward_momentum):
  del reduction_axes
  y = _affine(x, scale, bias, psi)
  return y, (x, scale, bias, probe, psi, nu, weight, count,
             backward_momentum)


def _train_normalize_bwd(reduction_axes, residuals, dy):
  (x, scale, bias, probe, psi, nu, weight, count,
   backward_momentum) = residuals
  dtype = psi.dtype
  dy = dy.astype(dtype)
  z = x.astype(dtype) / psi
  dz = dy if scale is None else dy * scale.astype(dtype)
  gamma_t = _masked_mean(z * z, weight, count, reduction_axes)
  lambda_t = _masked_mean(dz * z, weight, count, reduction_axes)
  d_probe = (1.0 - backward_momentum) * (lambda_t - nu * gamma_t)
  correction = nu * z
  if weight is not None:
    correction = jnp.where(weight, correction, 0.0)
  dx = ((dz - correction) / psi).astype(x.dtype)
  d_scale = (None if scale is None else jnp.sum(
      dy * z, reduction_axes, keepdims=True).astype(scale.dtype))
  d_bias = (None if bias is None else jnp.sum(
      dy, reduction_axes, keepdims=True).astype(bias.dtype))
  return (dx, d_scale, d_bias, d_probe.astype(probe.dtype), None, None, None,
          None, None)


_train_normalize.defvjp(_train_normalize_fwd, _train_normalize_bwd)


def apply(params: core.BNParams, state: PNState, x: jax.Array, *,
          training: bool, probe: jax.Array | None = None, axis: Axes = -1,
          momentum: float = 0.9, backward_momentum: float | None = None,
          epsilon: float = 1e-5, warmup_steps: int = 0,
          mask: jax.Array | None = None) -> tuple[jax.Array, PNState]:
  """Power-normalizes x; returns (y, new_state).

  Args:
    params: gamma and beta from `init` (a `core.BNParams`).
    state: a `PNState` from `init` or a previous step.
    x: input, a real float dtype; y has its dtype.
    training: True: divide by psi_{t-1} (by the batch's psi_B in warmup),
      return the state with psi^2 updated and count + 1 (nu is updated
      after the backward pass, `update_nu`); the backward pass is the
      paper's approximation. False: y = gamma x / sqrt(psi^2 + eps) + beta,
      the state returned as it is, plain autodiff.
    probe: zeros of the feature shape (`zero_probe(state)`), training only;
      the gradient of the loss with respect to it is nu's increment. None:
      zeros that nothing differentiates (nu then stays where it is).
    axis: feature axis or axes; all others are reduced (at least one).
    momentum: the paper's alpha for psi^2, running = momentum * running +
      (1 - momentum) * batch (the reference's alpha_fwd, 0.9).
    backward_momentum: alpha of nu's update (the reference's alpha_bkw);
      None: `momentum`, the paper's single alpha.
    epsilon: added to psi^2 (and psi_B^2) before the square root.
    warmup_steps: the first this many training steps (count + 1 <=
      warmup_steps) divide by the batch's psi_B and update psi^2 as the
      reference's warmup does (module notes); 0: the paper's algorithm.
    mask: optional boolean array broadcastable to x, False at padding:
      padding counts in no statistic and its outputs are still computed.

  Returns:
    (y, new_state).
  """
  core._check_dtype(x)  # pylint: disable=protected-access
  axes = core.feature_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in axes)
  if not reduction_axes:
    raise ValueError(
        f"axis={axis} names every axis of x (shape {tuple(x.shape)}), so no "
        "axis is left to take the quadratic mean over; keep at least one "
        "(the tokens).")
  feature_shape = tuple(x.shape[a] for a in axes)
  check_options(momentum, backward_momentum, epsilon, warmup_steps)
  _check_arrays(params, state, probe, feature_shape)
  if backward_momentum is None:
    backward_momentum = momentum
  expand = lambda v: None if v is None else jnp.expand_dims(
      v, reduction_axes)
  dtype = core._stats_dtype(x.dtype)  # pylint: disable=protected-access
  running = expand(state.psi2).astype(dtype)
  scale, bias = expand(params.scale), expand(params.bias)

  if not training:
    if probe is not None:
      raise ValueError("probe is for training (training=True): evaluation "
                       "neither reads nor updates nu.")
    if mask is not None:  # checked, though evaluation reads no statistic
      _broadcast_mask(mask, x.shape)
    return _affine(x, scale, bias, jnp.sqrt(running + epsilon)), state

  weight = None if mask is None else _broadcast_mask(mask, x.shape)
  x_stats = lax.stop_gradient(x).astype(dtype)
  if weight is None:
    count = jnp.full(running.shape, math.prod(
        x.shape[a] for a in reduction_axes), dtype)
    square_sum = jnp.sum(jnp.square(x_stats), reduction_axes, keepdims=True)
  else:
    count = jnp.sum(weight, reduction_axes, keepdims=True, dtype=dtype)
    square_sum = jnp.sum(jnp.where(weight, jnp.square(x_stats), 0.0),
                         reduction_axes, keepdims=True)
  seen = count > 0  # per feature: a batch with no real token changes nothing
  count = jnp.maximum(count, 1.0)
  batch_psi2 = square_sum / count
  step = state.count + 1  # the reference's iters, 1 at the first step
  in_warmup = (step <= warmup_steps) & seen
  psi = jnp.sqrt(jnp.where(in_warmup, batch_psi2, running) + epsilon)

  t = step.astype(dtype)
  new_psi2 = jnp.where(step < warmup_steps,
                       running * (t - 1.0) / t + batch_psi2 / t, running)
  new_psi2 = momentum * new_psi2 + (1.0 - momentum) * batch_psi2
  new_psi2 = jnp.where(seen, new_psi2, running)

  probe = zero_probe(state) if probe is None else jnp.asarray(probe)
  y = _train_normalize(
      reduction_axes, x, scale, bias, expand(probe).astype(dtype), psi,
      expand(state.nu).astype(dtype), weight, count,
      jnp.asarray(backward_momentum, dtype))
  new_state = state._replace(
      psi2=new_psi2.reshape(feature_shape).astype(state.psi2.dtype),
      count=state.count + 1)
  return y, new_state
