"""Figure 1 of Ioffe & Szegedy (2015) from probed runs: the per-workdir
report's additions (table and probes.png) and the series the page reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bn_lab import report
from studies.ioffe2015 import probes


def probe_series(rows: Sequence[Mapping[str, Any]]):
  """{combination name: (steps (T,), percentiles (runs, T, len(QS), units))}
  of the rows that carry probe_percentiles, runs in run order."""
  by_run: dict[str, dict[Any, list[Mapping[str, Any]]]] = {}
  for row in rows:
    if "probe_percentiles" in row:
      by_run.setdefault(report.run_name(row), {}).setdefault(row["run"], []).append(row)
  series = {}
  for name, runs in by_run.items():
    ordered = [sorted(mine, key=lambda r: r["epoch"])
               for _, mine in sorted(runs.items())]
    steps = np.array([s for r in ordered[0] for s in r["probe_steps"]])
    values = np.array([[p for r in mine for p in r["probe_percentiles"]]
                       for mine in ordered
                       if len(mine) == len(ordered[0])])
    series[name] = (steps, values)
  return series


def accuracy_curve(rows: Sequence[Mapping[str, Any]]):
  """(steps, test accuracy in %: the mean over runs at each step) of one
  combination's rows."""
  steps = sorted({r["step"] for r in rows})
  return steps, np.array([100 * np.mean([r["test_accuracy"] for r in rows
                                         if r["step"] == s]) for s in steps])


def accuracy_range(rows: Sequence[Mapping[str, Any]]):
  """(steps, lowest, highest test accuracy in % over runs at each step)."""
  steps = sorted({r["step"] for r in rows})
  at = [[100 * r["test_accuracy"] for r in rows if r["step"] == s]
        for s in steps]
  return steps, np.array([min(a) for a in at]), np.array([max(a) for a in at])


def _panel_grid(fig, probe_panels: int):
  """Two rows: (a) and one probe panel per combination above; the late
  accuracy and the two drifts below. Returns (accuracy, probe panels,
  late accuracy, median drift, spread drift) axes; the probe panels share
  one y range."""
  columns = max(probe_panels + 1, 3)
  grid = fig.subplots(2, columns, squeeze=False)
  for ax in grid[0, probe_panels + 1:]:
    ax.remove()
  for ax in grid[1, 3:]:
    ax.remove()
  probe_axes = list(grid[0, 1:probe_panels + 1])
  for ax in probe_axes[1:]:
    ax.sharey(probe_axes[0])
  return grid[0, 0], probe_axes, grid[1, 0], grid[1, 1], grid[1, 2]


