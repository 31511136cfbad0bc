"""bn_jax.norms and its linen drop-ins against flax.linen's modules.

flax.linen's LayerNorm, GroupNorm, InstanceNorm and RMSNorm are the
independent reference: for every axis and group configuration and in mixed
precision, the pure function and the bn_jax.nn module give flax's y and
gradients (w.r.t. x and params), and the modules create flax's variables,
so they load either way. The errors flax does not raise are pinned here too.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import helpers
import pytest

from bn_jax import nn as bn_nn
from bn_jax import norms

# kind: (pure function, bn_jax.nn module, flax.linen module).
KINDS = {
    "layer": (norms.layer_norm, bn_nn.LayerNorm, flax_nn.LayerNorm),
    "rms": (norms.rms_norm, bn_nn.RMSNorm, flax_nn.RMSNorm),
    "group": (norms.group_norm, bn_nn.GroupNorm, flax_nn.GroupNorm),
    "instance": (norms.instance_norm, bn_nn.InstanceNorm,
                 flax_nn.InstanceNorm),
}
# case: (kind, x shape, module options, masked).
CASES = {
    "layer": ("layer", (4, 6), dict(), False),
    "layer-whole-example": ("layer", (2, 3, 4, 5), dict(
        reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3)), False),
    "layer-two-pass-axes": ("layer", (2, 3, 4, 5), dict(
        reduction_axes=(1, 2), feature_axes=(2, 3), use_fast_variance=False,
        epsilon=1e-3), False),
    "layer-no-scale-masked": ("layer", (4, 6), dict(use_scale=False), True),
    "rms": ("rms", (4, 6), dict(), False),
    "rms-axes": ("rms", (2, 3, 4, 5), dict(reduction_axes=(2, 3)), False),
    "rms-no-scale-masked": ("rms", (4, 6), dict(use_scale=False), True),
    "group": ("group", (2, 4, 4, 8), dict(num_groups=4), False),
    "group-size-two-pass": ("group", (2, 4, 4, 8), dict(
        num_groups=None, group_size=2, use_fast_variance=False), False),
    "group-mlp": ("group", (4, 8), dict(num_groups=2), False),
    "group-axes-masked": ("group", (2, 3, 4, 8), dict(
        num_groups=2, reduction_axes=(2, 3)), True),
    "group-no-bias": ("group", (2, 4, 4, 8), dict(num_groups=8,
                                                  use_bias=False), False),
    "instance": ("instance", (2, 3, 4, 5), dict(), False),
    "instance-axes-two-pass": ("instance", (2, 3, 4, 5), dict(
        feature_axes=(1, 3), use_fast_variance=False), False),
    "instance-1d-masked": ("instance", (2, 7, 5), dict(epsilon=1e-3), True),
}
DTYPES = helpers.FLAX_DTYPES
# The options that shape the params, not the function's arguments.
PARAM_OPTIONS = ("param_dtype", "use_scale", "use_bias")



def _nontrivial(variables, seed=1):
  """Variables (or their shapes) as after some training, not as at init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
      variables)


def _pure(kind, mask, **options):
  """The pure function as f(params, x), params in flax's dict."""
  function = KINDS[kind][0]
  options = {k: v for k, v in options.items() if k not in PARAM_OPTIONS}
  def apply(params, x):
    affine = [params.get("scale")] + ([] if kind == "rms"
                                      else [params.get("bias")])
    return function(x, *affine, mask=mask, **options)
  return apply


def _linen(module, mask):
  return lambda params, x: module.apply({"params": params}, x, mask=mask)


def _value_and_grads(f, params, x, dy):
  """(y, grads w.r.t. params and x) of the projection sum(y * dy)."""
  def loss(params, x):
    y = f(params, x)
    return jnp.sum(y.astype(jnp.float32) * dy), y
  grads, y = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, grads


MATRIX = [(c, "f32") for c in CASES] + [
    (c, d) for c in ("layer", "group", "rms", "instance")
    for d in ("bf16-compute", "bf16-input", "bf16-params")]
QUICK = {("layer", "bf16-input"), ("group", "bf16-compute"),
         ("rms", "bf16-params")}


@pytest.mark.parametrize("case,dtypes", helpers.slow_except(
    MATRIX, lambda c, d: d == "f32" or (c, d) in QUICK,
    ids=[f"{c}-{d}" for c, d in MATRIX]))
