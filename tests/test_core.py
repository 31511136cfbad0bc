"""Tests for bn_jax.core against references independent of the code tested.

References: a float64 NumPy transcription of Ioffe & Szegedy (2015)
(Algorithm 1, Algorithm 2, the running update, and the backward pass of
Section 3 in its long form through dvar and dmean); autodiff of the plain
formula (`grad="autodiff"`); finite differences (`check_grads` in
float64) and, for second derivatives, central differences of the NumPy
backward pass and the closed-form Hessian of the variance; one batch against
the same batch split over a named axis or an ensemble axis; and, for
folding, the unfolded layers.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bn_jax
import helpers

# (x shape, feature axis): dense, channels-last conv (reduces N, H, W), two
# feature axes, and features first.
CASES = [((32, 8), -1), ((4, 5, 6, 3), -1), ((4, 5, 6, 3), (1, 3)),
         ((16, 6), 0)]
CASE_IDS = ["dense", "nhwc", "axes13", "axis0"]
STATS_METHODS = ["shifted", "two_pass", "one_pass"]
GRAD_MODES = ["paper_jvp", "paper_vjp", "autodiff"]
IMPLS = ["xla_cpu", "plain"]
# Tolerance of y in x's dtype against the float64 reference (a few ulps).
Y_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3,
         jnp.float64: 1e-12}

apply_jit = jax.jit(bn_jax.apply, static_argnames=(
    "training", "axis", "momentum", "epsilon", "unbiased_running_var",
    "axis_name", "axis_index_groups", "stats_method", "grad", "impl"))


def assert_close(actual, expected, tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64),
                             np.asarray(expected, np.float64),
                             rtol=tol, atol=tol)


# ----------------------------------------------------------------------------
# The paper in NumPy (float64).


def np_axes(ndim, axis):
  """(feature axes, reduction axes), computed here, not by bn_jax."""
  features = sorted({a % ndim for a in ((axis,) if isinstance(axis, int)
                                        else axis)})
  return features, tuple(a for a in range(ndim) if a not in features)


def np_expand(v, x, axis):
  """Per-feature array (feature shape) -> broadcastable against x."""
  return np.expand_dims(np.asarray(v, np.float64), np_axes(x.ndim, axis)[1])


def np_train(x, gamma, beta, axis, eps, mask=None):
  """Algorithm 1. Returns y, batch mean and biased variance (feature shape),
  and m, the number of values per feature."""
  x = np.asarray(x, np.float64)
  _, red = np_axes(x.ndim, axis)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape)
  m = w.sum(red, keepdims=True)
  mu = (w * x).sum(red, keepdims=True) / m  # mini-batch mean
  var = (w * (x - mu) ** 2).sum(red, keepdims=True) / m  # mini-batch variance
  xhat = (x - mu) / np.sqrt(var + eps)  # normalize
  y = np_expand(gamma, x, axis) * xhat + np_expand(beta, x, axis)
  squeeze = lambda v: v.reshape(np.asarray(gamma).shape)
  return y, squeeze(mu), squeeze(var), squeeze(m)


def np_eval(x, gamma, beta, mean, var, axis, eps):
  """Algorithm 2, step 11: y = gamma / sqrt(Var + eps) x
  + (beta - gamma E / sqrt(Var + eps))."""
  x = np.asarray(x, np.float64)
  g, b, e, v = (np_expand(p, x, axis) for p in (gamma, beta, mean, var))
  return g / np.sqrt(v + eps) * x + (b - g * e / np.sqrt(v + eps))


def np_running(running, batch, momentum):
  """flax's convention; PyTorch's momentum is 1 - momentum."""
  return momentum * np.asarray(running, np.float64) + (1 - momentum) * batch


def np_backward(dy, x, gamma, axis, eps):
  """Section 3, the chain rule written out: (dx, dgamma, dbeta)."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  _, red = np_axes(x.ndim, axis)
  m = np.prod([x.shape[a] for a in red])
  s = lambda v: v.sum(red, keepdims=True)
  mu = s(x) / m
  var = s((x - mu) ** 2) / m
  xhat = (x - mu) / np.sqrt(var + eps)
  dxhat = dy * np_expand(gamma, x, axis)
  dvar = s(dxhat * (x - mu) * -0.5 * (var + eps) ** -1.5)
  dmu = s(dxhat * -1 / np.sqrt(var + eps)) + dvar * s(-2 * (x - mu)) / m
  dx = dxhat / np.sqrt(var + eps) + dvar * 2 * (x - mu) / m + dmu / m
  shape = np.asarray(gamma).shape
  return dx, s(dy * xhat).reshape(shape), s(dy).reshape(shape)


# ----------------------------------------------------------------------------
# Inputs.


def make_inputs(shape, axis, dtype=jnp.float32, seed=0):
  """x with a non-zero mean, non-trivial gamma, beta and running stats."""
  rng = np.random.default_rng(seed)
  features, _ = np_axes(len(shape), axis)
  fshape = tuple(shape[a] for a in features)
  x = jnp.asarray(2.0 + 3.0 * rng.standard_normal(shape), dtype)
  params, state = random_bn(rng, fshape)
  dy = jnp.asarray(rng.standard_normal(shape), dtype)
  return x, params, state, dy


def random_bn(rng, fshape, count=0):
  """Params and running statistics away from the identity (var > 0)."""
  params = bn_jax.BNParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, fshape), jnp.float32),
      bias=jnp.asarray(rng.standard_normal(fshape), jnp.float32))
  state = bn_jax.BNState(
      mean=jnp.asarray(rng.standard_normal(fshape), jnp.float32),
      var=jnp.asarray(rng.uniform(0.2, 3.0, fshape), jnp.float32),
      count=jnp.asarray(count, jnp.int32))
  return params, state


# ----------------------------------------------------------------------------
# Forward: Algorithm 1 and 2 and the running update.


# Every statistics method in float32; the default one in half precision.
PRECISIONS = [(jnp.float32, m) for m in STATS_METHODS] + [
    (jnp.bfloat16, "shifted"), (jnp.float16, "shifted")]


