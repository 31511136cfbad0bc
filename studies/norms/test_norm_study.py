"""The normalization family from the config: `config.norm(s)`, the norm
factory, the checks, PreciseBN in the trainer, and a study over the norms.

The variants' own equivalence tests are in test_variants.py (BN's),
test_norms.py and test_nnx.py (the per-example norms) and test_precise.py
(recomputed statistics); here the question is whether a config reaches
them as it says.
"""

import json
import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import core
from bn_lab import runner
from studies import norms as norms_package
from studies.why_bn import landscape
from bn_lab import models
from bn_jax import nn as bn_nn
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from bn_lab import config as base
from studies.norms import config as norms_config
from bn_lab import report


def _x(shape=(8, 10), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(1.0 + 2.0 * rng.standard_normal(shape), jnp.float32)


# What each config.norm must build from config.bn's defaults, written out by
# hand: the module and the arguments that make it that variant.
_CLIPPING = (("dmax", 5.0), ("rmax", 3.0))  # rmin None: 1 / rmax
_BN = dict(momentum=0.99, epsilon=1e-3, stats_method="shifted",
           grad="paper_jvp", impl="xla_cpu", unbiased_running_var=False)
EXPECTED = {
    "batch": bn_nn.BatchNorm(**_BN),
    "renorm": bn_nn.BatchNorm(**_BN, renorm=True, renorm_clipping=_CLIPPING,
                              renorm_momentum=0.99,
                              renorm_schedule=(0.125, 1.0, 0.625)),
    "ghost": bn_nn.BatchNorm(**_BN, virtual_batch_size=32),
    "sampled": bn_nn.BatchNorm(**_BN, stats_fraction=0.25,
                               stats_sampling="stride"),
    "sampled-examples": bn_nn.BatchNorm(**_BN, stats_examples=16,
                                        stats_sampling="stride"),
    "layer": bn_nn.LayerNorm(epsilon=1e-3),
    "group": bn_nn.GroupNorm(num_groups=5, epsilon=1e-3),
    "instance": bn_nn.InstanceNorm(epsilon=1e-3),
    "rms": bn_nn.RMSNorm(epsilon=1e-3),
    "frn": bn_nn.FRN(epsilon=1e-3),
    "evonorm_b0": bn_nn.EvoNormB0(momentum=0.99, epsilon=1e-3),
    "evonorm_s0": bn_nn.EvoNormS0(num_groups=5, epsilon=1e-3),
    "noisy_batch": landscape.NoisyBN(**_BN),  # the paper's noise (defaults)
}


@pytest.mark.parametrize("norm", sorted(EXPECTED))
def test_make_norm_builds_each_variant_from_its_own_fields(norm):
  """Every field of config.bn a variant reads reaches it, and only those:
  the built module equals the hand-written one, attribute by attribute."""
  options = dict(base.get_config().bn)
  if norm == "sampled-examples":  # stats_examples, when set, replaces
    norm, options["stats_examples"] = "sampled", 16  # the fraction
    expected = EXPECTED["sampled-examples"]
  else:
    expected = EXPECTED[norm]
  built = models.make_norm(options, norm=norm, backend="cpu")()
  assert built == expected, (built, expected)


def test_every_norm_is_a_choice_and_has_an_entry():
  assert set(models.NORMS) == {*EXPECTED, "none"} - {"sampled-examples"}
  assert set(models.NORM_FIELDS) == set(models.NORMS) - {"none"}
  config = base.get_config()
  assert set(models.NORM_FIELDS["renorm"]) <= set(config.bn)
  read = {f for fields in models.NORM_FIELDS.values() for f in fields}
  # Each config.bn field is read by some variant (the unit by the spec).
  assert set(config.bn) - read == {"renorm_schedule_unit"}


@pytest.mark.parametrize("norm", ["layer", "group", "rms"])
def test_swept_momentum_does_not_reach_a_norm_without_statistics(norm):
  options = {**base.get_config().bn, "momentum": jnp.asarray(0.5)}
  module = models.make_norm(options, norm=norm)()
  assert not hasattr(module, "momentum")


def test_norm_none_is_the_placement_none():
  """norm="none" trains the model without normalization, whatever the
  placement: the same parameters as placement="none"."""
  x = _x((4, 784))
  shapes = []
  for norm, placement in (("none", "before_activation"), ("batch", "none")):
    spec = train.TrainSpec(norm=norm, placement=placement, widths=(6,))
    variables = spec.make_model({}).init(jax.random.key(0), x, train=False)
    shapes.append(jax.tree.map(jnp.shape, variables))
  assert shapes[0] == shapes[1]
  assert "batch_stats" not in shapes[0]


@pytest.mark.parametrize("norm, linear_bias", [
    ("batch", False), ("layer", False), ("rms", True)])
def test_before_activation_keeps_the_bias_a_norm_lacks(norm, linear_bias):
  """Before the norm, the Dense layer's bias is dropped only where the norm
  has a beta to replace it: RMSNorm has none."""
  spec = train.TrainSpec(norm=norm, placement="before_activation",
                         widths=(6,))
  params = spec.make_model({}).init(jax.random.key(0), _x((4, 784)),
                                    train=False)["params"]
  assert ("bias" in params["hidden_0"]["Dense_0"]) == linear_bias


def test_renorm_without_schedule_and_rmin_from_the_cli():
  """--config.bn.renorm_schedule=None keeps Keras's fixed limits, and an
  unset rmin is the paper's 1 / rmax."""
  config = helpers.resolved_config([
      "--config=lab/bn_lab/config.py", "--workdir=unused", "--config.norm=renorm",
      "--config.bn.renorm_schedule=None",
      "--config.bn.renorm_clipping.rmax=2.0"])
  sweep.validate_config(config)
  bn = dict(sweep.make_spec(config, 60000).bn)
  assert bn["renorm_schedule"] is None
  assert bn["renorm_clipping"] == (("dmax", 5.0), ("rmax", 2.0))
  assert core.renorm_limits(0, bn["renorm_clipping"]) == (0.5, 2.0, 5.0)


def test_renorm_schedule_fractions_relax_within_a_short_run():
  """The default (fractions of training) relaxes the clipping inside a
  4,680-step run; the paper's steps would keep it plain BN throughout."""
  config = base.get_config()
  config.norm = "renorm"
  spec = sweep.make_spec(config, 60000)  # 468 steps x 10 epochs
  assert dict(spec.bn)["renorm_schedule"] == (585, 4680, 2925)
  config.bn.renorm_schedule, config.bn.renorm_schedule_unit = (
      (5000, 40000, 25000), "steps")
  spec = sweep.make_spec(config, 60000)
  assert dict(spec.bn)["renorm_schedule"] == (5000, 40000, 25000)
  assert spec.total_steps < 5000


@pytest.mark.parametrize("changes, fragment", [
    ({"norm": "batchnorm"}, "config.norm='batchnorm' is not valid"),
    ({"norms": ("batch", "ln")}, "config.norms value='ln' is not valid"),
    ({"norm": "group", "bn.num_groups": 7},
     "config.bn.num_groups=7 does not divide the 50 features of layer "
     "hidden_0"),
    ({"norm": "instance"}, "config.norm='instance' needs spatial axes"),
    ({"norm": "ghost", "bn.virtual_batch_size": 48},
     "config.bn.virtual_batch_size=48 does not divide the batch size 128"),
    ({"norm": "sampled", "bn.stats_fraction": 0.01},
     "config.bn.stats_fraction=0.01 of a batch of 128 leaves fewer than 2"),
    ({"bn.stats_fraction": 1.5}, "config.bn.stats_fraction=1.5"),
    ({"bn.stats_sampling": "every"}, "config.bn.stats_sampling='every'"),
    ({"bn.virtual_batch_size": 0}, "config.bn.virtual_batch_size=0"),
    ({"bn.renorm_schedule": (0.5, 0.2, 0.9)}, "config.bn.renorm_schedule="),
    ({"bn.renorm_clipping.dmax": -1.0},
     "config.bn.renorm_clipping has dmax=-1.0 < 0"),
    ({"bn.renorm_schedule": (10, 20, 30)}, "each in [0, 1]"),
    ({"bn.renorm_schedule_unit": "epochs"},
     "config.bn.renorm_schedule_unit='epochs'"),
    ({"bn.renorm_clipping.rmax": 0.5},
     "config.bn.renorm_clipping has rmax=0.5 < 1"),
    ({"bn.renorm_momentum": 2.0}, "config.bn.renorm_momentum=2.0"),
    ({"precise_bn.num_batches": -1}, "config.precise_bn.num_batches=-1"),
    ({"norm": "ghost", "bn.virtual_batch_size": 64, "mesh_devices": 4},
     "config.bn.virtual_batch_size=64 does not divide the batch size 128 "
     "(32 per device over 4 devices)"),
    ({"norm": "sampled", "bn.stats_examples": 200},
     "config.bn.stats_examples=200 must be an integer from 2 to the batch "
     "size (128)"),
    ({"norm": "layer", "model": "cnn", "placement": "input"},
     "config.norm='layer' normalizes each example over a layer's features, "
     "and layer input_bn has 1"),
    ({"norm": "frn", "model": "cnn"},
     "config.norm='frn' takes its statistics over a layer's spatial "
     "positions, and layer hidden_0 has none"),
    ({"norm": "evonorm_b0", "model": "mlp"},
     "config.norm='evonorm_b0' takes its statistics over a layer's spatial "
     "positions, and layer hidden_0 has none"),
    ({"norm": "layer", "sweep.bn_momentum": (0.9, 0.99)},
     "config.sweep.bn_momentum sweeps config.bn.momentum, which "
     "norm='layer' does not read"),
    ({"norm": "none", "sweep.bn_epsilon": (1e-3, 1e-5)},
     "config.sweep.bn_epsilon sweeps config.bn.epsilon, which norm='none'"),
    ({"precise_bn.estimator": "median"},
     "config.precise_bn.estimator='median'"),
])
def test_bad_norm_settings_name_the_field(changes, fragment):
  config = base.get_config()
  for dotted, value in changes.items():
    section, _, name = dotted.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[name] = value
  with pytest.raises(sweep.ConfigError, match=re.escape(fragment)):
    sweep.validate_config(config)


def test_too_many_precise_batches_is_a_config_error():
  config = base.get_config()
  config.precise_bn.num_batches = 20
  with pytest.raises(sweep.ConfigError,
                     match="config.precise_bn.num_batches=20 batches of 128"):
    sweep.validate_data_size(config, num_train=2000, num_test=1000)


def test_instance_norm_fits_a_cnn_without_dense_hidden_layers():
  config = norms_config.get_config("cnn")
  assert "instance" in config.norms
  sweep.validate_config(config)  # no error


@pytest.mark.slow
def test_precise_metric_is_eval_mode_with_numpy_population_statistics():
  """placement=input: the recomputed statistics over every batch of the
  epoch ("pooled") are the per-pixel mean and variance of those examples;
  evaluating with them, as NumPy computes them, gives the same accuracy."""
  rng = np.random.default_rng(0)
  n, batch = 240, 40
  data = train.to_device(
      rng.integers(0, 256, (n, 784)).astype(np.uint8),
      rng.integers(0, 10, n), rng.integers(0, 256, (100, 784)).astype(
          np.uint8), rng.integers(0, 10, 100))
  spec = train.TrainSpec(placement="input", widths=(16,), batch_size=batch,
                         steps_per_epoch=n // batch, num_epochs=1,
                         precise_batches=n // batch,
                         precise_estimator="pooled", bn=(("epsilon", 1e-3),))
  state = train.create_train_state(spec, 0, {"learning_rate": 1e-3})
  epoch = np.asarray(train.epoch_batches(state.data_key, 0, n, spec))
  state, metrics = train.epoch_and_eval(state, data, spec=spec)

  pixels = np.asarray(data.train_images)[epoch.reshape(-1)] / 255.0
  stats = {"input_bn": {"mean": jnp.asarray(pixels.mean(0), jnp.float32),
                        "var": jnp.asarray(pixels.var(0), jnp.float32)}}
  np.testing.assert_allclose(
      train.population_statistics(state, data, epoch, spec=spec)[
          "input_bn"]["var"], stats["input_bn"]["var"], rtol=1e-4, atol=1e-6)
  expected = train.evaluate(state._replace(batch_stats=stats),
                            data.test_images, data.test_labels, spec=spec)
  assert metrics["test_accuracy_precise"] == pytest.approx(
      float(expected["correct"] / expected["count"]))
  assert metrics["test_loss_precise"] == pytest.approx(
      float(expected["loss_sum"] / expected["count"]), rel=1e-6)
  # The moving averages after 6 steps are far from the population: the
  # metric is not eval mode's.
  moving = np.asarray(state.batch_stats["input_bn"]["var"])
  assert np.max(np.abs(moving - pixels.var(0))) > 0.01


@pytest.fixture(scope="module")
def norms_study(tmp_path_factory):
  """studies/norms/config.py on tiny IDX data: every variant, one epoch,
  trained in a process of its own with unoptimized XLA
  (helpers.run_studies; the tests check its files against themselves)."""
  idx = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 400, 200)
  config = norms_config.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx),
                       "num_epochs": 1, "seeds": (0, 1), "widths": (10,),
                       "batch_size": 40, "progress_seconds": 0.0}.items():
    config[field] = value
  config.bn.virtual_batch_size = 10
  config.precise_bn.num_batches = 5
  workdir = tmp_path_factory.mktemp("norms")
  results, = helpers.run_studies([(norms_package.STUDY.name, config, workdir,
                                   None)])
  return workdir, results, config


