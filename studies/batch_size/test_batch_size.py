"""What the batch-size study needs: a norm-specific axis left out where the
norm does not read it, the learning-rate rule, and PreciseBN sized in
examples."""

import re

import numpy as np
import pytest

from bn_lab import classifier
from bn_lab import stats
from bn_lab import sweep
from bn_lab import train
from bn_lab import config as base
from studies.batch_size import config as batch_size_config
from studies.batch_size import page as batch_size_page


def test_ghost_batch_axis_is_left_out_of_the_references():
  """norms x virtual_batch_sizes: one combination per ghost size, and one
  per norm that does not read the ghost size, its row field None."""
  config = base.get_config()
  config.norms = ("ghost", "layer", "none")
  config.virtual_batch_sizes = (8, 32)
  sweep.validate_config(config)
  combos = sweep.combinations(config)
  assert [c.name for c in combos] == [
      "norm=ghost__bn.virtual_batch_size=8",
      "norm=ghost__bn.virtual_batch_size=32", "norm=layer", "norm=none"]
  assert [c.values["bn.virtual_batch_size"] for c in combos] == [
      8, 32, None, None]
  assert [c.values["norm"] for c in combos] == ["ghost", "ghost", "layer",
                                                "none"]
  assert [dict(sweep.make_spec(c.config, 60000).bn).get("virtual_batch_size")
          for c in combos] == [8, 32, None, None]


def test_an_axis_no_norm_of_the_study_reads_is_an_error():
  config = base.get_config()
  config.norms = ("layer", "group")
  config.virtual_batch_sizes = (8, 32)
  with pytest.raises(sweep.ConfigError, match=re.escape(
      "config.virtual_batch_sizes sweeps config.bn.virtual_batch_size, "
      "which no norm of the study (layer, group) reads")):
    sweep.validate_config(config)


@pytest.mark.parametrize("rule, factor", [
    ("none", lambda b: 1.0), ("linear", lambda b: b / 128),
    ("sqrt", lambda b: (b / 128) ** 0.5)])
def test_learning_rate_follows_the_batch_size_by_the_rule(rule, factor):
  config = base.get_config()
  config.lr_scaling = rule
  config.batch_sizes = (2, 128, 1024)
  config.sweep.learning_rate = (1e-3, 3e-3)
  sweep.validate_config(config)
  for combo in sweep.combinations(config):
    b = combo.config.batch_size
    rates = sorted({run["hparams"]["learning_rate"]
                    for run in sweep.run_grid(combo.config)})
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
  with pytest.raises(sweep.ConfigError, match=re.escape(message)):
    sweep.validate_config(config)


def test_precise_examples_and_batches_are_one_or_the_other():
  config = base.get_config()
  config.precise_bn.num_examples, config.precise_bn.num_batches = 1000, 5
  with pytest.raises(sweep.ConfigError, match="give one of the two"):
    sweep.validate_config(config)


@pytest.mark.parametrize("batch_size, batches", [
    (2, 30000), (128, 468), (1024, 58), (60000, 1)])
def test_precise_examples_become_batches_of_each_size(batch_size, batches):
  """60,000 examples in batches of the combination's size (whole batches,
  at least one); every combination recomputes over the same examples."""
  config = base.get_config()
  config.batch_size = batch_size
  config.precise_bn.num_examples = 60000
  sweep.validate_config(config)
  assert sweep.make_spec(config, 60000).precise_batches == batches
  assert train.PRECISE_METRIC in classifier.metric_names(config)


def test_more_precise_examples_than_training_data_is_an_error():
  config = base.get_config()
  config.precise_bn.num_examples = 70000
  sweep.validate_config(config)
  with pytest.raises(sweep.ConfigError, match=re.escape(
      "config.precise_bn.num_examples=70000 is more than the 60000 "
      "training examples")):
    sweep.validate_data_size(config, 60000, 10000)


@pytest.mark.parametrize("arg", ["norm", "sgd"])
def test_batch_size_configs(arg):
  """(a) every ghost size divides the SGD batch, the references once; (b)
  every SGD batch size with BN and the references; both report all four
  evaluations."""
  config = batch_size_config.get_config(arg)
  sweep.validate_config(config)
  sweep.validate_data_size(config, 60000, 10000)
  combos = sweep.combinations(config)
  sizes = batch_size_config.SIZES
  if arg == "norm":
    assert len(combos) == len(sizes) + len(batch_size_config.REFERENCES)
    assert {c.config.batch_size for c in combos} == {1024}
  else:
    assert len(combos) == len(sizes) * (1 + len(batch_size_config.REFERENCES))
    assert {c.config.batch_size for c in combos} == set(sizes)
  names = classifier.metric_names(config)
  for metric in ("train_accuracy_eval", "test_accuracy_batch_stats",
                 "test_accuracy", train.PRECISE_METRIC):
    assert metric in names
  with pytest.raises(ValueError, match="choose norm"):
    batch_size_config.get_config("ghosts")


def _points(moving, exact, batch_stats=0.5):
  """One ghost size (8) of a norm with running statistics: per seed its
  rows' moving-average and exact test accuracies."""
  finals = [{"test_accuracy": m, train.PRECISE_METRIC: e,
             "test_accuracy_batch_stats": batch_stats,
             "train_accuracy_eval": 1.0} for m, e in zip(moving, exact)]
  means = {k: float(np.mean([r[k] for r in finals])) for k in finals[0]}
  return {"ghost": [(8, means, finals)]}


