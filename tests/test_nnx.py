"""bn_jax.nnx against flax.nnx's BatchNorm, LayerNorm, GroupNorm,
InstanceNorm and RMSNorm.

flax.nnx is the independent reference: the same constructor arguments give
the same `nnx.state` tree (names, Variable types, shapes, dtypes) and, from
the same non-trivial state, the same y in training and evaluation, the same
updated BatchStats and the same gradients w.r.t. params and x. BatchNorm's
bn_jax options are checked against bn_jax.nn.BatchNorm, the linen front end
of the same core, with the nnx state as its variables.
"""

from __future__ import annotations

import chex
import flax.linen as flax_linen
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import helpers
import pytest

from bn_jax import nn as bn_nn
from bn_jax import nnx as bn_nnx

# case: (class name, x shape, constructor options).
CASES = {
    "batch": ("BatchNorm", (16, 5), dict(num_features=5)),
    "batch-nhwc": ("BatchNorm", (4, 3, 3, 6), dict(
        num_features=6, momentum=0.9, epsilon=1e-3)),
    "batch-axis1": ("BatchNorm", (6, 4, 3), dict(num_features=4, axis=1)),
    "batch-no-affine": ("BatchNorm", (16, 5), dict(
        num_features=5, use_scale=False, use_bias=False)),
    "layer": ("LayerNorm", (4, 6), dict(num_features=6)),
    "layer-axes": ("LayerNorm", (2, 3, 4, 5), dict(
        num_features=20, reduction_axes=(2, 3), feature_axes=(2, 3),
        use_fast_variance=False)),
    "rms": ("RMSNorm", (4, 6), dict(num_features=6)),
    "group": ("GroupNorm", (2, 4, 4, 8), dict(num_features=8,
                                              num_groups=4)),
    "group-size-mlp": ("GroupNorm", (4, 8), dict(
        num_features=8, num_groups=None, group_size=2)),
    "instance": ("InstanceNorm", (2, 3, 4, 5), dict(num_features=5)),
}
DTYPES = helpers.FLAX_DTYPES



