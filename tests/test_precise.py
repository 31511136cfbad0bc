"""Tests for bn_jax.precise: PreciseBN and AdaBN statistics.

The references do not use the code under test: each BN layer's input is
captured (by an interceptor) during ordinary training-mode forward passes
and its statistics are computed in float64 NumPy by transcriptions of
fvcore's two estimators; the layerwise case is a two-layer forward pass
written by hand, and the MNIST case is np.mean / np.var of the pixels.
"""

import collections
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import data
from bn_lab import models
from bn_jax import nn as bn_nn
from bn_jax import precise

# float32 statistics against float64 references: rounding of a few float32
# ulps per batch, accumulated over a handful of batches (measured: below
# 1e-6 relative, and 1.1e-7 absolute for values near 0 among values of
# order 1).
RTOL, ATOL = 1e-5, 1e-6


def make_mlp(placement, widths=(8, 6), **norm_options):
  return models.make_model(
      "mlp", placement=placement, activation="relu", widths=widths,
      norm=functools.partial(bn_nn.BatchNorm, **norm_options))


def init(model, seed=0, jit=False):
  """Variables with random BN scale and bias, so that the references must
  apply them (fresh ones are 1 and 0). `jit` for the CNN, whose eager init
  compiles many small ops (twice as long on this CPU)."""
  model_init = functools.partial(model.init, train=False)
  variables = (jax.jit(model_init) if jit else model_init)(
      jax.random.key(seed), jnp.zeros((1, 784)))
  flat = flax.traverse_util.flatten_dict(variables["params"])
  rng = np.random.default_rng(seed)
  for path, value in flat.items():
    if "BatchNorm_0" in path or "input_bn" in path:
      flat[path] = jnp.asarray(
          (1.0 if path[-1] == "scale" else 0.0)
          + 0.3 * rng.standard_normal(value.shape), jnp.float32)
  return {**variables, "params": flax.traverse_util.unflatten_dict(flat)}


def random_batches(num_batches=4, batch_size=16, seed=1):
  return jax.random.uniform(jax.random.key(seed),
                            (num_batches, batch_size, 784))


def bn_inputs(model, variables, batches) -> dict[tuple, list[np.ndarray]]:
  """{BN layer path: [its input in each batch]}, from training-mode passes,
  as float64 (values, features) arrays."""
  inputs = collections.defaultdict(list)

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, bn_nn.BatchNorm)
        and context.method_name == "__call__"):
      x = np.asarray(args[0], np.float64)
      inputs[context.module.path].append(x.reshape(-1, x.shape[-1]))
    return next_fun(*args, **kwargs)

  # Eager: after the first test, cheaper than compiling a jitted pass.
  with nn.intercept_methods(record):
    for x in batches:
      model.apply(variables, x, train=True, mutable=["batch_stats"])
  return inputs


def fvcore_mean_of_batch_variances(inputs):
  """fvcore update_bn_stats until May 2021: momentum 1.0 leaves PyTorch's
  running_mean / running_var at the batch's mean and Bessel-corrected
  variance, and these are averaged with equal weights."""
  running_mean, running_var = 0.0, 0.0
  for ind, x in enumerate(inputs):
    batch_mean, batch_var = x.mean(0), x.var(0, ddof=1)
    running_mean += (batch_mean - running_mean) / (ind + 1)
    running_var += (batch_var - running_var) / (ind + 1)
  return running_mean, running_var


def fvcore_population_variance(inputs):
  """fvcore's _PopulationVarianceEstimator (update_bn_stats since May
  2021): the batch size undoes the Bessel correction, batches are weighted
  by size, and the variance is pop_square_mean - pop_mean**2."""
  tot, pop_mean, pop_square_mean = 0, 0.0, 0.0
  for x in inputs:
    batch_size = len(x)
    batch_mean, batch_var = x.mean(0), x.var(0, ddof=1)
    tot += batch_size
    batch_square_mean = np.square(batch_mean) + batch_var * (
        (batch_size - 1) / batch_size)
    pop_mean += (batch_mean - pop_mean) * (batch_size / tot)
    pop_square_mean += (batch_square_mean - pop_square_mean) * (
        batch_size / tot)
  return pop_mean, pop_square_mean - np.square(pop_mean)


