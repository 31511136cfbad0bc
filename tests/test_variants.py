"""Tests for the variants of training-mode BN in bn_jax.core and bn_jax.nn.

Batch renormalization against Keras's `BatchNormalization(renorm=True)`
step by step, against batch norm itself at the limits r = 1, d = 0 (bit for
bit), and against a short jnp formula with r and d held constant; ghost
batches against batch norm on each chunk separately and, on 8 forced CPU
devices (a subprocess), against per-device statistics averaged over
devices; sampled statistics against a NumPy formula on the subset; the
linen module's init against flax's, and its capture of batch moments.

This file is also the subprocess's script: `python tests/test_variants.py`
runs `check_ghost_batches_are_per_device_bn` on 8 devices and prints "ok".
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
import helpers
from bn_jax import core
from bn_jax import nn as bn_nn

GRADS_AND_IMPLS = [(g, i) for g in core.GRAD_MODES for i in core.IMPLS]


def assert_trees_equal(actual, expected):
  chex.assert_trees_all_equal_structs(actual, expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def assert_trees_close(actual, expected, tol=1e-5):
  chex.assert_trees_all_equal_structs(actual, expected)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=tol,
      atol=tol), actual, expected)


def random_bn(rng, features, *, renorm=False, count=0):
  """Params and state away from the identity, renorm fields if asked."""
  params = bn_jax.BNParams(
      scale=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
      bias=jnp.asarray(rng.standard_normal(features), jnp.float32))
  state = bn_jax.BNState(
      mean=jnp.asarray(rng.standard_normal(features), jnp.float32),
      var=jnp.asarray(rng.uniform(0.5, 3.0, features), jnp.float32),
      count=jnp.asarray(count, jnp.int32))
  if renorm:
    state = state._replace(
        renorm_mean=jnp.asarray(rng.standard_normal(features), jnp.float32),
        renorm_stddev=jnp.asarray(rng.uniform(0.5, 2.0, features),
                                  jnp.float32))
  return params, state


def random_x(rng, shape, offset=1.0, spread=2.0):
  return jnp.asarray(offset + spread * rng.standard_normal(shape),
                     jnp.float32)


def bn_vjp(params, state, x, dy, **options):
  """(y, new_state, (dparams, dx)) of training-mode BN for cotangent dy."""
  def forward(params, x):
    return bn_jax.apply(params, state, x, training=True, **options)
  y, vjp, new_state = jax.vjp(forward, params, x, has_aux=True)
  return y, new_state, vjp(dy)


# ----------------------------------------------------------------------------
# Batch renormalization.


def renorm_reference(params, x, renorm_mean, renorm_stddev, limits, epsilon,
                     *, constant_corrections):
  """y of batch renorm written out (Ioffe, 2017, Algorithm 1), features
  last; r and d differentiated unless `constant_corrections`."""
  rmin, rmax, dmax = limits
  axes = tuple(range(x.ndim - 1))
  per_feature = lambda v: v.reshape((1,) * (x.ndim - 1) + (-1,))
  mu = jnp.mean(x, axes, keepdims=True)
  sigma_b = jnp.sqrt(jnp.mean(jnp.square(x - mu), axes, keepdims=True)
                     + epsilon)
  sigma = jnp.maximum(per_feature(renorm_stddev), jnp.sqrt(epsilon))
  r = jnp.clip(sigma_b / sigma, rmin, rmax)
  d = jnp.clip((mu - per_feature(renorm_mean)) / sigma, -dmax, dmax)
  if constant_corrections:
    r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
  return (((x - mu) / sigma_b * r + d) * per_feature(params.scale)
          + per_feature(params.bias))


@pytest.mark.parametrize("grad,impl", helpers.slow_except(
    GRADS_AND_IMPLS, lambda g, i: (g, i) == ("paper_jvp", "xla_cpu")))
def test_renorm_at_unit_limits_is_batch_norm_bitwise(grad, impl):
  """rmax = 1 and dmax = 0 (rmin is then 1 / rmax = 1; as during a
  schedule's hold, see
  test_renorm_schedule_reads_the_state_count): y, the gradients, the
  running mean and the count are batch norm's bit for bit (the same code,
  with a product by 1 and a sum with 0), although the renorm statistics are
  far from the batch's. Op by op, that is: compiled, XLA:CPU contracts
  a * b + c into one fused multiply-add where its fusion decides,
  differently in the two programs (one rounding, checked too). The running
  variance is Keras's renorm update, an average of standard deviations."""
  rng = np.random.default_rng(0)
  x = random_x(rng, (6, 2, 5))
  dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  params, state = random_bn(rng, 5, renorm=True, count=3)
  options = dict(grad=grad, impl=impl, momentum=0.9, epsilon=1e-3)
  unit = {"rmax": 1.0, "dmax": 0.0}

  def run():
    return (bn_vjp(params, state, x, dy, **options),
            bn_vjp(params, state, x, dy, renorm=True,
                   renorm_clipping=tuple(unit.items()), **options))
  (y, plain, grads), (y_renorm, new_state, grads_renorm) = run()
  assert_trees_equal((y_renorm, grads_renorm), (y, grads))
  assert_trees_equal((new_state.mean, new_state.count),
                     (plain.mean, plain.count))
  (y, _, grads), (y_renorm, _, grads_renorm) = jax.jit(run)()
  assert_trees_close((y_renorm, grads_renorm), (y, grads), tol=1e-6)

  batch_mean, batch_var, _ = bn_jax.moments(x, (0, 1))
  stddev = np.sqrt(np.asarray(state.var, np.float64) + 1e-3)
  stddev = 0.9 * stddev + 0.1 * np.sqrt(
      np.asarray(batch_var, np.float64).ravel() + 1e-3)
  np.testing.assert_allclose(new_state.var, stddev**2 - 1e-3, rtol=1e-6)
  np.testing.assert_allclose(
      new_state.renorm_mean, 0.01 * np.asarray(batch_mean).ravel()
      + 0.99 * np.asarray(state.renorm_mean), rtol=1e-6)


