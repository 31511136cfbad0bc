"""studies.gan.gan: the nets of every variant, D's separate and joint BN, the
scanned training step, the evaluation metrics against NumPy/SciPy, the
config checks, the runner's resume check on a GAN workdir, and (slow) the
study end to end through the one command line (experiments.main)."""

import dataclasses
import functools
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import helpers
from bn_lab import models
from bn_lab import runner
from bn_lab import train
from bn_lab import workdir as workdir_lib
import studies.gan as gan_study
from studies.gan import config as gan_config
from studies.gan import gan
from studies.gan import report as gan_report

TINY = gan.GANSpec(latent_dim=8, generator_channels=(6, 4),
                   discriminator_channels=(4, 6), batch_size=8,
                   steps_per_epoch=3, num_epochs=1, conv="im2col")
VARIANTS = [(g, d) for g in gan.GENERATOR_NORMS
            for d in gan.DISCRIMINATOR_NORMS]


def tiny_data(num_train=64, num_test=32, seed=0) -> train.DeviceData:
  rng = np.random.default_rng(seed)
  pixels = lambda n: rng.integers(0, 256, (n, 784), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 10, n)
  return train.to_device(pixels(num_train), labels(num_train),
                         pixels(num_test), labels(num_test))


def test_config_variants_are_valid():
  for arg in ("", "short"):
    config = gan_config.get_config(arg)
    gan.validate_config(config)
    assert len(gan.variants(config)) == 9
  with pytest.raises(ValueError, match="studies/gan/config.py:long"):
    gan_config.get_config("long")


# One variant per norm of each net stays fast; the rest are `slow`.
_FAST_VARIANTS = {("batch", "none"), ("layer", "batch_separate"),
                  ("none", "batch_joint")}


@pytest.mark.parametrize("generator_norm,discriminator_norm",
                         helpers.slow_except(
                             VARIANTS, lambda *v: v in _FAST_VARIANTS))
def test_shapes_and_variables_of_every_variant(generator_norm,
                                               discriminator_norm):
  # One fast variant has G's sigmoid output.
  output = "sigmoid" if generator_norm == "none" else "tanh"
  spec = dataclasses.replace(TINY, generator_norm=generator_norm,
                             discriminator_norm=discriminator_norm,
                             output=output)

  # Op by op, not jitted: the ops' programs are shared by every variant and
  # the file's other tests (one program per variant compiled the whole
  # initialization again, seconds each); create_states, jitted, is
  # the sweep tests'.
  def run(seed):
    state = gan.create_state(spec, seed)
    images = spec.generator().apply(
        {"params": state.g_params, "batch_stats": state.g_stats},
        jnp.ones((5, spec.latent_dim)), train=False)
    logits, _ = spec.discriminator().apply(
        {"params": state.d_params, "batch_stats": state.d_stats},
        (jnp.zeros((5, 28, 28, 1)), jnp.ones((3, 28, 28, 1))), train=True,
        mutable=["batch_stats"])
    return state, images, logits

  state, images, (real_logits, fake_logits) = run(0)
  assert images.shape == (5, 28, 28, 1)
  low = 0.0 if output == "sigmoid" else -1.0
  assert jnp.all((images >= low) & (images <= 1.0))
  assert real_logits.shape == (5,) and fake_logits.shape == (3,)
  # BN statistics exactly where BatchNorm is, per channel.
  if generator_norm == "batch":
    assert jax.tree.map(jnp.shape, state.g_stats) == {
        "norm_0": {"mean": (6,), "var": (6,)},
        "norm_1": {"mean": (4,), "var": (4,)}}
  else:
    assert state.g_stats == {}
  if generator_norm == "layer":  # a scale and bias per channel
    assert state.g_params["norm_1"]["scale"].shape == (4,)
  if discriminator_norm == "none":
    assert state.d_stats == {}
  else:
    assert jax.tree.map(jnp.shape, state.d_stats) == {
        "norm": {"mean": (6,), "var": (6,)}}
  # No bias before a norm (its beta replaces it).
  has_norm = generator_norm != "none"
  assert ("bias" in state.g_params["conv_0"]) != has_norm
  assert ("bias" in state.d_params["conv_1"]) == (discriminator_norm == "none")


