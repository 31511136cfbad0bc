"""experiments/report.py on synthetic workdirs: no training.

Each test writes a metrics.jsonl (and maybe a results.json) as the trainer's
contract describes them, then checks the table against numbers computed here
independently (numpy written out in the test), the files written, and the
one-line errors of the command line.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from bn_lab import workdir as workdir_lib
import experiments.main  # noqa: F401  (its global --workdir must not clash)
from bn_lab import report
from experiments import report as report_cli

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"placement": "none", "batch_size": 128, "model": "mlp",
            "activation": "relu", "norm": "batch",
            "bn.virtual_batch_size": 32}
TABLE_HEADER = ("| seeds | test acc (eval mode) | test acc (batch stats) | "
                "train loss | epochs to 97% | wall time (s) |")


def make_row(run, epoch, acc, *, swept=None, acc_bs=0.95, loss=0.1,
             wall=None, **extra):
  """One metrics.jsonl row of the combination that sweeps `swept`."""
  swept = swept or {"placement": "none"}
  combo = "__".join(f"{k}={v}" for k, v in swept.items())
  return {**DEFAULTS, **swept, "combo": combo, "run": run, "seed": run,
          "learning_rate": 1e-3, "bn_momentum": 0.99, "bn_epsilon": 1e-3,
          "epoch": epoch, "step": 100 * epoch,
          "wall_time": 2.0 * epoch + 0.5 if wall is None else wall,
          "train_loss": loss, "train_accuracy": 0.9, "test_loss": 0.2,
          "test_accuracy": acc, "test_accuracy_batch_stats": acc_bs, **extra}


def write_workdir(path, rows, results=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  if results is not None:
    (path / "results.json").write_text(json.dumps(results))
  return path


def table_rows(text):
  """The table's lines after the header and separator."""
  lines = [l for l in text.splitlines() if l.startswith("|")]
  return lines[2:]


# Accuracy of runs 0, 1, 2 of "placement=none" at epochs 1, 2, 3. Run 0
# reaches 97% at epoch 2, run 1 at epoch 3, run 2 never.
NONE_ACC = [[0.95, 0.97, 0.975], [0.96, 0.965, 0.971], [0.90, 0.92, 0.94]]
NONE_ACC_BS = [0.96, 0.95, 0.93]  # final epoch
NONE_LOSS = [0.1, 0.2, 0.3]  # final epoch


def placements_rows():
  """3 runs of "none" (with a duplicated row), 1 run of "input"."""
  rows = []
  for epoch in (1, 2, 3):
    for run in range(3):
      final = epoch == 3
      rows.append(make_row(
          run, epoch, NONE_ACC[run][epoch - 1],
          acc_bs=NONE_ACC_BS[run] if final else 0.5,
          loss=NONE_LOSS[run] if final else 1.0))
  # A crash before the checkpoint of epoch 3: its rows were appended twice,
  # the stale one (which would reach the target) first. The last one wins.
  stale = make_row(2, 3, 0.99, acc_bs=0.1, loss=9.0)
  rows.insert(len(rows) - 1, stale)
  rows += [make_row(0, epoch, 0.80 + 0.01 * epoch, acc_bs=0.7, loss=0.4,
                    swept={"placement": "input"}) for epoch in (1, 2, 3)]
  return rows


# ----------------------------------------------------------------------------
# The table's numbers.


def test_load_rows_last_duplicate_wins_in_trained_order(tmp_path):
  workdir = write_workdir(tmp_path / "w", placements_rows())
  rows = report.load_rows(workdir)
  assert len(rows) == 3 * 3 + 3  # the duplicate counted once
  keys = [(r["combo"], r["run"], r["epoch"]) for r in rows]
  assert keys == [("placement=none", run, epoch) for epoch in (1, 2, 3)
                  for run in range(3)] + [
                      ("placement=input", 0, epoch) for epoch in (1, 2, 3)]
  assert rows[8]["test_accuracy"] == 0.94