FVCORE = {"mean": fvcore_mean_of_batch_variances,
          "pooled": fvcore_population_variance}


def assert_stats_close(stats, path, expected, rtol=RTOL, atol=ATOL):
  layer = stats
  for name in path:
    layer = layer[name]
  np.testing.assert_allclose(layer["mean"], expected[0], rtol=rtol, atol=atol)
  np.testing.assert_allclose(layer["var"], expected[1], rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# PreciseBN: the estimators.


@pytest.mark.slow
def test_pooled_input_bn_over_an_mnist_epoch_is_the_pixel_statistics(
    bundled_mnist):
  images = data.to_float(bundled_mnist.train_images, "unit")  # (60000, 784)
  model = make_mlp("input")
  stats = precise.recompute_statistics(
      model, init(model), images.reshape(100, 600, 784), estimator="pooled")
  pixels = images.astype(np.float64)
  # Pixels in [0, 1], float32 sums of 600 values merged over 100 batches:
  # absolute errors of a few 1e-7 (measured: 2e-7; the variances reach 0.2).
  # "mean" would differ by up to 2.5e-3 here: it leaves out the spread of
  # the batch means.
  np.testing.assert_allclose(stats["input_bn"]["mean"], pixels.mean(0),
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(stats["input_bn"]["var"], pixels.var(0),
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize("estimator", precise.ESTIMATORS)
@pytest.mark.parametrize("placement", ["before_activation",
                                       "after_activation"])
def test_estimators_match_fvcore(placement, estimator):
  model = make_mlp(placement)
  variables, batches = init(model), random_batches()
  stats = precise.recompute_statistics(model, variables, batches,
                                       estimator=estimator)
  inputs = bn_inputs(model, variables, batches)
  assert len(inputs) == 2
  for path, per_batch in inputs.items():
    assert_stats_close(stats, path, FVCORE[estimator](per_batch))


def test_conv_layers_count_every_position():
  # A conv BN reduces over batch, height and width, as fvcore's
  # "consider spatial dimensions as batch" (count = B * H * W).
  model = models.make_model("cnn", placement="before_activation",
                            activation="relu", widths=(4,), channels=(3,))
  variables, batches = init(model, jit=True), random_batches(3, 4)
  inputs = bn_inputs(model, variables, batches)
  assert inputs[("conv_0", "BatchNorm_0")][0].shape == (4 * 28 * 28, 3)
  for estimator, reference in FVCORE.items():
    stats = precise.recompute_statistics(model, variables, batches,
                                         estimator=estimator)
    for path, per_batch in inputs.items():
      assert_stats_close(stats, path, reference(per_batch))


def test_mean_and_pooled_differ_on_small_batches():
  # Small batches: the mean of unbiased batch variances is not the pooled
  # biased variance (pooled adds the spread of the batch means).
  model = make_mlp("input")
  variables, batches = init(model), random_batches(4, 3)
  mean = precise.recompute_statistics(model, variables, batches,
                                      estimator="mean")["input_bn"]
  pooled = precise.recompute_statistics(model, variables, batches,
                                        estimator="pooled")["input_bn"]
  np.testing.assert_allclose(mean["mean"], pooled["mean"], rtol=1e-6)
  assert np.max(np.abs(mean["var"] - pooled["var"])) > 1e-2


def test_layerwise_matches_a_hand_built_two_layer_reference():
  model = make_mlp("before_activation")
  variables, batches = init(model), random_batches(4, 8)
  params = variables["params"]
  x = np.asarray(batches, np.float64)
  w0 = np.asarray(params["hidden_0"]["Dense_0"]["kernel"], np.float64)
  w1 = np.asarray(params["hidden_1"]["Dense_0"]["kernel"], np.float64)
  bn0 = params["hidden_0"]["BatchNorm_0"]
  for estimator, reference in FVCORE.items():
    # Layer 1 sees the inputs; layer 2 sees layer 1 in eval mode with its
    # recomputed statistics.
    h1 = [batch @ w0 for batch in x]
    mean1, var1 = reference(h1)
    a1 = [np.maximum((h - mean1) / np.sqrt(var1 + 1e-5)
                     * np.asarray(bn0["scale"], np.float64)
                     + np.asarray(bn0["bias"], np.float64), 0.0)
          for h in h1]
    mean2, var2 = reference([a @ w1 for a in a1])

    layerwise = precise.recompute_statistics(
        model, variables, batches, estimator=estimator, layerwise=True)
    assert_stats_close(layerwise, ("hidden_0", "BatchNorm_0"),
                       (mean1, var1))
    assert_stats_close(layerwise, ("hidden_1", "BatchNorm_0"),
                       (mean2, var2))
    all_train = precise.recompute_statistics(model, variables, batches,
                                             estimator=estimator)
    np.testing.assert_array_equal(
        all_train["hidden_0"]["BatchNorm_0"]["var"],
        layerwise["hidden_0"]["BatchNorm_0"]["var"])
    relative = np.abs(all_train["hidden_1"]["BatchNorm_0"]["var"] / var2 - 1)
    assert np.max(relative) > 0.05, relative


def test_under_vmap_each_run_is_its_own():
  model = make_mlp("before_activation")
  runs = [init(model, seed) for seed in (0, 1)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *runs)
  batches = random_batches()
  recompute = functools.partial(precise.recompute_statistics, model,
                                batches=batches, estimator="pooled",
                                layerwise=True)
  swept = jax.vmap(recompute)(stacked)
  for i, variables in enumerate(runs):
    alone = recompute(variables)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                   atol=1e-7),
                 jax.tree.map(lambda leaf, i=i: leaf[i], swept), alone)


def test_under_jit():
  model = make_mlp("after_activation")
  variables, batches = init(model), random_batches()
  recompute = functools.partial(precise.recompute_statistics, model,
                                estimator="mean", layerwise=True)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               jax.jit(recompute)(variables, batches),
               recompute(variables, batches))


