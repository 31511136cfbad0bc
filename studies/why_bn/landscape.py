"""Why BN helps, measured as Santurkar et al. (2018) measure it.

"How Does Batch Normalization Help Optimization?" (NeurIPS 2018) tests the
2015 explanation (BN reduces internal covariate shift) and offers another
(BN smooths the loss landscape). This module holds their measurements as
pure functions of a loss function of the parameters:

  internal_covariate_shift  Sec. 2.2, Definition 2.1: per layer, the
                            gradient of its weights before and after the
                            layers below it take this step's update.
  gradient_landscape        Sec. 3.1-3.2, Fig. 4 and App. A.2.2: the loss,
                            the gradient change and their ratio along the
                            gradient, for a grid of step sizes.
  noisy_affine, NoisyBN     Sec. 2.1 and App. A.2.1, Algorithm 1: "noisy
                            BN", BN followed by a random per-example and
                            per-feature scale and shift whose distribution
                            is redrawn every step.

The loss is any `loss_fn(params) -> scalar`; `training_loss` builds the one
`train.train_step` differentiates (mean softmax cross-entropy, the model in
training mode) for one batch. In training mode BN normalizes with the
batch's statistics, so the running statistics (`batch_stats`) play no part
in the loss, except in Batch Renormalization, whose r and d corrections
read them. Either way they are held at step t's values: every gradient
here is of the same function, on the same batch, with the same noise draw
(the "noise" rng is part of the closure), and none of them updates state.

All functions are pure jnp: they run under `jax.jit` (the loss function and
the layer names static, e.g. bound with `functools.partial`) and under
`jax.vmap` over stacked parameters (a sweep's runs). The k evaluation
points of one measurement are themselves vmapped (`batch_size=None`), or
mapped `batch_size` at a time with `jax.lax.map` when k copies of the
model's activations do not fit. Nothing here runs unless a study calls it.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_jax import core
from bn_jax import nn as bn_nn

LossFn = Callable[[Any], jax.Array]

# App. A.2.2: along the gradient, VGG steps of [1/2, 4] x the training
# step size (learning rate 0.1, so eta in [0.05, 0.4]: Fig. 4's cap of
# 0.4), DLN steps of [1/100, 30] x it.
PAPER_STEP_FACTORS = (0.5, 4.0)
# App. A.2.1, Algorithm 1 and the values used there.
PAPER_NOISE = {"n_mu": 0.5, "n_sigma": 1.25, "r_mu": 0.1, "r_sigma": 0.1}


# ----------------------------------------------------------------------------
# Shared pieces.


def training_loss(model: nn.Module, batch_stats: Any, inputs: jax.Array,
                  labels: jax.Array, rngs: Any = None) -> LossFn:
  """params -> the loss `train.train_step` differentiates on this batch.

  The model runs in training mode (batch statistics) with `batch_stats`
  as the state it reads; the new running statistics are dropped, so every
  call is the same function of the parameters. `rngs` (e.g.
  {"noise": key} for `NoisyBN`) is fixed too: every point sees one draw.

  Args:
    model: a flax classifier called as `model(x, train=...)`.
    batch_stats: the model's statistics at this step ({} without BN).
    inputs: the model's float inputs (`train.model_inputs`).
    labels: (N,) int class labels.
    rngs: the apply's rng streams, or None.
  """
  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats},
                            inputs, train=True, mutable=["batch_stats"],
                            rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  return loss


def classifier_layers(model: nn.Module) -> tuple[str, ...]:
  """A bn_lab.models classifier's layers, bottom to top, as
  `internal_covariate_shift` takes them: "input_bn" (placement "input"),
  "conv_i" (CNN), "hidden_i", "readout". Each is a block of the model: its
  linear map and the normalization layer that follows it.

  Why not the params' keys: a dict that has been through `jax.tree.map` or
  a checkpoint has its keys sorted, which puts "input_bn" above "hidden_0".
  """
  widths = getattr(model, "widths", None)
  placement = getattr(model, "placement", None)
  if widths is None or placement is None:
    raise ValueError(
        f"model={type(model).__name__}: pass a bn_lab.models classifier "
        "(make_model's MLP or CNN), which has `widths` and `placement`.")
  return (("input_bn",) * (placement == "input")
          + tuple(f"conv_{i}" for i in range(len(getattr(model, "channels",
                                                         ()))))
          + tuple(f"hidden_{i}" for i in range(len(widths))) + ("readout",))


def _check_batch_size(batch_size) -> None:
  if batch_size is not None and not (
      isinstance(batch_size, numbers.Integral)
      and not isinstance(batch_size, bool) and batch_size > 0):
    raise ValueError(f"batch_size={batch_size!r}: pass a positive integer "
                     "(points per lax.map step) or None (vmap all).")


def _map(fn, xs, batch_size):
  """fn over the leading axis of xs: all at once, or `batch_size` at a
  time (the memory of `batch_size` points, not all of them)."""
  if batch_size is None:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


def _l2(leaves) -> jax.Array:
  """The l2 norm of arrays taken as one vector, accumulated in float32 or
  wider."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(
      jnp.promote_types(x.dtype, jnp.float32)))) for x in leaves))