def test_table_numbers(tmp_path):
  workdir = write_workdir(tmp_path / "w", placements_rows())
  summaries = report.summarize(report.load_rows(workdir))
  none, single = summaries
  final = np.array([acc[-1] for acc in NONE_ACC])
  assert none["combo"] == "placement=none" and none["runs"] == 3
  np.testing.assert_allclose(none["test_accuracy_mean"], final.mean())
  np.testing.assert_allclose(none["test_accuracy_std"], final.std(ddof=1))
  np.testing.assert_allclose(none["test_accuracy_batch_stats_mean"],
                             np.mean(NONE_ACC_BS))
  np.testing.assert_allclose(none["train_loss_mean"], np.mean(NONE_LOSS))
  assert none["epochs_to_target_mean"] == 2.5  # runs 0 and 1: (2 + 3) / 2
  assert none["runs_reaching_target"] == 2
  assert none["wall_time"] == 6.5  # the last row's (no results.json)
  assert single["test_accuracy_std"] is None
  assert single["epochs_to_target_mean"] is None

  table = report.summary_markdown(summaries)
  assert table.startswith("| placement " + TABLE_HEADER + "\n|---|")
  mean, std = 100 * final.mean(), 100 * final.std(ddof=1)  # 96.20 +- 1.91
  assert table_rows(table) == [
      f"| none | 3 | {mean:.2f} +- {std:.2f} | 94.67 | 0.2000 | "
      "2.5 (2/3 seeds) | 6.5 |",
      "| input | 1 | 83.00 +- - | 70.00 | 0.4000 | not reached | 6.5 |"]
  assert ("Each line: one combination; means over 1 to 3 seeds, +- the "
          "sample standard deviation (ddof=1) over those seeds; - for a "
          "single seed.") in table
  assert "No results.json" in table  # an interrupted run says so


def test_results_json_gives_title_target_and_wall_time(tmp_path):
  results = {
      "study": "BN placements", "dataset": "mnist",
      "data_origin": "bundled copy /data/mnist", "target_accuracy": 0.975,
      "num_epochs": 3, "axes": {"placement": ["none", "input"],
                                "batch_size": [128], "model": ["mlp"],
                                "activation": ["relu"]},
      "combos": [{"combo": "placement=none", **DEFAULTS, "runs": 3,
                  "epochs": 3, "wall_time": 12.34, "compile_time": 2.0},
                 {"combo": "placement=input", **DEFAULTS,
                  "placement": "input", "runs": 1, "epochs": 3,
                  "wall_time": 3.0, "compile_time": None}]}
  workdir = write_workdir(tmp_path / "w", placements_rows(), results)
  table = report.write_report([workdir], workdir)
  summary = (workdir / "summary.md").read_text()
  assert summary.startswith("# mnist: BN placements\n\n"
                            "Data: bundled copy /data/mnist\n\n| placement |")
  assert summary.endswith(table)
  assert "epochs to 97.5% |" in table
  assert "No results.json" not in table
  # Only run 0 (0.975 at epoch 3) reaches 97.5%.
  assert table_rows(table)[0].endswith("| 3.0 (1/3 seeds) | 12.3 |")


# ----------------------------------------------------------------------------
# Columns.


def test_one_combination_shows_placement(tmp_path):
  rows = [make_row(run, 1, 0.98) for run in range(2)]
  table = report.summary_markdown(report.summarize(rows))
  assert table.startswith("| placement " + TABLE_HEADER)
  assert table_rows(table) == [
      "| none | 2 | 98.00 +- 0.00 | 95.00 | 0.1000 | 1.0 (2/2 seeds) | 2.5 |"]


def test_columns_only_for_the_axes_that_vary(tmp_path):
  rows = [make_row(0, 1, 0.98, swept={"batch_size": b}) for b in (64, 256)]
  table = report.summary_markdown(report.summarize(rows))
  assert table.startswith("| batch_size " + TABLE_HEADER)  # no placement
  assert [l.split(" | ")[0] for l in table_rows(table)] == ["| 64", "| 256"]


def test_two_axis_study_one_row_per_combination(tmp_path):
  rows = []
  for placement in ("none", "input"):
    for batch_size in (64, 128):
      swept = {"placement": placement, "batch_size": batch_size}
      rows += [make_row(run, 1, 0.9, swept=swept) for run in range(2)]
  workdir = write_workdir(tmp_path / "w", rows)
  table = report.write_report([workdir], workdir)
  assert table.startswith("| placement | batch_size " + TABLE_HEADER)
  assert [l.split(" | ")[:2] for l in table_rows(table)] == [
      ["| none", "64"], ["| none", "128"], ["| input", "64"],
      ["| input", "128"]]
  for combo in ("placement=none__batch_size=64",
                "placement=input__batch_size=128"):
    assert (workdir / f"curves_{combo}.png").is_file()


def test_axes_come_from_results_json(tmp_path):
  """An axis the trainer does not know yet ("optimizer") is a column once
  results.json lists it."""
  rows = [make_row(0, 1, 0.9, swept={"optimizer": n})
          for n in ("adam", "sgd")]
  results = {"axes": {**{a: [v] for a, v in DEFAULTS.items()},
                      "optimizer": ["adam", "sgd"]}}
  table = report.summary_markdown(report.summarize(rows, results=results))
  assert table.startswith("| optimizer " + TABLE_HEADER)
  # Without results.json only the trainer's axes count: none varies.
  table = report.summary_markdown(report.summarize(rows))
  assert table.startswith("| placement " + TABLE_HEADER)


