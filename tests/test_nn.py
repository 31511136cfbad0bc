"""bn_jax.nn.BatchNorm against flax.linen.BatchNorm with the same options.

flax is the independent reference: outputs, gradients (w.r.t. params and
x) and updated batch_stats agree to float32 tolerance, second derivatives
in float64 with every grad mode and impl, and the variables have the same
names and shapes, so checkpoints load either way.
"""

from __future__ import annotations


import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import helpers
import pytest

from bn_jax import nn as bn_nn

# Options shared by both modules, and the input shape they suit.
OPTIONS = {
    "dense": ((16, 5), dict()),
    "nhwc-momentum-epsilon": ((4, 3, 3, 6), dict(momentum=0.9, epsilon=1e-3)),
    "axis1": ((6, 4, 3), dict(axis=1)),
    "axes13": ((4, 3, 2, 5), dict(axis=(1, 3))),
    "no-scale": ((16, 5), dict(use_scale=False)),
    "no-affine": ((16, 5), dict(use_bias=False, use_scale=False)),
}
DTYPES = helpers.FLAX_DTYPES



def _modules(**options):
  return bn_nn.BatchNorm(**options), flax_nn.BatchNorm(**options)


def _train_step(module, variables, x, dy):
  """(y, new batch_stats, grads w.r.t. params and x) for sum(y * dy)."""
  def loss(params, x):
    y, updates = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y.astype(jnp.float32) * dy), (y, updates["batch_stats"])
  grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      variables.get("params", {}), x)
  return y, stats, grads