def _dot(a_leaves, b_leaves) -> jax.Array:
  wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return sum(jnp.sum(wide(a) * wide(b)) for a, b in zip(a_leaves, b_leaves))


# ----------------------------------------------------------------------------
# Internal covariate shift (Sec. 2.2, Definition 2.1).


class CovariateShift(NamedTuple):
  """Per layer, bottom to top (each (len(layers),)):
  l2: ||G - G'||_2, Definition 2.1's ICS (ideally 0).
  cosine: cos(G, G') (ideally 1); NaN where G or G' is 0.
  grad_norm: ||G||_2, to put l2 on a scale (l2 / grad_norm)."""
  l2: jax.Array
  cosine: jax.Array
  grad_norm: jax.Array


def _path_names(path) -> tuple[str, ...]:
  """A pytree key path as strings: dict keys, attribute names, indices."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _layer_of_leaves(params: Any, layers: Sequence[str]) -> list[int]:
  """The index in `layers` of the layer each leaf of `params` belongs to,
  in `jax.tree.leaves` order.

  A layer name is a path into the tree, "/"-separated ("hidden_0", or
  "hidden_0/Dense_0" to count a block's linear map apart from its BN); a
  leaf belongs to the layer whose path starts its own. The layers must
  cover every leaf once, so that "the layers below" leaves none out.
  """
  if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
    raise ValueError(f"layers={layers!r}: pass a sequence of layer names, "
                     "bottom to top, e.g. classifier_layers(model).")
  layers = tuple(layers)
  if not layers:
    raise ValueError("layers=(): pass at least one layer name, bottom to "
                     "top, e.g. classifier_layers(model).")
  if len(set(layers)) != len(layers):
    raise ValueError(f"layers={layers} names a layer twice; name each once.")
  prefixes = [tuple(name.split("/")) for name in layers]
  paths = [_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      params)[0]]
  owners = [[i for i, pre in enumerate(prefixes) if path[:len(pre)] == pre]
            for path in paths]
  for i, name in enumerate(layers):
    if not any(i in owner for owner in owners):
      top = sorted({path[0] for path in paths if path})
      raise ValueError(f"layers: {name!r} names no parameters; choose among "
                       f"{top} (or paths into them, '/'-separated).")
  shared = [p for p, owner in zip(paths, owners) if len(owner) > 1]
  if shared:
    raise ValueError(f"layers={layers} overlap: {'/'.join(shared[0])} is in "
                     "two of them; make each parameter one layer's.")
  missing = ["/".join(p) for p, owner in zip(paths, owners) if not owner]
  if missing:
    raise ValueError(f"layers={layers} leave out {missing}; list every "
                     "layer, bottom to top (classifier_layers(model)).")
  return [owner[0] for owner in owners]


def _check_same_structure(params: Any, other: Any, name: str) -> None:
  """`other` (updates, a direction) must be a tree like `params`: same
  structure and leaf shapes."""
  if jax.tree.structure(params) != jax.tree.structure(other):
    raise ValueError(f"{name}: its tree structure differs from params'; "
                     "pass a tree like params (optax's updates for them).")
  for p, o in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
    if jnp.shape(p) != jnp.shape(o):
      raise ValueError(f"{name}: a leaf of shape {jnp.shape(o)} where "
                       f"params has {jnp.shape(p)}; pass a tree like params.")


def internal_covariate_shift(loss_fn: LossFn, params: Any, updates: Any,
                             layers: Sequence[str], *,
                             batch_size: int | None = None,
                             ) -> CovariateShift:
  """Santurkar et al.'s internal covariate shift of each layer at one step.

  Definition 2.1: for layer i (weights W_i, layers 1..k bottom to top),
    G_i  = grad_{W_i} L(W_1, ..., W_k),
    G'_i = grad_{W_i} L(W_1 + U_1, ..., W_{i-1} + U_{i-1}, W_i, ..., W_k),
  the gradient the simultaneous update uses, and the same gradient after
  the layers below i have taken their update U (this step's, the same
  batch). ICS is ||G_i - G'_i||_2; Fig. 5 also plots cos(G_i, G'_i). The
  bottom layer has nothing below it: l2 0, cosine 1.

  "Layer i's weights" are the parameters under `layers[i]`. With
  `classifier_layers(model)` a layer is one block of the model: its Dense
  (or conv) kernel and bias and the scale and bias of the normalization
  layer in the block, which follows that linear map (before or after the
  activation); with placement "input" the input BN is the bottom layer.
  Paths such as "hidden_0/Dense_0" separate them.

  Cost: len(layers) gradients of `loss_fn`, at the points "no layer
  updated" (which gives every G_i) and "layers below i updated" for
  i >= 1, vmapped or `lax.map`ped (`batch_size`).

  Args:
    loss_fn: params -> scalar loss on this step's batch (`training_loss`).
    params: the parameters at step t, a pytree.
    updates: what the optimizer adds to them at step t, computed from
      this step's gradient G: a tree like params (optax's updates, e.g.
      `train.make_optimizer(spec).update(grads, state.opt_state,
      state.params)[0]`; `new = optax.apply_updates(params, updates)`).
    layers: names of the layers, bottom to top, covering every parameter
      once (see `_layer_of_leaves`); a tuple, to be a static jit argument.
    batch_size: None: all points at once; an integer: that many at a time.

  Returns:
    CovariateShift of (len(layers),) arrays.
  """
  _check_same_structure(params, updates, "updates")
  _check_batch_size(batch_size)
  owner = np.asarray(_layer_of_leaves(params, layers))
  num_layers = len(layers)
  # below[i, leaf]: the leaf is in a layer below layer i.
  below = jnp.asarray(owner[None, :] < np.arange(num_layers)[:, None])
  leaves, treedef = jax.tree.flatten(params)
  steps = jax.tree.leaves(updates)

  def gradient(updated):
    point = [jnp.where(moved, p + u.astype(p.dtype), p)
             for moved, p, u in zip(updated, leaves, steps)]
    return jax.tree.leaves(jax.grad(loss_fn)(treedef.unflatten(point)))

  grads = _map(gradient, below, batch_size)  # leaves of (layers, *shape)
  l2, cosine, norm = [], [], []
  for i in range(num_layers):
    g = [leaf[0] for leaf, o in zip(grads, owner) if o == i]
    g_moved = [leaf[i] for leaf, o in zip(grads, owner) if o == i]
    l2.append(_l2([a - b for a, b in zip(g, g_moved)]))
    norm.append(_l2(g))
    cosine.append(_dot(g, g_moved) / (norm[-1] * _l2(g_moved)))
  return CovariateShift(l2=jnp.stack(l2), cosine=jnp.stack(cosine),
                        grad_norm=jnp.stack(norm))


# ----------------------------------------------------------------------------
# The loss landscape along the gradient (Sec. 3.1-3.2, Fig. 4).


class Landscape(NamedTuple):
  """Along the gradient g = grad L(w), for each step size eta of the grid
  ((len(etas),) arrays), and their summaries (scalars):
  losses: L(w - eta g), Fig. 4(a)'s band is their range.
  grad_changes: ||grad L(w) - grad L(w - eta g)||_2, Fig. 4(b)
    ("gradient predictiveness": small is predictive).
  ratios: grad_changes / ||eta g||_2, the gradient's change per distance.
  loss_min, loss_max, loss_range: over the grid ("loss variation").
  beta_smoothness: max of ratios, Fig. 4(c)'s "effective" beta.
  loss: L(w); grad_norm: ||g||_2."""
  losses: jax.Array
  grad_changes: jax.Array
  ratios: jax.Array
  loss_min: jax.Array
  loss_max: jax.Array
  loss_range: jax.Array
  beta_smoothness: jax.Array
  loss: jax.Array
  grad_norm: jax.Array


def step_sizes(learning_rate: float, num: int = 8,
               factors: tuple[float, float] = PAPER_STEP_FACTORS,
               ) -> jax.Array:
  """`num` step sizes evenly spaced over [factors[0], factors[1]] x
  `learning_rate`: by default the paper's VGG grid, [1/2, 4] x the
  training step size (App. A.2.2; [0.05, 0.4] at its learning rate 0.1).

  The steps are along the raw gradient, as under the paper's SGD; for a
  run trained with Adam the learning rate is not a step size in these
  units, so pass step sizes to `gradient_landscape` directly."""
  low, high = factors
  if not (isinstance(num, numbers.Integral) and num > 0):
    raise ValueError(f"num={num!r}: pass a positive number of step sizes.")
  if not 0 < low <= high:
    raise ValueError(f"factors={factors}: pass 0 < low <= high, e.g. "
                     f"{PAPER_STEP_FACTORS}.")
  return learning_rate * jnp.linspace(low, high, num)


def _check_etas(etas) -> jax.Array:
  etas = jnp.asarray(etas)
  if etas.ndim != 1 or etas.shape[0] == 0 or not jnp.issubdtype(
      etas.dtype, jnp.floating):
    raise ValueError(f"etas: shape {etas.shape}, dtype {etas.dtype}; pass a "
                     "non-empty 1-D grid of float step sizes, e.g. "
                     "step_sizes(learning_rate).")
  try:
    values = np.asarray(etas)
  except jax.errors.TracerArrayConversionError:  # traced: checked by caller
    return etas
  if not np.all(np.isfinite(values) & (values > 0)):
    raise ValueError(f"etas={values.tolist()}: every step size must be "
                     "finite and > 0 (a ratio divides by it).")
  return etas


def gradient_landscape(loss_fn: LossFn, params: Any, etas, *,
                       batch_size: int | None = None) -> Landscape:
  """The loss and its gradient along the gradient at w (Sec. 3.2, Fig. 4).

  With g = grad L(w) and each step size eta of the grid, the point
  w - eta g (the step plain gradient descent with learning rate eta would
  take), its loss and its gradient's l2 distance from g; effective
  beta-smoothness is the largest ||grad L(w) - grad L(w - eta g)|| /
  ||eta g|| over the grid. Zero gradient gives NaN ratios.

  Cost: 1 + len(etas) gradients of `loss_fn`, vmapped over the grid or
  `lax.map`ped (`batch_size`).

  Args:
    loss_fn: params -> scalar loss on this step's batch (`training_loss`).
    params: w, a pytree.
    etas: (k,) float step sizes, each > 0 (`step_sizes`).
    batch_size: None: all points at once; an integer: that many at a time.
  """
  etas = _check_etas(etas)
  _check_batch_size(batch_size)
  loss, grad = jax.value_and_grad(loss_fn)(params)
  grad_norm = _l2(jax.tree.leaves(grad))

  def along(eta):
    point = jax.tree.map(lambda p, g: p - eta.astype(g.dtype) * g, params,
                         grad)
    loss_at, grad_at = jax.value_and_grad(loss_fn)(point)
    change = _l2([a - b for a, b in zip(jax.tree.leaves(grad),
                                        jax.tree.leaves(grad_at))])
    return loss_at, change

  losses, changes = _map(along, etas, batch_size)
  ratios = changes / (etas * grad_norm)
  loss_min, loss_max = jnp.min(losses), jnp.max(losses)
  return Landscape(losses=losses, grad_changes=changes, ratios=ratios,
                   loss_min=loss_min, loss_max=loss_max,
                   loss_range=loss_max - loss_min,
                   beta_smoothness=jnp.max(ratios), loss=loss,
                   grad_norm=grad_norm)


# ----------------------------------------------------------------------------
# "Noisy" BN (Sec. 2.1, App. A.2.1).


def _check_noise(n_mu, n_sigma, r_mu, r_sigma) -> None:
  checks = (("n_mu", n_mu, 0.0), ("n_sigma", n_sigma, 1.0),
            ("r_mu", r_mu, 0.0), ("r_sigma", r_sigma, 0.0))
  for name, value, low in checks:
    if isinstance(value, numbers.Real) and not value >= low:
      raise ValueError(f"{name}={value!r} must be >= {low} (Algorithm 1; "
                       f"the paper's {PAPER_NOISE[name]}).")


def noisy_affine(y: jax.Array, key: jax.Array, step, *,
                 feature_axes: int | tuple[int, ...] = -1,
                 n_mu: float = PAPER_NOISE["n_mu"],
                 n_sigma: float = PAPER_NOISE["n_sigma"],
                 r_mu: float = PAPER_NOISE["r_mu"],
                 r_sigma: float = PAPER_NOISE["r_sigma"]) -> jax.Array:
  """Santurkar et al.'s noise on BN's output: s * y + m, redrawn each step.

  Algorithm 1 (App. A.2.1), at step t, for each feature j:
    mu_j    ~ U(-n_mu, n_mu)       the parameters of this step's noise
    sigma_j ~ U(1, n_sigma)        distribution D^t_j, drawn i.i.d. from D_j
  then for each value y_ij (example i; for a conv, each pixel of it too):
    m_ij ~ U(mu_j - r_mu, mu_j + r_mu)   a shift with mean mu_j != 0
    s_ij ~ N(sigma_j, r_sigma^2)          a scale with mean sigma_j >= 1
    y_ij <- s_ij * y_ij + m_ij
  with the paper's n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1. D_j is
  fixed and D^t_j moves every step: a feature's noise has mean mu_j and
  scale sigma_j that jump from step to step, so its distribution after BN
  is never stable (the "covariate shift" the experiment injects). N's
  second parameter is read as a standard deviation (the paper writes
  N(sigma, r_sigma)).

  Every draw comes from `fold_in(key, step)`: the same (key, step) gives
  the same noise, another step another.

  Args:
    y: BN's output, any float shape.
    key: a typed or raw PRNG key.
    step: the training step t (int, may be traced).
    feature_axes: y's feature axes (BN's `axis`), as in `core`.
    n_mu, n_sigma, r_mu, r_sigma: Algorithm 1's constants.
  """
  _check_noise(n_mu, n_sigma, r_mu, r_sigma)
  axes = core.feature_axes(y.ndim, feature_axes)
  feature_shape = tuple(y.shape[a] if a in axes else 1
                        for a in range(y.ndim))
  dtype = jnp.promote_types(y.dtype, jnp.float32)
  k_mu, k_sigma, k_shift, k_scale = jax.random.split(
      jax.random.fold_in(key, step), 4)
  mu = jax.random.uniform(k_mu, feature_shape, dtype, -n_mu, n_mu)
  sigma = jax.random.uniform(k_sigma, feature_shape, dtype, 1.0, n_sigma)
  shift = mu + jax.random.uniform(k_shift, y.shape, dtype, -r_mu, r_mu)
  scale = sigma + r_sigma * jax.random.normal(k_scale, y.shape, dtype)
  return (scale * y.astype(dtype) + shift).astype(y.dtype)


class NoisyBN(bn_nn.BatchNorm):
  """bn_jax.nn.BatchNorm followed by `noisy_affine` ("noisy BN").

  A drop-in for BatchNorm (same attributes, variables and names, so
  population statistics and checkpoints treat it as one), plus Algorithm
  1's constants. In training the noise key comes from the rng stream
  "noise", which the trainer makes new every step as flax's examples do
  for dropout: `rngs={"noise": jax.random.fold_in(key, state.step)}`; the
  step is in the key, so `noisy_affine` gets step 0. The statistics are
  BN's own: the noise comes after them.

  In evaluation the noise is replaced by its expectation over steps,
  E[s] y + E[m] = (1 + n_sigma) / 2 * y (E[mu] = 0), as dropout is by its
  mean, so that the layers above see inputs of the scale they were trained
  on. The paper does not say what it does at test time.
  """
  n_mu: float = PAPER_NOISE["n_mu"]
  n_sigma: float = PAPER_NOISE["n_sigma"]
  r_mu: float = PAPER_NOISE["r_mu"]
  r_sigma: float = PAPER_NOISE["r_sigma"]

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    y = super().__call__(x, use_running_average, mask=mask)
    if nn.merge_param("use_running_average", self.use_running_average,
                      use_running_average):
      return (y * ((1.0 + self.n_sigma) / 2.0)).astype(y.dtype)
    if self.is_initializing():  # no noise stream needed to build variables
      return y
    return noisy_affine(y, self.make_rng("noise"), 0,
                        feature_axes=self.axis, n_mu=self.n_mu,
                        n_sigma=self.n_sigma, r_mu=self.r_mu,
                        r_sigma=self.r_sigma)