def test_rows_without_combo_are_read_as_placements(tmp_path):
  """metrics.jsonl of the trainer before combinations (no "combo")."""
  rows = [{k: v for k, v in make_row(0, 1, 0.9).items() if k != "combo"}]
  workdir = write_workdir(tmp_path / "w", rows)
  assert report.load_rows(workdir)[0]["combo"] == "placement=none"


def test_curves_filename_is_filesystem_safe():
  assert report.curves_filename(
      {"combo": "placement=none__widths=(50, 50)"}) == (
          "curves_placement=none__widths=_50__50_.png")
  assert report.curves_filename(
      {"combo": "placement=a/b", "workdir": "runs 1"}) == (
          "curves_runs_1_placement=a_b.png")


# ----------------------------------------------------------------------------
# What differs is never pooled: a line per swept value, +- over seeds only,
# a diverged run in no mean.

EPSILONS = (1e-3, 1e-1)
# Final (epoch 2) test accuracy of seed s at epsilon i: pooled, the six
# made one "94.6 +- 0.6" of two different networks.
EPS_ACC = [[0.938, 0.950], [0.944, 0.949], [0.941, 0.955]]


def epsilon_sweep_rows():
  """`--config.norm=layer --config.sweep.bn_epsilon='(1e-3,1e-1)'` over 3
  seeds: one combination, its runs seeds x epsilons in sweep.run_grid's
  order (run 2 * seed + i)."""
  return [make_row(2 * seed + i, epoch, EPS_ACC[seed][i] - 0.1 * (2 - epoch),
                   swept={"placement": "before_activation"}, norm="layer",
                   seed=seed, bn_epsilon=eps, acc_bs=EPS_ACC[seed][i],
                   loss=0.1 * (i + 1))
          for epoch in (1, 2) for seed in range(3)
          for i, eps in enumerate(EPSILONS)]


def test_a_bn_option_sweep_is_a_line_per_value():
  summaries = report.summarize(epsilon_sweep_rows())
  assert [(s["combo"], s["bn_epsilon"], s["runs"], s["seeds"], s["swept"])
          for s in summaries] == [
              ("placement=before_activation", eps, 3, [0, 1, 2],
               ("bn_epsilon",)) for eps in EPSILONS]
  acc = np.array(EPS_ACC)  # (seeds, epsilons)
  for s, values in zip(summaries, acc.T):
    np.testing.assert_allclose(s["test_accuracy_mean"], values.mean())
    np.testing.assert_allclose(s["test_accuracy_std"], values.std(ddof=1))
    assert s["diverged"] == [] and s["finite_runs"] == 3
  table = report.summary_markdown(summaries)
  assert table.startswith("| placement | bn_epsilon " + TABLE_HEADER)
  cells = [f"{100 * v.mean():.2f} +- {100 * v.std(ddof=1):.2f}"
           for v in acc.T]  # 94.10 +- 0.30, 95.13 +- 0.32
  assert table_rows(table) == [
      f"| before_activation | 0.001 | 3 | {cells[0]} | 94.10 | 0.1000 | "
      "not reached | 4.5 |",
      f"| before_activation | 0.1 | 3 | {cells[1]} | 95.13 | 0.2000 | "
      "not reached | 4.5 |"]
  assert ("Each line: one combination at one value of bn_epsilon (swept "
          "within it, never pooled); means over 3 seeds, +- the sample "
          "standard deviation (ddof=1) over those seeds.") in table
  assert "Wall time is the combination's" in table


# Learning rates 0.01, 0.1, 1.0 over 3 seeds; seed 1 at 1.0 diverges in
# epoch 2 (nan_guard="record" froze it at step 150: its frozen weights score
# 9.8%). Pooled, the nine made "61.5 +- 41.6".
RATES = (0.01, 0.1, 1.0)
LR_ACC = [[0.90, 0.95, 0.97], [0.91, 0.96, 0.098], [0.92, 0.94, 0.96]]


def lr_sweep_rows(diverged_at=150, **diverged_metrics):
  """The sweep's rows; the diverged run's epoch-2 row has `diverged_at` (or
  none: `diverged_at=None`) and `diverged_metrics`."""
  rows = []
  for epoch in (1, 2):
    for seed in range(3):
      for i, lr in enumerate(RATES):
        broken = (seed, i, epoch) == (1, 2, 2)
        extra = ({"diverged_at": diverged_at if broken else None,
                  **(diverged_metrics if broken else {})})
        rows.append(make_row(3 * seed + i, epoch,
                             LR_ACC[seed][i] - 0.05 * (2 - epoch),
                             seed=seed, learning_rate=lr,
                             loss=2.3 if broken else 0.1 * (i + 1), **extra))
  return rows


