"""studies.why_bn.landscape against gradients written out by hand in NumPy, central
finite differences, closed forms of a quadratic, direct loss evaluations,
and the noise distribution Algorithm 1 of Santurkar et al. (2018)
describes."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from studies.why_bn import landscape
from bn_lab import models
from bn_jax import nn as bn_nn
from bn_lab import train

WIDTHS = (8, 8)
BATCH = 16


def _assert_one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as error:
    fn(*args, **kwargs)
  assert "\n" not in str(error.value)


def _batch(seed, n=BATCH):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(0, 1, (n, 784)), jnp.float32),
          jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def _model(placement="before_activation", norm=bn_nn.BatchNorm):
  return models.make_model("mlp", placement=placement, activation="relu",
                           widths=WIDTHS, norm=functools.partial(
                               norm, momentum=0.9))


def _perturbed(tree, seed, size=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + size * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


def _bn_setup(placement="before_activation", norm=bn_nn.BatchNorm, seed=0):
  """A BN MLP with every parameter moved off its init, its loss on one
  batch in training mode, and a random update of every parameter."""
  model = _model(placement, norm)
  images, labels = _batch(seed)
  variables = model.init(jax.random.key(seed), images[:2], train=False)
  params = _perturbed(variables["params"], seed + 1)
  rngs = {"noise": jax.random.key(seed + 2)}
  loss_fn = landscape.training_loss(model, variables["batch_stats"], images,
                                    labels, rngs=rngs)
  updates = _perturbed(jax.tree.map(jnp.zeros_like, params), seed + 3, 0.1)
  return model, params, loss_fn, updates


# ----------------------------------------------------------------------------
# Internal covariate shift.


def _two_layer_grads(x, y, w1, b1, w2, b2):
  """Gradients of L = |h W2 + b2 - y|^2 / (2N), h = x W1 + b1, by hand."""
  n = x.shape[0]
  h = x @ w1 + b1
  r = h @ w2 + b2 - y
  dh = r @ w2.T / n
  return (x.T @ dh, dh.sum(0)), (h.T @ r / n, r.sum(0) / n)


def _l2_and_cosine(g, g_moved):
  g, g_moved = (np.concatenate([a.ravel() for a in t]) for t in (g, g_moved))
  return (np.linalg.norm(g - g_moved),
          g @ g_moved / (np.linalg.norm(g) * np.linalg.norm(g_moved)))


def test_ics_of_a_two_layer_linear_net_matches_hand_gradients():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((32, 5)), rng.standard_normal((32, 3))
  shapes = {"first": ((5, 4), (4,)), "second": ((4, 3), (3,))}
  params = {name: {"kernel": rng.standard_normal(k), "bias":
                   rng.standard_normal(b)} for name, (k, b) in shapes.items()}
  # Every layer moves, the top one too: its own update must not count.
  updates = jax.tree.map(lambda p: 0.3 * rng.standard_normal(p.shape),
                         params)

  def loss_fn(p):
    h = x @ p["first"]["kernel"] + p["first"]["bias"][None, :]
    out = h @ p["second"]["kernel"] + p["second"]["bias"][None, :]
    return jnp.sum(jnp.square(out - y)) / (2 * x.shape[0])

  flat = lambda p: (p["first"]["kernel"], p["first"]["bias"],
                    p["second"]["kernel"], p["second"]["bias"])
  with jax.enable_x64(True):
    got = landscape.internal_covariate_shift(
        loss_fn, jax.tree.map(jnp.asarray, params),
        jax.tree.map(jnp.asarray, updates), ["first", "second"])
  g_first, g_second = _two_layer_grads(x, y, *flat(params))
  w1, b1, w2, b2 = flat(params)
  moved = (w1 + updates["first"]["kernel"], b1 + updates["first"]["bias"],
           w2, b2)
  _, g_second_moved = _two_layer_grads(x, y, *moved)
  l2, cosine = _l2_and_cosine(g_second, g_second_moved)
  assert l2 > 0.1 and cosine < 0.99  # a shift worth measuring
  np.testing.assert_allclose(got.l2, [0.0, l2], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got.cosine, [1.0, cosine], rtol=1e-10)
  np.testing.assert_allclose(
      got.grad_norm, [np.sqrt(sum(np.sum(a**2) for a in g))
                      for g in (g_first, g_second)], rtol=1e-10)


def _tanh_net_loss(p, x, y, xp=np):
  h = x
  for name in ("a", "b", "c"):
    h = h @ p[name]["kernel"] + p[name]["bias"][None, :]
    if name != "c":
      h = xp.tanh(h)
  return xp.sum(xp.square(h - y)) / (2 * x.shape[0])


def _finite_difference_grad(loss, params, layer, step=1e-6):
  """Central differences of `loss` w.r.t. every entry of params[layer]."""
  grads = {}
  for name, value in params[layer].items():
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
      shifted = []
      for sign in (1, -1):
        p = {k: dict(v) for k, v in params.items()}
        p[layer][name] = value.copy()
        p[layer][name][index] += sign * step
        shifted.append(loss(p))
      grad[index] = (shifted[0] - shifted[1]) / (2 * step)
    grads[name] = grad
  return [grads["bias"], grads["kernel"]]


def test_ics_of_a_three_layer_tanh_net_matches_finite_differences():
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
  sizes = {"a": (3, 4), "b": (4, 3), "c": (3, 2)}
  params = {n: {"kernel": 0.8 * rng.standard_normal(s),
                "bias": 0.3 * rng.standard_normal(s[1])}
            for n, s in sizes.items()}
  updates = jax.tree.map(lambda p: 0.2 * rng.standard_normal(p.shape),
                         params)
  loss = functools.partial(_tanh_net_loss, x=x, y=y)
  order = ("a", "b", "c")
  want_l2, want_cosine = [], []
  for i, layer in enumerate(order):
    moved = {n: ({k: params[n][k] + updates[n][k] for k in params[n]}
                 if order.index(n) < i else params[n]) for n in order}
    l2, cosine = _l2_and_cosine(_finite_difference_grad(loss, params, layer),
                                _finite_difference_grad(loss, moved, layer))
    want_l2.append(l2)
    want_cosine.append(cosine)
  with jax.enable_x64(True):
    got = landscape.internal_covariate_shift(
        functools.partial(_tanh_net_loss, x=x, y=y, xp=jnp),
        jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, updates),
        order)
  assert min(want_l2[1:]) > 1e-2
  np.testing.assert_allclose(got.l2, want_l2, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(got.cosine, want_cosine, rtol=1e-6)


def test_classifier_layers_cover_the_models_parameters_in_order():
  for placement in ("input", "before_activation", "none"):
    model = _model(placement)
    params = model.init(jax.random.key(0), _batch(0)[0][:2],
                        train=False)["params"]
    layers = landscape.classifier_layers(model)
    assert set(layers) == set(params)
    assert layers[-1] == "readout" and layers[-2] == f"hidden_{len(WIDTHS)-1}"
    assert (layers[0] == "input_bn") == (placement == "input")
  cnn = models.make_model("cnn", placement="after_activation",
                          activation="relu", widths=(4,), channels=(2, 3))
  assert landscape.classifier_layers(cnn) == (
      "conv_0", "conv_1", "hidden_0", "readout")


@pytest.mark.parametrize("norm", [bn_nn.BatchNorm, landscape.NoisyBN],
                         ids=["bn", "noisy_bn"])
def test_ics_of_a_bn_net_sees_only_the_updates_below(norm):
  """Training mode, batch statistics: a layer's gradient moves when a layer
  below it moves, and not when it or a layer above it moves."""
  model, params, loss_fn, updates = _bn_setup("input", norm)
  layers = landscape.classifier_layers(model)
  assert layers == ("input_bn", "hidden_0", "hidden_1", "readout")
  ics = jax.jit(landscape.internal_covariate_shift, static_argnums=(0, 3))
  full = ics(loss_fn, params, updates, layers)
  assert full.l2[0] == 0.0
  assert np.all(full.l2[1:] > 1e-4) and np.all(full.grad_norm > 0)
  np.testing.assert_allclose(full.cosine[0], 1.0, rtol=1e-6)
  assert np.all(full.cosine <= 1.0 + 1e-6)
  # Only hidden_1 and the readout move: nothing below hidden_1 changed.
  upper = {name: (value if name in ("hidden_1", "readout") else
                  jax.tree.map(jnp.zeros_like, value))
           for name, value in updates.items()}
  part = ics(loss_fn, params, upper, layers)
  np.testing.assert_array_equal(part.l2[:2], 0.0)
  assert part.l2[3] > 1e-4
  # lax.map, two points at a time, computes the same.
  mapped = jax.jit(landscape.internal_covariate_shift, static_argnums=(0, 3),
                   static_argnames="batch_size")(loss_fn, params, updates,
                                                 layers, batch_size=2)
  for a, b in zip(full, mapped):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ics_layer_paths_split_a_block():
  model, params, loss_fn, updates = _bn_setup()
  split = ("hidden_0/Dense_0", "hidden_0/BatchNorm_0", "hidden_1",
           "readout")
  ics = jax.jit(landscape.internal_covariate_shift, static_argnums=(0, 3))(
      loss_fn, params, updates, split)
  assert ics.l2.shape == (4,)
  # The BN after hidden_0's Dense sees the Dense's update.
  assert ics.l2[0] == 0.0 and ics.l2[1] > 0.0


def test_ics_rejects_bad_layers_and_updates():
  model, params, loss_fn, updates = _bn_setup()
  layers = landscape.classifier_layers(model)
  ics = functools.partial(landscape.internal_covariate_shift, loss_fn,
                          params)
  _assert_one_line_error("'hidden_7' names no parameters", ics, updates,
                         (*layers, "hidden_7"))
  _assert_one_line_error(r"layers=\(\)", ics, updates, ())
  _assert_one_line_error("sequence of layer names", ics, updates, "readout")
  _assert_one_line_error("twice", ics, updates, (*layers, "readout"))
  _assert_one_line_error("leave out", ics, updates, layers[1:])
  _assert_one_line_error("overlap", ics, updates,
                         (*layers, "hidden_0/Dense_0"))
  _assert_one_line_error("tree structure differs", ics,
                         {k: v for k, v in updates.items()
                          if k != "readout"}, layers)
  wrong_shape = jax.tree.map(lambda u: u, updates)
  wrong_shape["readout"]["bias"] = jnp.zeros(3)
  _assert_one_line_error("leaf of shape", ics, wrong_shape, layers)
  _assert_one_line_error("batch_size=0", ics, updates, layers, batch_size=0)
  _assert_one_line_error("classifier", landscape.classifier_layers,
                         bn_nn.BatchNorm())


# ----------------------------------------------------------------------------
# Loss landscape.


def test_landscape_of_a_quadratic_matches_its_closed_form():
  # L(w) = w' A w / 2, A = diag(a): g = A w, w - eta g = (1 - eta a) w.
  a = np.array([0.5, 1.0, 3.0, 8.0])
  w = np.array([1.0, -2.0, 0.5, 0.25])
  etas = np.array([0.01, 0.05, 0.1, 0.2])
  with jax.enable_x64(True):
    got = landscape.gradient_landscape(
        lambda v: 0.5 * jnp.sum(jnp.asarray(a) * v * v), jnp.asarray(w),
        jnp.asarray(etas))
  losses = [0.5 * np.sum(a * ((1 - eta * a) * w) ** 2) for eta in etas]
  changes = etas * np.linalg.norm(a * a * w)
  np.testing.assert_allclose(got.losses, losses, rtol=1e-12)
  np.testing.assert_allclose(got.grad_changes, changes, rtol=1e-12)
  ratio = np.linalg.norm(a * a * w) / np.linalg.norm(a * w)
  np.testing.assert_allclose(got.ratios, ratio, rtol=1e-12)
  np.testing.assert_allclose(got.beta_smoothness, ratio, rtol=1e-12)
  assert float(got.beta_smoothness) <= a.max()
  np.testing.assert_allclose(got.loss_range, max(losses) - min(losses),
                             rtol=1e-12)


def _direct_landscape(loss_fn, params, etas):
  """Each point's loss and gradient computed one at a time, in NumPy."""
  flat = lambda tree: np.concatenate([np.ravel(x) for x in
                                      jax.tree.leaves(tree)])
  loss_fn, grad_fn = jax.jit(loss_fn), jax.jit(jax.grad(loss_fn))
  grad = grad_fn(params)
  losses, changes = [], []
  for eta in etas:
    point = jax.tree.map(lambda p, g, eta=eta: p - eta * g, params, grad)
    losses.append(float(loss_fn(point)))
    changes.append(np.linalg.norm(flat(grad) - flat(grad_fn(point))))
  ratios = np.array(changes) / (np.asarray(etas) * np.linalg.norm(flat(
      grad)))
  return np.array(losses), np.array(changes), ratios