def test_renorm_evaluation_is_running_statistics_bn():
  rng = np.random.default_rng(1)
  x = random_x(rng, (8, 5))
  params, state = random_bn(rng, 5, renorm=True)
  y, same_state = bn_jax.apply(params, state, x, training=False, renorm=True,
                               renorm_clipping={"rmax": 2.0})
  assert same_state is state
  mean, var, scale, bias = (np.asarray(v, np.float64) for v in (
      state.mean, state.var, params.scale, params.bias))
  expected = (np.asarray(x, np.float64) - mean) / np.sqrt(var + 1e-5) * (
      scale) + bias
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", helpers.slow_except(
    [(g,) for g in core.GRAD_MODES], lambda g: g == "paper_jvp",
    ids=list(core.GRAD_MODES)))
def test_renorm_corrections_carry_no_gradient(grad):
  """In float64: y is the paper's formula, and jax.grad equals the
  gradient of that formula with r and d constant, which differs from the
  one through r and d. Some features are clipped, some not."""
  rng = np.random.default_rng(2)
  clipping = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.3}
  limits = (0.8, 1.25, 0.3)
  epsilon = 1e-3
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((12, 4)), jnp.float64)
    # Renorm statistics that make r about (1 / 1.1, 1 / 0.9, 1, 3.3) and d
    # about (0.1, -0.2, 1, 0): in range for the first two features, not for
    # the last two.
    sigma_b = jnp.sqrt(jnp.var(x, 0) + epsilon)
    renorm_stddev = sigma_b * jnp.asarray([1.1, 0.9, 1.0, 0.3])
    renorm_mean = jnp.mean(x, 0) - renorm_stddev * jnp.asarray(
        [0.1, -0.2, 1.0, 0.0])
    params = bn_jax.BNParams(scale=jnp.asarray([1.5, 0.7, 1.2, 0.9]),
                             bias=jnp.asarray([0.1, -0.3, 0.2, 0.0]))
    state = bn_jax.BNState(mean=jnp.zeros(4), var=jnp.ones(4),
                           count=jnp.asarray(0, jnp.int32),
                           renorm_mean=renorm_mean,
                           renorm_stddev=renorm_stddev)
    weights = jnp.asarray(rng.standard_normal(x.shape))

    def loss(y):
      return jnp.sum(weights * y + 0.2 * jnp.sin(y))

    def ours(params, x):
      return loss(bn_jax.apply(params, state, x, training=True, renorm=True,
                               renorm_clipping=clipping, epsilon=epsilon,
                               grad=grad)[0])

    def reference(params, x, constant_corrections):
      return loss(renorm_reference(params, x, renorm_mean, renorm_stddev,
                                   limits, epsilon,
                                   constant_corrections=constant_corrections))

    @jax.jit
    def run(params, x):
      y = bn_jax.apply(params, state, x, training=True, renorm=True,
                       renorm_clipping=clipping, epsilon=epsilon,
                       grad=grad)[0]
      gradient = functools.partial(jax.grad(reference, argnums=(0, 1)),
                                   params, x)
      return (y, jax.grad(ours, argnums=(0, 1))(params, x), gradient(True),
              gradient(False))
    y, grads, constant, through = run(params, x)
    # The paper's formula in NumPy.
    xn = np.asarray(x)
    mu, sigma_b = xn.mean(0), np.sqrt(xn.var(0) + epsilon)
    r = np.clip(sigma_b / np.asarray(renorm_stddev), 0.8, 1.25)
    d = np.clip((mu - np.asarray(renorm_mean)) / np.asarray(renorm_stddev),
                -0.3, 0.3)
    raw_r = sigma_b / np.asarray(renorm_stddev)
    raw_d = (mu - np.asarray(renorm_mean)) / np.asarray(renorm_stddev)
    clipped = (r != raw_r) | (d != raw_d)
    assert clipped.tolist() == [False, False, True, True]
    np.testing.assert_allclose(
        y, ((xn - mu) / sigma_b * r + d) * np.asarray(params.scale)
        + np.asarray(params.bias), rtol=1e-12, atol=1e-12)

    assert_trees_close(grads, constant, tol=1e-10)
    assert np.abs(grads[1] - through[1]).max() > 1e-2


