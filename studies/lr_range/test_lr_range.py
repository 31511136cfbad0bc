"""The learning-rate range study (studies/lr_range/config.py): its config and grid,
the diverged runs' rows on a tiny real run (checked against their own
metrics), and its section of the studies page (recomputed here)."""

import copy
import json
import re
import shlex

import helpers
import numpy as np
import pytest
from scipy import stats as sps

from bn_lab import runner
from bn_lab import sweep
import studies.lr_range as lr_range_study
from studies.lr_range import config as lr_range
from bn_lab import report
from bn_lab import page as studies_page  # before the section's module
from studies.lr_range import page as lr_range_page


def test_config_validates_and_sweeps_a_log_grid():
  config = lr_range.get_config()
  sweep.validate_config(config)
  rates = np.array(config.sweep.learning_rate)
  assert rates[0] == 1e-3 and rates[-1] == 10 and rates.size == 13
  # 3 per decade: consecutive ratios 10^(1/3) to the grid's 3 digits.
  np.testing.assert_allclose(rates[1:] / rates[:-1], 10 ** (1 / 3),
                             rtol=5e-3)
  assert config.lr_range.small_learning_rate in tuple(rates)
  assert config.optimizer == "sgd" and config.nan_guard == "record"
  assert [c.values["placement"] for c in sweep.combinations(config)] == [
      "none", "before_activation"]
  runs = sweep.run_grid(sweep.combinations(config)[0].config)
  assert len(runs) == 13 * len(config.seeds)
  assert sorted({r["hparams"]["learning_rate"] for r in runs}) == (
      pytest.approx(sorted(rates)))


def test_short_variant_in_the_docstring_parses_and_validates():
  short = re.search(r"Short run.*?:\s+(\.venv/bin/python -m [^\n]*)",
                    lr_range.__doc__, re.DOTALL)
  argv = shlex.split(short.group(1))
  assert argv[:4] == [".venv/bin/python", "-m", "experiments.main",
                      "--config=studies/lr_range/config.py"]
  config = helpers.resolved_config(argv[3:])
  sweep.validate_config(config)
  assert config.num_epochs == 1 and tuple(config.seeds) == (0,)
  assert config.lr_range.small_learning_rate in tuple(
      config.sweep.learning_rate)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The study's config on tiny data (one hidden layer of 8, which
  compiles faster; 50 of the 200 images held out for validation): 2 epochs
  of 3 steps, 2 seeds, the rates 0.01 (the
  small pair), 0.5 and 1e30 (diverges at once)."""
  idx_dir = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 200, 100)
  workdir = tmp_path_factory.mktemp("runs") / "lr_range"
  config = lr_range.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "progress_seconds": 0.0, "num_epochs": 2,
                       "batch_size": 50, "seeds": (0, 1),
                       "widths": (8,),  # one layer: compiles faster
                       "validation_examples": 50}.items():
    config[field] = value
  config.sweep.learning_rate = (0.01, 0.5, 1e30)
  config.lr_range.trains_at = 0.3  # reachable in 8 steps of tiny data
  runner.run(lr_range_study.STUDY, 
      config, workdir, command="python -m experiments.main "
      f"--config=studies/lr_range/config.py --workdir={workdir}")
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, rows


@pytest.mark.slow
def test_diverged_rows_agree_with_the_metrics(tiny_run):
  """Every row carries diverged_at; a run that has it set is frozen from
  that step on: the same test accuracy at every later epoch, no training
  step counted in an epoch that starts after it (NaN mean loss); the
  others have finite losses throughout. The 1e30 runs diverge, the 0.01
  runs do not."""
  _, rows = tiny_run
  steps_per_epoch = (200 - 50) // 50  # 50 held out for validation
  runs = {}
  for row in rows:
    assert "diverged_at" in row
    runs.setdefault((row["combo"], row["run"]), []).append(row)
  for mine in runs.values():
    mine.sort(key=lambda r: r["epoch"])
    marks = {r["diverged_at"] for r in mine if r["diverged_at"] is not None}
    if not marks:
      assert all(np.isfinite(r["train_loss"]) for r in mine)
      continue
    (step,) = marks  # one step for all its rows
    frozen_epoch = -(-step // steps_per_epoch)  # the epoch of that step
    for r in mine:
      assert r["diverged_at"] == (step if r["epoch"] >= frozen_epoch
                                  else None)
      if (r["epoch"] - 1) * steps_per_epoch + 1 >= step:  # nothing kept
        assert np.isnan(r["train_loss"])
    later = [r["test_accuracy"] for r in mine if r["epoch"] >= frozen_epoch]
    assert later == [later[0]] * len(later)
  by_rate = lambda lr: [r for r in rows if r["learning_rate"] == lr]
  assert all(r["diverged_at"] is not None for r in by_rate(1e30)
             if r["epoch"] == 2)
  assert all(r["diverged_at"] is None for r in by_rate(0.01))


def _final(rows, placement, lr):
  mine = [r for r in rows if r["placement"] == placement
          and r["learning_rate"] == lr]
  last = max(r["epoch"] for r in mine)
  return sorted((r for r in mine if r["epoch"] == last),
                key=lambda r: r["seed"])


def _check_welch(text: str, a, b) -> None:
  """`text` holds mean(a) - mean(b) in points, its Welch interval and p as
  scipy gives them, then Holm's p (at least p)."""
  res = sps.ttest_ind(a, b, equal_var=False)
  diff = 100 * (np.mean(a) - np.mean(b))
  if np.isnan(res.pvalue):  # no spread
    assert f"{diff:+.2f} points, undetermined" in text, text
    return
  got = re.search(r"(\S+) \[(\S+), (\S+)\] points, p (= \S+|< 0\.001) "
                  r"\(Holm (< )?([^)\s]+)\)", text)
  assert got, text
  ci = res.confidence_interval(0.95)
  np.testing.assert_allclose([float(v) for v in got.groups()[:3]],
                             [diff, 100 * ci.low, 100 * ci.high], atol=0.006)
  if got.group(4).startswith("="):
    assert float(got.group(4)[2:]) == pytest.approx(res.pvalue, rel=0.05)
  else:
    assert res.pvalue < 0.001
  assert float(got.group(6)) >= min(res.pvalue, 0.001) * 0.95