def test_pixel_ranges_of_each_output():
  pixels = jnp.asarray([[0, 255] * 392], jnp.uint8)
  sigmoid = dataclasses.replace(TINY, output="sigmoid")
  assert sigmoid.images(pixels).min() == 0.0
  assert sigmoid.images(pixels).shape == (1, 28, 28, 1)
  assert TINY.images(pixels).min() == -1.0 and TINY.images(pixels).max() == 1
  np.testing.assert_allclose(TINY.to_unit(TINY.images(pixels)),
                             sigmoid.images(pixels))


@pytest.mark.parametrize("kernel,strides,size", [
    ((4, 4), (2, 2), 28), ((3, 3), (2, 2), 14), ((4, 4), (2, 2), 7),
    ((3, 3), (1, 1), 9)])
def test_strided_im2col_conv_matches_flax_conv(kernel, strides, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  ours = models.Conv(5, kernel, strides=strides)
  theirs = nn.Conv(5, kernel, strides=strides)
  variables = theirs.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(ours.init(jax.random.key(1), x), variables)
  chex.assert_trees_all_close(ours.apply(variables, x),
                              theirs.apply(variables, x), atol=1e-5)


def _normalized(h, epsilon):
  """NumPy BN of conv features (N, H, W, C) with their own statistics."""
  h = np.asarray(h, np.float64)
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  return (h - mean) / np.sqrt(var + epsilon), mean, var


def test_separate_and_joint_discriminator_normalization_differ():
  """batch_separate: each of real and fake normalized by its own batch's
  statistics (two calls, running statistics updated twice in order);
  batch_joint: one set over both. Checked with NumPy on the BN layer's
  input (conv_1's output) and output."""
  spec = dataclasses.replace(TINY, discriminator_norm="batch_separate")
  state = gan.create_state(spec, 0)
  rng = np.random.default_rng(0)
  real = jnp.asarray(rng.uniform(-1, 1, (6, 28, 28, 1)), jnp.float32)
  fake = jnp.asarray(rng.uniform(0, 1, (4, 28, 28, 1)), jnp.float32)
  variables = {"params": state.d_params, "batch_stats": state.d_stats}
  epsilon, momentum = dict(spec.bn)["epsilon"], dict(spec.bn)["momentum"]
  outputs = {}
  for joint in (False, True):
    discriminator = dataclasses.replace(spec, discriminator_norm=(
        "batch_joint" if joint else "batch_separate")).discriminator()
    assert discriminator.joint == joint
    logits, state_out = discriminator.apply(
        variables, (real, fake), train=True, capture_intermediates=True,
        mutable=["batch_stats", "intermediates"])
    captured = state_out["intermediates"]
    outputs[joint] = (logits, captured["norm"]["__call__"],
                      captured["conv_1"]["__call__"],
                      state_out["batch_stats"]["norm"])
  logits, normalized, inputs, stats_sep = outputs[False]
  assert len(normalized) == 2  # two calls: real, then fake
  for y, h in zip(normalized, inputs):
    np.testing.assert_allclose(y, _normalized(h, epsilon)[0], atol=1e-4)
  _, mean_real, var_real = _normalized(inputs[0], epsilon)
  _, mean_fake, var_fake = _normalized(inputs[1], epsilon)
  expected_mean = momentum * (1 - momentum) * mean_real + (
      1 - momentum) * mean_fake
  np.testing.assert_allclose(stats_sep["mean"], expected_mean, atol=1e-5)

  joint_logits, joint_normalized, joint_inputs, _ = outputs[True]
  assert len(joint_normalized) == 1 and joint_normalized[0].shape[0] == 10
  np.testing.assert_allclose(joint_inputs[0],
                             np.concatenate(inputs), atol=1e-6)
  expected = _normalized(joint_inputs[0], epsilon)[0]
  np.testing.assert_allclose(joint_normalized[0], expected, atol=1e-4)
  # The fake half normalized jointly is not the fake normalized alone.
  assert np.max(np.abs(expected[6:] - normalized[1])) > 0.1
  assert np.max(np.abs(joint_logits[1] - logits[1])) > 1e-3


def test_discriminator_without_norm_is_the_same_joint_or_separate():
  spec = dataclasses.replace(TINY, discriminator_norm="none")
  state = gan.create_state(spec, 0)
  x = (jnp.ones((3, 28, 28, 1)), -jnp.ones((2, 28, 28, 1)))
  joint = spec.discriminator().apply({"params": state.d_params}, x,
                                     train=True)
  separate = dataclasses.replace(spec.discriminator(), joint=False).apply(
      {"params": state.d_params}, x, train=True)
  chex.assert_trees_all_close(joint, separate, atol=1e-5)


def _reference_step(state, real, spec):
  """One D step then one G step, written plainly: G recomputed for its
  own gradient (no vjp reuse), D's new parameters and statistics used."""
  generator, discriminator = spec.generator(), spec.discriminator()
  tx = spec.optimizer()
  z = gan.latents(state.noise_key, state.step, real.shape[0],
                  spec.latent_dim)

  def generate(g_params):
    return generator.apply({"params": g_params,
                            "batch_stats": state.g_stats}, z, train=True,
                           mutable=["batch_stats"])

  fake, g_updates = generate(state.g_params)

  def d_loss(d_params):
    (r, f), upd = discriminator.apply(
        {"params": d_params, "batch_stats": state.d_stats}, (real, fake),
        train=True, mutable=["batch_stats"])
    return (optax.sigmoid_binary_cross_entropy(r, jnp.ones_like(r)).mean()
            + optax.sigmoid_binary_cross_entropy(f, jnp.zeros_like(f))
            .mean()), upd
  d_grads, d_upd = jax.grad(d_loss, has_aux=True)(state.d_params)
  updates, d_opt = tx.update(d_grads, state.d_opt)
  d_params = optax.apply_updates(state.d_params, updates)

  def g_loss(g_params):
    fake, _ = generate(g_params)
    batches = ((real, fake) if spec.discriminator_norm == "batch_joint"
               else (fake,))
    logits, upd = discriminator.apply(
        {"params": d_params, "batch_stats": d_upd.get("batch_stats", {})},
        batches, train=True, mutable=["batch_stats"])
    f = logits[-1]
    return optax.sigmoid_binary_cross_entropy(f, jnp.ones_like(f)).mean(), upd
  g_grads, g_upd = jax.grad(g_loss, has_aux=True)(state.g_params)
  updates, g_opt = tx.update(g_grads, state.g_opt)
  return state._replace(
      step=state.step + 1, g_params=optax.apply_updates(state.g_params,
                                                        updates),
      g_stats=g_updates.get("batch_stats", {}), g_opt=g_opt,
      d_params=d_params, d_stats=g_upd.get("batch_stats", {}), d_opt=d_opt)


@pytest.mark.parametrize("generator_norm,discriminator_norm",
                         helpers.slow_except(
                             [("batch", "batch_joint"),
                              ("layer", "batch_separate")],
                             lambda g, d: g == "batch"))
def test_train_step_matches_a_plain_reference(generator_norm,
                                              discriminator_norm):
  spec = dataclasses.replace(TINY, generator_norm=generator_norm,
                             discriminator_norm=discriminator_norm)
  state = gan.create_state(spec, 3)
  real = spec.images(tiny_data().train_images[:spec.batch_size])
  ours, metrics = jax.jit(gan.train_step, static_argnames="spec")(
      state, real, spec=spec)
  expected = jax.jit(_reference_step, static_argnums=2)(state, real, spec)
  chex.assert_trees_all_close(ours, expected, rtol=1e-4, atol=1e-6)
  assert set(metrics) == set(gan.TRAIN_METRICS)
  assert 0 < metrics["d_real"] < 1 and metrics["d_loss"] > 0


@pytest.mark.parametrize("generator_norm,discriminator_norm",
                         helpers.slow_except(
                             [("batch", "batch_separate"),
                              ("none", "batch_joint")],
                             lambda g, d: g == "batch"))
def test_scanned_epoch_equals_steps_one_by_one(generator_norm,
                                               discriminator_norm):
  """One epoch of 2 seeds (the vmapped scan of `sweep_epoch`): seed 1's
  run equals its steps taken one by one in Python."""
  spec = dataclasses.replace(TINY, generator_norm=generator_norm,
                             discriminator_norm=discriminator_norm)
  data = tiny_data()
  swept, metrics = gan.sweep_epoch(gan.create_states(jnp.asarray([1, 2]),
                                                     spec=spec),
                                   data, spec=spec)
  state = gan.create_state(spec, 1)
  batches = train.epoch_batches(state.data_key, 0, 64, spec)
  step = jax.jit(gan.train_step, static_argnames="spec")
  losses = []
  for indices in batches:
    state, m = step(state, spec.images(data.train_images[indices]),
                    spec=spec)
    losses.append(m["d_loss"])
  scanned = jax.tree.map(lambda x: x[0], swept)
  assert int(scanned.step) == spec.steps_per_epoch
  chex.assert_trees_all_close(scanned, state, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["d_loss"][0], np.mean(losses),
                             rtol=1e-5)
  # The other seed trained differently.
  assert not np.allclose(swept.g_params["conv_1"]["kernel"][1],
                         scanned.g_params["conv_1"]["kernel"])


def test_latents_depend_on_key_and_step_only():
  key = jax.random.key_data(jax.random.key(0))
  a = gan.latents(key, 3, 4, 2)
  np.testing.assert_array_equal(a, gan.latents(key, 3, 4, 2))
  assert not np.allclose(a, gan.latents(key, 4, 4, 2))


# ----------------------------------------------------------------------------
# Evaluation metrics against closed forms and NumPy/SciPy.


def _trace_sqrt_product(cov1, cov2):
  """tr((cov1 cov2)^(1/2)) by symmetric eigendecompositions: the
  eigenvalues of cov1^(1/2) cov2 cov1^(1/2), an independent route."""
  w, v = np.linalg.eigh(cov1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root1 @ cov2 @ root1)
  return np.sum(np.sqrt(np.clip(inner, 0, None)))


def _random_covariance(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_identical_distributions_is_zero():
  rng = np.random.default_rng(0)
  mean, cov = rng.standard_normal(6), _random_covariance(rng, 6)
  assert gan.frechet_distance(mean, cov, mean, cov) == pytest.approx(
      0.0, abs=1e-9)
  # Sample statistics of one feature set against themselves, with a dead
  # (always 0) feature making the covariance singular.
  features = rng.standard_normal((300, 5))
  features[:, 2] = 0.0
  statistics = gan.feature_statistics(features)
  assert gan.frechet_distance(*statistics, *statistics) == pytest.approx(
      0.0, abs=1e-6)


def test_frechet_distance_closed_forms():
  # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
  assert gan.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == (
      pytest.approx(9.0 + 1.0))
  # Diagonal covariances: |dm|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert gan.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == (
      pytest.approx(expected))
  # General covariances: the eigendecomposition route.
  rng = np.random.default_rng(1)
  c1, c2 = _random_covariance(rng, 8), _random_covariance(rng, 8)
  m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
  expected = (np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2)
              - 2 * _trace_sqrt_product(c1, c2))
  assert gan.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected,
                                                               rel=1e-8)


