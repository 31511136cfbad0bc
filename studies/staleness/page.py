"""The staleness study's section of docs/studies.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats
from bn_lab import train


def section(studies, out: Path) -> str:
  (study,) = studies[:1]
  rows = study["rows"]
  momenta = sorted({r["bn_momentum"] for r in rows})
  epochs = sorted({r["epoch"] for r in rows})
  shown = sorted({epochs[0], epochs[min(1, len(epochs) - 1)],
                  epochs[len(epochs) // 2 - 1 if len(epochs) > 2 else 0],
                  epochs[-1]})
  lines, cells = [], []
  for momentum in momenta:
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    for epoch in shown:
      at = [r for r in mine if r["epoch"] == epoch]
      moving = [r["test_accuracy"] for r in at]
      exact = [r[train.PRECISE_METRIC] for r in at]
      lines.append([momentum, epoch, page.percent(moving), page.percent(exact),
                    f"{np.mean([r['running_mean_gap'] for r in at]):.3f}",
                    f"{np.mean([r['running_var_gap'] for r in at]):.3f}"])
    for epoch in epochs:
      # Paired: the same runs' test accuracy with exact statistics and
      # with the moving average.
      at = [r for r in mine if r["epoch"] == epoch]
      cells.append((momentum, epoch, stats.paired(
          [r[train.PRECISE_METRIC] for r in at],
          [r["test_accuracy"] for r in at],
          label=f"momentum {momentum}, epoch {epoch}: exact - moving")))
  # One family: every (momentum, epoch) cell.
  cells = [(m, e, c) for (m, e, _), c in zip(
      cells, stats.holm_family(c for _, _, c in cells))]
  config = study["config"]
  text = ["## How stale is the moving average\n",
          page.provenance_markdown(studies),
          f"The reference MLP, BN momentum {', '.join(map(str, momenta))} x "
          f"{len(config['seeds'])} seeds as one vmapped sweep with one data "
          "order. Momentum only shapes the running averages, never the "
          "training (BN normalizes with batch statistics in training), so "
          "the momenta train identical weights and the exact column is the "
          "same for all: a built-in control. After every epoch the "
          "statistics are recomputed over "
          + (f"{config['precise_bn']['num_batches']} training batches"
             if config["precise_bn"]["num_batches"] else
             f"{config['precise_bn']['num_examples']:,} training examples")
          + f" ({config['precise_bn']['estimator']}); the gaps compare the "
          "running statistics with them over every feature of the BN "
          "layer: the mean's error in population standard deviations, and "
          "|log| of the variance ratio.\n",
          page.table(["momentum", "epoch", "test acc, moving average",
                 "test acc, exact", "running mean gap (std)",
                 "running var gap (log ratio)"], lines),
          page.figure(out, f"{study['label']}.png",
                 lambda p: _plot_staleness(rows, momenta, p),
                 "moving average against exact statistics")]
  worse = [(m, e, c) for m, e, c in cells if c.diff < 0]
  text.append(
      "* **Exact statistics never worse than the moving average: "
      + _never_worse(c for _, _, c in worse)
      + f"** ({len(cells) - len(worse)} of {len(cells)} (momentum, epoch) "
      "cells exact at or above on average"
      + ("" if not worse else "; worse at " + "; ".join(
          f"{m} epoch {e} ({page.judged(c)})" for m, e, c in worse))
      + "; paired t test over seeds, every cell one Holm family).")
  for momentum in momenta:
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    gaps = [np.mean([r["running_var_gap"] for r in mine if r["epoch"] == e])
            for e in (epochs[0], epochs[-1])]
    text.append(f"* momentum {momentum}: variance gap {gaps[0]:.3f} after "
                f"epoch {epochs[0]}, {gaps[1]:.3f} after epoch {epochs[-1]}.")
  last = {m: np.mean([r["test_accuracy"] for r in rows
                      if r["bn_momentum"] == m and r["epoch"] == epochs[-1]])
          for m in momenta}
  text.append(f"* Best eval-mode accuracy at the last epoch: momentum "
              f"{max(last, key=last.get)} ({100 * max(last.values()):.2f}).\n")
  return "\n".join(text)


def _never_worse(worse) -> str:
  """The claim's verdict from the cells where exact is worse on average:
  "holds" with none, "does not hold" where one is worse beyond noise,
  "holds within noise" where all are within noise, else undetermined."""
  verdicts = {stats.verdict(c) for c in worse}
  if not verdicts:
    return "holds"
  if "beyond noise" in verdicts:
    return "does not hold"
  return ("holds within noise" if verdicts == {"within noise"}
          else "undetermined")


def _plot_staleness(rows, momenta, path):
  fig = report.new_figure((11, 4))
  ax_acc, ax_gap = fig.subplots(1, 2)
  for i, momentum in enumerate(momenta):
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    epochs, moving = page.mean_curve(mine, "test_accuracy")
    _, exact = page.mean_curve(mine, train.PRECISE_METRIC)
    _, gap = page.mean_curve(mine, "running_var_gap")
    ax_acc.plot(epochs, 100 * moving, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}, moving average")
    ax_acc.plot(epochs, 100 * exact, color=f"C{i}", ls="--",
                label=f"momentum {momentum}, exact")
    ax_gap.plot(epochs, gap, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="moving average (solid) vs exact (dashed)")
  ax_gap.set(xlabel="epoch", ylabel="|log var_running / var_exact|",
             yscale="log", title="running variance gap")
  for ax in (ax_acc, ax_gap):
    report.epoch_axis(ax)
    ax.legend(fontsize=7)
  report.save_figure(fig, path)
  return fig
