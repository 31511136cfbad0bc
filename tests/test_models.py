"""Tests for bn_lab.models: every placement x model x activation, the
variables each placement creates, and a NumPy forward pass as reference."""

import re

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import models
from bn_jax import nn as bn_nn

CHANNELS = (2, 3)  # tiny CNN: 28 -> 14 -> 7, so 7 * 7 * 3 = 147 features
WIDTHS = (5, 4)
BATCH = 8  # one batch size throughout: fewer shapes to compile
EPSILON = 1e-3
NP_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
}


def make(model="mlp", placement="before_activation", activation="relu",
         momentum=0.9):
  return models.make_model(model, placement=placement, activation=activation,
                           widths=WIDTHS, channels=CHANNELS,
                           norm=models.make_norm({"momentum": momentum,
                                                  "epsilon": EPSILON,
                                                  "impl": "auto"}))


def images(n, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n, 784)).astype(
      np.float32)


def shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


@pytest.mark.parametrize("placement,model,activation", helpers.slow_except(
    [(p, m, a) for p in models.PLACEMENTS for m in models.MODELS
     for a in models.ACTIVATIONS], lambda p, m, a: m == "mlp" and a == "relu"))
def test_every_combination_builds_and_runs(placement, model, activation):
  net = make(model, placement, activation)
  x = images(BATCH)
  variables = net.init(jax.random.key(0), x, train=False)
  assert set(variables) == ({"params"} if placement == "none" else
                            {"params", "batch_stats"})
  logits = net.apply(variables, x, train=False)
  train_logits, updates = net.apply(variables, x, train=True,
                                    mutable=["batch_stats"])
  for out in (logits, train_logits):
    assert out.shape == (BATCH, 10) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
  if placement == "none":
    assert updates == {}
  else:
    # A training-mode call moves every running statistic away from its
    # initial value (mean 0, var 1).
    for new, old in zip(jax.tree.leaves(updates["batch_stats"]),
                        jax.tree.leaves(variables["batch_stats"])):
      assert not np.allclose(new, old)


def _dense(width_in, width_out, bias):
  return ({"kernel": (width_in, width_out), "bias": (width_out,)} if bias
          else {"kernel": (width_in, width_out)})


def _bn(features):
  return {"scale": (features,), "bias": (features,)}


def _stats(features):
  return {"mean": (features,), "var": (features,)}


def expected_variables(model, placement):
  """The variable shapes each placement should create, written out by hand:
  every hidden block `<block>` holds its linear map and, where placed, its
  own BatchNorm_0."""
  with_bn = placement in ("before_activation", "after_activation")
  bias = placement != "before_activation"  # BN's beta replaces the bias
  params, stats = {}, {}
  blocks = []
  if model == "cnn":
    c_in = 1
    for i, c in enumerate(CHANNELS):
      blocks.append((f"conv_{i}", "Conv_0",
                     {"kernel": (3, 3, c_in, c), **({"bias": (c,)}
                                                    if bias else {})}, c))
      c_in = c
    width_in = 7 * 7 * CHANNELS[-1]
  else:
    width_in = 784
  for i, w in enumerate(WIDTHS):
    blocks.append((f"hidden_{i}", "Dense_0", _dense(width_in, w, bias), w))
    width_in = w
  for block, linear, linear_shapes, features in blocks:
    params[block] = {linear: linear_shapes}
    if with_bn:
      params[block]["BatchNorm_0"] = _bn(features)
      stats[block] = {"BatchNorm_0": _stats(features)}
  params["readout"] = _dense(width_in, 10, True)
  if placement == "input":
    # MLP: per pixel (784 features). CNN: channels-last input, so one
    # feature (the single input channel), as usual for convolutions.
    features = 784 if model == "mlp" else 1
    params["input_bn"] = _bn(features)
    stats["input_bn"] = _stats(features)
  return ({"params": params, "batch_stats": stats} if stats
          else {"params": params})


@pytest.mark.parametrize("placement,model", helpers.slow_except(
    [(p, m) for m in models.MODELS for p in models.PLACEMENTS],
    lambda p, m: m == "mlp"))
def test_variable_structure(placement, model):
  net = make(model, placement)
  variables = net.init(jax.random.key(0), images(BATCH), train=False)
  assert shapes(variables) == expected_variables(model, placement), (
      "each hidden block must own its BatchNorm (e.g. params['hidden_0']"
      "['BatchNorm_0']); got top-level names "
      f"{sorted(variables['params'])}")


# ----------------------------------------------------------------------------
# The forward pass against NumPy.


def _bn_vars(collection, name):
  """The variables of BN `name` ("input_bn" or a hidden block's name)."""
  if name == "input_bn":
    return collection[name]
  return collection[name]["BatchNorm_0"]


