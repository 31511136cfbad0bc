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


def plot_probes(rows: Sequence[Mapping[str, Any]],
                path: Path | str | None = None):
  """Figure 1 of Ioffe & Szegedy (2015) from probed runs: (a) test accuracy
  (eval mode, %, the mean over runs) against optimizer steps, (b, c...) the
  15th, 50th and 85th percentiles of the input to one sigmoid of the last
  hidden layer (`probes.FIGURE_UNIT`, first run) per combination, and the
  drift summary over all units (`probes.drift_of_probes`, the median over
  runs). Constrained layout: each panel's y label keeps clear of its
  neighbour. None without probes."""
  series = probe_series(rows)
  if not series:
    return None
  fig = report.new_figure((4.2 * (len(series) + 2), 3.8))
  fig.set_layout_engine("constrained", w_pad=0.1, wspace=0.05)
  axes = fig.subplots(1, len(series) + 2)
  for name in series:
    axes[0].plot(*accuracy_curve(
        [r for r in rows if report.run_name(r) == name]),
        marker="o", ms=2, label=name)
  axes[0].set(ylabel="test accuracy (eval mode, %)",
              title="(a) test accuracy, mean over runs")
  axes[0].legend(fontsize=8)
  figure_rows = [probes.QS.index(q) for q in probes.FIGURE_QS]
  for ax, (name, (steps, values)) in zip(axes[1:], series.items()):
    for row, q in zip(figure_rows, probes.FIGURE_QS):
      ax.plot(steps, values[0, :, row, probes.FIGURE_UNIT], label=f"p{q}")
    ax.set(ylabel="sigmoid input",
           title=f"{name}\nunit {probes.FIGURE_UNIT}, first run")
    ax.legend(fontsize=8)
  for name, (steps, values) in series.items():
    drift = np.array([probes.drift_of_probes(v) for v in values])
    axes[-1].plot(steps, np.median(drift, 0), label=name)
  axes[-1].set(ylabel="|p50(t) - p50(end)| / IQR(end)",
               title="drift, median over units and runs")
  axes[-1].legend(fontsize=8)
  for ax in axes:
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