@pytest.mark.slow
def test_norms_study_reports_one_row_per_variant(norms_study):
  workdir, results, config = norms_study
  assert results["axes"]["norm"] == list(config.norms)
  assert [c["combo"] for c in results["combos"]] == [
      f"norm={n}" for n in config.norms]
  rows = [json.loads(l) for l in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * len(config.norms)
  for row in rows:
    assert 0.0 <= row["test_accuracy_precise"] <= 1.0
    if row["norm"] in ("layer", "group", "rms", "none"):  # no statistics
      assert row["test_accuracy_precise"] == row["test_accuracy"]
  table = report.write_report([workdir], workdir)
  body = [l for l in table.splitlines() if l.startswith("| ")][1:]
  assert [l.split(" | ")[0] for l in body] == [
      f"| {n}" for n in config.norms]
  assert "test acc (precise BN)" in table


@pytest.mark.slow
def test_instance_and_group_norm_train_a_cnn(tmp_path):
  """The conv-only norms run from the config on the CNN (studies/norms/config.py's
  :cnn variant, shrunk): one row each, finite and above chance."""
  idx = helpers.write_tiny_idx(tmp_path / "idx", 200, 100)
  config = norms_config.get_config("cnn")
  for field, value in {"dataset": "tiny", "data_dir": str(idx),
                       "num_epochs": 2, "seeds": (0,), "channels": (5, 10),
                       "batch_size": 20, "norms": ("instance", "group"),
                       "progress_seconds": 0.0, "learning_rate": 3e-3,
                       "target_accuracy": 0.3}.items():
    config[field] = value
  config.precise_bn.num_batches = 0
  results = runner.run(norms_package.STUDY, config, tmp_path / "work")
  assert [c["combo"] for c in results["combos"]] == [
      "norm=instance", "norm=group"]
  rows = [json.loads(l) for l in
          (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if r["epoch"] == 2]
  assert [r["norm"] for r in final] == ["instance", "group"]
  for row in final:
    assert row["test_accuracy"] > 0.3, row  # chance is 0.1


def test_a_workdir_from_before_the_norms_resumes_as_batch_norm():
  """A config.json written before config.norm existed matches the current
  config while that config trains as the old trainer did (norm "batch", no
  PreciseBN); choosing another norm is a difference, named."""
  current = base.get_config().to_dict()
  saved = json.loads(json.dumps(current))
  del saved["norm"], saved["norms"], saved["precise_bn"]
  for field in list(saved["bn"]):
    if field not in ("momentum", "epsilon", "unbiased_running_var",
                     "stats_method", "grad", "impl"):
      del saved["bn"][field]
  assert workdir_lib.result_fields_that_differ(saved, current) == []
  current["norm"], current["precise_bn"]["num_batches"] = "layer", 5
  assert workdir_lib.result_fields_that_differ(saved, current) == [
      "norm", "precise_bn.num_batches"]


def test_ghost_batch_size_is_a_study_axis():
  """virtual_batch_sizes sets bn.virtual_batch_size per combination: each
  its own program, with its own ghost-batch size in the spec."""
  config = base.get_config()
  config.norm, config.virtual_batch_sizes = "ghost", (8, 32)
  sweep.validate_config(config)
  combos = sweep.combinations(config)
  assert [c.name for c in combos] == ["bn.virtual_batch_size=8",
                                      "bn.virtual_batch_size=32"]
  assert [dict(sweep.make_spec(c.config, 60000).bn)["virtual_batch_size"]
          for c in combos] == [8, 32]
  config.virtual_batch_sizes = (8, 0)
  with pytest.raises(sweep.ConfigError, match=re.escape(
      "config.bn.virtual_batch_size=0 must be a positive integer. "
      "(combination bn.virtual_batch_size=0)")):
    sweep.validate_config(config)
