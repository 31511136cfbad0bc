"""PowerNorm (bn_jax.power, bn_jax.nn.PowerNorm, bn_jax.nnx.PowerNorm)
against an independent float64 NumPy transcription of the paper's
algorithm (Shen et al., 2020, "Power Normalization (Every Iteration)"):

  forward   z = x / psi_{t-1}, y = gamma z + beta,
            psi_t^2 = a psi_{t-1}^2 + (1 - a) mean_B(x^2)
  backward  dL/dz = gamma dL/dy, dL/dx = (dL/dz - nu_{t-1} z) / psi_{t-1},
            nu_t = nu_{t-1} (1 - (1 - a) Gamma) + (1 - a) Lambda,
            Gamma = mean_B(z^2), Lambda = mean_B(dL/dz z)
  inference y = gamma x / psi + beta

with psi = sqrt(psi^2 + eps), and the reference code's warmup (batch psi_B
for the first warmup steps; cumulative average, then the EMA, of psi^2).
"""

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import nn as bn_nn
from bn_jax import nnx as bn_nnx
from bn_jax import power

EPS = 1e-5


# ----------------------------------------------------------------------------
# The NumPy transcription (float64), on tokens of shape (N, C).


def np_step(x, gamma, beta, psi2, nu, step, dy=None, *, mask=None,
            alpha=0.9, alpha_b=None, eps=EPS, warmup=0):
  """One training step of the paper's algorithm on (N, C) tokens; `step` is
  1-based. Returns a dict of y, the new psi2 and, given dy, the gradients
  and the new nu."""
  alpha_b = alpha if alpha_b is None else alpha_b
  x = np.asarray(x, np.float64)
  keep = np.ones(len(x), bool) if mask is None else np.asarray(mask, bool)
  batch_psi2 = np.mean(x[keep] ** 2, axis=0)
  divisor2 = batch_psi2 if step <= warmup else psi2
  psi = np.sqrt(divisor2 + eps)
  z = x / psi
  out = {"y": gamma * z + beta, "psi": psi}
  new_psi2 = psi2
  if step < warmup:
    new_psi2 = psi2 * (step - 1) / step + batch_psi2 / step
  out["psi2"] = alpha * new_psi2 + (1 - alpha) * batch_psi2
  if dy is not None:
    dy = np.asarray(dy, np.float64)
    dz = gamma * dy
    big_gamma = np.mean(z[keep] ** 2, axis=0)
    big_lambda = np.mean(dz[keep] * z[keep], axis=0)
    correction = nu * z * keep[:, None]
    out["dx"] = (dz - correction) / psi
    out["dgamma"] = np.sum(dy * z, axis=0)
    out["dbeta"] = np.sum(dy, axis=0)
    out["nu"] = (nu * (1 - (1 - alpha_b) * big_gamma)
                 + (1 - alpha_b) * big_lambda)
  return out


def _random_setup(shape=(5, 3, 4), seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.normal(0.5, 2.0, shape)
  dy = rng.normal(size=shape)
  gamma = rng.uniform(0.5, 1.5, c)
  beta = rng.normal(size=c)
  psi2 = rng.uniform(0.5, 3.0, c)
  nu = rng.normal(0.0, 0.2, c)
  return x, dy, gamma, beta, psi2, nu


def _jax_inputs(x, gamma, beta, psi2, nu, count, dtype):
  params = power.PNParams(scale=jnp.asarray(gamma, dtype),
                          bias=jnp.asarray(beta, dtype))
  state = power.PNState(psi2=jnp.asarray(psi2, jnp.float32),
                        nu=jnp.asarray(nu, jnp.float32),
                        count=jnp.asarray(count, jnp.int32))
  return params, state, jnp.asarray(x, dtype)


@functools.partial(jax.jit,
                   static_argnames=("momentum", "backward_momentum"))
def _train_grads(params, state, x, dy, mask=None, momentum=0.9,
                 backward_momentum=None):
  """y, new state (nu folded in) and the gradients of sum(y * dy)."""
  def loss(params, probe, x):
    y, new_state = power.apply(params, state, x, training=True, probe=probe,
                               mask=mask, momentum=momentum,
                               backward_momentum=backward_momentum)
    return jnp.sum(y * dy), (y, new_state)
  (_, (y, new_state)), (g_params, g_probe, g_x) = jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True)(params, power.zero_probe(state),
                                             x)
  return y, power.update_nu(new_state, g_probe), g_params, g_x