def np_batch_norm(x, scale, bias, mean, var):
  return (x - mean) / np.sqrt(var + EPSILON) * scale + bias


def reference_mlp(variables, x, placement, activation, train):
  """float64 NumPy forward pass of the MLP.

  Returns (logits, {BN name: (mean, var) the layer normalized with}).
  """
  params = jax.tree.map(lambda v: np.asarray(v, np.float64),
                        variables["params"])
  stats = jax.tree.map(lambda v: np.asarray(v, np.float64),
                       variables.get("batch_stats", {}))
  act = NP_ACTIVATIONS[activation]
  used = {}

  def norm(h, name):
    p, s = _bn_vars(params, name), _bn_vars(stats, name)
    mean, var = (h.mean(0), h.var(0)) if train else (s["mean"], s["var"])
    used[name] = (mean, var)
    return np_batch_norm(h, p["scale"], p["bias"], mean, var)

  h = np.asarray(x, np.float64)
  if placement == "input":
    h = norm(h, "input_bn")
  for i in range(len(WIDTHS)):
    block = f"hidden_{i}"
    dense = params[block]["Dense_0"]
    h = h @ dense["kernel"]
    if placement == "before_activation":
      h = act(norm(h, block))
      continue
    h = act(h + dense["bias"])
    if placement == "after_activation":
      h = norm(h, block)
  return h @ params["readout"]["kernel"] + params["readout"]["bias"], used


def _randomize(variables, seed):
  """Non-trivial params and running statistics (var > 0)."""
  leaves, tree = jax.tree.flatten(variables)
  rng = np.random.default_rng(seed)
  new = [np.asarray(rng.uniform(0.5, 1.5, v.shape) if v.ndim == 1 else
                    rng.normal(0, 0.1, v.shape), np.float32) for v in leaves]
  return jax.tree.unflatten(tree, new)


@pytest.mark.parametrize("activation", tuple(models.ACTIVATIONS))
@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_mlp_matches_numpy(placement, activation):
  momentum = 0.9
  net = make("mlp", placement, activation, momentum=momentum)
  x = images(BATCH, seed=1)
  variables = _randomize(net.init(jax.random.key(0), x, train=False), 2)

  expected, _ = reference_mlp(variables, x, placement, activation, False)
  np.testing.assert_allclose(net.apply(variables, x, train=False), expected,
                             rtol=1e-4, atol=1e-5)

  expected, batch = reference_mlp(variables, x, placement, activation, True)
  logits, updates = net.apply(variables, x, train=True,
                              mutable=["batch_stats"])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  # Running statistics: flax's momentum convention, biased batch variance.
  for name, (mean, var) in batch.items():
    new = _bn_vars(updates["batch_stats"], name)
    old = _bn_vars(variables["batch_stats"], name)
    np.testing.assert_allclose(
        new["mean"], momentum * np.asarray(old["mean"]) + (1 - momentum) * mean,
        rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        new["var"], momentum * np.asarray(old["var"]) + (1 - momentum) * var,
        rtol=1e-4, atol=1e-6)
  assert len(batch) == {"none": 0, "input": 1}.get(placement, len(WIDTHS))


# ----------------------------------------------------------------------------
# Eval mode reads running statistics; training mode, the batch's.


@pytest.mark.parametrize("placement,model", helpers.slow_except(
    [(p, m) for m in models.MODELS for p in models.PLACEMENTS],
    lambda p, m: m == "mlp"))
def test_eval_output_does_not_depend_on_the_batch(placement, model):
  net = make(model, placement)
  x = images(BATCH, seed=3)
  variables = net.init(jax.random.key(0), x, train=False)
  # One training-mode step, so that the running statistics are not 0 / 1.
  _, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
  variables = {**variables, **updates}
  other = x.copy()
  other[1:] = images(BATCH - 1, seed=4) * 3.0  # other batch-mates
  moved = np.roll(x, 3, axis=0)  # the same batch, x[0] now at row 3

  eval_a = net.apply(variables, x, train=False)
  eval_b = net.apply(variables, other, train=False)
  eval_moved = net.apply(variables, moved, train=False)
  np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eval_a, np.roll(eval_moved, -3, axis=0),
                             rtol=1e-5, atol=1e-6)

  train_a, _ = net.apply(variables, x, train=True, mutable=["batch_stats"])
  train_b, _ = net.apply(variables, other, train=True,
                         mutable=["batch_stats"])
  gap = np.max(np.abs(np.asarray(train_a[0]) - np.asarray(train_b[0])))
  if placement == "none":
    assert gap < 1e-5
  else:
    assert gap > 1e-3  # the batch statistics changed the first output