@pytest.mark.parametrize("clipping,expected", [
    ({"rmax": 3.0, "dmax": 5.0}, {
        0: (1.0, 1.0, 0.0), 4999: (1.0, 1.0, 0.0), 5000: (1.0, 1.0, 0.0),
        # rmax 1 + 2 * 17500 / 35000, dmax 5 * 17500 / 20000, rmin 1 / rmax
        22500: (0.5, 2.0, 4.375),
        25000: (7 / 15, 15 / 7, 5.0),  # rmax 1 + 2 * 20000 / 35000
        40000: (1 / 3, 3.0, 5.0), 10**6: (1 / 3, 3.0, 5.0)}),
    ({"rmin": 0.25, "rmax": 3.0, "dmax": 5.0}, {
        4000: (1.0, 1.0, 0.0),
        22500: (0.625, 2.0, 4.375),  # rmin 1 - 0.75 * 17500 / 35000
        50000: (0.25, 3.0, 5.0)}),
], ids=["paper", "with-rmin"])
def test_renorm_schedule_limits(clipping, expected):
  """The paper's schedule (hold 5000 steps, rmax 3 at 40k, dmax 5 at 25k):
  limits by hand, for a Python step and a traced one."""
  limits_at = jax.jit(functools.partial(
      core.renorm_limits, clipping=tuple(clipping.items()),
      schedule=(5000, 40000, 25000)))
  for step, want in expected.items():
    np.testing.assert_allclose(core.renorm_limits(
        step, clipping, (5000, 40000, 25000)), want, rtol=1e-6)
    np.testing.assert_allclose(limits_at(jnp.asarray(step, jnp.int32)),
                               want, rtol=1e-6)


def test_renorm_limits_without_schedule_and_immediate_relaxation():
  assert core.renorm_limits(7) == (0.0, np.inf, np.inf)  # Keras's defaults
  assert core.renorm_limits(7, (("dmax", 2.0),)) == (0.0, np.inf, 2.0)
  # An absent (or None) rmin is the paper's 1 / rmax.
  assert core.renorm_limits(7, {"rmax": 4.0, "rmin": None}) == (
      0.25, 4.0, np.inf)
  assert core.renorm_limits(7, {"rmax": 1.0, "dmax": 0.0}) == (1.0, 1.0,
                                                                0.0)
  # hold == rmax_steps: the limits jump at the end of the hold.
  schedule, clipping = (10, 10, 20), {"rmax": 3.0, "dmax": 4.0}
  np.testing.assert_allclose(core.renorm_limits(9, clipping, schedule),
                             (1.0, 1.0, 0.0))
  np.testing.assert_allclose(core.renorm_limits(10, clipping, schedule),
                             (1 / 3, 3.0, 0.0))
  np.testing.assert_allclose(core.renorm_limits(15, clipping, schedule),
                             (1 / 3, 3.0, 2.0))  # dmax 4 * 5 / 10


def test_renorm_schedule_reads_the_state_count():
  """A scheduled step at count c computes what the fixed limits of step c
  compute, bit for bit."""
  rng = np.random.default_rng(3)
  x = random_x(rng, (16, 3), spread=4.0)
  clipping = {"rmax": 3.0, "dmax": 5.0}

  @jax.jit
  def both(state):
    limits = core.renorm_limits(state.count, clipping, (5, 15, 10))
    fixed = dict(zip(("rmin", "rmax", "dmax"), limits))
    return (bn_jax.apply(params, state, x, training=True, renorm=True,
                         renorm_clipping=clipping,
                         renorm_schedule=(5, 15, 10)),
            bn_jax.apply(params, state, x, training=True, renorm=True,
                         renorm_clipping=fixed))
  for count in (2, 8, 12):
    params, state = random_bn(rng, 3, renorm=True, count=count)
    scheduled, fixed = both(state)
    assert_trees_equal(scheduled, fixed)