def test_returns_the_input_tree_and_keeps_other_variables():
  # momentum=None adds an int32 `count` to each layer, renorm its
  # `renorm_mean` and `renorm_stddev`: kept as they are.
  model = make_mlp("before_activation", momentum=None, renorm=True)
  variables = init(model)
  batch_stats = variables["batch_stats"]
  stats = precise.recompute_statistics(model, variables, random_batches())
  assert (jax.tree.structure(stats) == jax.tree.structure(batch_stats))
  for path in (("hidden_0", "BatchNorm_0"), ("hidden_1", "BatchNorm_0")):
    new, old = stats[path[0]][path[1]], batch_stats[path[0]][path[1]]
    for name in ("count", "renorm_mean", "renorm_stddev"):
      assert new[name] is old[name]
    assert new["mean"].dtype == new["var"].dtype == jnp.float32
    assert not np.allclose(new["mean"], old["mean"])
  frozen = precise.recompute_statistics(
      model, flax.core.freeze(variables), random_batches())
  assert isinstance(frozen, flax.core.FrozenDict)


def test_an_apply_fn_is_accepted():
  model = make_mlp("input")
  variables, batches = init(model), random_batches()
  np.testing.assert_array_equal(
      precise.recompute_statistics(
          functools.partial(model.apply, train=True), variables,
          batches)["input_bn"]["var"],
      precise.recompute_statistics(model, variables,
                                   batches)["input_bn"]["var"])


class _SharedBN(nn.Module):

  @nn.compact
  def __call__(self, x, *, train):
    bn = bn_nn.BatchNorm()
    return bn(bn(x, use_running_average=not train),
              use_running_average=not train)


