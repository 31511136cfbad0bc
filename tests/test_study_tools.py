"""What the studies measure with: raw input scaling, the training set in eval
mode, and the source article's worked example of the BN transform."""

import json

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_lab import classifier
from bn_lab import data as data_lib
from bn_lab import sweep
from bn_lab import train
from bn_lab import config as base


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
  sweep.validate_config(config)
  assert sweep.make_spec(config, 60000).eval_train
  assert classifier.metric_names(config)[-2:] == train.TRAIN_EVAL_METRICS


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


def _diverging_sweep(idx_dir, workdir, nan_guard):
  config = base.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "num_epochs": 2, "seeds": (0,), "widths": (8,),
                       "batch_size": 50, "progress_seconds": 0.0,
                       "placement": "none", "optimizer": "sgd",
                       "nan_guard": nan_guard}.items():
    config[field] = value
  config.sweep.learning_rate = (0.1, 1e30)
  return classifier.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 200, 100)


def test_nan_guard_record_freezes_the_diverging_run_only(idx_dir, tmp_path):
  """learning rate 1e30 diverges at once: with nan_guard="record" that run
  is frozen at its initial state and marked, the other trains on exactly as
  it does alone; the default guard stops the whole sweep."""
  with pytest.raises(train.NonFiniteError):
    _diverging_sweep(idx_dir, tmp_path / "stop", True)
  _diverging_sweep(idx_dir, tmp_path / "record", "record")
  rows = [json.loads(l) for l in
          (tmp_path / "record" / "metrics.jsonl").read_text().splitlines()]
  good = [r for r in rows if r["learning_rate"] == 0.1]
  bad = [r for r in rows if r["learning_rate"] == 1e30]
  assert [r["diverged_at"] for r in good] == [None, None]
  # Step 1's update leaves huge but finite weights, with which step 2's
  # loss overflows; epoch 2 reports the same step.
  assert [r["diverged_at"] for r in bad] == [2, 2]
  for row in bad:  # frozen at its last finite weights: chance level (its
    # loss may overflow: those weights came from a 1e30 step)
    assert row["test_accuracy"] < 0.3
  # Training metrics count the kept steps only: step 1, then none.
  assert np.isfinite(bad[0]["train_loss"]) and np.isnan(bad[1]["train_loss"])
  # The good run is the run of a sweep without the diverging one.
  alone = tmp_path / "alone"
  config = base.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "num_epochs": 2, "seeds": (0,), "widths": (8,),
                       "batch_size": 50, "progress_seconds": 0.0,
                       "placement": "none", "optimizer": "sgd",
                       "learning_rate": 0.1}.items():
    config[field] = value
  classifier.train_and_evaluate(config, alone)
  reference = [json.loads(l) for l in
               (alone / "metrics.jsonl").read_text().splitlines()]
  for mine, theirs in zip(good, reference):
    assert mine["test_accuracy"] == pytest.approx(theirs["test_accuracy"],
                                                  abs=1e-6)
    assert mine["train_loss"] == pytest.approx(theirs["train_loss"],
                                               rel=1e-5)


def test_nan_guard_values_are_checked():
  config = base.get_config()
  config.nan_guard = "skip"
  with pytest.raises(sweep.ConfigError, match="config.nan_guard='skip'"):
    sweep.validate_config(config)
  config.nan_guard = "record"
  sweep.validate_config(config)
  spec = sweep.make_spec(config, 60000)
  assert spec.nan_guard and spec.freeze_diverged


def test_small_gaussian_init_option():
  """init="gaussian": every Dense kernel is N(0, init_std^2), whatever its
  fan-in (the sample std of 78,400 draws within 2%); "default" keeps flax's
  LeCun normal, whose scale is 1/sqrt(fan_in)."""
  for init, expected in (("gaussian", {784: 0.01, 100: 0.01}),
                         ("default", {784: 784 ** -0.5, 100: 0.1})):
    spec = train.TrainSpec(placement="before_activation", widths=(100, 100),
                           init=init, init_std=0.01)
    params = spec.make_model({}).init(
        jax.random.key(0), jnp.zeros((2, 784)), train=False)["params"]
    kernels = {"hidden_0": params["hidden_0"]["Dense_0"]["kernel"],
               "hidden_1": params["hidden_1"]["Dense_0"]["kernel"],
               "readout": params["readout"]["kernel"]}
    for name, kernel in kernels.items():
      # flax's truncated normal is scaled to the stated variance.
      std = expected[kernel.shape[0]]
      assert float(np.std(kernel)) == pytest.approx(std, rel=0.06), (
          init, name)
  config = base.get_config()
  config.init = "xavier"
  with pytest.raises(sweep.ConfigError, match="config.init='xavier'"):
    sweep.validate_config(config)


def test_running_statistics_gaps_match_numpy():
  rng = np.random.default_rng(3)
  def stats(shift):
    return {"a": {"mean": rng.normal(size=4) + shift,
                  "var": rng.uniform(0.5, 2.0, 4)},
            "b": {"BatchNorm_0": {"mean": rng.normal(size=3) + shift,
                                  "var": rng.uniform(0.5, 2.0, 3),
                                  "count": np.int32(7)}}}
  running, recomputed = stats(1.0), stats(0.0)
  mean_gap, var_gap = train.running_statistics_gaps(
      jax.tree.map(jnp.asarray, running), jax.tree.map(jnp.asarray,
                                                       recomputed))
  layers = [(running["a"], recomputed["a"]),
            (running["b"]["BatchNorm_0"], recomputed["b"]["BatchNorm_0"])]
  expected_mean = np.mean([np.mean(np.abs(r["mean"] - p["mean"])
                                   / np.sqrt(p["var"] + 1e-5))
                           for r, p in layers])
  expected_var = np.mean([np.mean(np.abs(np.log((r["var"] + 1e-5)
                                                / (p["var"] + 1e-5))))
                          for r, p in layers])
  np.testing.assert_allclose([mean_gap, var_gap],
                             [expected_mean, expected_var], rtol=1e-5)
  assert train.running_statistics_gaps(
      jax.tree.map(jnp.asarray, running),
      jax.tree.map(jnp.asarray, running)) == (0.0, 0.0)