def test_renorm_matches_keras_step_by_step(monkeypatch):
  """Five training steps of keras.layers.BatchNormalization(renorm=True) on
  the jax backend: y and the moving mean, moving variance, renorm mean and
  renorm stddev agree after every step. Steps 1 and 3 clip r and d, the
  others do not. Keras starts from a state with moving_stddev =
  sqrt(moving_variance + epsilon), which bn_jax derives from the variance
  (see core.apply)."""
  # Keras reads its backend once, at its first import.
  monkeypatch.setenv("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip(f"keras was imported with the {keras.backend.backend()} "
                "backend before this test")
  features, epsilon, momentum, renorm_momentum = 4, 1e-3, 0.9, 0.8
  clipping = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.3}
  layer = keras.layers.BatchNormalization(
      renorm=True, renorm_clipping=clipping, renorm_momentum=renorm_momentum,
      momentum=momentum, epsilon=epsilon)
  layer.build((None, 3, features))
  rng = np.random.default_rng(4)
  params, state = random_bn(rng, features, renorm=True)
  for name, value in (("gamma", params.scale), ("beta", params.bias),
                      ("moving_mean", state.mean),
                      ("moving_variance", state.var),
                      ("moving_stddev", np.sqrt(state.var + epsilon)),
                      ("renorm_mean", state.renorm_mean),
                      ("renorm_stddev", state.renorm_stddev)):
    getattr(layer, name).assign(np.asarray(value))
  step = jax.jit(functools.partial(
      bn_jax.apply, training=True, renorm=True,
      renorm_clipping=tuple(clipping.items()),
      renorm_momentum=renorm_momentum, momentum=momentum, epsilon=epsilon))

  # Batches whose std and mean, in units of the current renorm statistics,
  # are about r and d: in range, or not.
  targets = [(1.1, 0.1), (2.0, 0.5), (0.95, -0.2), (0.5, -0.6), (1.05, 0.0)]
  clipped = []
  for r, d in targets:
    z = rng.standard_normal((6, 3, features))
    z = (z - z.mean((0, 1))) / z.std((0, 1))
    rm, rs = np.asarray(state.renorm_mean), np.asarray(state.renorm_stddev)
    x = np.asarray(rm + rs * (r * z + d), np.float32)
    sigma_b = np.sqrt(x.var((0, 1)) + epsilon)
    r_raw, d_raw = sigma_b / rs, (x.mean((0, 1)) - rm) / rs
    clipped.append(bool(((r_raw < 0.8) | (r_raw > 1.25)
                         | (np.abs(d_raw) > 0.3)).any()))
    y_keras = layer(x, training=True)
    y, state = step(params, state, jnp.asarray(x))
    np.testing.assert_allclose(y, y_keras, rtol=2e-5, atol=2e-5)
    for ours, theirs in ((state.mean, layer.moving_mean),
                         (state.var, layer.moving_variance),
                         (state.renorm_mean, layer.renorm_mean),
                         (state.renorm_stddev, layer.renorm_stddev)):
      np.testing.assert_allclose(ours, np.asarray(theirs.value), rtol=2e-5,
                                 atol=2e-6)
  assert clipped == [False, True, False, True, False]


# ----------------------------------------------------------------------------
# Ghost batches.


GHOST_CASES = {
    "nhwc": ((8, 2, 2, 3), {}),
    "renorm": ((12, 3), dict(renorm=True, renorm_clipping={"rmax": 1.5,
                                                           "dmax": 0.5})),
    "paper-vjp": ((12, 3), dict(grad="paper_vjp")),
    "cumulative-unbiased-autodiff": ((12, 3), dict(
        momentum=None, unbiased_running_var=True, grad="autodiff")),
    "mask": ((12, 3), dict(mask=True)),
    "sampled-plain": ((12, 3), dict(stats_examples=2, impl="plain")),
}


@pytest.mark.parametrize("case", helpers.slow_except(
    [(c,) for c in GHOST_CASES], lambda c: c == "renorm",
    ids=list(GHOST_CASES)))
