"""What the studies measure with: raw input scaling, the training set in eval
mode, and the source article's worked example of the BN transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax import data as data_lib
from bn_jax import experiment
from bn_jax import study
from bn_jax import train
from configs import base


def test_raw_scaling_keeps_pixel_values():
  pixels = np.array([[0, 1, 128, 255]], np.uint8)
  np.testing.assert_array_equal(data_lib.scale_pixels(pixels, "raw"),
                                [[0.0, 1.0, 128.0, 255.0]])
  assert data_lib.scale_pixels(pixels, "raw").dtype == np.float32


def test_input_bn_makes_raw_and_unit_pixels_the_same_model():
  """BN on the input normalizes away the scale: in training mode the
  logits from raw 0..255 pixels equal those from [0, 1] pixels (to the
  epsilon's share of the variance), with the same initial weights."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (64, 784)).astype(np.uint8)
  logits = {}
  for scaling in ("unit", "raw"):
    spec = train.TrainSpec(placement="input", widths=(16,),
                           input_scaling=scaling, bn=(("epsilon", 1e-9),))
    state = train.create_train_state(spec, 0, {"learning_rate": 1e-3})
    model = spec.make_model(state.bn_hparams)
    logits[scaling], _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        train.model_inputs(jnp.asarray(pixels), spec), train=True,
        mutable=["batch_stats"])
  np.testing.assert_allclose(logits["raw"], logits["unit"], rtol=1e-4,
                             atol=1e-5)
  # Without BN the raw pixels are 255 times larger at the first layer.
  assert not np.allclose(logits["raw"], 0.0)


def test_eval_train_is_eval_mode_accuracy_over_the_training_set():
  """train_accuracy_eval is the share of all training examples the model,
  after the epoch and in eval mode, classifies right: counted here with
  NumPy from the model's eval-mode logits."""
  rng = np.random.default_rng(1)
  n = 200
  images = rng.integers(0, 256, (n, 784)).astype(np.uint8)
  labels = rng.integers(0, 10, n)
  data = train.to_device(images, labels, images[:50], labels[:50])
  spec = train.TrainSpec(widths=(16,), batch_size=40, steps_per_epoch=5,
                         num_epochs=1, eval_train=True, eval_chunk=64)
  state = train.create_train_state(spec, 0, {"learning_rate": 1e-2})
  state, metrics = train.epoch_and_eval(state, data, spec=spec)
  logits = spec.make_model(state.bn_hparams).apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(images, jnp.float32) / 255.0, train=False)
  expected = np.mean(np.argmax(np.asarray(logits), -1) == labels)
  assert float(metrics["train_accuracy_eval"]) == pytest.approx(expected)
  assert float(metrics["train_accuracy_eval"]) != pytest.approx(
      float(metrics["train_accuracy"]))  # training mode, weights moving


def test_eval_train_adds_its_metrics():
  config = base.get_config()
  config.eval_train = True
  study.validate_config(config)
  assert study.make_spec(config, 60000).eval_train
  assert experiment.metric_names(config)[-2:] == train.TRAIN_EVAL_METRICS


def test_the_articles_worked_example():
  """The article's example: batch mean 0.5, variance 0.2, epsilon 1e-4,
  gamma 2, beta 0.1. A batch with exactly those statistics (0.5 +- sqrt(0.2))
  is normalized to +-sqrt(0.2 / 0.2001), then scaled and shifted."""
  x = jnp.asarray([[0.5 - np.sqrt(0.2)], [0.5 + np.sqrt(0.2)]], jnp.float32)
  params = bn_jax.BNParams(scale=jnp.asarray([2.0]), bias=jnp.asarray([0.1]))
  _, state = bn_jax.init(1)
  y, new_state = bn_jax.apply(params, state, x, training=True, epsilon=1e-4,
                              momentum=0.0)
  xhat = np.sqrt(0.2 / (0.2 + 1e-4))
  np.testing.assert_allclose(y[:, 0], [0.1 - 2 * xhat, 0.1 + 2 * xhat],
                             rtol=1e-6)
  np.testing.assert_allclose(new_state.mean, [0.5], rtol=1e-6)
  np.testing.assert_allclose(new_state.var, [0.2], rtol=1e-5)
  # The value at the mean maps to beta.
  y_mean, _ = bn_jax.apply(params, new_state, jnp.asarray([[0.5]]),
                           training=False, epsilon=1e-4)
  np.testing.assert_allclose(y_mean, [[0.1]], rtol=1e-6)