def test_landscape_of_a_bn_net_matches_direct_evaluations():
  _, params, loss_fn, _ = _bn_setup()
  etas = landscape.step_sizes(0.1, num=5)
  np.testing.assert_allclose(etas, [0.05, 0.1375, 0.225, 0.3125, 0.4],
                             rtol=1e-6)
  losses, changes, ratios = _direct_landscape(loss_fn, params, etas)
  got = jax.jit(landscape.gradient_landscape, static_argnums=0)(
      loss_fn, params, etas)
  np.testing.assert_allclose(got.losses, losses, rtol=1e-5)
  np.testing.assert_allclose(got.grad_changes, changes, rtol=1e-4)
  np.testing.assert_allclose(got.ratios, ratios, rtol=1e-4)
  np.testing.assert_allclose(got.loss_min, losses.min(), rtol=1e-5)
  np.testing.assert_allclose(got.loss_max, losses.max(), rtol=1e-5)
  np.testing.assert_allclose(got.loss_range, np.ptp(losses), rtol=1e-3,
                             atol=1e-6)
  np.testing.assert_allclose(got.beta_smoothness, ratios.max(), rtol=1e-4)
  np.testing.assert_allclose(got.loss, loss_fn(params), rtol=1e-6)
  mapped = jax.jit(landscape.gradient_landscape, static_argnums=0,
                   static_argnames="batch_size")(loss_fn, params, etas,
                                                 batch_size=2)
  for a, b in zip(got, mapped):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_landscape_vmaps_over_runs():
  _, params, loss_fn, _ = _bn_setup()
  runs = [params, _perturbed(params, 9, 0.1)]
  etas = jnp.array([0.05, 0.4])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *runs)
  one_run = lambda p: landscape.gradient_landscape(loss_fn, p, etas)
  both = jax.jit(jax.vmap(one_run))(stacked)
  for k, run in enumerate(runs):
    one = jax.jit(one_run)(run)
    for a, b in zip(both, one):
      np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-7)