def test_ghost_batches_are_batch_norm_per_chunk(case):
  """virtual_batch_size=4: y, dx and the gradient of gamma and beta are
  those of batch norm applied to each chunk of 4 on its own (gradients
  summed), and the new state is the mean of the chunks' new states."""
  shape, options = GHOST_CASES[case]
  rng = np.random.default_rng(5)
  x = random_x(rng, shape)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params, state = random_bn(rng, shape[-1], renorm="renorm" in options,
                            count=2)
  options = dict(options, momentum=options.get("momentum", 0.9))
  if options.pop("mask", False):  # the third example of each chunk is padding
    options["mask"] = jnp.asarray((np.arange(shape[0]) % 4 != 2)[:, None])
  chunks = shape[0] // 4

  @jax.jit
  def run():
    ghost = bn_vjp(params, state, x, dy, virtual_batch_size=4, **options)
    per_chunk = []
    for c in range(chunks):
      rows = slice(4 * c, 4 * c + 4)
      chunk_options = dict(options)
      if "mask" in options:
        chunk_options["mask"] = options["mask"][rows]
      per_chunk.append(bn_vjp(params, state, x[rows], dy[rows],
                              **chunk_options))
    return ghost, per_chunk
  (y, new_state, (dparams, dx)), per_chunk = run()
  ys, states, grads = zip(*per_chunk)
  assert_trees_close(y, jnp.concatenate(ys), tol=1e-5)
  assert_trees_close(dx, jnp.concatenate([g[1] for g in grads]), tol=1e-4)
  assert_trees_close(dparams, jax.tree.map(lambda *g: sum(g),
                                           *[g[0] for g in grads]), tol=1e-4)
  expected_state = jax.tree.map(lambda *v: np.mean(v, axis=0), *states)
  assert_trees_close(new_state._replace(count=0),
                     expected_state._replace(count=0), tol=1e-6)
  assert new_state.count == state.count + 1


def test_ghost_batches_pool_chunk_i_over_the_named_axis():
  """Two members of a named axis with 8 examples each, ghost batches of 4:
  chunk i is normalized with the statistics of chunk i of both members."""
  rng = np.random.default_rng(6)
  x = random_x(rng, (2, 8, 3))
  params, state = random_bn(rng, 3)

  @jax.jit
  def run():
    ghost = jax.vmap(lambda x: bn_jax.apply(
        params, state, x, training=True, axis_name="members",
        virtual_batch_size=4), axis_name="members")(x)
    pooled = [bn_jax.apply(params, state, x[:, 4 * c:4 * c + 4].reshape(8, 3),
                           training=True) for c in range(2)]
    return ghost, pooled
  (y, new_state), pooled = run()
  expected_y = jnp.stack([p[0].reshape(2, 4, 3) for p in pooled], axis=1)
  assert_trees_close(y, expected_y.reshape(2, 8, 3))
  expected_state = jax.tree.map(lambda a, b: (a + b) / 2, pooled[0][1],
                                pooled[1][1])
  for member in range(2):
    assert_trees_close(
        jax.tree.map(lambda v: v[member], new_state)._replace(count=1),
        expected_state._replace(count=1), tol=1e-6)


def check_ghost_batches_are_per_device_bn():
  """8 devices of 4 examples, BN without axis_name and the mean of the
  devices' new batch_stats (bn_stats="per_device" of bn_lab.parallel and
  train.py) == one device with virtual_batch_size=4; with renorm and with
  grad="paper_vjp" too. Runs in a process with 8 CPU devices."""
  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  devices, per_device = 8, 4
  mesh = jax.make_mesh((devices,), ("data",))
  rng = np.random.default_rng(7)
  x = random_x(rng, (devices * per_device, 2, 3))
  dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  x_rows, dy_rows = jax.device_put((x, dy), NamedSharding(mesh, P("data")))
  for options in ({}, dict(renorm=True, renorm_clipping={"rmax": 1.5,
                                                         "dmax": 0.5}),
                  dict(grad="paper_vjp")):
    module = bn_nn.BatchNorm(momentum=0.9, **options)
    variables = module.init(jax.random.key(0), x[:per_device], False)
    variables = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
        variables)

    def step(module, variables, x, dy):
      def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x,
            use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(y * dy), (y, updates["batch_stats"])
      grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
          variables["params"], x)
      return y, stats, grads

    def per_device_step(variables, x, dy):
      y, stats, grads = step(module, variables, x, dy)
      return y, jax.lax.pmean(stats, "data"), grads
    y, stats, (dparams, dx) = jax.jit(jax.shard_map(
        per_device_step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
        out_specs=(P("data"), P(), (P(), P("data")))))(
            jax.device_put(variables, NamedSharding(mesh, P())), x_rows,
            dy_rows)
    ghost = bn_nn.BatchNorm(momentum=0.9, virtual_batch_size=per_device,
                            **options)
    y_ref, stats_ref, (dparams_ref, dx_ref) = jax.jit(
        functools.partial(step, ghost))(variables, x, dy)
    assert_trees_close((y, dx), (y_ref, dx_ref), tol=1e-5)
    assert_trees_close(stats, stats_ref, tol=1e-6)
    assert_trees_close(dparams, dparams_ref, tol=1e-4)


@pytest.mark.slow
def test_ghost_batches_are_per_device_bn_on_8_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, __file__], env=env,
                          cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
      result.stdout[-2000:] + result.stderr[-4000:])