@pytest.mark.parametrize("shape,axis,dtype,stats_method", helpers.slow_except(
    [c + p for c in CASES for p in PRECISIONS],
    lambda shape, axis, d, m: d == jnp.float32 and m == "shifted",
    ids=[f"{i}-{jnp.dtype(d).name}-{m}" for i in CASE_IDS
         for d, m in PRECISIONS]))
def test_training_matches_paper(shape, axis, dtype, stats_method):
  x, params, state, _ = make_inputs(shape, axis, dtype)
  y, new_state = apply_jit(params, state, x, training=True, axis=axis,
                           momentum=0.9, epsilon=1e-3,
                           stats_method=stats_method)
  # The reference sees the same (rounded) x: statistics must be float32
  # accurate whatever x's dtype, y is rounded once to x's dtype.
  y_ref, mu, var, _ = np_train(x, params.scale, params.bias, axis, 1e-3)
  assert y.dtype == dtype
  assert new_state.mean.dtype == new_state.var.dtype == jnp.float32
  assert_close(y, y_ref, Y_TOL[dtype])
  assert_close(new_state.mean, np_running(state.mean, mu, 0.9), 1e-5)
  assert_close(new_state.var, np_running(state.var, var, 0.9), 1e-5)
  assert new_state.count == 1


@pytest.mark.parametrize("shape,axis,dtype", helpers.slow_except(
    [c + (jnp.float32,) for c in CASES] + [CASES[1] + (jnp.bfloat16,),
                                           CASES[1] + (jnp.float16,)],
    lambda shape, axis, dtype: len(shape) == 2 and dtype == jnp.float32,
    ids=CASE_IDS + ["nhwc-bfloat16", "nhwc-float16"]))
def test_eval_matches_algorithm_2(shape, axis, dtype):
  x, params, state, _ = make_inputs(shape, axis, dtype)
  y, new_state = apply_jit(params, state, x, training=False, axis=axis)
  assert y.dtype == dtype
  assert_close(y, np_eval(x, params.scale, params.bias, state.mean,
                          state.var, axis, 1e-5), Y_TOL[dtype])
  _, same_state = bn_jax.apply(params, state, x, training=False, axis=axis)
  assert same_state is state  # evaluation returns the state untouched
  chex.assert_trees_all_equal(new_state, state)


@pytest.mark.parametrize("unbiased", [False, True])
def test_running_var_bias_correction(unbiased):
  shape, axis = (4, 5, 6, 3), -1
  x, params, state, _ = make_inputs(shape, axis)
  _, new_state = apply_jit(params, state, x, training=True, axis=axis,
                           momentum=0.8, unbiased_running_var=unbiased)
  _, mu, var, m = np_train(x, params.scale, params.bias, axis, 1e-5)
  if unbiased:  # Algorithm 2, step 10: Var[x] = m / (m - 1) E[var_B]
    var = var * m / (m - 1)
  assert_close(new_state.mean, np_running(state.mean, mu, 0.8), 1e-5)
  assert_close(new_state.var, np_running(state.var, var, 0.8), 1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_momentum_none_is_exact_cumulative_average(unbiased):
  shape, axis = (32, 8), -1
  _, params, state, _ = make_inputs(shape, axis)
  means, variances = [], []
  for seed in range(4):
    x = make_inputs(shape, axis, seed=seed + 1)[0] * (seed + 1)
    _, state = apply_jit(params, state, x, training=True, axis=axis,
                         momentum=None, unbiased_running_var=unbiased)
    _, mu, var, m = np_train(x, params.scale, params.bias, axis, 1e-5)
    means.append(mu)
    variances.append(var * m / (m - 1) if unbiased else var)
  assert state.count == 4
  assert_close(state.mean, np.mean(means, axis=0), 1e-5)
  assert_close(state.var, np.mean(variances, axis=0), 1e-5)


@pytest.mark.parametrize("use_scale,use_bias",
                         [(False, True), (True, False), (False, False)])
def test_without_scale_or_bias(use_scale, use_bias):
  shape, axis = (4, 5, 6, 3), -1
  x, _, state, dy = make_inputs(shape, axis)
  params, _ = bn_jax.init(3, use_scale=use_scale, use_bias=use_bias)
  assert (params.scale is None) != use_scale
  assert (params.bias is None) != use_bias
  gamma, beta = np.ones(3), np.zeros(3)
  y, _ = apply_jit(params, state, x, training=True)
  assert_close(y, np_train(x, gamma, beta, axis, 1e-5)[0], 2e-5)
  y, _ = apply_jit(params, state, x, training=False)
  assert_close(y, np_eval(x, gamma, beta, state.mean, state.var, axis, 1e-5),
               2e-5)
  dx, _, _ = np_backward(dy, x, gamma, axis, 1e-5)
  loss = lambda x: jnp.vdot(bn_jax.apply(params, state, x,
                                         training=True)[0], dy)
  assert_close(jax.jit(jax.grad(loss))(x), dx, 1e-4)


@pytest.mark.parametrize("stats_method,grad", helpers.slow_except(
    [("shifted", "paper_jvp"), ("shifted", "autodiff"),
     ("two_pass", "paper_jvp"), ("one_pass", "paper_jvp")],
    lambda s, g: s == "shifted" and g == "paper_jvp"))
def test_mask_ignores_padding(stats_method, grad):
  # The first and last rows are padding (and hold values far off the data),
  # so the references (first and last example) are padded too.
  shape, axis = (8, 4), -1
  x, params, state, dy = make_inputs(shape, axis)
  x = x.at[0].set(100.0).at[-1].set(-50.0)
  valid = np.array([False] + [True] * 6 + [False])
  kwargs = dict(training=True, stats_method=stats_method, grad=grad)

  def loss(x, params, mask):
    y, new_state = bn_jax.apply(params, state, x, mask=mask, **kwargs)
    return jnp.vdot(y[1:-1] if mask is not None else y, dy[1:-1]), (
        y, new_state)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (dx, dparams), (y, new_state) = grad(x, params, valid[:, None])
  (dx_ref, dparams_ref), (y_ref, state_ref) = grad(x[1:-1], params, None)
  chex.assert_trees_all_close(new_state, state_ref, rtol=1e-5, atol=1e-6)
  assert_close(y[1:-1], y_ref, 1e-5)
  assert_close(dx[1:-1], dx_ref, 1e-5)
  chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-5, atol=1e-5)
  # Padding gets no gradient through the statistics, only its own y.
  assert_close(dx[np.array([0, -1])], 0.0, 1e-6)