def test_a_learning_rate_sweep_with_a_diverged_run():
  summaries = report.summarize(lr_sweep_rows())
  assert [(s["learning_rate"], s["runs"], s["finite_runs"])
          for s in summaries] == [(0.01, 3, 3), (0.1, 3, 3), (1.0, 3, 2)]
  assert summaries[2]["diverged"] == [
      {"run": 5, "seed": 1, "step": 150, "epoch": None}]
  acc = np.array(LR_ACC)
  finite = acc[[0, 2], 2]  # the diverged seed is in no mean
  np.testing.assert_allclose(summaries[2]["test_accuracy_mean"],
                             finite.mean())
  np.testing.assert_allclose(summaries[2]["test_accuracy_std"],
                             finite.std(ddof=1))
  np.testing.assert_allclose(summaries[2]["train_loss_mean"], 0.3)
  np.testing.assert_allclose(summaries[0]["test_accuracy_std"],
                             acc[:, 0].std(ddof=1))
  table = report.summary_markdown(summaries)
  assert table.startswith(
      "| placement | learning_rate | seeds | test acc (eval mode) | test acc "
      "(batch stats) | train loss | epochs to 97% | diverged | wall time (s) "
      "|")
  mean = lambda v: f"{100 * v.mean():.2f} +- {100 * v.std(ddof=1):.2f}"
  assert table_rows(table) == [
      f"| none | 0.01 | 3 | {mean(acc[:, 0])} | 95.00 | 0.1000 | "
      "not reached | - | 4.5 |",
      f"| none | 0.1 | 3 | {mean(acc[:, 1])} | 95.00 | 0.2000 | "
      "not reached | - | 4.5 |",
      f"| none | 1 | 3 | {mean(finite)} (2 of 3 seeds) | 95.00 | 0.3000 | "
      "2.0 (1/2 seeds) | 1 of 3 seeds (seed 1 at step 150) | 4.5 |"]
  assert "A diverged seed (frozen at its first non-finite step" in table


def test_a_nan_without_the_guard_is_a_diverged_run():
  """nan_guard=False: no diverged_at, but a non-finite loss (JSON NaN)."""
  rows = lr_sweep_rows(diverged_at=None, test_loss=float("nan"),
                       train_loss=float("nan"))
  line = table_rows(report.summary_markdown(report.summarize(rows)))[2]
  assert line.endswith("| 1 of 3 seeds (seed 1 at epoch 2) | 4.5 |")
  assert "(2 of 3 seeds)" in line and "nan" not in line


def test_a_line_whose_seeds_all_diverged_says_so():
  rows = [make_row(run, 1, 0.1, seed=run, learning_rate=10.0,
                   diverged_at=40 + run, loss=2.3) for run in range(2)]
  rows += [make_row(run, 1, 0.9, seed=run - 2, learning_rate=0.1)
           for run in (2, 3)]
  summaries = report.summarize(rows)
  assert summaries[0]["finite_runs"] == 0
  assert summaries[0]["test_accuracy_mean"] is None
  assert table_rows(report.summary_markdown(summaries))[0] == (
      "| none | 10 | 2 | all 2 seeds diverged | - | - | - | 2 of 2 seeds "
      "(seed 0 at step 40; seed 1 at step 41) | 2.5 |")
  fig = report.plot_comparison(rows)
  assert [l.get_label() for l in fig.axes[2].get_lines()] == [
      "placement=none__learning_rate=10 (all 2 seeds diverged)",
      "placement=none__learning_rate=0.1"]
  assert fig.axes[2].get_lines()[0].get_xdata().size == 0  # no curve
  assert fig.get_suptitle().startswith(
      "line: mean over 2 seeds (diverged seeds left out); shaded band")


def test_the_curves_are_per_value_without_diverged_runs():
  rows = lr_sweep_rows()
  fig = report.plot_comparison(rows)
  ax_test = fig.axes[2]
  lines = ax_test.get_lines()
  assert [l.get_label() for l in lines] == [
      "placement=none__learning_rate=0.01", "placement=none__learning_rate=0.1",
      "placement=none__learning_rate=1 (1 of 3 seeds diverged, left out)"]
  acc = 100 * np.array(LR_ACC)
  for line, i in zip(lines, range(3)):
    seeds = [0, 2] if i == 2 else [0, 1, 2]
    np.testing.assert_allclose(line.get_ydata(),
                               [acc[seeds, i].mean() - 5, acc[seeds, i].mean()])
  assert ax_test.get_legend().get_title().get_text() == "setting"
  assert fig.get_suptitle() == (
      "line: mean over 2 to 3 seeds (diverged seeds left out); shaded band "
      "(error bar at a single point): mean ± 1 sample std (ddof=1) over "
      "them")
  # The runs' figure: every run, named by its seed and swept value.
  labels = [l.get_label() for l in
            report.plot_runs(rows, "placement=none").axes[0].get_lines()]
  assert labels[:3] == ["run 0 (seed 0, learning_rate=0.01)",
                        "run 1 (seed 0, learning_rate=0.1)",
                        "run 2 (seed 0, learning_rate=1)"]
  assert labels[5] == ("run 5 (seed 1, learning_rate=1, diverged at step "
                       "150)")


