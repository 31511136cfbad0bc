"""What the batch-size study needs: a norm-specific axis left out where the
norm does not read it, the learning-rate rule, and PreciseBN sized in
examples."""

import re

import pytest

from bn_jax import experiment
from bn_jax import study
from bn_jax import train
from configs import base
from configs import batch_size as batch_size_config


def test_ghost_batch_axis_is_left_out_of_the_references():
  """norms x virtual_batch_sizes: one combination per ghost size, and one
  per norm that does not read the ghost size, its row field None."""
  config = base.get_config()
  config.norms = ("ghost", "layer", "none")
  config.virtual_batch_sizes = (8, 32)
  study.validate_config(config)
  combos = study.combinations(config)
  assert [c.name for c in combos] == [
      "norm=ghost__bn.virtual_batch_size=8",
      "norm=ghost__bn.virtual_batch_size=32", "norm=layer", "norm=none"]
  assert [c.values["bn.virtual_batch_size"] for c in combos] == [
      8, 32, None, None]
  assert [c.values["norm"] for c in combos] == ["ghost", "ghost", "layer",
                                                "none"]
  assert [dict(study.make_spec(c.config, 60000).bn).get("virtual_batch_size")
          for c in combos] == [8, 32, None, None]


def test_an_axis_no_norm_of_the_study_reads_is_an_error():
  config = base.get_config()
  config.norms = ("layer", "group")
  config.virtual_batch_sizes = (8, 32)
  with pytest.raises(study.ConfigError, match=re.escape(
      "config.virtual_batch_sizes sweeps config.bn.virtual_batch_size, "
      "which no norm of the study (layer, group) reads")):
    study.validate_config(config)


@pytest.mark.parametrize("rule, factor", [
    ("none", lambda b: 1.0), ("linear", lambda b: b / 128),
    ("sqrt", lambda b: (b / 128) ** 0.5)])
def test_learning_rate_follows_the_batch_size_by_the_rule(rule, factor):
  config = base.get_config()
  config.lr_scaling = rule
  config.batch_sizes = (2, 128, 1024)
  config.sweep.learning_rate = (1e-3, 3e-3)
  study.validate_config(config)
  for combo in study.combinations(config):
    b = combo.config.batch_size
    rates = sorted({run["hparams"]["learning_rate"]
                    for run in study.run_grid(combo.config)})
    assert rates == pytest.approx([1e-3 * factor(b), 3e-3 * factor(b)])


@pytest.mark.parametrize("field, value, message", [
    ("lr_scaling", "cubic", "config.lr_scaling='cubic' is not valid"),
    ("lr_reference_batch_size", 0,
     "config.lr_reference_batch_size=0 must be a positive integer"),
    ("precise_bn.num_examples", -5,
     "config.precise_bn.num_examples=-5 must be a positive integer")])
def test_bad_rule_or_example_count_is_named(field, value, message):
  config = base.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(study.ConfigError, match=re.escape(message)):
    study.validate_config(config)


def test_precise_examples_and_batches_are_one_or_the_other():
  config = base.get_config()
  config.precise_bn.num_examples, config.precise_bn.num_batches = 1000, 5
  with pytest.raises(study.ConfigError, match="give one of the two"):
    study.validate_config(config)


@pytest.mark.parametrize("batch_size, batches", [
    (2, 30000), (128, 468), (1024, 58), (60000, 1)])
def test_precise_examples_become_batches_of_each_size(batch_size, batches):
  """60,000 examples in batches of the combination's size (whole batches,
  at least one); every combination recomputes over the same examples."""
  config = base.get_config()
  config.batch_size = batch_size
  config.precise_bn.num_examples = 60000
  study.validate_config(config)
  assert study.make_spec(config, 60000).precise_batches == batches
  assert train.PRECISE_METRIC in experiment.metric_names(config)


def test_more_precise_examples_than_training_data_is_an_error():
  config = base.get_config()
  config.precise_bn.num_examples = 70000
  study.validate_config(config)
  with pytest.raises(study.ConfigError, match=re.escape(
      "config.precise_bn.num_examples=70000 is more than the 60000 "
      "training examples")):
    study.validate_data_size(config, 60000, 10000)


@pytest.mark.parametrize("arg", ["norm", "sgd"])
def test_batch_size_configs(arg):
  """(a) every ghost size divides the SGD batch, the references once; (b)
  every SGD batch size with BN and the references; both report all four
  evaluations."""
  config = batch_size_config.get_config(arg)
  study.validate_config(config)
  study.validate_data_size(config, 60000, 10000)
  combos = study.combinations(config)
  sizes = batch_size_config.SIZES
  if arg == "norm":
    assert len(combos) == len(sizes) + len(batch_size_config.REFERENCES)
    assert {c.config.batch_size for c in combos} == {1024}
  else:
    assert len(combos) == len(sizes) * (1 + len(batch_size_config.REFERENCES))
    assert {c.config.batch_size for c in combos} == set(sizes)
  names = experiment.metric_names(config)
  for metric in ("train_accuracy_eval", "test_accuracy_batch_stats",
                 "test_accuracy", train.PRECISE_METRIC):
    assert metric in names
  with pytest.raises(ValueError, match="choose norm"):
    batch_size_config.get_config("ghosts")