def test_exact_against_moving_is_paired_over_the_same_runs():
  """Exact statistics and the moving average are the same runs evaluated
  two ways: the paired t test. The seeds spread by 5 points, exact is
  below by 1.00, 0.95 and 1.02 points: Welch's test sees the seeds'
  spread (p = 0.66), the paired test only the spread of the differences
  (mean -0.99, sd 0.036 points, t = -47.6 at df = 2, p = 0.0004), so the
  claim "exact never worse" does not hold. Both comparisons are as scipy
  computes them."""
  from scipy import stats as sps
  moving = [0.90, 0.95, 0.92]
  exact = [0.89, 0.9405, 0.9098]
  points = _points(moving, exact)
  comparisons = batch_size_page._batch_size_comparisons(points, sgd=True)
  (key, c), = comparisons.items()
  assert key == ("exact", "ghost", 8) and c.paired
  assert c.p == pytest.approx(sps.ttest_rel(exact, moving).pvalue, rel=1e-9)
  assert sps.ttest_ind(exact, moving, equal_var=False).pvalue > 0.5
  family = dict(zip(comparisons, stats.holm_family(comparisons.values())))
  text = batch_size_page._batch_size_verdicts(points, True, family)
  assert ("ghost: exact statistics never worse than the moving average "
          "(Wu & Johnson 2021): does not hold** (worse at 8 (-0.99 [") in text
  assert "beyond noise); paired over seeds)" in text, text
  # Below by 1.00 and 0.95 points, one seed above by 1.5: -0.15 on average,
  # within the differences' spread (sd 1.44 points, p = 0.87).
  points = _points(moving, [0.89, 0.9405, 0.935])
  assert sps.ttest_rel([0.89, 0.9405, 0.935], moving).pvalue > 0.5
  family = dict(zip(comparisons, stats.holm_family(
      batch_size_page._batch_size_comparisons(points, sgd=True).values())))
  text = batch_size_page._batch_size_verdicts(points, True, family)
  assert "average (Wu & Johnson 2021): holds within noise** (worse" in text


def test_ghost_sizes_against_the_reference_are_one_family():
  """(a): exact against moving (paired) and the ghost size against the
  best reference (Welch, other networks) are one Holm family of 2."""
  from scipy import stats as sps
  points = _points([0.90, 0.91, 0.92], [0.901, 0.912, 0.921])
  reference = [{"test_accuracy": a, train.PRECISE_METRIC: a,
                "test_accuracy_batch_stats": a, "train_accuracy_eval": 1.0}
               for a in (0.95, 0.951, 0.952)]
  points["layer"] = [(None, {k: float(np.mean([r[k] for r in reference]))
                             for k in reference[0]}, reference)]
  comparisons = batch_size_page._batch_size_comparisons(points, sgd=False)
  assert list(comparisons) == [("exact", "ghost", 8),
                               ("reference", "ghost", 8)]
  c = comparisons[("reference", "ghost", 8)]
  assert not c.paired and c.p == pytest.approx(sps.ttest_ind(
      [0.90, 0.91, 0.92], [0.95, 0.951, 0.952], equal_var=False).pvalue,
                                               rel=1e-9)
  # Holm over 2: the smaller p (the reference's, 0.018, against the
  # paired +0.13 points' 0.057) doubled, the larger kept (or the doubled
  # smaller one, if larger).
  exact_p = comparisons[("exact", "ghost", 8)].p
  assert c.p < exact_p
  corrected = stats.holm_family(comparisons.values())
  assert corrected[1].p_holm == pytest.approx(2 * c.p, rel=1e-9)
  assert corrected[0].p_holm == pytest.approx(max(exact_p, 2 * c.p),
                                              rel=1e-9)
  text = batch_size_page._batch_size_verdicts(
      points, False, dict(zip(comparisons, corrected)))
  assert ("ghost (moving average) is below it beyond noise at ghost sizes "
          "8 (-4.10 [") in text, text


def test_a_diverged_run_is_named_and_in_no_mean_or_test():
  """nan_guard="record" froze seed 2 at ghost size 8: the table's means
  and the paired test are over seeds 0 and 1, and a note names seed 2."""
  rows = []
  for seed, (moving, exact, diverged_at) in enumerate(
      [(0.90, 0.91, None), (0.92, 0.93, None), (0.10, 0.10, 37)]):
    rows.append({"combo": "norm=ghost__bn.virtual_batch_size=8",
                 "norm": "ghost", "bn.virtual_batch_size": 8, "run": seed,
                 "seed": seed, "epoch": 1, "test_accuracy": moving,
                 train.PRECISE_METRIC: exact, "train_loss": 0.1,
                 "test_loss": 0.1, "test_accuracy_batch_stats": 0.5,
                 "train_accuracy_eval": 1.0, "diverged_at": diverged_at})
  lines, points, diverged = batch_size_page._batch_size_table(
      rows, "bn.virtual_batch_size")
  (size, means, finals), = points["ghost"]
  assert [r["seed"] for r in finals] == [0, 1]
  assert means["test_accuracy"] == pytest.approx(0.91)
  assert lines[0][4] == "91.00"  # test, moving average: seeds 0 and 1
  assert batch_size_page._diverged_note(diverged) == (
      "Diverged, so left out of every mean, figure and test above: ghost "
      "size 8 seed 2 (step 37).\n")
  (key, c), = batch_size_page._batch_size_comparisons(points,
                                                      sgd=True).items()
  assert c.n_a == 2