def test_a_swept_workdir_reports_a_line_per_value(tmp_path):
  workdir = write_workdir(tmp_path / "w", lr_sweep_rows(
      diverged_at=None, test_loss=float("nan")))
  table = report.write_report([workdir], workdir)
  assert [l.split(" | ")[1] for l in table_rows(table)] == ["0.01", "0.1",
                                                             "1"]
  assert "seed 1 at epoch 2" in (workdir / "summary.md").read_text()
  assert sorted(p.name for p in workdir.glob("*.png")) == [
      "curves_placement=none.png", "learning_curves.png"]


# ----------------------------------------------------------------------------
# The plots: what each panel draws, read back from the Figure.


def test_comparison_plots_percent_with_a_labelled_band(tmp_path):
  rows = report.load_rows(write_workdir(tmp_path / "w", placements_rows()))
  fig = report.plot_comparison(rows)
  ax_loss, ax_train, ax_test = fig.axes[:3]
  assert ax_test.get_ylabel() == "test accuracy (eval mode, %)"
  assert ax_train.get_ylabel() == "train accuracy (training mode, %)"
  assert ax_loss.get_yscale() == "log"
  none, single = ax_test.get_lines()
  assert none.get_label() == "placement=none"
  acc = 100 * np.array(NONE_ACC)  # (runs, epochs)
  # Three epochs: optimizer steps on the x axis (the rows' "step").
  np.testing.assert_array_equal(none.get_xdata(), [100, 200, 300])
  np.testing.assert_allclose(none.get_ydata(), acc.mean(0))
  np.testing.assert_allclose(single.get_ydata(), [81, 82, 83])
  # The band: +- one sample std over the 3 runs; none for the single run.
  band, = ax_test.collections
  ys = band.get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose(
      [ys.min(), ys.max()], [(acc.mean(0) - acc.std(0, ddof=1)).min(),
                             (acc.mean(0) + acc.std(0, ddof=1)).max()])
  assert fig.get_suptitle() == (
      "line: mean over 1 to 3 seeds; shaded band (error bar at a single "
      "point): mean ± 1 sample std (ddof=1) over them")
  for ax in (ax_loss, ax_train, ax_test):
    assert ax.get_xlabel() == "optimizer steps" and ax.get_xlim()[0] == 0
  assert ax_loss.get_title() == "Training loss (epoch means)"


def test_band_note_says_seeds():
  assert report.band_note([make_row(0, 1, 0.9)]) == (
      "one seed per line: the line is that run, no band")
  # Two learning rates of one seed each: a line each, not one of 2 runs.
  swept = [make_row(run, 1, 0.9, learning_rate=lr)
           for run, lr in enumerate((0.1, 0.2))]
  assert report.band_note(swept) == (
      "one seed per line: the line is that run, no band")
  swept = [make_row(run, 1, 0.9, learning_rate=lr, seed=seed)
           for run, (seed, lr) in enumerate(
               (s, lr) for s in range(2) for lr in (0.1, 0.2))]
  assert report.band_note(swept) == (
      "line: mean over 2 seeds; shaded band (error bar at a single point): "
      "mean ± 1 sample std (ddof=1) over them")


def test_one_epoch_run_has_a_real_axis():
  """One epoch was a point over x ticks from 0.945 to 1.050: now optimizer
  steps from 0, the point at the epoch's last step with an error bar."""
  rows = [make_row(run, 1, acc) for run, acc in enumerate((0.9, 0.92))]
  assert report.x_axis(rows) == ("step", "optimizer steps")
  fig = report.plot_comparison(rows)
  ax_test = fig.axes[2]
  low, high = ax_test.get_xlim()
  assert low == 0 and 100 <= high < 200
  assert all(t == int(t) for t in ax_test.get_xticks())
  line, = ax_test.get_lines()[:1]
  np.testing.assert_array_equal(line.get_xdata(), [100])
  np.testing.assert_allclose(line.get_ydata(), [91])
  assert len(ax_test.containers) == 1  # the error bar: ± the std
  fig = report.plot_runs(rows, "placement=none")
  assert fig.axes[0].get_xlabel() == "optimizer steps"
  assert fig.axes[0].get_lines()[0].get_marker() == "o"  # a visible point