@pytest.mark.parametrize("stats_method", ["shifted", "two_pass"])
def test_mask_with_large_offset_stays_accurate(stats_method):
  """Trailing padding (the usual layout) must not cost the stable methods
  their accuracy when |mean| >> std: no padded value may serve as a shift."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(1e4 + rng.standard_normal((512, 16)), jnp.float32)
  x = x.at[-10:].set(0.0)
  valid = (np.arange(512) < 502)[:, None]
  y, new_state = bn_jax.apply(*bn_jax.init(16), x, training=True,
                              mask=valid, momentum=0.0,
                              stats_method=stats_method)
  expected = np.asarray(x[:502], np.float64).var(0)
  assert_close(new_state.var, expected, 1e-3)
  assert_close(np.asarray(y[:502], np.float64).var(0), 1.0, 1e-3)


# ----------------------------------------------------------------------------
# Numerics.


@pytest.mark.parametrize("stats_method", ["shifted", "two_pass"])
def test_large_offset_normalizes_to_unit_variance(stats_method):
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.standard_normal((512, 16)), jnp.float32)
  params, state = bn_jax.init(16)
  y, new_state = apply_jit(params, state, x, training=True, momentum=0.0,
                           stats_method=stats_method)
  y = np.asarray(y, np.float64)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(y.var(0), 1.0, atol=1e-3)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(new_state.var, x64.var(0), rtol=1e-3)
  np.testing.assert_allclose(new_state.mean, x64.mean(0), rtol=0, atol=1e-3)


@pytest.mark.parametrize("stats_method", STATS_METHODS)
def test_variance_never_negative(stats_method):
  # Constant features, large and small: the variance is 0 (the one-pass
  # formula may round to a small positive value), never negative, and y is
  # finite.
  x = jnp.broadcast_to(jnp.array([1e4, -3.0, 0.1, 7e3], jnp.float32),
                       (64, 4))
  params = bn_jax.BNParams(scale=jnp.ones(4), bias=jnp.arange(4.0))
  _, state = bn_jax.init(4)
  y, new_state = apply_jit(params, state, x, training=True, momentum=0.0,
                           stats_method=stats_method)
  assert np.all(np.asarray(new_state.var) >= 0)
  assert np.all(np.isfinite(np.asarray(y)))
  if stats_method == "shifted":
    np.testing.assert_array_equal(new_state.var, 0.0)
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(4.0), y.shape))
  # Random data with |mean| >> std, where E[x^2] - E[x]^2 cancels.
  rng = np.random.default_rng(1)
  x = jnp.asarray(3e4 + 1e-2 * rng.standard_normal((64, 4)), jnp.float32)
  _, new_state = apply_jit(params, state, x, training=True, momentum=0.0,
                           stats_method=stats_method)
  assert np.all(np.asarray(new_state.var) >= 0)


# ----------------------------------------------------------------------------
# Gradients: analytic (default) vs autodiff vs finite differences vs paper.


@pytest.mark.parametrize("shape,axis,dtype", helpers.slow_except(
    [c + (jnp.float32,) for c in CASES] + [CASES[1] + (jnp.bfloat16,),
                                           CASES[2] + (jnp.bfloat16,)],
    lambda shape, axis, dtype: shape == CASES[2][0] and dtype == jnp.float32,
    ids=CASE_IDS + ["nhwc-bfloat16", "axes13-bfloat16"]))
def test_grad_analytic_autodiff_and_paper_agree(shape, axis, dtype):
  """The VJP of apply (every grad mode, both impls) and
  batch_norm_backward all equal Section 3's backward pass."""
  x, params, state, dy = make_inputs(shape, axis, dtype)
  _, red = np_axes(x.ndim, axis)
  paper = np_backward(dy, x, params.scale, axis, 1e-5)
  _, mu, var, _ = np_train(x, params.scale, params.bias, axis, 1e-5)
  mean, inv_std, gamma = (jnp.asarray(np_expand(v, x, axis), jnp.float32)
                          for v in (mu, 1 / np.sqrt(var + 1e-5), params.scale))

  @jax.jit
  def grads(x, params, dy):
    def vjp(grad, impl):
      forward = lambda x, params: bn_jax.apply(
          params, state, x, training=True, axis=axis, grad=grad,
          impl=impl)[0]
      dx, dparams = jax.vjp(forward, x, params)[1](dy)
      return dx, dparams.scale, dparams.bias
    closed_form = bn_jax.batch_norm_backward(dy, x, mean, inv_std, gamma,
                                             red)
    return [vjp(g, i) for g in GRAD_MODES for i in IMPLS] + [closed_form]

  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  for dx, dgamma, dbeta in grads(x, params, dy):
    assert dx.dtype == dtype and dgamma.dtype == jnp.float32
    scale = np.abs(paper[0]).max()  # dx in x's dtype: relative to its size
    assert_close(np.asarray(dx, np.float64) / scale, paper[0] / scale, tol)
    assert_close(dgamma.reshape(paper[1].shape), paper[1], tol)
    assert_close(dbeta.reshape(paper[2].shape), paper[2], tol)


# Small shapes: finite differences evaluate the function many times.
FD_CASES = [((6, 3), -1), ((2, 3, 2, 2), -1), ((2, 3, 2, 2), (1, 3)),
            ((5, 4), 0)]


# Second order (rev over rev) for the two feature axes.
FD_ORDERS = [1, 1, 2, 1]


@pytest.mark.parametrize("shape,axis,grad,order", helpers.slow_except(
    [c + ("paper_jvp", o) for c, o in zip(FD_CASES, FD_ORDERS)]
    + [FD_CASES[1] + ("autodiff", 1), FD_CASES[0] + ("paper_vjp", 2),
       FD_CASES[2] + ("paper_vjp", 1)],
    lambda shape, axis, grad, order: grad == "paper_vjp" and order == 2,
    ids=CASE_IDS + ["nhwc-autodiff", "dense-vjp", "axes13-vjp"]))