def test_matches_flax(case, dtypes):
  kind, shape, options, masked = CASES[case]
  x_dtype, dtype, param_dtype, tol, grad_tol = DTYPES[dtypes]
  options = dict(options, dtype=dtype, param_dtype=param_dtype)
  ours, theirs = (module(**options) for module in KINDS[kind][1:])
  x, dy = helpers.random_inputs(shape, x_dtype)
  mask = (jnp.asarray(np.random.default_rng(3).random(shape) > 0.3)
          if masked else None)
  shapes = [jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x))
            for m in (ours, theirs)]
  # Same names, shapes and dtypes: flax's variables are ours.
  chex.assert_trees_all_equal_shapes_and_dtypes(*shapes)
  params = _nontrivial(shapes[1]).get("params", {})

  @jax.jit  # one compilation for all three
  def run(params, x, dy):
    return [_value_and_grads(f, params, x, dy)
            for f in (_pure(kind, mask, **options), _linen(ours, mask),
                      _linen(theirs, mask))]
  *results, (y_ref, grads_ref) = run(params, x, dy)
  for y, grads in results:
    assert y.dtype == y_ref.dtype
    chex.assert_trees_all_close(y.astype(jnp.float32),
                                y_ref.astype(jnp.float32), rtol=tol, atol=tol)
    chex.assert_trees_all_close(grads, grads_ref, rtol=grad_tol,
                                atol=grad_tol)


@pytest.mark.parametrize("kind,shape,options", [
    ("layer", (4, 6), {}), ("rms", (4, 6), {}),
    ("group", (2, 3, 3, 4), dict(num_groups=2)),
    ("instance", (2, 3, 3, 4), {})])
def test_variables_load_both_ways(kind, shape, options):
  """Random initializers draw the same values in both (same names, same
  keys); each module's variables give the other's output."""
  random_init = jax.nn.initializers.normal(1.0)
  inits = dict(scale_init=random_init) | (
      {} if kind == "rms" else dict(bias_init=random_init))
  ours, theirs = (module(**options, **inits) for module in KINDS[kind][1:])
  x, _ = helpers.random_inputs(shape)

  @jax.jit
  def run():
    ours_vars, theirs_vars = (m.init(jax.random.key(0), x)
                              for m in (ours, theirs))
    return ours_vars, theirs_vars, [
        [m.apply(v, x) for m in (ours, theirs)]
        for v in (ours_vars, theirs_vars)]
  ours_vars, theirs_vars, outputs = run()
  chex.assert_trees_all_equal(ours_vars, theirs_vars)
  for got, want in outputs:
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_features_split_over_a_named_axis(masked):
  """LayerNorm over features split across a vmapped axis equals LayerNorm
  over the whole feature vector. With a mask the devices weigh by their
  unmasked counts (flax averages their means, so only unmasked is flax's)."""
  x, dy = helpers.random_inputs((4, 6))
  mask = (jnp.asarray(np.random.default_rng(3).random((4, 6)) > 0.4)
          if masked else None)
  split = lambda v: v.reshape(4, 2, 3).transpose(1, 0, 2)  # 2 devices
  whole = lambda y: y.transpose(1, 0, 2).reshape(4, 6)
  params = {"scale": jnp.linspace(0.5, 1.5, 3), "bias": jnp.linspace(-1, 1, 3)}

  def on_devices(f):
    per_device = lambda x, dy, mask: _value_and_grads(
        lambda p, x: f(p, x, mask), params, x, dy)
    y, (dparams, dx) = jax.vmap(per_device, axis_name="d")(
        split(x), split(dy), None if mask is None else split(mask))
    return whole(y), whole(dx), jax.tree.map(lambda g: g.sum(0), dparams)

  ours = lambda p, x, mask: norms.layer_norm(
      x, p["scale"], p["bias"], axis_name="d", mask=mask)
  theirs = lambda p, x, mask: flax_nn.LayerNorm(axis_name="d").apply(
      {"params": p}, x, mask=mask)
  tile = lambda v: jnp.tile(v, 2)
  whole_params = jax.tree.map(tile, params)
  y_ref, (dparams_ref, dx_ref) = _value_and_grads(
      lambda p, x: norms.layer_norm(x, p["scale"], p["bias"], mask=mask),
      whole_params, x, dy)
  y, dx, dparams = jax.jit(lambda: on_devices(ours))()
  chex.assert_trees_all_close((y, dx), (y_ref, dx_ref), rtol=1e-5,
                              atol=1e-5)
  # Each device's scale serves 3 of the 6 features: their gradients add.
  chex.assert_trees_all_close(
      dparams, jax.tree.map(lambda g: g[:3] + g[3:], dparams_ref),
      rtol=1e-5, atol=1e-5)
  if not masked:
    chex.assert_trees_all_close(jax.jit(lambda: on_devices(theirs))(),
                                (y, dx, dparams), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", helpers.slow_except(
    [(kind,) for kind in KINDS], lambda kind: kind == "layer"))
def test_fully_masked_example_stays_finite(kind):
  """An all-padding example (flax: 0 / 0 = NaN) must not put NaN into the
  other examples' gradients through a loss that masks it out."""
  x, dy = helpers.random_inputs((3, 4, 6))
  mask = jnp.arange(3)[:, None, None] < 2  # example 2 is padding
  options = dict(num_groups=2) if kind == "group" else {}
  affine = norms.init(6)[:1 if kind == "rms" else 2]
  def loss(x, *affine):
    y = KINDS[kind][0](x, *affine, mask=mask, **options)
    return jnp.sum(jnp.where(mask, y * dy, 0.0))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, *affine)
  assert all(jnp.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kind", helpers.slow_except(
    [(kind,) for kind in KINDS], lambda kind: kind == "group"))