def _nontrivial(variables, seed=1):
  """Variables (or their shapes) as after some training, not as at init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
      variables)


# Every option in float32; the mixed-precision settings on two of them.
CASES = [(o, "f32") for o in OPTIONS] + [
    (o, d) for o in ("dense", "nhwc-momentum-epsilon")
    for d in ("bf16-compute", "bf16-input")] + [("dense", "bf16-params")]


@pytest.mark.parametrize("case,dtypes", helpers.slow_except(
    CASES, lambda o, d: o == "nhwc-momentum-epsilon" and d != "bf16-input",
    ids=[f"{o}-{d}" for o, d in CASES]))
def test_matches_flax(case, dtypes):
  shape, options = OPTIONS[case]
  x_dtype, dtype, param_dtype, tol, grad_tol = DTYPES[dtypes]
  ours, theirs = _modules(dtype=dtype, param_dtype=param_dtype, **options)
  x, dy = helpers.random_inputs(shape, x_dtype)
  shapes = [jax.eval_shape(lambda: m.init(jax.random.key(0), x, False))
            for m in (ours, theirs)]
  # Same names, shapes and dtypes: flax's variables are ours.
  chex.assert_trees_all_equal_shapes_and_dtypes(*shapes)
  variables = _nontrivial(shapes[1])

  @jax.jit  # one compilation for both modules, training and evaluation
  def run(variables, x, dy):
    return [(_train_step(m, variables, x, dy),
             m.apply(variables, x, use_running_average=True))
            for m in (ours, theirs)]
  ((y, stats, grads), y_eval), ((y_ref, stats_ref, grads_ref), y_eval_ref) = (
      run(variables, x, dy))
  helpers.assert_close_to_flax((y, y_eval, stats, grads),
                               (y_ref, y_eval_ref, stats_ref, grads_ref),
                               tol, grad_tol)


def test_variables_load_both_ways():
  ours, theirs = _modules(momentum=0.9)
  x, _ = helpers.random_inputs((16, 5))
  ours_vars = _nontrivial(ours.init(jax.random.key(0), x, False), seed=2)
  theirs_vars = _nontrivial(theirs.init(jax.random.key(0), x, False), seed=3)

  @jax.jit
  def both(variables):
    return [[m.apply(variables, x, use_running_average=not training,
                     mutable=["batch_stats"]) for training in (False, True)]
            for m in (ours, theirs)]
  for variables in (ours_vars, theirs_vars):
    got, want = both(variables)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_named_axis_under_vmap_matches_flax():
  ours, theirs = _modules(axis_name="batch", momentum=0.9)
  x, dy = helpers.random_inputs((4, 8, 5))  # 4 devices x 8 examples
  # As in flax, init runs outside the vmap that binds the axis name.
  variables = _nontrivial(theirs.init(jax.random.key(0), x[0], False))

  def step(module):
    per_device = lambda x, dy: _train_step(module, variables, x, dy)
    return jax.vmap(per_device, axis_name="batch")(x, dy)
  (y, stats, grads), (y_ref, stats_ref, grads_ref) = (
      jax.jit(lambda: step(ours))(), jax.jit(lambda: step(theirs))())
  chex.assert_trees_all_close(y, y_ref, rtol=2e-5, atol=2e-5)
  chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-4)
  # Synchronized: every device holds the statistics of all 32 examples.
  one_batch = flax_nn.BatchNorm(momentum=0.9).apply(
      variables, x.reshape(32, 5), use_running_average=False,
      mutable=["batch_stats"])[1]["batch_stats"]
  chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], stats), one_batch,
                              rtol=1e-5, atol=1e-6)


def test_init_does_not_update_stats():
  x, _ = helpers.random_inputs((16, 5))
  variables = bn_nn.BatchNorm().init(jax.random.key(0), x,
                                     use_running_average=False)
  chex.assert_trees_all_equal(
      variables["batch_stats"],
      {"mean": jnp.zeros(5, jnp.float32), "var": jnp.ones(5, jnp.float32)})
  # A dummy batch of one example, as model code often passes to init.
  bn_nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:1])


def test_cumulative_average_counts_updates():
  module = bn_nn.BatchNorm(momentum=None)
  x, _ = helpers.random_inputs((16, 5))
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  assert variables["batch_stats"]["count"] == 0
  means = []
  for seed in range(3):
    x, _ = helpers.random_inputs((16, 5), seed=seed)
    _, updates = module.apply(variables, x, use_running_average=False,
                              mutable=["batch_stats"])
    variables = {**variables, **updates}
    means.append(np.asarray(x, np.float64).mean(0))
  assert variables["batch_stats"]["count"] == 3
  np.testing.assert_allclose(variables["batch_stats"]["mean"],
                             np.mean(means, axis=0), rtol=1e-5, atol=1e-6)


GRADS_AND_IMPLS = [(g, i) for g in ("paper_jvp", "paper_vjp", "autodiff")
                   for i in ("xla_cpu", "plain")]


@pytest.mark.parametrize("grad,impl", helpers.slow_except(
    GRADS_AND_IMPLS, lambda g, i: g == "paper_jvp" and i == "xla_cpu"))
def test_grad_and_impl_match_flax_to_second_order(grad, impl):
  """Every grad mode and impl, two_pass statistics, in float64: y, the
  updated batch_stats, the gradient and Hessian-vector products (reverse
  over reverse, forward over reverse) equal flax's two-pass BatchNorm
  (use_fast_variance=False, plain autodiff with no stop_gradient)."""
  options = dict(momentum=0.9, epsilon=1e-3, param_dtype=jnp.float64)
  ours = bn_nn.BatchNorm(stats_method="two_pass", grad=grad, impl=impl,
                         **options)
  theirs = flax_nn.BatchNorm(use_fast_variance=False, **options)
  with jax.enable_x64(True):
    x, dy = helpers.random_inputs((4, 2, 2, 3), jnp.float64)
    variables = _nontrivial(theirs.init(jax.random.key(0), x, False))
    rng = np.random.default_rng(2)
    direction = jax.tree.map(
        lambda v: jnp.asarray(rng.standard_normal(v.shape)),
        (variables["params"], x))

    def derivatives(module):
      def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x,
            use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(y * dy + 0.1 * jnp.sin(y)), (y, updates)
      gradient = jax.grad(loss, argnums=(0, 1), has_aux=True)
      grads, aux = gradient(variables["params"], x)
      just_grad = lambda p, x: gradient(p, x)[0]
      rev_rev = jax.vjp(just_grad, variables["params"], x)[1](direction)
      fwd_rev = jax.jvp(just_grad, (variables["params"], x), direction)[1]
      return aux, grads, rev_rev, fwd_rev
    ((y, stats), *derivs), ((y_ref, stats_ref), *derivs_ref) = jax.jit(
        lambda: [derivatives(m) for m in (ours, theirs)])()
    chex.assert_trees_all_close(y, y_ref, rtol=1e-10, atol=1e-10)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(derivs, derivs_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("options,error,message", [
    (dict(grad="vjp"), ValueError, r"^grad='vjp'; choose one of "
     r"\('paper_jvp', 'paper_vjp', 'autodiff'\)"),
    (dict(grad=True), ValueError, r"^grad=True; choose one of"),
    (dict(impl="gpu"), ValueError,
     r"^impl='gpu'; choose one of \('auto', 'xla_cpu', 'plain'\)"),
    (dict(analytic_grad=True), TypeError, "analytic_grad"),
], ids=["grad-old-name", "grad-bool", "impl", "old-attribute"])
def test_bad_grad_or_impl_is_a_clear_error(options, error, message):
  x, _ = helpers.random_inputs((16, 5))
  with pytest.raises(error, match=message):
    bn_nn.BatchNorm(**options).init(jax.random.key(0), x, False)