def test_grad_finite_differences(shape, axis, grad, order):
  with jax.enable_x64(True):
    x, params, state, dy = make_inputs(shape, axis, jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    def f(x, scale, bias):
      y, _ = bn_jax.apply(bn_jax.BNParams(scale, bias), state, x,
                          training=True, axis=axis, grad=grad)
      return jnp.sum(y * dy + 0.1 * jnp.sin(y))
    args = (x, params.scale, params.bias)
    f = jax.jit(f)  # the checks evaluate f and its derivatives many times
    check_grads(f, args, order=order, modes=["rev"], atol=1e-5, rtol=1e-5)
    if grad != "paper_vjp":  # a custom VJP has no forward mode
      check_grads(f, args, order=1, modes=["fwd"], atol=1e-5, rtol=1e-5)


def test_grad_finite_differences_named_axis():
  """grad(vmap(f, axis_name)): the statistics span 3 groups of 4."""
  with jax.enable_x64(True):
    x, params, state, dy = make_inputs((12, 3), -1, jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    def f(x, scale, bias):
      def local(x, dy):
        y, _ = bn_jax.apply(bn_jax.BNParams(scale, bias), state, x,
                            training=True, axis_name="batch")
        return jnp.sum(y * dy + 0.1 * jnp.sin(y))
      return jax.vmap(local, axis_name="batch")(
          x.reshape(3, 4, 3), dy.reshape(3, 4, 3)).sum()
    check_grads(jax.jit(f), (x, params.scale, params.bias), order=1,
                modes=["rev"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Second and higher derivatives: every stats_method x grad mode x impl.


def np_grad(x, gamma, beta, dy, axis, eps):
  """(dx, dgamma, dbeta) of f = sum(y * dy + 0.1 sin(y)) in NumPy: the
  paper's backward pass for the cotangent df/dy = dy + 0.1 cos(y)."""
  y = np_train(x, gamma, beta, axis, eps)[0]
  return np_backward(dy + 0.1 * np.cos(y), np.asarray(x, np.float64), gamma,
                     axis, eps)


def np_hvp(args, direction, dy, axis, eps, h=1e-5):
  """Hessian of f times `direction`: central differences of np_grad."""
  at = lambda t: np_grad(*(np.asarray(a, np.float64) + t * np.asarray(d)
                           for a, d in zip(args, direction)), dy, axis, eps)
  return [(p - m) / (2 * h) for p, m in zip(at(h), at(-h))]


def bn_loss(state, dy, axis, **options):
  """f(x, gamma, beta) = sum(y * dy + 0.1 sin(y)), training mode."""
  def f(x, scale, bias):
    y, _ = bn_jax.apply(bn_jax.BNParams(scale, bias), state, x,
                        training=True, axis=axis, **options)
    return jnp.sum(y * dy + 0.1 * jnp.sin(y))
  return f


def float64_args_and_direction(shape, axis, seed):
  """(x, scale, bias) in float64, a random direction of the same shapes, the
  state and dy: the point and direction of a higher-order check. Call under
  jax.enable_x64(True)."""
  x, params, state, dy = make_inputs(shape, axis, jnp.float64)
  args = (x,) + tuple(p.astype(jnp.float64) for p in params)
  rng = np.random.default_rng(seed)
  direction = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
  return args, direction, state, dy


SECOND_ORDER = [(s, g, i) for s in STATS_METHODS for g in GRAD_MODES
                for i in IMPLS]


@pytest.mark.parametrize("stats_method,grad,impl", helpers.slow_except(
    SECOND_ORDER,
    lambda s, g, i: s == "two_pass" and g == "paper_jvp" and i == "xla_cpu"))
def test_second_derivatives_match_paper(stats_method, grad, impl):
  """Hessian-vector products in float64 against central differences of the
  NumPy backward pass: reverse-over-reverse and forward-over-reverse in
  every mode, and the second directional derivative by forward-over-forward
  where the mode has a forward mode ("paper_vjp", a custom VJP, raises).

  A two_pass variance that centres on the mean as a constant and drops the
  zero correction m (mean - c)^2 has the right first derivatives but the
  Hessian 2 delta_ij / m instead of 2 (delta_ij - 1/m) / m: it fails here.
  """
  shape, axis, eps = (4, 2, 2, 3), -1, 1e-5
  with jax.enable_x64(True):
    args, direction, state, dy = float64_args_and_direction(shape, axis, 7)
    expected = np_hvp(args, direction, dy, axis, eps)
    f = bn_loss(state, dy, axis, epsilon=eps, stats_method=stats_method,
                grad=grad, impl=impl)
    gradient = jax.grad(f, argnums=(0, 1, 2))
    # The Hessian is symmetric: the VJP of the gradient is H @ direction.
    rev_rev = jax.vjp(gradient, *args)[1](direction)
    fwd_rev = jax.jvp(gradient, args, direction)[1]
    for hvp in (rev_rev, fwd_rev):
      for actual, want in zip(hvp, expected):
        assert_close(actual, want, 1e-6)

    vhv = sum(np.vdot(d, e) for d, e in zip(direction, expected))
    along = lambda *a: jax.jvp(f, a, direction)[1]
    if grad == "paper_vjp":  # no forward mode over a custom VJP
      with pytest.raises(TypeError, match="custom_vjp"):
        along(*args)
    else:
      assert_close(jax.jvp(along, args, direction)[1], vhv, 1e-6)


# Every mode with two_pass (the one with a correction term), the default
# mode with the others.
THIRD_ORDER = [("two_pass", g) for g in GRAD_MODES] + [
    ("shifted", "paper_jvp"), ("one_pass", "paper_jvp")]


@pytest.mark.slow  # second order (above) is the quick check
@pytest.mark.parametrize("stats_method,grad", THIRD_ORDER,
                         ids=["-".join(c) for c in THIRD_ORDER])
def test_third_derivatives_match_paper(stats_method, grad):
  """The third directional derivative d^3/dt^3 f(args + t v) (reverse mode
  three times, so every grad mode) against the second central difference
  of v . grad f from the NumPy backward pass. With "paper_vjp" this is
  where the variance's Hessian first enters (through the residuals)."""
  shape, axis, eps, h = (8, 3), -1, 1e-5, 1e-3
  with jax.enable_x64(True):
    args, direction, state, dy = float64_args_and_direction(shape, axis, 8)
    along = lambda t: sum(np.vdot(d, g) for d, g in zip(direction, np_grad(
        *(np.asarray(a) + t * np.asarray(d) for a, d in zip(args, direction)),
        dy, axis, eps)))
    expected = (along(h) - 2 * along(0.0) + along(-h)) / h**2
    f = bn_loss(state, dy, axis, epsilon=eps, stats_method=stats_method,
                grad=grad)
    dot = lambda u, v: sum(jnp.vdot(a, b) for a, b in zip(u, v))
    # v . H(args) v, then its gradient (H is symmetric: vjp = H v).
    vhv = lambda *a: dot(direction, jax.vjp(jax.grad(f, argnums=(0, 1, 2)),
                                            *a)[1](direction))
    third = dot(direction, jax.grad(vhv, argnums=(0, 1, 2))(*args))
    assert_close(third, expected, 1e-5 * max(1.0, abs(expected)))


@pytest.mark.parametrize("stats_method,impl,masked", helpers.slow_except(
    [(s, i, m) for s in STATS_METHODS for i in IMPLS for m in (False, True)],
    lambda s, i, m: s == "two_pass" and i == "xla_cpu"))
def test_variance_hessian_closed_form(stats_method, impl, masked):
  """d^2 var_f / dx_if dx_jf = 2 (delta_ij - 1/m) / m over a feature's m
  (valid) values, zero across features and for padding, by forward-over-
  reverse and reverse-over-reverse. (Centred on the mean as a constant, the
  old two_pass gave 2 delta_ij / m.)"""
  n, features = 8, 3
  valid = np.array([False] + [True] * 5 + [False] * 2) if masked else (
      np.ones(n, bool))
  m = valid.sum()
  w = valid.astype(np.float64)
  block = 2 * np.outer(w, w) * (np.eye(n) - 1 / m) / m
  expected = np.zeros((features, n, features, n, features))
  for f in range(features):
    expected[f, :, f, :, f] = block
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(2 + 3 * rng.standard_normal((n, features)))
    var = lambda x: bn_jax.moments(
        x, (0,), mask=valid[:, None] if masked else None,
        stats_method=stats_method, impl=impl)[1][0]
    hessians = jax.jit(lambda x: (jax.hessian(var)(x),
                                  jax.jacrev(jax.jacrev(var))(x)))(x)
  for hessian in hessians:
    assert_close(hessian, expected, 1e-12)


def _plain_and_xla_cpu_agree(outputs):
  """outputs(impl) -> pytree, evaluated for both impls in one program."""
  xla_cpu, plain = jax.jit(lambda: [outputs(i) for i in IMPLS])()
  scale = lambda v: max(1.0, float(jnp.abs(v).max()))
  for p, c in zip(jax.tree.leaves(plain), jax.tree.leaves(xla_cpu)):
    assert p.shape == c.shape and p.dtype == c.dtype
    assert_close(p / scale(c), c / scale(c), 1e-5)


def _values_and_derivatives(loss, x, params, direction):
  """aux, the gradient and a Hessian-vector product (reverse over reverse)
  of loss(x, params) -> (scalar, aux)."""
  gradient = jax.grad(loss, argnums=(0, 1), has_aux=True)
  grads, hvp, aux = jax.vjp(gradient, x, params, has_aux=True)
  return aux, grads, hvp(direction)


@pytest.mark.parametrize("stats_method,grad", helpers.slow_except(
    [(s, g) for s in STATS_METHODS for g in GRAD_MODES],
    lambda s, g: s == "shifted" and g == "paper_jvp"))
def test_plain_matches_xla_cpu(stats_method, grad):
  """The same y, state, gradient and Hessian-vector product with either
  impl, with and without a mask (not with paper_vjp, which takes none)."""
  shape, axis = (4, 2, 2, 3), -1
  x, params, state, dy = make_inputs(shape, axis)
  x = x.at[0, 0].set(40.0)  # padding, far off, where there is a mask
  mask = np.ones(shape[:3] + (1,), bool)
  mask[0, 0] = False
  direction = (dy[::-1], jax.tree.map(lambda p: p[::-1], params))

  def outputs(impl):
    results = []
    for m in [None] if grad == "paper_vjp" else [None, mask]:
      def loss(x, params, m=m):
        y, new_state = bn_jax.apply(params, state, x, training=True,
                                    mask=m, stats_method=stats_method,
                                    grad=grad, impl=impl)
        return jnp.sum(y * dy + 0.1 * jnp.sin(y)), (y, new_state)
      results.append(_values_and_derivatives(loss, x, params, direction))
    return results
  _plain_and_xla_cpu_agree(outputs)


@pytest.mark.slow  # test_plain_matches_xla_cpu is the quick check
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_plain_matches_xla_cpu_named_axis(grad):
  """Under vmap(axis_name=...), 4 groups sharing statistics, every
  stats_method: the same y, state, gradient and Hessian-vector product
  with either impl (derivatives inside the vmap, where every mode works)."""
  x, params, state, dy = make_inputs((8, 3), -1)
  groups = lambda v: v.reshape((4, 2) + v.shape[1:])
  direction = (dy[::-1], jax.tree.map(lambda p: p[::-1], params))

  def outputs(impl):
    def local(x, dy, dx_direction, stats_method):
      def loss(x, params):
        y, new_state = bn_jax.apply(params, state, x, training=True,
                                    axis_name="batch",
                                    stats_method=stats_method, grad=grad,
                                    impl=impl)
        return jnp.sum(y * dy + 0.1 * jnp.sin(y)), (y, new_state)
      return _values_and_derivatives(loss, x, params,
                                     (dx_direction, direction[1]))
    return [jax.vmap(functools.partial(local, stats_method=s),
                     axis_name="batch")(groups(x), groups(dy),
                                        groups(direction[0]))
            for s in STATS_METHODS]
  _plain_and_xla_cpu_agree(outputs)


def test_plain_is_free_of_xla_cpu_devices():
  """impl="plain" writes the forward and backward passes without the
  optimization barriers and the stacked per-feature reductions that
  "xla_cpu" adds (both checked present there, so the check can fail)."""
  x, params, state, dy = make_inputs((8, 3), -1, jnp.bfloat16)

  def program(impl, grad):
    loss = lambda x, params: jnp.vdot(bn_jax.apply(
        params, state, x, training=True, grad=grad, impl=impl)[0], dy)
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, params))
  # The second: a per-feature (1, 3) vector stacked with zeros.
  for grad in GRAD_MODES:
    for device in ("optimization_barrier", "[2,1,3]"):
      assert device in program("xla_cpu", grad), (grad, device)
      assert device not in program("plain", grad), (grad, device)


# ----------------------------------------------------------------------------
# Named axes (synchronized BN) and unnamed ensembles.


@pytest.mark.parametrize("shape,axis,grad", helpers.slow_except(
    [CASES[0] + ("paper_jvp",), CASES[1] + ("paper_jvp",),
     CASES[0] + ("autodiff",), CASES[1] + ("paper_vjp",)],
    lambda shape, axis, grad: len(shape) == 4 and grad == "paper_jvp",
    ids=["dense", "nhwc", "dense-autodiff", "nhwc-vjp"]))
def test_named_axis_equals_one_batch(shape, axis, grad):
  """Split into 4 groups over a named axis: same state and gradients as one
  batch, with grad outside the vmap (jit around either) and inside it."""
  x, params, state, dy = make_inputs(shape, axis)
  groups = lambda v: v.reshape((4, -1) + v.shape[1:])

  def loss(params, x, dy, **kwargs):
    y, new_state = bn_jax.apply(params, state, x, training=True, axis=axis,
                                grad=grad, **kwargs)
    return jnp.sum(y * dy + 0.1 * jnp.sin(y)), new_state
  grad_of = functools.partial(jax.grad, argnums=(0, 1), has_aux=True)
  (dparams_ref, dx_ref), state_ref = jax.jit(grad_of(loss))(params, x, dy)

  named = functools.partial(loss, axis_name="batch")
  def total(params, x, dy):
    losses, states = jax.vmap(named, (None, 0, 0), axis_name="batch")(
        params, x, dy)
    return losses.sum(), states
  # jit outside grad, and inside it (JAX traces custom rules lazily, so a
  # collective inside one would fail there with "unbound axis name").
  # The custom VJP's backward pass runs outside the vmap's axis scope, so
  # with it only the gradient inside the vmap (below) is supported.
  nestings = [] if grad == "paper_vjp" else [jax.jit(grad_of(total))]
  if grad == "paper_jvp":  # plain autodiff is JAX's own: one nesting
    nestings.append(grad_of(jax.jit(total)))
  for grad_total in nestings:
    (dparams, dx), states = grad_total(params, groups(x), groups(dy))
    chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-4, atol=1e-4)
    assert_close(dx.reshape(x.shape), dx_ref, 1e-4)
    for i in range(4):  # every group holds the statistics of all groups
      chex.assert_trees_all_close(jax.tree.map(lambda s: s[i], states),
                                  state_ref, rtol=1e-5, atol=1e-6)

  if grad == "autodiff":
    return
  per_group = jax.jit(jax.vmap(grad_of(named), (None, 0, 0),
                               axis_name="batch"))
  (dparams, dx), _ = per_group(params, groups(x), groups(dy))
  # Each group holds its own contribution to the replicated params.
  chex.assert_trees_all_close(jax.tree.map(lambda g: g.sum(0), dparams),
                              dparams_ref, rtol=1e-4, atol=1e-4)
  assert_close(dx.reshape(x.shape), dx_ref, 1e-4)


def test_batch_norm_backward_named_axis():
  x, params, state, dy = make_inputs((32, 8), -1)
  dx_ref, dgamma_ref, dbeta_ref = np_backward(dy, x, params.scale, -1, 1e-5)
  _, mu, var, _ = np_train(x, params.scale, params.bias, -1, 1e-5)
  per_feature = lambda v: jnp.asarray(v, jnp.float32)[None]
  backward = functools.partial(
      bn_jax.batch_norm_backward, mean=per_feature(mu),
      inv_std=per_feature(1 / np.sqrt(var + 1e-5)),
      scale=per_feature(params.scale), reduction_axes=(0,),
      axis_name="batch")
  dx, dgamma, dbeta = jax.vmap(backward, axis_name="batch")(
      dy.reshape(4, 8, 8), x.reshape(4, 8, 8))
  assert_close(dx.reshape(x.shape), dx_ref, 1e-4)
  assert_close(dgamma.sum(0)[0], dgamma_ref, 1e-4)
  assert_close(dbeta.sum(0)[0], dbeta_ref, 1e-4)


def test_ensemble_keeps_statistics_per_member():
  """vmap over an unnamed axis: K members, each with its own params, state
  and data, are K independent batch norms."""
  members, shape = 3, (16, 4)
  inputs = [make_inputs(shape, -1, seed=k) for k in range(members)]
  stack = lambda trees: jax.tree.map(lambda *v: jnp.stack(v), *trees)
  x, params, state = (stack([i[j] for i in inputs]) for j in range(3))
  step = jax.jit(jax.vmap(functools.partial(bn_jax.apply, training=True)))
  y, new_state = step(params, state, x)
  assert new_state.mean.shape == new_state.var.shape == (members, 4)
  assert new_state.count.shape == (members,)
  for k, (xk, pk, sk, _) in enumerate(inputs):
    yk, state_k = apply_jit(pk, sk, xk, training=True)
    assert_close(y[k], yk, 1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[k], new_state),
                                state_k, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_pmap_and_shard_map_in_subprocess():
  """4 forced CPU devices (JAX fixes the device count at start-up): pmap,
  and grad outside shard_map, equal one batch, with the default gradient
  and with grad="paper_vjp", each with both impls; index groups normalize
  each group on its own. (tests/test_parallel.py
  checks shard_map with the gradient inside on 8 devices.)"""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      import bn_jax
      assert jax.device_count() == 4
      rng = np.random.default_rng(0)
      x = jnp.asarray(2 + 3 * rng.standard_normal((16, 5)), jnp.float32)
      dy = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
      params = bn_jax.BNParams(jnp.linspace(0.5, 1.5, 5), jnp.arange(5.0))
      _, state = bn_jax.init(5)
      def loss(params, x, dy, **kw):
        y, _ = bn_jax.apply(params, state, x, training=True, **kw)
        return jnp.sum(y * dy + 0.1 * jnp.sin(y))
      grad = jax.grad(loss, argnums=(0, 1))
      ref = grad(params, x, dy)
      close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                      atol=1e-4)
      # The default and the literal custom VJP, each with both impls.
      for kw in [dict(grad=g, impl=i) for g in ("paper_jvp", "paper_vjp")
                 for i in ("xla_cpu", "plain")]:
        g = jax.pmap(
            lambda p, x, dy: grad(p, x, dy, axis_name="i", **kw),
            axis_name="i", in_axes=(None, 0, 0))(
                params, x.reshape(4, 4, 5), dy.reshape(4, 4, 5))
        close(g[0].scale.sum(0), ref[0].scale)
        close(g[1].reshape(16, 5), ref[1])
        mesh = jax.make_mesh((4,), ("d",))
        rows = NamedSharding(mesh, P("d"))
        xs, dys = jax.device_put(x, rows), jax.device_put(dy, rows)
        ps = jax.device_put(params, NamedSharding(mesh, P()))
        total = jax.shard_map(
            lambda p, x, dy: jax.lax.psum(
                loss(p, x, dy, axis_name="d", **kw), "d"),
            mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P())
        g = jax.jit(jax.grad(total, argnums=(0, 1)))(ps, xs, dys)
        close(g[0].scale, ref[0].scale)
        close(g[1], ref[1])
      # axis_index_groups: devices {0, 1} and {2, 3} are two separate
      # batches; each half equals plain BN on its 8 rows.
      y = jax.pmap(lambda x: bn_jax.apply(
          params, state, x, training=True, axis_name="i",
          axis_index_groups=[[0, 1], [2, 3]])[0], axis_name="i")(
              x.reshape(4, 4, 5)).reshape(16, 5)
      for half in (slice(0, 8), slice(8, 16)):
        close(y[half], bn_jax.apply(params, state, x[half],
                                    training=True)[0])
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env,
                          cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ----------------------------------------------------------------------------