def test_frechet_distance_of_gaussian_samples_approaches_the_closed_form():
  rng = np.random.default_rng(2)
  c1, c2 = _random_covariance(rng, 4), _random_covariance(rng, 4)
  m1, m2 = np.zeros(4), np.full(4, 0.5)
  x = rng.multivariate_normal(m1, c1, 200_000)
  y = rng.multivariate_normal(m2, c2, 200_000)
  expected = gan.frechet_distance(m1, c1, m2, c2)
  sampled = gan.frechet_distance(*gan.feature_statistics(x),
                                 *gan.feature_statistics(y))
  assert sampled == pytest.approx(expected, rel=0.02)
  np.testing.assert_allclose(gan.feature_statistics(x)[1], np.cov(x.T))


def test_coverage_against_numpy():
  rng = np.random.default_rng(0)
  probabilities = np.array([0.3, 0.2, 0.2, 0.1, 0.08, 0.06, 0.04, 0.02, 0,
                            0])
  labels = rng.choice(10, size=10_000, p=probabilities)
  counts = np.bincount(labels, minlength=10)
  entropy, classes = gan.coverage(labels)
  assert entropy == pytest.approx(stats.entropy(counts / counts.sum()))
  assert classes == int(np.sum(counts / counts.sum() >= 0.05))
  assert classes == 6
  assert gan.coverage(np.full(100, 3)) == (0.0, 1)
  entropy, classes = gan.coverage(np.arange(1000) % 10)
  assert entropy == pytest.approx(math.log(10)) and classes == 10