# ----------------------------------------------------------------------------
# Invalid names.


@pytest.mark.parametrize("model", models.MODELS)
@pytest.mark.parametrize("field, bad, choices", [
    ("placement", "before", models.PLACEMENTS),
    ("activation", "gelu", tuple(models.ACTIVATIONS))])
def test_invalid_name_lists_choices(model, field, bad, choices):
  net = make(model, **{field: bad})
  with pytest.raises(ValueError, match=f"{field}='{bad}'") as error:
    net.init(jax.random.key(0), images(2), train=False)
  for choice in choices:
    assert repr(choice) in str(error.value)


def test_invalid_model_lists_choices():
  with pytest.raises(ValueError, match="model='vgg'") as error:
    make("vgg")
  for choice in models.MODELS:
    assert repr(choice) in str(error.value)


# ----------------------------------------------------------------------------
# The CNN's convolution: flax.linen.Conv as a matmul.


@pytest.mark.slow
@pytest.mark.parametrize("kernel_size, use_bias", [((3, 3), True),
                                                   ((3, 3), False),
                                                   ((5, 3), True)])
def test_conv_matches_flax_conv(kernel_size, use_bias):
  """models.Conv against flax.linen.Conv (XLA's convolution, stride 1, SAME):
  the same initial parameters from the same key, the same output and the
  same gradients with respect to input and parameters."""
  import flax.linen as flax_nn
  x = jax.random.normal(jax.random.key(0), (3, 9, 7, 4))
  ours = models.Conv(6, kernel_size, use_bias=use_bias)
  theirs = flax_nn.Conv(6, kernel_size, use_bias=use_bias)
  variables = theirs.init(jax.random.key(1), x)
  for a, b in zip(jax.tree.leaves(ours.init(jax.random.key(1), x)),
                  jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(variables, x),
                             theirs.apply(variables, x), rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  grads = [jax.grad(loss(m), argnums=(0, 1))(variables, x)
           for m in (ours, theirs)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_patches_matmul_is_the_matmul_over_the_last_axis():
  """The 2-D form of the im2col product: a (2, 3, 4, 5) array of patches
  times a (5, 6) kernel, and the gradients of sum(y * weights), against
  NumPy's einsums (d/dpatches = weights @ kernel.T, d/dkernel = the patches'
  rows times the weights' rows, summed)."""
  patches = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 4, 5)))
  kernel = np.asarray(jax.random.normal(jax.random.key(1), (5, 6)))
  np.testing.assert_allclose(models.patches_matmul(patches, kernel),
                             np.einsum("abck,kf->abcf", patches, kernel),
                             rtol=1e-5, atol=1e-6)
  weights = np.asarray(jax.random.normal(jax.random.key(2), (2, 3, 4, 6)))
  loss = lambda p, k: jnp.sum(models.patches_matmul(p, k) * weights)
  d_patches, d_kernel = jax.grad(loss, argnums=(0, 1))(patches, kernel)
  np.testing.assert_allclose(d_patches,
                             np.einsum("abcf,kf->abck", weights, kernel),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_kernel,
                             np.einsum("abck,abcf->kf", patches, weights),
                             rtol=1e-5, atol=1e-5)


def test_conv_rejects_even_kernels():
  with pytest.raises(ValueError, match="odd sizes"):
    models.Conv(4, (2, 2)).init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))