# Tracing, errors, folding.


def test_jitted_apply_traces_once():
  x, params, state, _ = make_inputs((32, 8), -1)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, x):
    return bn_jax.apply(params, state, x, training=True)

  for i in range(3):  # threading the state must not change its types
    _, state = step(params, state, x + i)
  assert state.count == 3


@pytest.mark.parametrize("call,message", [
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((1, 4)), training=True),
     "at least 2 values per feature"),
    (lambda: bn_jax.apply(bn_jax.init(3)[0], bn_jax.init(4)[1],
                          jnp.ones((8, 4)), training=True),
     r"params.scale has shape \(3,\)"),
    (lambda: bn_jax.apply(bn_jax.init(4)[0], bn_jax.init(5)[1],
                          jnp.ones((8, 4)), training=False),
     r"state.mean has shape \(5,\)"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          momentum=1.5), "momentum=1.5 is outside"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          momentum=-0.1), "PyTorch momentum"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          epsilon=0.0), "epsilon=0.0 must be > 0"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          epsilon=-1e-5), "must be > 0"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          axis=2), "axis 2 is out of range"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          axis=(1, -1)), "same dimension twice"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          stats_method="welford"), "stats_method='welford'"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          grad="fast"),
     r"^grad='fast'; choose one of \('paper_jvp', 'paper_vjp', 'autodiff'\)"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          grad=True), r"^grad=True; choose one of"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=False,
                          grad="vjp"), r"^grad='vjp'; choose one of"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          impl="gpu"),
     r"^impl='gpu'; choose one of \('auto', 'xla_cpu', 'plain'\)"),
    (lambda: bn_jax.moments(jnp.ones((8, 4)), (0,), impl="cuda"),
     r"^impl='cuda'; choose one of"),
    (lambda: bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                          grad="paper_vjp", mask=jnp.ones((8, 1), bool)),
     "grad='paper_vjp' does not take a mask"),
], ids=["one-value", "params-shape", "state-shape", "momentum-high",
        "momentum-low", "epsilon-zero", "epsilon-negative", "axis-range",
        "axis-twice", "stats-method", "grad-mode", "grad-old-bool",
        "grad-eval", "impl", "moments-impl", "vjp-mask"])