def test_many_epochs_or_no_steps_put_epochs_on_the_x_axis():
  rows = [make_row(0, epoch, 0.9) for epoch in range(1, 7)]
  assert report.x_axis(rows) == ("epoch", "epoch")
  assert report.x_axis(rows[:5]) == ("step", "optimizer steps")
  no_steps = [{k: v for k, v in r.items() if k != "step"} for r in rows[:2]]
  assert report.x_axis(no_steps) == ("epoch", "epoch")
  ax_test = report.plot_comparison(rows).axes[2]
  assert ax_test.get_xlabel() == "epoch"
  np.testing.assert_array_equal(ax_test.get_lines()[0].get_xdata(),
                                range(1, 7))


@pytest.mark.parametrize("fields, expected", [
    ({"placement": "none", "norm": "batch"}, False),
    ({"placement": "before_activation", "norm": "none"}, False),
    ({"placement": "before_activation", "norm": "layer"}, False),
    ({"placement": "after_activation", "norm": "group"}, False),
    ({"placement": "input", "norm": "instance"}, False),
    ({"placement": "input", "norm": "rms"}, False),
    ({"placement": "input", "norm": "batch"}, True),
    ({"placement": "before_activation", "norm": "renorm"}, True),
    ({"placement": "before_activation", "norm": "ghost"}, True),
    ({"placement": "before_activation", "norm": "sampled"}, True),
    ({"placement": "before_activation"}, True),  # the BN-only trainer's
    ({"placement": "input", "norm": "a_study_s_own"}, True),
])
def test_has_running_statistics(fields, expected):
  assert report.has_running_statistics(fields) is expected


def test_runs_plot_has_batch_stats_only_with_running_statistics(tmp_path):
  rows = report.load_rows(write_workdir(tmp_path / "w", placements_rows()))
  ax = report.plot_runs(rows, "placement=none").axes[0]  # no BN
  assert [l.get_linestyle() for l in ax.get_lines()] == ["-"] * 3
  np.testing.assert_allclose([l.get_ydata()[-1] for l in ax.get_lines()],
                             [100 * a[-1] for a in NONE_ACC])
  assert "no running statistics" in ax.get_title()
  assert ax.get_ylabel() == "test accuracy (%)"
  assert "batch statistics" not in [
      t.get_text() for t in ax.get_legend().get_texts()]

  ax = report.plot_runs(rows, "placement=input").axes[0]  # BN at the input
  eval_mode, batch_stats = ax.get_lines()
  assert batch_stats.get_linestyle() == "--"
  np.testing.assert_allclose(eval_mode.get_ydata(), [81, 82, 83])
  np.testing.assert_allclose(batch_stats.get_ydata(), [70, 70, 70])
  assert "batch statistics" in [
      t.get_text() for t in ax.get_legend().get_texts()]

  layer = [make_row(0, 1, 0.9, swept={"placement": "before_activation"},
                    norm="layer")]
  ax = report.plot_runs(layer, layer[0]["combo"]).axes[0]
  assert len(ax.get_lines()) == 1


def write_steps(workdir, rows, tail=""):
  (workdir / "steps.jsonl").write_text(
      "".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
              for r in rows) + tail)


def step_row(run, step, loss, acc=0.5, combo="placement=none"):
  return {"combo": combo, "run": run, "seed": run, "step": step,
          "train_loss": loss, "train_accuracy": acc}


def test_load_steps(tmp_path):
  workdir = write_workdir(tmp_path / "w", [make_row(0, 1, 0.9)])
  assert report.load_steps(workdir) == []  # an older workdir: no file
  write_steps(workdir, [
      step_row(0, 10, 9.0),
      step_row(0, 10, 1.0),  # appended again after a resume: the last wins
      step_row(1, 10, 2.0),
      "[1, 2]",  # not a row
      {"combo": "placement=none", "run": 0, "train_loss": 1.0},  # no step
  ], tail='{"combo": "placement=none", "ru')  # being appended
  rows = report.load_steps(workdir)
  assert [(r["run"], r["step"], r["train_loss"]) for r in rows] == [
      (0, 10, 1.0), (1, 10, 2.0)]
  (workdir / "steps.jsonl").write_text("{not json\n")
  with pytest.raises(report.ReportError,
                     match=r"steps\.jsonl, line 1 is not a JSON row"):
    report.load_steps(workdir)