def test_sample_features_and_batch_statistics_sampling():
  """Features of the classifier's penultimate layer for K runs; sampling
  with batch statistics normalizes each chunk of latents alone."""
  spec = dataclasses.replace(TINY, generator_norm="batch")
  classifier = train.TrainSpec(model="mlp", widths=(12, 7),
                               placement="before_activation")
  classifier_variables = classifier.make_model({}).init(
      jax.random.key(0), jnp.zeros((1, 784)), train=False)
  states = gan.create_states(jnp.asarray([0, 1]), spec=spec)
  # G's running statistics, off their initial values, make the two modes
  # differ.
  states = states._replace(g_stats=jax.tree.map(lambda x: x + 0.5,
                                                states.g_stats))
  features, labels = gan.sample_features(
      states, classifier_variables, spec=spec, classifier=classifier,
      num=10, chunk=4)
  assert features.shape == (2, 10, 7) and labels.shape == (2, 10)
  run = jax.tree.map(lambda x: x[1], states)

  @functools.partial(jax.jit, static_argnames="use_running_average")
  def reference(z, use_running_average=True):
    images = gan.generate(spec, run.g_params, run.g_stats, z,
                          use_running_average=use_running_average)
    return gan.classify(classifier, classifier_variables,
                        images.reshape(z.shape[0], -1))

  z = gan.eval_latents(12, spec.latent_dim)
  expected, expected_labels = reference(z[:10])
  np.testing.assert_allclose(features[1], expected, atol=1e-5)
  np.testing.assert_array_equal(labels[1], expected_labels)
  batch_features, _ = gan.sample_features(
      states, classifier_variables, spec=spec, classifier=classifier,
      num=10, chunk=6, batch=3)
  for start in (0, 3, 9):  # each batch of 3 normalized alone; whole
    # chunks of latents, no padding in the last batch
    expected, _ = reference(z[start:start + 3], use_running_average=False)
    np.testing.assert_allclose(batch_features[1, start:start + 3],
                               expected[:10 - start], atol=1e-5)
  assert not np.allclose(batch_features[1], features[1], atol=1e-3)
  with pytest.raises(ValueError, match="multiple"):
    gan.sample_features(states, classifier_variables, spec=spec,
                        classifier=classifier, num=10, chunk=4, batch=3)