def plot_probes(rows: Sequence[Mapping[str, Any]],
                path: Path | str | None = None, late: float = 0.5):
  """Figure 1 of Ioffe & Szegedy (2015) from probed runs, two rows:
  (a) test accuracy (eval mode, %, the mean over runs) against optimizer
  steps; (b, c, ...) per combination the 15th, 50th and 85th percentiles of
  the input to one sigmoid of the last hidden layer (`probes.FIGURE_UNIT`,
  first run), all on one y range; below, (a) again over the last `late`
  part of training on its own y range (a gap of a point is invisible on
  (a)'s 0-100 scale), shaded over the runs' range; the drift of the median
  (`probes.drift_of_probes`) and of the p15-p85 spread
  (`probes.spread_drift_of_probes`), medians over runs. Constrained
  layout: each panel's y label keeps clear of its neighbour. None without
  probes."""
  series = probe_series(rows)
  if not series:
    return None
  fig = report.new_figure((4.4 * max(len(series) + 1, 3), 7.8))
  fig.set_layout_engine("constrained", w_pad=0.12, h_pad=0.1, wspace=0.06,
                        hspace=0.08)
  accuracy, probe_axes, late_accuracy, drift_ax, spread_ax = _panel_grid(
      fig, len(series))
  colors = {name: f"C{i}" for i, name in enumerate(series)}
  for name in series:
    mine = [r for r in rows if report.run_name(r) == name]
    steps, mean = accuracy_curve(mine)
    accuracy.plot(steps, mean, marker="o", ms=2, color=colors[name],
                  label=name)
    keep = np.asarray(steps) >= (1 - late) * steps[-1]
    _, low, high = accuracy_range(mine)
    late_steps = np.asarray(steps)[keep]
    late_accuracy.plot(late_steps, mean[keep], marker="o", ms=2,
                       color=colors[name], label=name)
    late_accuracy.fill_between(late_steps, low[keep], high[keep],
                               color=colors[name], alpha=0.2, lw=0)
  accuracy.set(ylabel="test accuracy (eval mode, %)",
               title="(a) test accuracy\nmean over runs")
  accuracy.legend(fontsize=8, loc="lower right")
  late_accuracy.set(ylabel="test accuracy (eval mode, %)",
                    title=f"(a) the last {late:.0%} of training\nmean; shaded: "
                          "range over runs")
  late_accuracy.legend(fontsize=8)
  figure_rows = [probes.QS.index(q) for q in probes.FIGURE_QS]
  for i, (ax, (name, (steps, values))) in enumerate(
      zip(probe_axes, series.items())):
    for row, q in zip(figure_rows, probes.FIGURE_QS):
      ax.plot(steps, values[0, :, row, probes.FIGURE_UNIT], label=f"p{q}")
    ax.set(ylabel="sigmoid input",
           title=f"({chr(ord('b') + i)}) {name}\nunit "
                 f"{probes.FIGURE_UNIT}, first run")
    ax.legend(fontsize=8)
  for name, (steps, values) in series.items():
    drift = np.array([probes.drift_of_probes(v) for v in values])
    spread = np.array([probes.spread_drift_of_probes(v) for v in values])
    drift_ax.plot(steps, np.median(drift, 0), color=colors[name], label=name)
    spread_ax.plot(steps, np.median(spread, 0), color=colors[name],
                   label=name)
  drift_ax.set(ylabel="|p50(t) - p50(end)| / IQR(end)",
               title="drift of the median p50\nmedian over units and runs")
  spread_ax.set(ylabel="|ln(spread(t) / spread(end))|",
                title="drift of the spread p85 - p15\n"
                      "median over units and runs")
  for ax in (drift_ax, spread_ax):
    ax.legend(fontsize=8)
  for ax in fig.axes:
    ax.set_xlabel("optimizer steps")
    ax.grid(alpha=0.3)
  report.save_figure(fig, path)
  return fig


def probe_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Per probed combination: the steps at which the mean test accuracy
  first reaches 97% and 98%, and the median drift over all units (first
  probe, and the probe at a tenth of training). Empty without probes."""
  series = probe_series(rows)
  if not series:
    return ""
  lines = ["| combination | steps to 97% | steps to 98% | drift at first "
           "probe | drift at 10% of training |", "|---|---|---|---|---|"]
  for name, (steps, values) in series.items():
    mine = [r for r in rows if report.run_name(r) == name]
    at = {}
    for target in (0.97, 0.98):
      reached = sorted(s for s in {r["step"] for r in mine} if np.mean(
          [r["test_accuracy"] for r in mine if r["step"] == s]) >= target)
      at[target] = str(reached[0]) if reached else "not reached"
    drift = np.median([np.asarray(probes.drift_of_probes(v))
                       for v in values], 0)
    tenth = int(np.argmin(np.abs(steps - steps[-1] / 10)))
    lines.append(f"| {name} | {at[0.97]} | {at[0.98]} | {drift[0]:.3f} | "
                 f"{drift[tenth]:.3f} (step {steps[tenth]}) |")
  return "\n".join(lines) + "\n"




def probe_report(rows: Sequence[Mapping[str, Any]], out: Path) -> str:
  """The run report's addition (`report.write_report`'s extras): the
  probe table, and probes.png in `out`; "" without probes."""
  probed = probe_markdown(rows)
  if not probed:
    return ""
  plot_probes(rows, out / "probes.png")
  return "\nProbes (config.probe; the figure is probes.png):\n\n" + probed
