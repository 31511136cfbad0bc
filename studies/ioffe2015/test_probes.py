"""studies.ioffe2015.probes against a NumPy forward pass written out by hand and
numpy.percentile."""

import dataclasses
import functools
import json

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import nn as bn_nn
from bn_lab import checkpoints
from bn_lab import models
from bn_lab import report
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from studies import ioffe2015
from studies.ioffe2015 import config as ioffe_config
from studies.ioffe2015 import figure
from studies.ioffe2015 import probes

WIDTHS = (20, 20, 20)
EPSILON = 1e-2  # large, so that a reference without it would fail
NUM_IMAGES = 64


def _images(seed, n=NUM_IMAGES):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (n, 784)),
                     jnp.float32)


def _model(placement, widths=WIDTHS):
  norm = functools.partial(bn_nn.BatchNorm, epsilon=EPSILON, momentum=0.5)
  return models.make_model("mlp", placement=placement, activation="sigmoid",
                           widths=widths, norm=norm)


def _trained_variables(model, seed):
  """Variables with every parameter perturbed (BN's scale and bias away
  from 1 and 0) and running statistics moved by a few training passes."""
  variables = model.init(jax.random.key(seed), _images(seed, 2), train=False)
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  params = treedef.unflatten([
      p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  variables = {**variables, "params": params}
  for step in range(3):
    batch = 2.0 * _images(seed + 10 + step) - 0.3
    _, new = model.apply(variables, batch, train=True,
                         mutable=["batch_stats"])
    variables = {**variables, **new}
  return variables


def _reference_inputs(placement, variables, images):
  """The last hidden layer's pre-activation, computed in float64 from the
  variables, as models.py's docstring describes the placements."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        variables["params"])
  stats = jax.tree.map(lambda a: np.asarray(a, np.float64),
                       variables.get("batch_stats", {}))

  def bn(p, s, h):
    return ((h - s["mean"]) / np.sqrt(s["var"] + EPSILON) * p["scale"]
            + p["bias"])

  sigmoid = lambda h: 1.0 / (1.0 + np.exp(-h))
  x = np.asarray(images, np.float64)
  if placement == "input":
    x = bn(params["input_bn"], stats["input_bn"], x)
  for i in range(len(WIDTHS)):
    name = f"hidden_{i}"
    dense = params[name]["Dense_0"]
    h = x @ dense["kernel"] + dense.get("bias", 0.0)
    if placement == "before_activation":
      h = bn(params[name]["BatchNorm_0"], stats[name]["BatchNorm_0"], h)
    if i == len(WIDTHS) - 1:
      return h
    x = sigmoid(h)
    if placement == "after_activation":
      x = bn(params[name]["BatchNorm_0"], stats[name]["BatchNorm_0"], x)


@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_activation_inputs_match_numpy_forward_pass(placement):
  model = _model(placement)
  variables = _trained_variables(model, seed=0)
  if placement != "none":
    # The running statistics take part: they moved away from init's (0, 1).
    for layer in variables["batch_stats"].values():
      layer = layer.get("BatchNorm_0", layer)
      assert np.abs(layer["mean"]).min() > 1e-3
      assert np.abs(layer["var"] - 1.0).min() > 1e-3
  images = _images(1)
  got = probes.activation_inputs(model, variables, images)
  assert got.shape == (NUM_IMAGES, WIDTHS[-1])
  want = _reference_inputs(placement, variables, images)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Evaluation mode: the statistics of this batch play no part.
  np.testing.assert_allclose(
      probes.activation_inputs(model, variables, images[:5]), want[:5],
      rtol=1e-4, atol=1e-4)


def test_percentiles_match_numpy():
  values = np.random.default_rng(2).standard_normal((37, 6)).astype(
      np.float32)
  qs = (0, 2.5, 15, 50, 85, 100)
  got = probes.percentiles(jnp.asarray(values), qs)
  assert got.shape == (len(qs), 6)
  np.testing.assert_allclose(got, np.percentile(values, qs, axis=0),
                             rtol=1e-6, atol=1e-6)


def test_drift_of_a_hand_made_series():
  p50 = jnp.array([[0.0, 4.0, 10.0],
                   [1.0, 3.0, 7.0],
                   [2.0, 2.0, 4.0]])
  iqr_end = jnp.array([1.0, 4.0, 2.0])
  # |p50(t) - p50(end)| / IQR: t=0 (2, 0.5, 3), t=1 (1, 0.25, 1.5), t=2 0.
  np.testing.assert_allclose(probes.drift(p50, iqr_end), [2.0, 1.0, 0.0])


def test_drift_of_probes_reads_the_median_and_quartiles():
  series = jnp.asarray(np.random.default_rng(3).standard_normal(
      (4, len(probes.QS), 5)), jnp.float32)
  at = {q: np.asarray(series[:, i]) for i, q in enumerate(probes.QS)}
  want = np.median(np.abs(at[50] - at[50][-1]) / (at[75][-1] - at[25][-1]),
                   axis=1)
  np.testing.assert_allclose(probes.drift_of_probes(series), want,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"lacks \[25, 75\]"):
    probes.drift_of_probes(series[:, :3], probes.FIGURE_QS)


def test_spread_drift_of_probes_reads_p15_and_p85():
  series = jnp.asarray(np.random.default_rng(4).uniform(
      0, 1, (4, len(probes.QS), 5)).cumsum(axis=1), jnp.float32)
  at = {q: np.asarray(series[:, i]) for i, q in enumerate(probes.QS)}
  spread = at[85] - at[15]
  want = np.median(np.abs(np.log(spread / spread[-1])), axis=1)
  got = probes.spread_drift_of_probes(series)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[-1] == 0.0
  # Doubling and halving the spread are the same distance, ln 2.
  low, high = jnp.zeros((3, 1)), jnp.array([[2.0], [0.5], [1.0]])
  np.testing.assert_allclose(probes.spread_drift(low, high),
                             [np.log(2), np.log(2), 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match=r"lacks \[15, 85\]"):
    probes.spread_drift_of_probes(series[:, 1:4], (25, 50, 75))


def test_early_mean_averages_the_first_part_of_training():
  series = np.arange(12.0).reshape(2, 6)
  steps = np.array([10, 20, 30, 40, 50, 60])
  np.testing.assert_allclose(probes.early_mean(series, steps, 0.5),
                             [1.0, 7.0])  # steps 10, 20, 30
  with pytest.raises(ValueError, match="no probe at or before"):
    probes.early_mean(series, np.array([50, 51, 52, 53, 54, 100]), 0.4)


def test_jit_and_vmap_over_stacked_runs_from_a_checkpoint(tmp_path):
  """A sweep's two runs, saved and restored as the trainer's checkpoints
  are, probed in one jitted vmap: each equals numpy.percentile of its own
  hand-computed inputs."""
  model = _model("before_activation")
  runs = [_trained_variables(model, seed) for seed in (4, 5)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *runs)
  manager = checkpoints.manager(tmp_path / "checkpoints", keep=1)
  checkpoints.save(manager, 3, stacked)
  epoch, restored = checkpoints.restore_newest(
      manager, jax.eval_shape(lambda: stacked))
  assert epoch == 3
  images = _images(6)
  probe = jax.jit(jax.vmap(functools.partial(probes.probe, model),
                           in_axes=(0, None)))
  got = probe(restored, images)
  assert got.shape == (2, len(probes.QS), WIDTHS[-1])
  for run, variables in enumerate(runs):
    want = np.percentile(
        _reference_inputs("before_activation", variables, images),
        probes.QS, axis=0)
    np.testing.assert_allclose(got[run], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        got[run], probes.probe(model, variables, images), rtol=1e-6,
        atol=1e-6)


def test_bad_arguments_name_the_value_and_the_fix():
  with pytest.raises(ValueError, match=r"widths=\(\).*at least one width"):
    probes.activation_inputs(_model("none", widths=()), {}, _images(0, 2))
  with pytest.raises(ValueError, match=r"qs=\(50, 150\)"):
    probes.percentiles(jnp.zeros((3, 2)), (50, 150))
  with pytest.raises(ValueError, match=r"p50_series.shape=\(3,\)"):
    probes.drift(jnp.zeros(3), jnp.ones(3))


# ----------------------------------------------------------------------------
# The probe as a trainer measurement, and through the runner.


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 200, 100)


def test_probe_every_k_steps_records_and_changes_nothing():
  """A probe every k steps: the epoch's state is what it is without the probe, and
  the probe after the epoch's last chunk is the percentiles of the final
  state's activation inputs (np.percentile of studies.ioffe2015.probes'
  activation_inputs, which tests/test_probes.py checks against a NumPy
  forward pass)."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (240, 784)).astype(np.uint8)
  labels = rng.integers(0, 10, 240)
  data = train.to_device(images, labels, images[:30], labels[:30])
  spec = train.TrainSpec(placement="before_activation", activation="sigmoid",
                         widths=(12, 12), batch_size=40, steps_per_epoch=6,
                         num_epochs=1, optimizer="sgd")
  probed_spec = dataclasses.replace(spec, measurements=(train.Measurement(
      "probe", 3, probes.measure_probe, on="test_images", num_images=30),))
  (plain, plain_metrics), (state, metrics) = helpers.one_epoch_each(
      (spec, probed_spec), data)
  chex.assert_trees_all_equal(state, plain)
  probed = metrics.pop("probe")
  np.testing.assert_array_equal(probed["step"], [3, 6])
  probed = probed["percentiles"]
  assert probed.shape == (2, len(probes.QS), 12)
  chex.assert_trees_all_equal(metrics, plain_metrics)
  last = probed[-1]
  inputs = probes.activation_inputs(
      spec.make_model(state.bn_hparams),
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(images[:30], jnp.float32) / 255.0)
  np.testing.assert_allclose(
      last, np.percentile(np.asarray(inputs), probes.QS, axis=0), rtol=1e-5,
      atol=1e-6)


def test_probe_rows_and_checks(idx_dir, tmp_path):
  config = ioffe_config.get_config()
  config.placements, config.activation, config.optimizer = (), "relu", "adam"
  config.learning_rate, config.bn.unbiased_running_var = 1e-3, False
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "num_epochs": 2, "seeds": (0,), "widths": (8,),
                       "batch_size": 50, "progress_seconds": 0.0}.items():
    config[field] = value
  config.probe.every_steps, config.probe.num_images = 2, 50
  results = runner.run(ioffe2015.STUDY, config, tmp_path)
  assert results["study_id"] == "ioffe2015" and results["schema"] == 2
  rows = [json.loads(l) for l in
          (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["probe_steps"] for r in rows] == [[2, 4], [6, 8]]
  assert np.asarray(rows[1]["probe_percentiles"]).shape == (
      2, len(probes.QS), 8)
  table = report.write_report([tmp_path], tmp_path / "report",
                              extras=(figure.probe_report,))
  probe_table = table.split("Probes (config.probe")[1]
  assert "| steps to 97% | steps to 98% |" in probe_table, table
  assert (tmp_path / "report" / "probes.png").stat().st_size > 0
  steps, values = figure.probe_series(rows)["run"]
  np.testing.assert_array_equal(steps, [2, 4, 6, 8])
  assert values.shape == (1, 4, len(probes.QS), 8)
  config.probe.every_steps = 3  # 4 steps per epoch
  with pytest.raises(sweep.ConfigError,
                     match="every 3 steps does not divide the 4"):
    sweep.validate_data_size(config, 200, 100, probes.measurements(config))
  # No hidden layer and no BN: nothing for the probe to look at (with BN
  # placed, the placement check says first that it has no layer).
  config.probe.every_steps, config.widths = 2, ()
  config.placements = ("none",)
  with pytest.raises(sweep.ConfigError, match="config.widths is empty"):
    ioffe2015.STUDY.validate(config)


def test_the_probe_needs_a_feed_forward_model():
  config = ioffe_config.get_config()
  config.placements, config.placement = (), "before_activation"
  config.model, config.widths = "lstm", (8,)
  with pytest.raises(sweep.ConfigError,
                     match="probe.every_steps does not fit model='lstm'"):
    probes.check_config(config)