# ----------------------------------------------------------------------------
# Config checks: one line naming the field.


def _config(**overrides):
  config = gan_config.get_config("short")
  for dotted, value in overrides.items():
    *parents, name = dotted.split("__")
    target = config
    for parent in parents:
      target = target[parent]
    target[name] = value
  return config


@pytest.mark.parametrize("overrides,field", [
    ({"generator_norms": ("batch", "group")}, "generator_norms"),
    ({"generator_norms": ()}, "generator_norms"),
    ({"discriminator_norms": ("batch",)}, "discriminator_norms"),
    ({"discriminator_norms": ("none", "none")}, "discriminator_norms"),
    ({"output": "relu"}, "output"),
    ({"conv": "fft"}, "conv"),
    ({"generator_channels": (8,)}, "generator_channels"),
    ({"discriminator_channels": (8, 0)}, "discriminator_channels"),
    ({"latent_dim": 0}, "latent_dim"),
    ({"batch_size": 1}, "batch_size"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ({"seeds": (1, 1)}, "seeds"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"b1": 1.0}, "b1"),
    ({"bn__momentum": 1.5}, "bn.momentum"),
    ({"bn__epsilon": 0.0}, "bn.epsilon"),
    ({"eval__grid_samples": 10}, "eval.grid_samples"),
    ({"eval__num_samples": 1}, "eval.num_samples"),
    ({"eval__curve_samples": -1}, "eval.curve_samples"),
    ({"classifier__widths": ()}, "classifier.widths"),
    ({"classifier__model": "resnet"}, "classifier.model"),
    ({"classifier__bn_momentum": 2.0}, "classifier.bn_momentum"),
    ({"classifier__steps_per_epoch": 0}, "classifier.steps_per_epoch"),
])
def test_bad_config_is_one_line_naming_the_field(overrides, field):
  with pytest.raises(gan.ConfigError) as error:
    gan.validate_config(_config(**overrides))
  message = str(error.value)
  assert f"config.{field}" in message and "\n" not in message, message