def test_training_loss_is_the_train_steps_loss():
  spec = train.TrainSpec(widths=WIDTHS, placement="before_activation",
                         batch_size=BATCH)
  state = train.create_train_state(spec, 0, {"learning_rate": 0.01})
  images, labels = _batch(3)
  _, metrics = train.train_step(state, images, labels, spec=spec)
  loss_fn = landscape.training_loss(spec.make_model(state.bn_hparams),
                                    state.batch_stats, images, labels)
  np.testing.assert_allclose(loss_fn(state.params),
                             metrics["loss_sum"] / BATCH, rtol=1e-6)


def test_landscape_rejects_bad_grids():
  _, params, loss_fn, _ = _bn_setup()
  run = functools.partial(landscape.gradient_landscape, loss_fn, params)
  _assert_one_line_error("non-empty 1-D grid", run, jnp.zeros((0,)))
  _assert_one_line_error("non-empty 1-D grid", run, jnp.ones((2, 2)))
  _assert_one_line_error("non-empty 1-D grid", run, jnp.array([1, 2]))
  _assert_one_line_error("> 0", run, jnp.array([0.0, 0.1]))
  _assert_one_line_error("> 0", run, jnp.array([0.1, jnp.nan]))
  _assert_one_line_error("batch_size=-1", run, jnp.array([0.1]),
                         batch_size=-1)
  _assert_one_line_error("factors", landscape.step_sizes, 0.1,
                         factors=(4.0, 0.5))
  _assert_one_line_error("num=0", landscape.step_sizes, 0.1, num=0)