# ----------------------------------------------------------------------------
# Sampled statistics.


def np_sampled(x, params, state, index, *, epsilon, momentum):
  """Batch norm whose statistics come from the examples `index` (NumPy,
  float64, features last): y and the new running mean and variance."""
  x = np.asarray(x, np.float64)
  subset = x[index].reshape(-1, x.shape[-1])
  mu, var = subset.mean(0), subset.var(0)
  scale, bias = np.asarray(params.scale), np.asarray(params.bias)
  y = (x - mu) / np.sqrt(var + epsilon) * scale + bias
  new_mean = momentum * np.asarray(state.mean) + (1 - momentum) * mu
  new_var = momentum * np.asarray(state.var) + (1 - momentum) * var
  return y, new_mean, new_var


@pytest.mark.parametrize("options,index", [
    (dict(stats_examples=5), [0, 4, 8, 12, 16]),  # stride 20 // 5
    pytest.param(dict(stats_fraction=0.3), [0, 3, 6, 9, 12, 15],
                 marks=pytest.mark.slow),  # 6 of 20, stride 3
    (dict(stats_examples=3, stats_sampling="random"), None),
], ids=["examples", "fraction", "random"])
def test_sampled_statistics_match_numpy(options, index):
  rng = np.random.default_rng(8)
  x = random_x(rng, (20, 2, 3))
  params, state = random_bn(rng, 3, count=5)
  if index is None:  # the documented draw: the key of the update count
    key = jax.random.fold_in(jax.random.key(0), 5)
    index = np.sort(np.asarray(jax.random.permutation(key, 20))[:3])
  y, new_state = jax.jit(functools.partial(
      bn_jax.apply, training=True, epsilon=1e-3, momentum=0.9,
      **options))(params, state, x)
  y_ref, mean_ref, var_ref = np_sampled(x, params, state, index,
                                        epsilon=1e-3, momentum=0.9)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new_state.mean, mean_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.var, var_ref, rtol=1e-5, atol=1e-6)


def test_random_sampling_is_pure_and_follows_the_count():
  rng = np.random.default_rng(9)
  x = random_x(rng, (32, 3))
  params, state = random_bn(rng, 3)
  apply = jax.jit(functools.partial(bn_jax.apply, training=True,
                                    stats_fraction=0.25,
                                    stats_sampling="random"))
  first, again = apply(params, state, x), apply(params, state, x)
  assert_trees_equal(first, again)
  later = apply(params, state._replace(count=jnp.asarray(1, jnp.int32)), x)
  assert not np.array_equal(first[0], later[0])


@pytest.mark.parametrize("grad", helpers.slow_except(
    [("paper_jvp",), ("autodiff",)], lambda g: g == "paper_jvp",
    ids=["paper_jvp", "autodiff"]))
def test_sampled_statistics_gradient(grad):
  """float64: the gradient flows through the subset's statistics and
  equals jax.grad of the formula written with x[::4]."""
  rng = np.random.default_rng(10)
  with jax.enable_x64(True):
    x = jnp.asarray(1.0 + rng.standard_normal((16, 3)), jnp.float64)
    params = bn_jax.BNParams(scale=jnp.asarray([1.5, 0.7, 1.2]),
                             bias=jnp.asarray([0.1, -0.3, 0.2]))
    state = bn_jax.BNState(mean=jnp.zeros(3), var=jnp.ones(3),
                           count=jnp.asarray(0, jnp.int32))
    weights = jnp.asarray(rng.standard_normal(x.shape))

    def ours(params, x):
      y = bn_jax.apply(params, state, x, training=True, stats_fraction=0.25,
                       grad=grad)[0]
      return jnp.sum(weights * y + 0.2 * jnp.sin(y))

    def reference(params, x):
      subset = x[::4]
      mu, var = subset.mean(0, keepdims=True), subset.var(0, keepdims=True)
      y = (x - mu) / jnp.sqrt(var + 1e-5) * params.scale[None] + (
          params.bias[None])
      return jnp.sum(weights * y + 0.2 * jnp.sin(y))
    assert_trees_close(*jax.jit(lambda params, x: [
        jax.grad(f, (0, 1))(params, x) for f in (ours, reference)])(
            params, x), tol=1e-10)