def test_config_with_an_unread_bn_field_is_refused():
  config = _config()
  config.bn.num_groups = 4
  with pytest.raises(gan.ConfigError, match="num_groups"):
    gan.validate_config(config)


def test_more_examples_per_epoch_than_the_data_is_refused():
  with pytest.raises(gan.ConfigError, match="config.steps_per_epoch"):
    gan.validate_data_size(_config(steps_per_epoch=100, batch_size=64), 1000)



@pytest.mark.parametrize("result_dir", gan_study.STUDY.result_dirs)
def test_workdir_of_another_config_is_refused(tmp_path, result_dir):
  """The runner's resume check: a workdir holding the classifier or a
  finished variant resumes only a config that differs in fields that
  cannot change a result; another one is refused in one line, before any
  data is loaded."""
  config = _config()
  workdir_lib.write_atomic(tmp_path / "config.json",
                           workdir_lib.config_json(config.to_dict()))
  (tmp_path / result_dir).mkdir()  # results exist
  check = lambda: workdir_lib.check_resumable(
      tmp_path, config.to_dict(), study="gan",
      result_dirs=gan_study.STUDY.result_dirs)
  check()  # same: resumes
  config.study = "renamed"  # not a result field
  check()
  config.latent_dim = 16
  config.eval.chunk = 100
  config.data_dir = str(tmp_path / "no data here")  # never read
  with pytest.raises(workdir_lib.ConfigMismatch) as error:
    runner.run(gan_study.STUDY, config, tmp_path)
  assert "eval.chunk, latent_dim differ" in str(error.value)
  assert "\n" not in str(error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["config.json", result_dir])


def test_tile_lays_images_out_row_by_row():
  images = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
  mosaic = gan_report.tile(images, columns=2, pad=1)
  assert mosaic.shape == (5, 5)
  np.testing.assert_array_equal(mosaic[:2, 3:], images[1])
  np.testing.assert_array_equal(mosaic[3:, :2], images[2])
  assert np.all(mosaic[3:, 3:] == 255)


# ----------------------------------------------------------------------------
# The study through the one command line, end to end.