def _numpy_pool_2x2(x):
  """Max over each 2x2 window and the pooling gradient that splits each
  window's cotangent evenly over its tied maxima, by explicit loops."""
  n, h, w, c = x.shape
  out = np.zeros((n, h // 2, w // 2, c), x.dtype)
  share = np.zeros_like(x)  # d out[window] / d x
  for b, i, j, k in np.ndindex(n, h // 2, w // 2, c):
    window = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k]
    out[b, i, j, k] = window.max()
    ties = window == window.max()
    share[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k] = ties / ties.sum()
  return out, share


def test_max_pool_2x2_matches_flax_and_numpy():
  """Forward: flax.linen.max_pool's values exactly. Gradient: flax's where
  the maxima are unique; with ties (a ReLU'd, BN'd window of zeros), the
  cotangent split evenly over them, against NumPy loops."""
  import flax.linen as flax_nn
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 4, 3)))
  np.testing.assert_array_equal(
      models.max_pool_2x2(x), flax_nn.max_pool(x, (2, 2), strides=(2, 2)))
  weights = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 2, 3)))
  loss = lambda pool: lambda x: jnp.sum(pool(x) * weights)
  flax_pool = lambda x: flax_nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(jax.grad(loss(models.max_pool_2x2))(x),
                                jax.grad(loss(flax_pool))(x))
  tied = np.maximum(np.round(x), 0.0)  # many windows of equal values
  out, share = _numpy_pool_2x2(tied)
  assert np.any((share > 0) & (share < 1)), "the case has no ties"
  np.testing.assert_array_equal(models.max_pool_2x2(tied), out)
  upsampled = np.repeat(np.repeat(weights, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(jax.grad(loss(models.max_pool_2x2))(tied),
                             share * upsampled, rtol=1e-6)


def test_max_pool_2x2_rejects_odd_sizes():
  with pytest.raises(ValueError, match="even height and width"):
    models.max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


# ----------------------------------------------------------------------------
# Backend switches and the norm factory.


@pytest.mark.slow
def test_cnn_with_either_convolution_gives_the_same_model():
  """conv="im2col" (models.Conv) and conv="xla" (flax.linen.Conv): same
  parameters from the same key, same outputs and gradients."""
  x = jnp.asarray(images(4))
  outputs, grads = [], []
  for conv in ("im2col", "xla"):
    model = models.make_model("cnn", placement="after_activation",
                              activation="relu", widths=WIDTHS,
                              channels=CHANNELS, conv=conv)
    variables = model.init(jax.random.key(0), x, train=False)
    loss = lambda p, v=variables, m=model: jnp.sum(m.apply(
        {**v, "params": p}, x, train=True, mutable=["batch_stats"])[0] ** 2)
    outputs.append(variables["params"])
    grads.append(jax.grad(loss)(variables["params"]))
  chex.assert_trees_all_equal(*outputs)
  # To float rounding (summation order differs; BN amplifies it a little).
  chex.assert_trees_all_close(*grads, rtol=2e-3, atol=1e-4)


def test_auto_choices_follow_the_backend():
  choose = models.resolve_backend_choice
  assert choose("auto", "im2col", "xla", backend="cpu") == "im2col"
  assert choose("auto", "im2col", "xla", backend="gpu") == "xla"
  assert choose("auto", "im2col", "xla", backend="tpu") == "xla"
  assert choose("xla", "im2col", "xla", backend="cpu") == "xla"  # override
  # impl="auto": the XLA:CPU barriers only in the CPU's program.
  options = {"momentum": 0.9, "epsilon": 1e-3, "impl": "auto"}
  x = jnp.ones((4, 3))
  for backend, barriers in (("cpu", True), ("gpu", False)):
    norm = models.make_norm(options, backend=backend)()
    variables = norm.init(jax.random.key(0), x, use_running_average=False)
    program = str(jax.make_jaxpr(lambda v: norm.apply(
        v, x, use_running_average=False, mutable=["batch_stats"]))(
            variables))
    assert ("optimization_barrier" in program) == barriers, backend


def test_make_norm_passes_every_option_to_batch_norm():
  """The norm the factory builds normalizes as a BatchNorm given the same
  arguments directly (here: the exact cumulative average, an unbiased
  running variance and a large epsilon)."""
  options = {"momentum": None, "epsilon": 0.5, "unbiased_running_var": True,
             "stats_method": "two_pass", "grad": "autodiff", "impl": "plain"}
  x = jnp.asarray(images(6)[:, :5])
  direct = bn_nn.BatchNorm(**options)
  built = models.make_norm(options)()
  results = []
  for module in (direct, built):
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    y, updates = module.apply(variables, x, use_running_average=False,
                              mutable=["batch_stats"])
    results.append((y, updates))
  chex.assert_trees_all_equal(*results)
  stats = results[0][1]["batch_stats"]
  np.testing.assert_allclose(stats["var"], np.var(np.asarray(x), 0, ddof=1),
                             rtol=1e-5)  # momentum None, first update: exact
  assert int(stats["count"]) == 1


@pytest.mark.parametrize("field, value, fragment", [
    ("stats_method", "welford", "config.bn.stats_method='welford'"),
    ("grad", True, "config.bn.grad=True"),
    ("impl", "gpu", "config.bn.impl='gpu'"),
    ("momentum", 1.5, "config.bn.momentum=1.5"),
    ("epsilon", 0, "config.bn.epsilon=0"),
    ("unbiased_running_var", "yes", "config.bn.unbiased_running_var='yes'"),
])
def test_check_norm_options_names_the_field(field, value, fragment):
  options = {"momentum": 0.99, "epsilon": 1e-3, "unbiased_running_var": False,
             "stats_method": "shifted", "grad": "paper_jvp", "impl": "auto",
             field: value}
  with pytest.raises(ValueError, match=re.escape(fragment)):
    models.check_norm_options(options)