def _reduced_shapes(jaxpr):
  """Operand shapes of every reduce_sum in a jaxpr and the jaxprs in it."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum":
      yield eqn.invars[0].aval.shape
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _reduced_shapes(inner)


@pytest.mark.parametrize("sampling", ["stride", "random"])
def test_sampled_statistics_read_only_the_subset(sampling):
  """Every sum over the batch in the forward pass reads 4 of 16 examples:
  the subset is sliced or gathered, not masked."""
  x = jnp.ones((16, 2, 3))
  params, state = bn_jax.init(3)
  program = jax.make_jaxpr(functools.partial(
      bn_jax.apply, training=True, stats_examples=4,
      stats_sampling=sampling))(params, state, x)
  shapes = [s for s in _reduced_shapes(program.jaxpr) if len(s) == 3]
  assert shapes and all(s[0] == 4 for s in shapes), shapes


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("options,message", [
    (dict(virtual_batch_size=5),
     r"virtual_batch_size=5 does not divide the batch of 12 examples"),
    (dict(virtual_batch_size=4, axis=0),
     r"virtual_batch_size splits or samples the batch along axis 0, but "
     r"axis=0"),
    (dict(virtual_batch_size=0), r"virtual_batch_size=0 must be a positive"),
    (dict(stats_fraction=0.5, stats_examples=4),
     r"stats_fraction=0.5 and stats_examples=4 both"),
    (dict(stats_fraction=1.5), r"stats_fraction=1.5 must be in \(0, 1\]"),
    (dict(stats_examples=13), r"stats_examples=13 is more than the 12"),
    (dict(stats_examples=1), r"at least 2 values per feature.* sampled to 1"),
    (dict(stats_examples=4, grad="paper_vjp"),
     r"grad='paper_vjp' differentiates statistics of the whole batch"),
    (dict(stats_examples=4, stats_sampling="every"),
     r"stats_sampling='every'; choose one of \('stride', 'random'\)"),
    (dict(renorm=True), r"renorm=True needs state.renorm_mean"),
    (dict(renorm_clipping={"rmax": 2.0}), r"pass renorm=True"),
    (dict(renorm=True, renorm_clipping={"rmax": 2.0, "r": 1.0}),
     r"renorm_clipping has keys \['r'\]"),
    (dict(renorm=True, renorm_clipping={"rmax": 0.5, "rmin": 1.0}),
     r"rmax=0.5 < rmin=1.0"),
    (dict(renorm=True, renorm_clipping={"dmax": -1.0}), r"dmax=-1.0 < 0"),
    (dict(renorm=True, renorm_clipping={"rmax": 3.0},
          renorm_schedule=(5, 10, 10)), r"renorm_clipping has no dmax"),
    (dict(renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 1.0},
          renorm_schedule=(20, 10, 10)), r"hold_steps <= rmax_steps"),
    (dict(renorm=True, renorm_momentum=1.5), r"renorm_momentum=1.5 must"),
], ids=["ghost-divides", "ghost-axis", "ghost-size", "sampled-both",
        "fraction", "examples", "one-example", "sampled-vjp", "sampling",
        "renorm-state", "renorm-off", "clipping-key", "clipping-r",
        "clipping-d", "schedule-clipping", "schedule-order", "renorm-momentum"])
def test_errors_are_helpful(options, message):
  params, state = bn_jax.init(3)
  x = jnp.ones((12, 3))
  if options.get("axis") == 0:
    params, state = bn_jax.init(12)
  if options.get("renorm") and "renorm_clipping" in options:
    params, state = bn_jax.init(3, renorm=True)
  with pytest.raises(ValueError, match=message) as error:
    bn_jax.apply(params, state, x, training=True, **options)
  assert "\n" not in str(error.value)


def test_evaluation_ignores_the_batch_variants():
  """A test batch need not split into ghost batches."""
  params, state = bn_jax.init(3)
  x = jnp.ones((7, 3))
  y, _ = bn_jax.apply(params, state, x, training=False, virtual_batch_size=4,
                      stats_examples=4)
  assert_trees_equal(y, bn_jax.apply(params, state, x, training=False)[0])


# ----------------------------------------------------------------------------
# The linen module.


def test_init_normalizes_as_flax():
  """init_with_output: the local batch's statistics (mean 0, var 1), equal
  to flax's y, and the initial variables; a batch of one gives y = bias."""
  rng = np.random.default_rng(11)
  x = random_x(rng, (16, 5))
  key = jax.random.key(0)
  y, variables = bn_nn.BatchNorm(use_running_average=False).init_with_output(
      key, x)
  y_ref, variables_ref = flax_nn.BatchNorm(
      use_running_average=False).init_with_output(key, x)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-6)
  np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-4)
  assert_trees_close(y, y_ref)
  assert_trees_equal(variables, variables_ref)
  one = bn_nn.BatchNorm(use_running_average=False, axis_name="absent",
                        bias_init=flax_nn.initializers.constant(0.5))
  y_one, _ = one.init_with_output(key, x[:1])
  y_one_ref, _ = flax_nn.BatchNorm(
      use_running_average=False, axis_name="absent",
      bias_init=flax_nn.initializers.constant(0.5)).init_with_output(key,
                                                                     x[:1])
  assert_trees_equal(y_one, y_one_ref)
  np.testing.assert_array_equal(y_one, 0.5)