def _close(actual, expected, rtol, atol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# One step: forward, psi^2, the custom backward, nu.


@pytest.mark.parametrize("x64", [False, True])
def test_one_step_matches_numpy(x64):
  x, dy, gamma, beta, psi2, nu = _random_setup()
  tol = dict(rtol=1e-12, atol=1e-12) if x64 else dict(rtol=1e-5, atol=1e-6)
  options = dict(momentum=0.8, backward_momentum=0.7)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    params, state, xj = _jax_inputs(x, gamma, beta, psi2, nu, 3, dtype)
    if x64:  # the state in float64 too, for the tight tolerance
      state = state._replace(psi2=jnp.asarray(psi2), nu=jnp.asarray(nu))
    y, new_state, g_params, g_x = _train_grads(
        params, state, xj, jnp.asarray(dy, dtype), **options)
  ref = np_step(x.reshape(-1, 4), gamma, beta, psi2, nu, 4,
                dy.reshape(-1, 4), alpha=0.8, alpha_b=0.7)
  assert y.dtype == dtype and g_x.dtype == dtype
  _close(y, ref["y"].reshape(x.shape), **tol)
  _close(new_state.psi2, ref["psi2"], **tol)
  _close(g_x, ref["dx"].reshape(x.shape), **tol)
  _close(g_params.scale, ref["dgamma"], **tol)
  _close(g_params.bias, ref["dbeta"], **tol)
  _close(new_state.nu, ref["nu"], **tol)
  assert int(new_state.count) == 4
  # Not the exact gradient (which would differentiate through psi too, and
  # here psi_{t-1} is a constant): the correction -nu z / psi is there.
  assert np.abs(ref["dx"] - gamma * dy.reshape(-1, 4) / ref["psi"]).max(
  ) > 1e-3


def test_masked_tokens_count_in_no_statistic():
  """(T, B, C) with padding: y, psi^2, nu and dx on the real tokens are
  NumPy's on the real tokens alone; padding's y and dx are computed (no
  correction in dx); padding's values change nothing else."""
  x, dy, gamma, beta, psi2, nu = _random_setup((6, 3, 4), seed=1)
  lengths = np.array([6, 4, 2])
  mask = np.arange(6)[:, None] < lengths[None, :]  # (T, B)
  params, state, xj = _jax_inputs(x, gamma, beta, psi2, nu, 0, jnp.float32)
  options = dict(mask=jnp.asarray(mask[..., None]))
  y, new_state, g_params, g_x = _train_grads(
      params, state, xj, jnp.asarray(dy, jnp.float32), **options)
  tol = dict(rtol=1e-5, atol=1e-6)
  real = np_step(x[mask], gamma, beta, psi2, nu, 1, dy[mask])
  _close(np.asarray(y)[mask], real["y"], **tol)
  _close(new_state.psi2, real["psi2"], **tol)
  _close(new_state.nu, real["nu"], **tol)
  _close(np.asarray(g_x)[mask], real["dx"], **tol)
  # Padding: outputs as any token's, dx = gamma dy / psi (no statistic).
  psi = np.sqrt(psi2 + EPS)
  _close(np.asarray(y)[~mask], gamma * x[~mask] / psi + beta, **tol)
  _close(np.asarray(g_x)[~mask], gamma * dy[~mask] / psi, **tol)
  # gamma's and beta's gradients are exact, padding's outputs included.
  _close(g_params.scale, np.sum(dy * x / psi, axis=(0, 1)), **tol)
  _close(g_params.bias, np.sum(dy, axis=(0, 1)), **tol)
  # The whole-batch transcription with the mask agrees too.
  whole = np_step(x.reshape(-1, 4), gamma, beta, psi2, nu, 1,
                  dy.reshape(-1, 4), mask=mask.reshape(-1))
  _close(g_x, whole["dx"].reshape(x.shape), **tol)
  # Huge values at the padding change nothing on the real tokens.
  x_padded = np.where(mask[..., None], x, 1e3)
  y2, state2, _, g_x2 = _train_grads(
      params, state, jnp.asarray(x_padded, jnp.float32),
      jnp.asarray(dy, jnp.float32), **options)
  _close(np.asarray(y2)[mask], real["y"], **tol)
  _close(state2.psi2, real["psi2"], **tol)
  _close(state2.nu, real["nu"], **tol)
  _close(np.asarray(g_x2)[mask], real["dx"], **tol)


def test_a_feature_without_real_tokens_keeps_its_state():
  x, dy, gamma, beta, psi2, nu = _random_setup((4, 3), seed=2)
  mask = np.ones((4, 3), bool)
  mask[:, 1] = False  # feature 1: padding everywhere
  params, state, xj = _jax_inputs(x, gamma, beta, psi2, nu, 0, jnp.float32)
  _, new_state, _, _ = _train_grads(params, state, xj,
                                    jnp.asarray(dy, jnp.float32),
                                    mask=jnp.asarray(mask))
  assert np.isfinite(np.asarray(new_state.psi2)).all()
  _close(new_state.psi2[1], psi2[1], rtol=1e-6, atol=0)
  _close(new_state.nu[1], nu[1], rtol=1e-6, atol=0)
  ref = np_step(x[:, [0, 2]], gamma[[0, 2]], beta[[0, 2]], psi2[[0, 2]],
                nu[[0, 2]], 1, dy[:, [0, 2]])
  _close(new_state.psi2[np.array([0, 2])], ref["psi2"], rtol=1e-5, atol=1e-6)


def test_eval_mode():
  x, _, gamma, beta, psi2, nu = _random_setup((7, 4), seed=3)
  params, state, xj = _jax_inputs(x, gamma, beta, psi2, nu, 5, jnp.float32)
  y, same = power.apply(params, state, xj, training=False)
  _close(y, gamma * x / np.sqrt(psi2 + EPS) + beta, rtol=1e-5, atol=1e-6)
  assert same is state
  g = jax.grad(lambda x: jnp.sum(power.apply(params, state, x,
                                             training=False)[0]))(xj)
  _close(g, np.broadcast_to(gamma / np.sqrt(psi2 + EPS), x.shape),
         rtol=1e-5, atol=1e-6)


def test_bfloat16_input_keeps_float32_statistics():
  x, _, gamma, beta, psi2, nu = _random_setup((8, 4), seed=4)
  x16 = jnp.asarray(x, jnp.bfloat16)
  params, state, _ = _jax_inputs(x, gamma, beta, psi2, nu, 0, jnp.float32)
  y, new_state = jax.jit(power.apply, static_argnames="training")(
      params, state, x16, training=True)
  assert y.dtype == jnp.bfloat16 and new_state.psi2.dtype == jnp.float32
  ref = np_step(np.asarray(x16, np.float64), gamma, beta, psi2, nu, 1)
  _close(new_state.psi2, ref["psi2"], rtol=1e-6, atol=1e-6)
  _close(y, ref["y"], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------
# A tiny training loop: Dense -> PowerNorm -> squared error, SGD, warmup.

D, C, LR = 3, 4, 0.5
OPTIONS = dict(momentum=0.8, backward_momentum=0.7, warmup_steps=2)


def _loop_data(seed=5):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(4, 5, 3, D))  # 4 steps of (B=5, T=3, D)
  targets = rng.normal(size=(4, 5, 3, C))
  lengths = np.array([[3, 1, 2, 3, 2]] * 4)
  masks = np.arange(3)[None, None, :] < lengths[..., None]  # (4, B, T)
  w = rng.normal(size=(D, C))
  return xs, targets, masks, w


def np_loop(xs, targets, masks, w, use_mask):
  gamma, beta = np.ones(C), np.zeros(C)
  psi2, nu = np.ones(C), np.zeros(C)
  history = []
  for t in range(len(xs)):
    x = xs[t].reshape(-1, D)
    h = x @ w
    mask = masks[t].reshape(-1) if use_mask else None
    out = np_step(h, gamma, beta, psi2, nu, t + 1, mask=mask,
                  alpha=0.8, alpha_b=0.7, warmup=2)
    dy = (out["y"] - targets[t].reshape(-1, C)) / out["y"].size
    out = np_step(h, gamma, beta, psi2, nu, t + 1, dy, mask=mask,
                  alpha=0.8, alpha_b=0.7, warmup=2)
    w = w - LR * (x.T @ out["dx"])
    gamma = gamma - LR * out["dgamma"]
    beta = beta - LR * out["dbeta"]
    psi2, nu = out["psi2"], out["nu"]
    history.append(dict(w=w, gamma=gamma, beta=beta, psi2=psi2, nu=nu,
                        y=out["y"]))
  return history


def _loss(y, target):
  return 0.5 * jnp.mean(jnp.square(y - target))


@jax.jit
def _pure_step(w, params, state, x, target, mask):
  def loss_fn(w, params, probe):
    y, new_state = power.apply(params, state, x @ w, training=True,
                               probe=probe, mask=mask, **OPTIONS)
    return _loss(y, target), (y, new_state)
  (_, (y, new_state)), (g_w, g_params, g_probe) = jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2), has_aux=True)(w, params,
                                                power.zero_probe(state))
  params = jax.tree.map(lambda p, g: p - LR * g, params, g_params)
  return w - LR * g_w, params, power.update_nu(new_state, g_probe), y