@pytest.mark.slow
def test_section_numbers_and_verdicts_match_the_metrics(tiny_run, tmp_path):
  workdir, rows = tiny_run
  loaded = studies_page.load_study(workdir)
  text = lr_range_page.section([loaded], tmp_path)
  assert (tmp_path / "lr_range.png").read_bytes()[:4] == b"\x89PNG"
  threshold = 0.3
  cell = lambda a: f"{100 * np.mean(a):.2f} +- {100 * np.std(a, ddof=1):.2f}"
  for lr in (0.01, 0.5, 1e30):
    for placement in ("none", "before_activation"):
      finals = _final(rows, placement, lr)
      for key in ("test_accuracy", "val_accuracy"):
        assert f"| {cell([r[key] for r in finals])} |" in text
  # The 1e30 row names each seed's diverged step; neither network trains
  # there, so it is not compared.
  steps = sorted(r["diverged_at"] for r in _final(rows, "none", 1e30))
  row_1e30 = next(l for l in text.splitlines() if l.startswith("| 1e+30 |"))
  assert f"{', '.join(f'{s:,}' for s in steps)} (2/2)" in row_1e30
  assert "neither trains: not compared" in row_1e30
  # "Trains" and the largest such rate read the validation accuracy.
  largest = {}
  for placement in ("none", "before_activation"):
    ok = [lr for lr in (0.01, 0.5, 1e30) if all(
        r["diverged_at"] is None and r["val_accuracy"] >= threshold
        for r in _final(rows, placement, lr))]
    largest[placement] = max(ok) if ok else None
  show = lambda lr: "none" if lr is None else f"{lr:g}"
  assert (f"largest rate at which every seed trains: "
          f"{show(largest['before_activation'])} with BN, "
          f"{show(largest['none'])} without") in text
  # The small pair at a matched training loss, recomputed: per seed, no
  # BN's last-epoch loss and BN's first epoch at or below it.
  claim = next(l for l in text.splitlines()
               if l.startswith("| little or no benefit"))
  bn_acc, plain_acc = [], []
  for seed in (0, 1):
    plain = _final(rows, "none", 0.01)[seed]
    bn_rows = sorted((r for r in rows if r["placement"] == "before_activation"
                      and r["learning_rate"] == 0.01 and r["seed"] == seed),
                     key=lambda r: r["epoch"])
    at = [r for r in bn_rows if r["train_loss"] <= plain["train_loss"]]
    if at:
      bn_acc.append(at[0]["test_accuracy"])
      plain_acc.append(plain["test_accuracy"])
  if len(bn_acc) < 2:
    assert "no comparison" in claim, claim
  else:
    _check_welch(claim, bn_acc, plain_acc)


@pytest.mark.slow
def test_a_small_rate_off_the_grid_is_named(tiny_run, tmp_path):
  workdir, _ = tiny_run
  loaded = copy.deepcopy(studies_page.load_study(workdir))
  loaded["config"]["lr_range"]["small_learning_rate"] = 0.02
  with pytest.raises(report.ReportError, match=re.escape(
      "config.lr_range.small_learning_rate=0.02 is not one of the learning "
      "rates trained (0.01, 0.5, 1e+30)")):
    lr_range_page.section([loaded], tmp_path)