def test_complex_input_is_rejected():
  x = jnp.ones((4, 3), jnp.complex64)
  with pytest.raises(ValueError, match=r"x has dtype complex64; .*float32"):
    bn_nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)


def test_module_variants_are_core_apply():
  """Each variant's module has its variables and computes core.apply's step;
  a dict renorm_clipping becomes hashable pairs."""
  rng = np.random.default_rng(12)
  x = random_x(rng, (8, 3))
  clipping = {"rmax": 2.0, "dmax": 1.0}
  cases = [
      (dict(renorm=True, renorm_clipping=clipping, renorm_schedule=(1, 4, 3)),
       {"mean", "var", "count", "renorm_mean", "renorm_stddev"}),
      (dict(virtual_batch_size=4), {"mean", "var"}),
      (dict(stats_fraction=0.5, stats_sampling="random"),
       {"mean", "var", "count"}),
  ]
  module = bn_nn.BatchNorm(renorm=True, renorm_clipping=clipping)
  assert module == bn_nn.BatchNorm(renorm=True,
                                   renorm_clipping=tuple(clipping.items()))
  hash(module)

  @jax.jit
  def run(variables_list):
    results = []
    for (options, _), variables in zip(cases, variables_list):
      stats = variables["batch_stats"]
      y, updates = bn_nn.BatchNorm(**options).apply(
          variables, x, use_running_average=False, mutable=["batch_stats"])
      state = core.BNState(**{"count": jnp.zeros((), jnp.int32), **stats})
      expected = bn_jax.apply(bn_jax.BNParams(**variables["params"]), state,
                              x, training=True, **options)
      results.append(((y, updates["batch_stats"]),
                      (expected[0], {k: getattr(expected[1], k)
                                     for k in stats})))
    return results
  variables_list = []
  for options, names in cases:
    variables = bn_nn.BatchNorm(**options).init(jax.random.key(0), x, False)
    assert set(variables["batch_stats"]) == names
    variables_list.append(jax.tree.map(
        lambda v: v + 2 if v.dtype == jnp.int32 else v * 1.5, variables))
  for got, want in run(variables_list):
    assert_trees_equal(got, want)


def test_batch_moments_are_captured_and_state_kept():
  """mutable=["batch_moments"]: a training pass that returns the whole
  batch's plain statistics (no ghost batches, no subset) and updates no
  batch_stats; batch_stats change only where they are mutable."""
  rng = np.random.default_rng(13)
  x = random_x(rng, (8, 2, 3))
  module = bn_nn.BatchNorm(use_running_average=False, virtual_batch_size=4,
                           stats_fraction=0.5, momentum=0.9)
  variables = module.init(jax.random.key(0), x)

  @jax.jit
  def run(variables):
    return (module.apply(variables, x, mutable=["batch_moments"]),
            module.apply(variables, x, mutable=["batch_stats"]),
            module.apply(variables, x,
                         mutable=["batch_stats", "batch_moments"]),
            module.apply(variables, x))
  (y, captured), (y_train, updated), (_, both), y_immutable = run(variables)
  assert set(captured) == {"batch_moments"}
  xn = np.asarray(x, np.float64).reshape(-1, 3)
  moments = captured["batch_moments"]
  assert_trees_close(moments, {"mean": xn.mean(0), "var": xn.var(0),
                               "count": np.float32(16)})
  assert {v.dtype for v in jax.tree.leaves(moments)} == {jnp.dtype("float32")}
  assert moments["count"].shape == ()
  assert_trees_equal((y, y_immutable), (y_train, y_train))
  assert_trees_equal(both, {**updated, **captured})
  assert not np.array_equal(updated["batch_stats"]["mean"],
                            variables["batch_stats"]["mean"])


def test_batch_moments_are_pooled_over_the_named_axis():
  rng = np.random.default_rng(14)
  x = random_x(rng, (2, 6, 3))
  module = bn_nn.BatchNorm(use_running_average=False, axis_name="members")
  variables = module.init(jax.random.key(0), x[0])
  moments = jax.jit(jax.vmap(
      lambda x: module.apply(variables, x, mutable=["batch_moments"])[1],
      axis_name="members"))(x)["batch_moments"]
  xn = np.asarray(x, np.float64).reshape(-1, 3)
  for member in range(2):
    assert_trees_close(jax.tree.map(lambda v: v[member], moments),
                       {"mean": xn.mean(0), "var": xn.var(0),
                        "count": np.float32(12)})


if __name__ == "__main__":
  check_ghost_batches_are_per_device_bn()
  print("ok")