def _pure_loop(xs, targets, masks, w, use_mask, dtype=jnp.float32):
  params, state = power.init(C, dtype)
  if dtype == jnp.float64:  # the state too (init's is float32)
    state = state._replace(psi2=state.psi2.astype(dtype),
                           nu=state.nu.astype(dtype))
  w = jnp.asarray(w, dtype)
  history = []
  for t in range(len(xs)):
    mask = jnp.asarray(masks[t][..., None]) if use_mask else None
    w, params, state, y = _pure_step(w, params, state,
                                     jnp.asarray(xs[t], dtype),
                                     jnp.asarray(targets[t], dtype), mask)
    history.append(dict(w=w, gamma=params.scale, beta=params.bias,
                        psi2=state.psi2, nu=state.nu, y=y,
                        count=state.count))
  return history


@pytest.mark.parametrize("use_mask", [False, True])
def test_training_loop_matches_numpy(use_mask):
  """Four SGD steps, two of them warmup: weights upstream (through dL/dx),
  gamma, beta, psi^2 and nu match NumPy's after every step."""
  xs, targets, masks, w = _loop_data()
  expected = np_loop(xs, targets, masks, w, use_mask)
  actual = _pure_loop(xs, targets, masks, w, use_mask)
  for t, (a, e) in enumerate(zip(actual, expected)):
    assert int(a["count"]) == t + 1
    for name in ("w", "gamma", "beta", "psi2", "nu"):
      _close(a[name], e[name], rtol=1e-5, atol=1e-6)
    _close(np.asarray(a["y"]).reshape(-1, C), e["y"], rtol=1e-5, atol=1e-5)
  assert np.abs(expected[-1]["nu"]).max() > 1e-3  # nu did move