def test_errors_are_helpful(call, message):
  with pytest.raises(ValueError, match=message) as error:
    call()
  assert "\n" not in str(error.value)  # one line


FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # its smallest normal


def _epsilon_users():
  """(name, f(epsilon)) for every layer and function of bn_jax that takes
  an epsilon: each builds (and, for linen modules, initializes or calls)
  it on a small batch."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x, x4 = jnp.ones((8, 4)).at[0].set(2.0), jnp.ones((2, 3, 3, 4))
  sequences = jnp.ones((2, 2, 4))  # (batch, time, features)
  key, rngs = jax.random.key(0), lambda: nnx.Rngs(0)
  linen = lambda module, x=x: lambda e: module(epsilon=e).init(key, x)
  function = lambda f, **kw: lambda e: f(x4, *bn_jax.norms.init(4),
                                         epsilon=e, **kw)
  return [
      ("core.apply", lambda e: bn_jax.apply(*bn_jax.init(4), x,
                                            training=True, epsilon=e)),
      ("core.apply-eval", lambda e: bn_jax.apply(*bn_jax.init(4), x,
                                                 training=False, epsilon=e)),
      ("fold_into_preceding", lambda e: bn_jax.fold_into_preceding(
          jnp.ones((3, 4)), None, *bn_jax.init(4), epsilon=e)),
      ("nn.BatchNorm", lambda e: bn_jax.nn.BatchNorm(
          epsilon=e, use_running_average=False).init(key, x)),
      ("nn.BatchNorm-renorm", lambda e: bn_jax.nn.BatchNorm(
          epsilon=e, renorm=True).init(key, x, use_running_average=False)),
      ("nn.LayerNorm", linen(bn_jax.nn.LayerNorm)),
      ("nn.RMSNorm", linen(bn_jax.nn.RMSNorm)),
      ("nn.GroupNorm", linen(functools.partial(bn_jax.nn.GroupNorm,
                                               num_groups=2))),
      ("nn.InstanceNorm", linen(bn_jax.nn.InstanceNorm, x4)),
      ("norms.layer_norm", function(bn_jax.norms.layer_norm)),
      ("norms.rms_norm", lambda e: bn_jax.norms.rms_norm(
          x4, bn_jax.norms.init(4)[0], epsilon=e)),
      ("norms.group_norm", function(bn_jax.norms.group_norm, num_groups=2)),
      ("norms.instance_norm", function(bn_jax.norms.instance_norm)),
      ("nnx.BatchNorm", lambda e: bn_jax.nnx.BatchNorm(4, epsilon=e,
                                                       rngs=rngs())),
      ("nnx.LayerNorm", lambda e: bn_jax.nnx.LayerNorm(4, epsilon=e,
                                                       rngs=rngs())),
      ("nnx.RMSNorm", lambda e: bn_jax.nnx.RMSNorm(4, epsilon=e,
                                                   rngs=rngs())),
      ("nnx.GroupNorm", lambda e: bn_jax.nnx.GroupNorm(4, num_groups=2,
                                                       epsilon=e,
                                                       rngs=rngs())),
      ("nnx.InstanceNorm", lambda e: bn_jax.nnx.InstanceNorm(
          4, epsilon=e, rngs=rngs())),
      ("recurrent.LSTM-batch", lambda e: bn_jax.recurrent.LSTM(
          3, norm="batch", t_max=2, epsilon=e).init(key, sequences,
                                                    train=True)),
      ("recurrent.LSTM-layer", lambda e: bn_jax.recurrent.LSTM(
          3, norm="layer", epsilon=e).init(key, sequences, train=True)),
  ]


@pytest.mark.parametrize("epsilon", [
    1e-45, FLOAT32_TINY / 2, np.float32(1e-40), np.asarray(1e-39),
    float("inf"), float("nan"), 1e39, 0.0, -1e-5],
    ids=["denormal", "below-tiny", "np-float32", "np-0d", "inf", "nan",
         "above-float32", "zero", "negative"])
def test_an_unusable_epsilon_is_rejected_by_every_user(epsilon):
  """A subnormal epsilon is flushed to 0 on XLA:CPU and GPUs, so a constant
  feature would be divided by sqrt(0); every layer and function rejects it
  (and NaN, inf, <= 0) in one line, naming float32's smallest normal."""
  for name, use in _epsilon_users():
    with pytest.raises(ValueError, match="must be > 0, finite") as error:
      use(epsilon)
    message = str(error.value)
    assert "\n" not in message and "1.1754944e-38" in message, (name,
                                                                message)