def test_training_curves_come_from_steps_jsonl(tmp_path):
  """A combination with step rows draws its training curves from them (the
  mean and std over runs at each logged step); one without, from its
  epochs."""
  workdir = write_workdir(tmp_path / "w", placements_rows())
  losses = {run: [1.0 + run, 0.5 + run, 0.25 + run] for run in range(3)}
  write_steps(workdir, [step_row(run, step, losses[run][i], 0.1 * i)
                        for i, step in enumerate((10, 20, 30))
                        for run in range(3)])
  rows, steps = report.load_rows(workdir), report.load_steps(workdir)
  fig = report.plot_comparison(rows, steps=steps)
  ax_loss, ax_train = fig.axes[:2]
  logged, epochs = ax_loss.get_lines()
  np.testing.assert_array_equal(logged.get_xdata(), [10, 20, 30])
  np.testing.assert_allclose(logged.get_ydata(), [2.0, 1.5, 1.25])
  assert logged.get_marker() in (None, "None")  # a curve, not epoch dots
  np.testing.assert_array_equal(epochs.get_xdata(), [100, 200, 300])
  np.testing.assert_allclose(ax_train.get_lines()[0].get_ydata(),
                             [0, 10, 20])
  band = ax_loss.collections[0].get_paths()[0].vertices[:, 1]
  np.testing.assert_allclose([band.min(), band.max()], [0.25, 3.0])
  assert ax_loss.get_title() == (
      "Training loss (10-step means, else epoch means)")
  # The report reads steps.jsonl itself.
  report.write_report([workdir], tmp_path / "out")
  assert_png(tmp_path / "out" / "learning_curves.png")
  assert len(report._load_study(workdir, None)["steps"]) == 9


def test_steps_on_an_epoch_axis_are_fractions_of_epochs():
  rows = [make_row(0, epoch, 0.9) for epoch in range(1, 7)]  # 100 / epoch
  steps = [step_row(0, step, 1.0) for step in range(50, 601, 50)]
  xs, mean, std, dense = report.training_curve(rows, steps, "train_loss",
                                               "epoch")
  assert dense and xs == [s / 100 for s in range(50, 601, 50)]
  xs, _, _, dense = report.training_curve(rows, [], "train_loss", "epoch")
  assert not dense and xs == list(range(1, 7))


# ----------------------------------------------------------------------------
# The command line.


def assert_png(path):
  with Image.open(path) as image:
    assert image.format == "PNG"
    width, height = image.size
  assert 200 < width < 2000 and 200 < height < 1000, (path, image.size)
  assert path.stat().st_size < 300_000  # small figures


def test_cli_regenerates_summary_and_pngs(tmp_path, capsys):
  workdir = write_workdir(tmp_path / "w", placements_rows())
  (workdir / "summary.md").write_text("stale\n")
  report_cli.main(["report", f"--workdir={workdir}"])
  printed = capsys.readouterr().out
  summary = (workdir / "summary.md").read_text()
  assert summary.startswith("# w: no results.json yet\n\n| placement |")
  assert table_rows(printed) == table_rows(summary) and len(
      table_rows(summary)) == 2
  for name in ("learning_curves.png", "curves_placement=none.png",
               "curves_placement=input.png"):
    assert_png(workdir / name)
  assert not list(workdir.glob(".*.tmp"))


def test_cli_several_workdirs_into_out(tmp_path, capsys):
  a = write_workdir(tmp_path / "a", placements_rows())
  b = write_workdir(tmp_path / "b", [make_row(0, 1, 0.99)])
  out = tmp_path / "compared"
  report_cli.main(["report", f"--workdir={a}", "--workdir", str(b),
               f"--out={out}"])
  table = capsys.readouterr().out
  assert table.startswith("| workdir | placement " + TABLE_HEADER)
  assert [l.split(" | ")[:2] for l in table_rows(table)] == [
      ["| a", "none"], ["| a", "input"], ["| b", "none"]]
  for name in ("learning_curves.png", "curves_a_placement=none.png",
               "curves_a_placement=input.png", "curves_b_placement=none.png"):
    assert_png(out / name)
  assert (out / "summary.md").read_text().startswith(
      "# a: no results.json yet; b: no results.json yet\n")
  assert not (a / "summary.md").exists() and not (b / "summary.md").exists()


def exit_message(argv):
  with pytest.raises(SystemExit) as raised:
    report_cli.main(argv)
  message = str(raised.value.code)
  assert raised.value.code not in (0, None)
  assert "\n" not in message and "Traceback" not in message, message
  return message


def test_cli_several_workdirs_need_out(tmp_path):
  a = write_workdir(tmp_path / "a", [make_row(0, 1, 0.9)])
  message = exit_message(["report", f"--workdir={a}", f"--workdir={a}"])
  assert "--out" in message
  message = exit_message(["report", f"--workdir={a}", f"--workdir={a}",
                          f"--out={tmp_path / 'out'}"])
  assert message.startswith("ReportError: a workdir is given twice")


def test_cli_missing_workdir(tmp_path):
  missing = tmp_path / "nowhere"
  message = exit_message(["report", f"--workdir={missing}"])
  assert message == f"ReportError: workdir {missing} does not exist."