def _nontrivial(state, seed=1):
  """A state (or its shapes) as after some training, not as at init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), state)


def _step(graphdef, params, rest, x, dy, *, train, **call):
  """(y, BatchStats after the call, grads w.r.t. params and x) of the
  projection sum(y * dy), in the mode that `train()` / `eval()` set."""
  def loss(params, x):
    # Fresh Variables of this trace: the BatchStats are written to in it.
    module = nnx.merge(graphdef, params, rest, copy=True)
    if train:
      module.train()
    else:
      module.eval()
    y = module(x, **call)
    return (jnp.sum(y.astype(jnp.float32) * dy),
            (y, nnx.state(module, nnx.BatchStat)))
  grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, stats, grads


MATRIX = [(c, "f32") for c in CASES] + [
    (c, d) for c in ("batch-nhwc", "layer", "group")
    for d in ("bf16-compute", "bf16-input", "bf16-params")]
QUICK = {("batch-nhwc", "bf16-compute"), ("group", "bf16-input")}


@pytest.mark.parametrize("case,dtypes", helpers.slow_except(
    MATRIX, lambda c, d: d == "f32" or (c, d) in QUICK,
    ids=[f"{c}-{d}" for c, d in MATRIX]))
def test_matches_flax_nnx(case, dtypes):
  name, shape, options = CASES[case]
  x_dtype, dtype, param_dtype, tol, grad_tol = DTYPES[dtypes]
  ours, theirs = (getattr(module, name)(
      **options, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
                  for module in (bn_nnx, nnx))
  # The same tree: names, Variable types, shapes and dtypes.
  states = [nnx.state(m) for m in (ours, theirs)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  chex.assert_trees_all_equal_shapes_and_dtypes(*states)
  state = _nontrivial(states[1])
  for module in (ours, theirs):
    nnx.update(module, state)
  splits = [nnx.split(m, nnx.Param, ...) for m in (ours, theirs)]
  x, dy = helpers.random_inputs(shape, x_dtype)

  @jax.jit  # one compilation for both, training and evaluation
  def run(x, dy):
    return [[_step(*split, x, dy, train=train) for train in (True, False)]
            for split in splits]
  ((y, stats, grads), (y_eval, stats_eval, _)), (
      (y_ref, stats_ref, grads_ref), (y_eval_ref, _, _)) = run(x, dy)
  helpers.assert_close_to_flax((y, y_eval, stats, grads),
                               (y_ref, y_eval_ref, stats_ref, grads_ref),
                               tol, grad_tol)
  # Evaluation leaves the BatchStats as they were.
  chex.assert_trees_all_equal(stats_eval, nnx.state(ours, nnx.BatchStat))


# bn_jax's options, each checked against bn_jax.nn.BatchNorm.
BN_OPTIONS = {
    "two-pass-unbiased": dict(stats_method="two_pass",
                              unbiased_running_var=True, momentum=0.9),
    "cumulative": dict(momentum=None),
    "paper-vjp-plain": dict(grad="paper_vjp", impl="plain"),
    "autodiff-masked": dict(grad="autodiff", stats_method="one_pass"),
    "renorm-schedule": dict(renorm=True, renorm_momentum=0.9,
                            renorm_clipping={"rmax": 1.5, "dmax": 0.5},
                            renorm_schedule=(0, 10, 10)),
    "ghost-renorm-paper-vjp": dict(virtual_batch_size=2, renorm=True,
                                   grad="paper_vjp"),
    "sampled-random": dict(stats_fraction=0.5, stats_sampling="random"),
    "ghost-sampled-masked": dict(virtual_batch_size=2, stats_examples=1),
}


@pytest.mark.parametrize("option", helpers.slow_except(
    [(o,) for o in BN_OPTIONS],
    lambda o: o in ("cumulative", "renorm-schedule")))
def test_batch_norm_options_match_bn_jax_nn(option):
  """The nnx state, as a pure dict, is bn_jax.nn.BatchNorm's variables
  (the extra BatchStats included); both front ends give the same y,
  statistics and gradients."""
  options = BN_OPTIONS[option]
  module = bn_nnx.BatchNorm(6, **options, rngs=nnx.Rngs(0))
  nnx.update(module, _nontrivial(nnx.state(module)))
  x, dy = helpers.random_inputs((4, 3, 3, 6))
  mask = (jnp.asarray(np.random.default_rng(2).random((4, 3, 3, 1)) > 0.3)
          if "masked" in option else None)
  variables = {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param)),
               "batch_stats": nnx.to_pure_dict(
                   nnx.state(module, nnx.BatchStat))}
  linen = bn_nn.BatchNorm(**options)

  def linen_step(params, x):
    y, updates = linen.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        use_running_average=False, mask=mask, mutable=["batch_stats"])
    return jnp.sum(y * dy), (y, updates["batch_stats"])

  @jax.jit
  def run(x, dy):
    y, stats, grads = _step(*nnx.split(module, nnx.Param, ...), x, dy,
                            train=True, mask=mask)
    return (y, nnx.to_pure_dict(stats), nnx.to_pure_dict(grads[0]),
            grads[1]), jax.grad(linen_step, argnums=(0, 1), has_aux=True)(
                variables["params"], x)
  (y, stats, dparams, dx), ((dparams_ref, dx_ref), (y_ref, stats_ref)) = run(
      x, dy)
  chex.assert_trees_all_close((y, dx), (y_ref, dx_ref), rtol=1e-5,
                              atol=1e-5)
  chex.assert_trees_all_close(stats, stats_ref, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-5, atol=1e-5)


def test_group_norm_with_spatial_axes_kept_is_flax_linen_s():
  """reduction_axes that keep a spatial axis: one statistic per example,
  row and group, repeated along the channels, as flax.linen computes it
  (flax.nnx 0.12 repeats along axis 1 instead, so it is not the reference
  here)."""
  x, _ = helpers.random_inputs((2, 3, 4, 8))
  ours = bn_nnx.GroupNorm(8, num_groups=2, reduction_axes=(2, 3),
                          rngs=nnx.Rngs(0))
  linen = flax_linen.GroupNorm(num_groups=2, reduction_axes=(2, 3))
  chex.assert_trees_all_close(
      ours(x), linen.apply(linen.init(jax.random.key(0), x), x),
      rtol=1e-5, atol=1e-5)


def test_train_eval_and_view_switch_like_flax():
  """model.train() / model.eval() and nnx.view switch BatchNorm inside a
  model as they switch flax's (the per-example norms have no mode)."""
  class Model(nnx.Module):
    def __init__(self, namespace, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.batch_norm = namespace.BatchNorm(4, rngs=rngs)
      self.layer_norm = namespace.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.layer_norm(self.batch_norm(self.linear(x)))

  x, _ = helpers.random_inputs((8, 3))
  stats = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
  results = []
  for namespace in (bn_nnx, nnx):
    model = Model(namespace, nnx.Rngs(0))
    initial = stats(model)
    evaluating = nnx.view(model, use_running_average=True)
    y_view = evaluating(x)
    assert model.batch_norm.use_running_average is False  # a view, no change
    chex.assert_trees_all_equal(stats(model), initial)
    model.eval()
    y_eval = model(x)
    chex.assert_trees_all_equal(stats(model), initial)
    model.train()
    y_train = model(x)
    results.append((y_view, y_eval, y_train, stats(model)))
  chex.assert_trees_all_close(*results, rtol=1e-5, atol=1e-5)
  # One training call moved the running statistics towards the batch's.
  assert not np.allclose(results[0][3]["batch_norm"]["mean"], 0.0)


@pytest.mark.parametrize("name,options", [
    ("LayerNorm", {}), ("RMSNorm", {}), ("GroupNorm", dict(num_groups=2)),
    ("InstanceNorm", {})])
def test_per_example_norms_ignore_use_running_average(name, options):
  module = getattr(bn_nnx, name)(4, **options, rngs=nnx.Rngs(0))
  x, _ = helpers.random_inputs((2, 3, 3, 4))
  y = module(x)
  for use_running_average in (True, False):
    chex.assert_trees_all_equal(
        module(x, use_running_average=use_running_average), y)


def test_batch_norm_without_a_mode_is_a_clear_error():
  module = bn_nnx.BatchNorm(5, use_running_average=None, rngs=nnx.Rngs(0))
  x, _ = helpers.random_inputs((16, 5))
  with pytest.raises(ValueError, match=r"BatchNorm needs use_running_average"):
    module(x)
  module(x, use_running_average=True)


@pytest.mark.parametrize("make,shape,message", [
    (lambda r: bn_nnx.GroupNorm(8, num_groups=3, rngs=r), None,
     r"num_groups=3 does not divide the 8 channels"),
    (lambda r: bn_nnx.GroupNorm(8, 2, 4, rngs=r), None,
     r"exactly one of num_groups and group_size"),
    (lambda r: bn_nnx.InstanceNorm(6, rngs=r), (4, 6),
     r"instance_norm needs spatial axes"),
    (lambda r: bn_nnx.LayerNorm(5, rngs=r), (4, 6),
     r"LayerNorm has num_features=5 but x of shape \(4, 6\) has 6 features"),
    (lambda r: bn_nnx.BatchNorm(6, stats_method="exact", rngs=r), (4, 6),
     r"stats_method='exact'; choose one of"),
], ids=["num-groups", "both-group-args", "instance-mlp", "num-features",
        "stats-method"])
def test_bad_arguments_are_clear_errors(make, shape, message):
  with pytest.raises(ValueError, match=message):
    module = make(nnx.Rngs(0))
    module(helpers.random_inputs(shape)[0])