def test_the_smallest_normal_epsilon_is_accepted_traced_ones_unchecked():
  """float32's smallest normal number is accepted (and keeps a constant
  feature finite); a traced epsilon (a vmapped sweep) is not checked."""
  for name, use in _epsilon_users():
    use(FLOAT32_TINY)
  y, _ = bn_jax.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True,
                      epsilon=FLOAT32_TINY)
  assert np.isfinite(np.asarray(y)).all()
  swept = jax.vmap(lambda e: bn_jax.apply(
      *bn_jax.init(4), jnp.ones((8, 4)).at[0].set(2.0), training=True,
      epsilon=e)[0])(jnp.asarray([1e-3, 1e-5]))
  assert swept.shape == (2, 8, 4) and np.isfinite(np.asarray(swept)).all()


def test_mode_names_are_exported():
  assert bn_jax.GRAD_MODES == tuple(GRAD_MODES)
  assert bn_jax.IMPLS == tuple(IMPLS)


def _trained_bn(features, seed=0):
  """Params and running stats as after training, not the identity."""
  return random_bn(np.random.default_rng(seed), features, count=10)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_dense(with_bias):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(4), jnp.float32) if with_bias else None
  params, state = _trained_bn(4)
  dense = x @ kernel + (0.0 if bias is None else bias[None])
  expected, _ = bn_jax.apply(params, state, dense, training=False,
                             epsilon=1e-3)
  kernel2, bias2 = bn_jax.fold_into_preceding(kernel, bias, params, state,
                                              epsilon=1e-3)
  assert_close(x @ kernel2 + bias2[None], expected, 1e-5)