@pytest.mark.slow
def test_entry_point_end_to_end_rerun_and_resume(tmp_path):
  data_dir = helpers.write_tiny_idx(tmp_path / "idx", 256, 100)
  workdir = tmp_path / "work"
  args = [
      "--config=studies/gan/config.py:short", f"--workdir={workdir}",
      "--config.dataset=tiny_idx", "--config.data_source=idx",
      f"--config.data_dir={data_dir}",
      "--config.generator_norms=('batch', 'none')",
      "--config.discriminator_norms=('batch_separate',)",
      "--config.latent_dim=8", "--config.generator_channels=(4, 4)",
      "--config.discriminator_channels=(4, 4)", "--config.batch_size=16",
      "--config.steps_per_epoch=3", "--config.num_epochs=2",
      "--config.eval.num_samples=40", "--config.eval.curve_samples=20",
      "--config.eval.grid_samples=4", "--config.eval.epoch_grid_samples=3",
      "--config.eval.chunk=20", "--config.classifier.channels=(4, 4)",
      "--config.classifier.widths=(8,)",
      "--config.classifier.steps_per_epoch=5",
      "--config.classifier.batch_size=32"]
  first = helpers.run_cli(args)
  # The study's report path, then where the files went.
  assert f"{workdir / 'report.md'}\nWrote to {workdir}: " in first.stdout
  assert "report.md" in helpers.files_written(first.stdout, workdir)
  assert "[G-batch_D-batch_separate] epoch 2/2" in first.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["study_id"] == "gan" and results["schema"] == 2
  assert results["command"].startswith(
      "python -m experiments.main --config=studies/gan/config.py:short")
  assert [v["variant"] for v in results["variants"]] == [
      "G-batch_D-batch_separate", "G-none_D-batch_separate"]
  batch = results["variants"][0]
  assert len(batch["eval_mode"]["frechet_distance"]) == 2  # seeds
  assert "batch_stats_mode" in batch
  assert "batch_stats_mode" not in results["variants"][1]
  rows = workdir_lib.read_jsonl(workdir / "metrics.jsonl")
  assert len(rows) == 2 * 2 * 2  # variants x seeds x epochs
  assert {"d_loss", "frechet_distance", "coverage_entropy"} <= set(rows[0])
  assert np.load(workdir / "samples" / "G-none_D-batch_separate" /
                 "final.npy").shape == (2, 4, 28, 28)
  report = (workdir / "report.md").read_text()
  assert "| batch | batch_separate |" in report
  for png in ("samples_overview.png", "curves.png",
              "samples_G-none_D-batch_separate.png",
              "training_G-batch_D-batch_separate.png"):
    assert (workdir / "figures" / png).stat().st_size > 0

  # A rerun skips the finished variants; one whose final evaluation is
  # missing resumes from its last checkpoint and is evaluated again.
  (workdir / "variants" / "G-none_D-batch_separate.json").unlink()
  second = helpers.run_cli(args)
  assert "[G-batch_D-batch_separate] finished before; skipped" in (
      second.stderr)
  assert "[G-none_D-batch_separate] resumed from the checkpoint of epoch 2" \
      in second.stderr
  assert "classifier: loaded from" in second.stderr
  again = json.loads((workdir / "results.json").read_text())
  assert again["variants"] == results["variants"][:1] + [
      {**results["variants"][1], "compile_time": None,
       "eval_time": again["variants"][1]["eval_time"]}]
  assert len(workdir_lib.read_jsonl(workdir / "metrics.jsonl")) == 8

  # Another config in the same workdir: one line naming the field.
  third = helpers.run_cli([*args, "--config.latent_dim=6"], check=False)
  assert third.returncode != 0
  assert third.stderr.strip().splitlines()[-1].startswith(
      "ConfigMismatch:") and "latent_dim differ" in third.stderr
  # A bad value: one line naming the field (a repeated --config.FIELD
  # would merge the tuples, so the entry is replaced).
  bad_args = [a if not a.startswith("--config.generator_norms=") else
              "--config.generator_norms=('batch', 'group')" for a in args]
  bad = helpers.run_cli(bad_args, check=False)
  assert bad.stderr.strip().splitlines()[-1] == (
      "ConfigError: config.generator_norms=('batch', 'group') has 'group'; "
      "choose among ('batch', 'layer', 'none').")