def test_training_loop_float64_tight():
  xs, targets, masks, w = _loop_data(seed=6)
  expected = np_loop(xs, targets, masks, w, True)
  with jax.enable_x64(True):
    actual = _pure_loop(xs, targets, masks, w, True, jnp.float64)
  for a, e in zip(actual, expected):
    assert a["nu"].dtype == jnp.float64
    for name in ("w", "gamma", "beta", "psi2", "nu"):
      _close(a[name], e[name], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------
# The flax front ends give the pure function's results.


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train, mask=None):
    h = nn.Dense(C, use_bias=False)(x)
    return bn_nn.PowerNorm(**OPTIONS)(h, use_running_average=not train,
                                      mask=mask)


class _NnxNet(nnx.Module):
  def __init__(self, w):
    self.dense = nnx.Linear(D, C, use_bias=False, rngs=nnx.Rngs(0))
    self.dense.kernel[...] = jnp.asarray(w, jnp.float32)
    self.norm = bn_nnx.PowerNorm(C, rngs=nnx.Rngs(0), **OPTIONS)

  def __call__(self, x, mask=None):
    return self.norm(self.dense(x), mask=mask)


def test_linen_and_nnx_modules_match_the_pure_function():
  xs, targets, masks, w = _loop_data(seed=7)
  expected = _pure_loop(xs, targets, masks, w, True)
  tx = optax.sgd(LR)

  # linen: the probe collection differentiated and folded.
  model = _LinenNet()
  variables = model.init(jax.random.key(0), jnp.asarray(xs[0], jnp.float32),
                         train=True)
  assert set(variables) == {"params", "batch_stats", "power_probe"}
  params = dict(variables["params"])
  params["Dense_0"] = {"kernel": jnp.asarray(w, jnp.float32)}
  batch_stats, probes = variables["batch_stats"], variables["power_probe"]
  opt_state = tx.init(params)

  @jax.jit
  def linen_step(params, batch_stats, opt_state, x, target, mask):
    def loss_fn(params, probes):
      y, updates = model.apply(
          {"params": params, "batch_stats": batch_stats,
           "power_probe": probes}, x, train=True, mask=mask,
          mutable=["batch_stats"])
      return _loss(y, target), updates["batch_stats"]
    (_, batch_stats), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes)
    batch_stats = power.fold_probe_grads(batch_stats, probe_grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state

  # nnx: PARAMS_AND_PROBES differentiated, fold_power_probe_grads.
  net = _NnxNet(w)
  optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(net, optimizer, x, target, mask):
    grads = nnx.grad(lambda net: _loss(net(x, mask), target),
                     argnums=nnx.DiffState(0, bn_nnx.PARAMS_AND_PROBES))(net)
    optimizer.update(net, bn_nnx.fold_power_probe_grads(net, grads))

  tol = dict(rtol=1e-5, atol=1e-6)
  for t, e in enumerate(expected):
    x = jnp.asarray(xs[t], jnp.float32)
    target = jnp.asarray(targets[t], jnp.float32)
    mask = jnp.asarray(masks[t][..., None])
    params, batch_stats, opt_state = linen_step(params, batch_stats,
                                                opt_state, x, target, mask)
    nnx_step(net, optimizer, x, target, mask)
    stats = batch_stats["PowerNorm_0"]
    norm_params = params["PowerNorm_0"]
    for got in (
        dict(w=params["Dense_0"]["kernel"], gamma=norm_params["scale"],
             beta=norm_params["bias"], psi2=stats["psi2"], nu=stats["nu"],
             count=stats["count"]),
        dict(w=net.dense.kernel[...], gamma=net.norm.scale[...],
             beta=net.norm.bias[...], psi2=net.norm.psi2[...],
             nu=net.norm.nu[...], count=net.norm.count[...])):
      for name in ("w", "gamma", "beta", "psi2", "nu"):
        _close(got[name], np.asarray(e[name]), **tol)
      assert int(got["count"]) == t + 1
  assert np.abs(np.asarray(expected[-1]["nu"])).max() > 1e-3
  # The probes stay zeros; evaluation is the pure function's.
  assert not np.asarray(net.norm.probe[...]).any()
  x = jnp.asarray(xs[0], jnp.float32)
  pure_eval, _ = power.apply(
      power.PNParams(expected[-1]["gamma"], expected[-1]["beta"]),
      power.PNState(expected[-1]["psi2"], expected[-1]["nu"],
                    expected[-1]["count"]),
      x @ expected[-1]["w"], training=False)
  linen_eval = model.apply({"params": params, "batch_stats": batch_stats},
                           x, train=False)
  net.eval()
  _close(linen_eval, np.asarray(pure_eval), **tol)
  _close(net(x), np.asarray(pure_eval), **tol)


# ----------------------------------------------------------------------------
# jit, vmap, and the arguments.


def test_jit_and_vmap():
  x, dy, gamma, beta, psi2, nu = _random_setup((3, 6, 4), seed=8)
  params, _, xj = _jax_inputs(x, gamma, beta, psi2, nu, 0, jnp.float32)
  rng = np.random.default_rng(9)
  states = power.PNState(
      psi2=jnp.asarray(rng.uniform(0.5, 2.0, (3, 4)), jnp.float32),
      nu=jnp.asarray(rng.normal(0, 0.2, (3, 4)), jnp.float32),
      count=jnp.zeros((3,), jnp.int32))
  dyj = jnp.asarray(dy, jnp.float32)

  def one(state, x, dy):  # x (6, 4): one model's batch
    y, new_state, g_params, g_x = _train_grads(params, state, x, dy)
    return y, new_state, g_params, g_x

  batched = jax.jit(jax.vmap(one))(states, xj, dyj)
  for i in range(3):
    state = jax.tree.map(lambda v: v[i], states)
    ref = np_step(x[i], gamma, beta, np.asarray(state.psi2),
                  np.asarray(state.nu), 1, dy[i])
    _close(batched[0][i], ref["y"], rtol=1e-5, atol=1e-6)
    _close(batched[1].psi2[i], ref["psi2"], rtol=1e-5, atol=1e-6)
    _close(batched[1].nu[i], ref["nu"], rtol=1e-5, atol=1e-6)
    _close(batched[2].scale[i], ref["dgamma"], rtol=1e-5, atol=1e-6)
    _close(batched[3][i], ref["dx"], rtol=1e-5, atol=1e-6)


def _one_line_error(fn, match):
  with pytest.raises(ValueError, match=match) as info:
    fn()
  assert "\n" not in str(info.value), str(info.value)


def test_bad_arguments_are_one_line_errors():
  params, state = power.init(4)
  x = jnp.ones((3, 4))
  train = lambda **kw: power.apply(params, state, kw.pop("x", x),
                                   training=True, **kw)
  _one_line_error(lambda: train(momentum=1.5), "momentum=1.5")
  _one_line_error(lambda: train(momentum=None), "momentum=None")
  _one_line_error(lambda: train(backward_momentum=-0.1),
                  "backward_momentum=-0.1")
  _one_line_error(lambda: train(epsilon=0.0), "epsilon=0.0")
  _one_line_error(lambda: train(warmup_steps=-1), "warmup_steps=-1")
  _one_line_error(lambda: train(warmup_steps=2.5), "warmup_steps=2.5")
  _one_line_error(lambda: train(x=jnp.ones((3, 5))), "shape")
  _one_line_error(lambda: train(axis=2), "axis 2 is out of range")
  _one_line_error(lambda: train(axis=(0, 1)), "names every axis")
  _one_line_error(lambda: train(mask=jnp.ones((2, 1), bool)),
                  "does not broadcast")
  _one_line_error(lambda: train(mask=jnp.ones((3, 1))), "boolean")
  _one_line_error(lambda: train(x=jnp.ones((3, 4), jnp.int32)), "dtype")
  _one_line_error(lambda: train(probe=jnp.zeros(3)), "probe has shape")
  _one_line_error(
      lambda: power.apply(params, state, x, training=False,
                          probe=jnp.zeros(4)), "probe is for training")
  _one_line_error(lambda: power.update_nu(state, jnp.zeros(3)),
                  "probe_grad has shape")
  _one_line_error(
      lambda: power.fold_probe_grads({"PowerNorm_0": {"nu": 0.0}},
                                     {"PowerNorm_1": {"nu": 0.0}}),
      "PowerNorm_1")
  _one_line_error(lambda: bn_nnx.PowerNorm(4, momentum=2.0,
                                           rngs=nnx.Rngs(0)), "momentum=2.0")
  # linen: training with batch_stats mutable and no probe collection.
  model = bn_nn.PowerNorm()
  variables = model.init(jax.random.key(0), x, use_running_average=False)
  _one_line_error(
      lambda: model.apply({"params": variables["params"],
                           "batch_stats": variables["batch_stats"]}, x,
                          use_running_average=False,
                          mutable=["batch_stats"]), "power_probe")