def test_second_derivatives_match_numerical(kind):
  """Float64 derivatives to second order, against finite differences."""
  shape, options = {"group": ((2, 3, 4), dict(num_groups=2)),
                    "instance": ((2, 3, 4), {})}.get(kind, ((3, 4), {}))
  with jax.enable_x64(True):
    x, _ = helpers.random_inputs(shape, jnp.float64)
    params = _nontrivial(norms.init(shape[-1], jnp.float64))
    affine = params[:1] if kind == "rms" else params
    f = jax.jit(lambda x, *affine: jnp.sin(KINDS[kind][0](
        x, *affine, **options)).sum())
    jax.test_util.check_grads(f, (x, *affine), order=2, modes=("rev",))


@pytest.mark.parametrize("kind", ["batch", *KINDS])
def test_use_running_average_is_accepted_and_ignored(kind):
  """Any norm fits where BatchNorm goes: models call
  `norm(name=...)(x, use_running_average=not train)`."""
  norm = {"batch": bn_nn.BatchNorm, "layer": bn_nn.LayerNorm,
          "rms": bn_nn.RMSNorm, "instance": bn_nn.InstanceNorm,
          "group": functools.partial(bn_nn.GroupNorm, num_groups=2)}[kind]

  class Model(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x, train):
      return norm(name="norm")(x, use_running_average=not train)
  x, _ = helpers.random_inputs((4, 3, 3, 4))
  variables = Model().init(jax.random.key(0), x, train=False)
  assert set(variables) == ({"params", "batch_stats"} if kind == "batch"
                            else {"params"})
  train, _ = Model().apply(variables, x, train=True, mutable=True)
  evaluate = Model().apply(variables, x, train=False)
  if kind != "batch":
    chex.assert_trees_all_equal(train, evaluate)
    chex.assert_trees_all_equal(
        evaluate, norm().apply({"params": variables["params"]["norm"]}, x))


@pytest.mark.parametrize("function,shape,options,message", [
    (norms.instance_norm, (4, 6), {},
     r"instance_norm needs spatial axes to normalize over, but x of shape "
     r"\(4, 6\) has only the batch axis 0 and the feature axes \(1,\); use it "
     r"on conv features"),
    (norms.instance_norm, (4, 3, 6), dict(feature_axes=(0, 2)),
     r"include axis 0, the batch axis"),
    (norms.instance_norm, (4, 1, 1, 6), {}, r"over 1 value"),
    (norms.group_norm, (4, 6), dict(num_groups=4),
     r"num_groups=4 does not divide the 6 channels"),
    (norms.group_norm, (4, 6), dict(num_groups=None, group_size=4),
     r"group_size=4 does not divide the 6 channels"),
    (norms.group_norm, (4, 6), dict(num_groups=2, group_size=3),
     r"exactly one of num_groups and group_size"),
    (norms.group_norm, (4, 6), dict(num_groups=None, group_size=1),
     r"each mean and variance over 1 value"),
    (norms.group_norm, (2, 3, 3, 6), dict(num_groups=2, reduction_axes=(1, 2)),
     r"must include the last axis \(3\)"),
    (norms.layer_norm, (4, 6), dict(reduction_axes=2), r"out of range"),
    (norms.layer_norm, (4, 6), dict(reduction_axes=(1, -1)), r"twice"),
    (norms.layer_norm, (4, 6), dict(reduction_axes=()), r"at least one"),
    (norms.layer_norm, (4, 1), {}, r"over 1 value"),
    (norms.layer_norm, (4, 6), dict(epsilon=0.0), r"epsilon=0.0 must be > 0"),
    (norms.layer_norm, (4, 5), {},
     r"scale has shape \(6,\) but x's feature shape \(axes \(1,\)\) is "
     r"\(5,\)"),
], ids=["instance-mlp", "instance-batch-axis", "instance-one-value",
        "num-groups", "group-size", "both-group-args", "group-one-value",
        "group-axes", "axis-range", "axis-twice", "no-axes", "layer-one-value",
        "epsilon", "param-shape"])
def test_bad_arguments_are_clear_errors(function, shape, options, message):
  x, _ = helpers.random_inputs(shape)
  with pytest.raises(ValueError, match=message):
    function(x, *norms.init(6), **options)


def test_linen_instance_norm_on_mlp_features_is_a_clear_error():
  with pytest.raises(ValueError, match=r"instance_norm needs spatial axes"):
    bn_nn.InstanceNorm().init(jax.random.key(0), jnp.ones((4, 6)))