def test_errors():
  model = make_mlp("input")
  variables, batches = init(model), random_batches()
  with pytest.raises(ValueError, match=r"estimator='median'.*\('mean', "
                     r"'pooled'\)"):
    precise.recompute_statistics(model, variables, batches,
                                 estimator="median")
  with pytest.raises(ValueError, match="none ran in training mode"):
    precise.recompute_statistics(functools.partial(model.apply, train=False),
                                 variables, batches)
  shared = _SharedBN()
  with pytest.raises(ValueError, match="called more than once"):
    precise.recompute_statistics(
        shared, shared.init(jax.random.key(0), jnp.zeros((2, 3)),
                            train=False), jnp.ones((2, 4, 3)))


# ----------------------------------------------------------------------------
# AdaBN: statistics recomputed on shifted data.


def eval_logits(model, variables, stats, inputs):
  if stats:  # a model without BN has none
    variables = {**variables, "batch_stats": stats}
  return np.asarray(model.apply(variables, inputs, train=False))


def clean_and_shifted(kind, severity):
  """(N, B, 784) unit-scale inputs, held-out test inputs, and both through
  `data.shift_images`."""
  pixels = np.random.default_rng(0).integers(0, 256, (5 * 32, 784), np.uint8)
  clean = data.scale_pixels(pixels, "unit")
  shifted = data.shift_images(pixels, kind, severity)
  return (clean[:128].reshape(4, 32, 784), clean[128:],
          shifted[:128].reshape(4, 32, 784), shifted[128:])


# (placement, estimator, shift): brightness is a = 1, b = 0.3; contrast
# then brightness a = 0.2, b = 0.3 + 0.8 * MNIST_PIXEL_MEAN.
ADABN_CASES = [("input", "pooled", "brightness"),
               ("input", "mean", "contrast+brightness"),
               ("before_activation", "pooled", "contrast+brightness"),
               ("before_activation", "mean", "brightness")]


@pytest.mark.parametrize("placement,estimator,kind", ADABN_CASES)
def test_adapted_statistics_undo_an_affine_shift(placement, estimator, kind):
  # The first BN sees a * h + c per feature (a > 0): the input itself, or
  # a bias-free Dense of it. With statistics of the shifted data it
  # normalizes to the same values as on clean data, up to epsilon:
  # a^2 var + eps against a^2 (var + eps), a relative 1e-8 / (a^2 var)
  # < 1e-5 here (a >= 0.2, var >= ~5e-3), so epsilon is set to 1e-8.
  model = make_mlp(placement, epsilon=1e-8)
  variables = init(model)
  clean, clean_test, shifted, shifted_test = clean_and_shifted(kind, 3)
  recompute = functools.partial(precise.recompute_statistics, model,
                                variables, estimator=estimator)
  clean_stats = recompute(clean)
  on_clean = eval_logits(model, variables, clean_stats, clean_test)
  on_shifted = eval_logits(model, variables, recompute(shifted),
                           shifted_test)
  # float32 rounding of the shifted inputs and their statistics, relative
  # to the logits' scale (measured: below 2.2e-6).
  scale = np.max(np.abs(on_clean))
  np.testing.assert_allclose(on_shifted, on_clean, rtol=0, atol=2e-5 * scale)
  # Without adaptation the shift does change the logits.
  stale = eval_logits(model, variables, clean_stats, shifted_test)
  assert np.max(np.abs(stale - on_clean)) > 0.1 * scale


@pytest.mark.parametrize("placement", ["after_activation", "none"])
def test_adapted_statistics_do_not_undo_a_shift_after_relu_or_without_bn(
    placement):
  # relu(a * h + c) is not an affine function of relu(h): BN after the
  # activation cannot undo the shift, and without BN nothing adapts.
  model = make_mlp(placement, epsilon=1e-8)
  variables = init(model)
  clean, clean_test, shifted, shifted_test = clean_and_shifted(
      "contrast+brightness", 3)
  recompute = functools.partial(precise.recompute_statistics, model,
                                variables, estimator="pooled")
  on_clean = eval_logits(model, variables, recompute(clean), clean_test)
  on_shifted = eval_logits(model, variables, recompute(shifted),
                           shifted_test)
  # Measured: 0.73 (after_activation) and 0.64 (none) of the logits' scale.
  assert np.max(np.abs(on_shifted - on_clean)) > 0.1 * np.max(
      np.abs(on_clean))