def test_cli_workdir_without_metrics(tmp_path):
  (tmp_path / "w").mkdir()
  message = exit_message(["report", f"--workdir={tmp_path / 'w'}"])
  assert f"{tmp_path / 'w'} has no metrics.jsonl" in message
  (tmp_path / "w" / "metrics.jsonl").write_text("\n")
  message = exit_message(["report", f"--workdir={tmp_path / 'w'}"])
  assert f"{tmp_path / 'w' / 'metrics.jsonl'} is empty" in message


@pytest.mark.parametrize("bad_line", [
    b'{"combo": "placement=none", "run": 0, "epo',  # cut short by a crash
    b"\xff\xfe not utf-8",
    b"[1, 2]",
    json.dumps({**make_row(0, 2, 0.9), "test_accuracy": None}).encode(),
], ids=["truncated", "not_utf8", "not_object", "null_metric"])
def test_cli_corrupt_metrics_line_names_file_and_line(tmp_path, bad_line):
  workdir = tmp_path / "w"
  write_workdir(workdir, [make_row(0, 1, 0.9)])
  with open(workdir / "metrics.jsonl", "ab") as f:
    f.write(bad_line + b"\n")
  message = exit_message(["report", f"--workdir={workdir}"])
  assert message.startswith(
      f"ReportError: {workdir / 'metrics.jsonl'}, line 2 "), message
  assert not (workdir / "summary.md").exists()


def test_row_being_appended_is_not_an_error(tmp_path):
  """A running trainer may be mid-append: an unterminated last line that
  does not parse is skipped; one that parses is a row."""
  workdir = write_workdir(tmp_path / "w", [make_row(0, 1, 0.9)])
  with open(workdir / "metrics.jsonl", "ab") as f:
    f.write(b'{"combo": "placement=none", "ru')
  assert len(report.load_rows(workdir)) == 1
  (workdir / "metrics.jsonl").write_text(json.dumps(make_row(0, 1, 0.9)))
  assert report.load_rows(workdir)[0]["test_accuracy"] == 0.9


def test_corrupt_results_json_names_the_file(tmp_path):
  workdir = write_workdir(tmp_path / "w", [make_row(0, 1, 0.9)])
  (workdir / "results.json").write_text('{"study": ')
  message = exit_message(["report", f"--workdir={workdir}"])
  assert f"{workdir / 'results.json'} is unreadable or not valid JSON" in (
      message)


# ----------------------------------------------------------------------------
# A failing write.


@pytest.mark.parametrize("failing_call, name", [
    (1, "summary.md"), (2, "learning_curves.png"),
    (3, "curves_placement=none.png")])
def test_failing_write_keeps_the_old_file(tmp_path, monkeypatch,
                                           failing_call, name):
  workdir = write_workdir(tmp_path / "w", placements_rows())
  report.write_report([workdir], workdir)
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  calls = []
  fsync = os.fsync

  def full_disk(fd):
    calls.append(fd)
    if len(calls) == failing_call:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return fsync(fd)

  monkeypatch.setattr(workdir_lib.os, "fsync", full_disk)
  # A 4th epoch: every file rewritten now would differ from before.
  write_workdir(workdir, placements_rows() + [make_row(0, 4, 0.5)])
  with pytest.raises(workdir_lib.WriteError) as raised:
    report.write_report([workdir], workdir)
  assert f"could not write {workdir / name} (No space left on device)" in (
      str(raised.value))
  assert (workdir / name).read_bytes() == before[name]
  assert not [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")]

  calls.clear()
  message = exit_message(["report", f"--workdir={workdir}"])
  assert message.startswith(f"WriteError: could not write {workdir / name} ")
  assert (workdir / name).read_bytes() == before[name]


def test_out_that_is_a_file_is_a_write_error(tmp_path):
  workdir = write_workdir(tmp_path / "w", [make_row(0, 1, 0.9)])
  (tmp_path / "file").write_text("")
  message = exit_message(["report", f"--workdir={workdir}",
                          f"--out={tmp_path / 'file' / 'sub'}"])
  assert message.startswith(
      f"WriteError: could not create the directory {tmp_path / 'file'}")


# ----------------------------------------------------------------------------
# The real command.


@pytest.mark.slow
def test_subprocess_command(tmp_path):
  workdir = write_workdir(tmp_path / "w", placements_rows())
  command = [sys.executable, "-m", "experiments.report"]
  done = subprocess.run(command + [f"--workdir={workdir}"], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert "| placement " + TABLE_HEADER in done.stdout
  assert_png(workdir / "learning_curves.png")

  done = subprocess.run(command + [f"--workdir={tmp_path / 'nowhere'}"],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 1
  assert done.stderr.strip() == (
      f"ReportError: workdir {tmp_path / 'nowhere'} does not exist.")