def test_fold_into_flax_conv():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
  conv = nn.Conv(features=4, kernel_size=(3, 3))
  variables = jax.jit(conv.init)(jax.random.key(0), x)
  params, state = _trained_bn(4)

  @jax.jit
  def unfolded_and_folded(variables, x):
    expected, _ = bn_jax.apply(params, state, conv.apply(variables, x),
                               training=False)
    kernel, bias = bn_jax.fold_into_preceding(
        variables["params"]["kernel"], variables["params"]["bias"], params,
        state, epsilon=1e-5)
    assert kernel.shape == (3, 3, 3, 4)
    return expected, conv.apply({"params": {"kernel": kernel, "bias": bias}},
                                x)
  expected, folded = unfolded_and_folded(variables, x)
  assert_close(folded, expected, 1e-5)


def test_fold_requires_epsilon():
  """No default: a BN trained with Keras' 1e-3 must not be folded with
  1e-5 by omission."""
  params, state = _trained_bn(4)
  kernel = jnp.ones((5, 4))
  fold = bn_jax.fold_into_preceding
  with pytest.raises(TypeError, match="epsilon"):
    fold(kernel, None, params, state)
  with pytest.raises(TypeError):  # keyword only
    fold(kernel, None, params, state, 1e-3)
  with pytest.raises(ValueError, match="epsilon=0.0 must be > 0"):
    bn_jax.fold_into_preceding(kernel, None, params, state, epsilon=0.0)