# ----------------------------------------------------------------------------
# Noisy BN.


def _noise(key=0, step=0, shape=(4000, 64), **kwargs):
  """The shift m and the scale s the noise draws for (key, step): its
  outputs for y = 0 and y = 1 (one draw, so s = out(1) - out(0))."""
  key = jax.random.key(key)
  shift = landscape.noisy_affine(jnp.zeros(shape), key, step, **kwargs)
  return (np.asarray(shift), np.asarray(landscape.noisy_affine(
      jnp.ones(shape), key, step, **kwargs)) - np.asarray(shift))


def test_noisy_affine_is_deterministic_and_moves_every_step():
  y = jax.random.normal(jax.random.key(1), (32, 6))
  key = jax.random.key(2)
  same = [landscape.noisy_affine(y, key, 3) for _ in range(2)]
  np.testing.assert_array_equal(*same)
  step = jax.jit(landscape.noisy_affine)
  np.testing.assert_allclose(step(y, key, 3), same[0], rtol=1e-6)
  assert not np.allclose(landscape.noisy_affine(y, key, 4), same[0])
  assert not np.allclose(landscape.noisy_affine(y, jax.random.key(3), 3),
                         same[0])
  # The distribution itself moves: per-feature mean shifts of two steps.
  shift_0, _ = _noise(step=0)
  shift_1, _ = _noise(step=1)
  assert np.abs(shift_0.mean(0) - shift_1.mean(0)).max() > 0.2


def test_noisy_affine_draws_algorithm_1s_distribution():
  n = landscape.PAPER_NOISE
  assert n == {"n_mu": 0.5, "n_sigma": 1.25, "r_mu": 0.1, "r_sigma": 0.1}
  shift, scale = _noise()
  # Shift: per feature, U(mu - 0.1, mu + 0.1) with mu ~ U(-0.5, 0.5).
  mu = shift.mean(0)
  assert np.all(np.abs(mu) < n["n_mu"] + 0.01)
  assert np.abs(mu).max() > 0.25 and 0.2 < mu.std() < 0.4  # non-zero mean
  assert np.all(shift.max(0) - shift.min(0) <= 2 * n["r_mu"] + 1e-6)
  np.testing.assert_allclose(shift.std(0), n["r_mu"] / np.sqrt(3), rtol=0.1)
  # Scale: per feature, N(sigma, 0.1^2) with sigma ~ U(1, 1.25).
  sigma = scale.mean(0)
  se = 4 * n["r_sigma"] / np.sqrt(scale.shape[0])
  assert np.all((sigma > 1 - se) & (sigma < n["n_sigma"] + se))
  assert sigma.max() > 1.15  # non-unit scale
  np.testing.assert_allclose(scale.std(0), n["r_sigma"], rtol=0.1)
  # Unit-variance input leaves with variance E[sigma^2] + r_sigma^2 +
  # r_mu^2 / 3 on average: 1.27 + 0.01 + 0.0033.
  y = jax.random.normal(jax.random.key(5), (4000, 64))
  out = landscape.noisy_affine(y, jax.random.key(0), 0)
  np.testing.assert_allclose(np.var(out, 0).mean(), 1.2708 + 0.0133,
                             atol=0.05)


def test_noisy_affine_shares_parameters_over_a_convs_pixels():
  shift, _ = _noise(shape=(8, 5, 5, 3))
  per_channel = shift.reshape(-1, 3)
  assert np.all(per_channel.max(0) - per_channel.min(0) <= 0.2 + 1e-6)
  y = jnp.ones((4, 3), jnp.bfloat16)
  assert landscape.noisy_affine(y, jax.random.key(0), 0).dtype == jnp.bfloat16
  _assert_one_line_error("n_sigma=0.5", landscape.noisy_affine, y,
                         jax.random.key(0), 0, n_sigma=0.5)


def test_noisy_bn_is_batch_norm_then_noise():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2000, 16))
  plain, noisy = bn_nn.BatchNorm(momentum=0.9), landscape.NoisyBN(
      momentum=0.9)
  variables = noisy.init(jax.random.key(1), x[:2], use_running_average=True)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, plain.init(jax.random.key(1), x[:2],
                            use_running_average=True))
  variables = {**variables, "batch_stats": {"mean": jnp.full(16, 2.0),
                                            "var": jnp.full(16, 3.0)}}
  train_mode = functools.partial(noisy.apply, use_running_average=False,
                                 mutable=["batch_stats"])
  rngs = lambda seed: {"noise": jax.random.key(seed)}
  y, stats = train_mode(variables, x, rngs=rngs(7))
  y_again, _ = train_mode(variables, x, rngs=rngs(7))
  y_other, _ = train_mode(variables, x, rngs=rngs(8))
  np.testing.assert_array_equal(y, y_again)
  assert not np.allclose(y, y_other)
  bn_y, bn_stats = plain.apply(variables, x, use_running_average=False,
                               mutable=["batch_stats"])
  # The statistics are BN's; the output is BN's with Algorithm 1's noise.
  jax.tree.map(np.testing.assert_array_equal, stats, bn_stats)
  np.testing.assert_allclose(bn_y.mean(0), 0.0, atol=1e-4)
  assert np.all(np.abs(y.mean(0)) < 0.5 + 0.05)
  assert np.abs(y.mean(0)).max() > 0.1
  assert np.all((y.std(0) > 0.95) & (y.std(0) < 1.3))
  # Evaluation: the noise's mean, E[s] y + E[m] = 1.125 y.
  np.testing.assert_allclose(
      noisy.apply(variables, x, use_running_average=True),
      1.125 * plain.apply(variables, x, use_running_average=True),
      rtol=1e-6)
  with pytest.raises(flax.errors.InvalidRngError):
    train_mode(variables, x)
