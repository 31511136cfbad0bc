r"""Summary table and plots of a finished (or interrupted) training workdir.

Reads the workdir's metrics.jsonl (and results.json, written when the run
finished, and steps.jsonl, the training curves' step-level points, where
the trainer wrote one) and (re)writes summary.md, learning_curves.png (the
combinations compared) and curves_<combo>.png (every run of one
combination), and returns the table. Several workdirs put all their
combinations into one table, with a workdir column. The command line is
experiments/report.py.

The runner calls `write_report` at the end of a classifier run (a study
adds its own parts through `extras`); the pure helpers (`load_rows`,
`load_results`, `load_steps`, `summarize`, `summary_markdown`,
`plot_comparison`, `plot_runs`) are for tests, notebooks and the studies'
page sections. The library never imports this module.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from bn_lab import models
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib

# The study axes of the trainer's rows when results.json (which lists them
# under "axes") is absent: the fields the trainer's axes set.
DEFAULT_AXES = tuple(sweep.AXES.values())
DEFAULT_TARGET = 0.97
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
# Step-level training rows (train loss and accuracy every few optimizer
# steps), where the trainer writes them: the training curves' points.
STEPS_FILE = "steps.jsonl"
# Curves of runs of at most this many epochs have optimizer steps on the x
# axis (a point per epoch would be no curve).
FEW_EPOCHS = 5
# What the table and plots read from every row; the rest is optional.
_NUMERIC_FIELDS = ("run", "epoch", "train_loss", "test_accuracy",
                   "test_accuracy_batch_stats")
# Per-run hyperparameters a sweep may vary within one combination.
_RUN_HPARAMS = train.SWEEPABLE
_DPI = 110


class ReportError(ValueError):
  """A workdir that cannot be reported on; the message names the file."""


# ----------------------------------------------------------------------------
# Reading a workdir.


def load_rows(workdir: Path | str) -> list[dict[str, Any]]:
  """The rows of a workdir's metrics.jsonl, one per (combo, run, epoch).

  A resumed run may have appended a row twice after a crash: the last one
  wins, at the place of the first, so the rows stay in the order trained.

  Args:
    workdir: a training workdir.

  Returns:
    The rows as dicts. Rows without "combo" (from the trainer before
    combinations) get "placement=<placement>".

  Raises:
    ReportError: no such directory, no or an empty metrics.jsonl, or a
      complete line (one ending in a newline) that is not a JSON object with
      numeric run, epoch and metrics (the message names the file and line).
  """
  path = _metrics_path(Path(workdir))
  try:
    # A cut-off last line is a row being appended as we read: left out.
    lines = workdir_lib.numbered_jsonl(path)
  except OSError as e:
    raise ReportError(f"could not read {path} ({e.strerror or e}).") from e
  except workdir_lib.CorruptMetrics as e:
    raise ReportError(str(e)) from e
  rows: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
  for number, value in lines:
    row = _check_row(value, path, number)
    rows[(row["combo"], row["run"], row["epoch"])] = row
  if not rows:
    raise ReportError(f"{path} is empty: no epoch has finished yet.")
  return list(rows.values())


def _metrics_path(workdir: Path) -> Path:
  if not workdir.exists():
    raise ReportError(f"workdir {workdir} does not exist.")
  if not workdir.is_dir():
    raise ReportError(f"workdir {workdir} is not a directory.")
  path = workdir / METRICS_FILE
  if not path.is_file():
    raise ReportError(f"{workdir} has no {METRICS_FILE}: not a training "
                      "workdir, or no epoch has finished yet.")
  return path


def _check_row(row: Any, path: Path, number: int) -> dict[str, Any]:
  """A parsed line as a row with what the table needs, or ReportError."""
  where = f"{path}, line {number}"
  if not isinstance(row, dict):
    raise ReportError(f"{where} is not a JSON object but "
                      f"{type(row).__name__}.")
  bad = [k for k in _NUMERIC_FIELDS
         if isinstance(row.get(k), bool)
         or not isinstance(row.get(k), (int, float))]
  if bad:
    raise ReportError(f"{where} lacks a number for {', '.join(bad)}.")
  if "combo" not in row:
    row["combo"] = f"placement={row.get('placement')}"
  return row


def load_results(workdir: Path | str) -> dict[str, Any] | None:
  """The workdir's results.json, or None where the run has not finished.

  Raises:
    ReportError: results.json exists but is not a JSON object.
  """
  path = Path(workdir) / RESULTS_FILE
  if not path.exists():
    return None
  try:
    results = json.loads(path.read_bytes())
  except (OSError, ValueError) as e:
    raise ReportError(f"{path} is unreadable or not valid JSON ({e}).") from e
  if not isinstance(results, dict):
    raise ReportError(f"{path} is not a JSON object.")
  return results


def study_axes(results: Mapping[str, Any] | None) -> tuple[str, ...]:
  """The axis fields: results.json's "axes" keys, else DEFAULT_AXES."""
  axes = (results or {}).get("axes")
  return tuple(axes) if isinstance(axes, dict) and axes else DEFAULT_AXES


def study_target(results: Mapping[str, Any] | None) -> float:
  """results.json's target_accuracy, else DEFAULT_TARGET."""
  target = (results or {}).get("target_accuracy")
  return float(target) if _is_number(target) else DEFAULT_TARGET


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _combos_info(results: Mapping[str, Any] | None) -> dict[str, dict]:
  """results.json's per-combination entries (wall and compile times)."""
  combos = (results or {}).get("combos")
  if not isinstance(combos, list):
    return {}
  return {c["combo"]: c for c in combos if isinstance(c, dict) and "combo" in c}


# ----------------------------------------------------------------------------
# The table.


def summarize(rows: Sequence[Mapping[str, Any]], *,
              results: Mapping[str, Any] | None = None,
              axes: Sequence[str] | None = None,
              target: float | None = None) -> list[dict[str, Any]]:
  """One summary per combination of one workdir, in the order trained.

  Args:
    rows: the workdir's metrics rows (`load_rows`), possibly of a run that
      was interrupted: each run is summarized at its last recorded epoch.
    results: the workdir's results.json (`load_results`) or None; gives the
      default axes and target and the wall and compile times.
    axes: the study's axis fields; default `study_axes(results)`.
    target: the accuracy of "epochs to target"; default
      `study_target(results)`.

  Returns:
    Dicts with "combo", one field per axis (None where a row lacks it),
    "axes" (the axis names), "runs", "epochs" (the last one recorded),
    "test_accuracy_mean", "test_accuracy_std" (sample standard deviation
    over runs, ddof=1; None for a single run), "test_accuracy_batch_stats_mean",
    "train_loss_mean", "epochs_to_target_mean" (over the runs that reach the
    target; None if none does), "runs_reaching_target", "target",
    "wall_time", "compile_time" (None where unknown) and "complete" (whether
    results.json exists).
  """
  axes = tuple(axes) if axes is not None else study_axes(results)
  target = float(target) if target is not None else study_target(results)
  info = _combos_info(results)
  by_combo: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_combo.setdefault(row["combo"], []).append(row)
  return [{**_summarize_combo(mine, axes, target, info.get(combo, {})),
           "combo": combo, "complete": results is not None}
          for combo, mine in by_combo.items()]


def _summarize_combo(rows: list[Mapping[str, Any]], axes: tuple[str, ...],
                     target: float, info: Mapping[str, Any]) -> dict:
  by_run: dict[Any, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_run.setdefault(row["run"], []).append(row)
  final = [max(mine, key=lambda r: r["epoch"]) for mine in by_run.values()]
  accuracy = np.array([r["test_accuracy"] for r in final], dtype=float)
  reached = [_first_epoch_at(mine, target) for mine in by_run.values()]
  hit = [e for e in reached if e is not None]
  wall_time = info.get("wall_time", rows[-1].get("wall_time"))
  return {
      **{axis: rows[0].get(axis, info.get(axis)) for axis in axes},
      "axes": axes, "runs": len(by_run),
      "epochs": max(r["epoch"] for r in final),
      "test_accuracy_mean": float(accuracy.mean()),
      "test_accuracy_std": (float(accuracy.std(ddof=1))
                            if len(accuracy) > 1 else None),
      "test_accuracy_batch_stats_mean": float(np.mean(
          [r["test_accuracy_batch_stats"] for r in final])),
      "test_accuracy_precise_mean": (
          float(np.mean([r[train.PRECISE_METRIC] for r in final]))
          if all(train.PRECISE_METRIC in r for r in final) else None),
      "train_loss_mean": float(np.mean([r["train_loss"] for r in final])),
      "epochs_to_target_mean": float(np.mean(hit)) if hit else None,
      "runs_reaching_target": len(hit), "target": target,
      "wall_time": wall_time if _is_number(wall_time) else None,
      "compile_time": info.get("compile_time"),
  }


def _first_epoch_at(rows: Iterable[Mapping[str, Any]],
                    target: float) -> int | None:
  epochs = [r["epoch"] for r in rows if r["test_accuracy"] >= target]
  return min(epochs) if epochs else None


def summary_markdown(summaries: Sequence[Mapping[str, Any]]) -> str:
  """The markdown table of `summarize`'s dicts (of one or several workdirs),
  with the notes that explain it underneath.

  Columns: "workdir" when the summaries carry one (`write_report` adds it
  for several workdirs), then the axes whose value differs between the rows
  ("placement" if none does), runs, test accuracy in eval mode (mean +- sample
  std over runs, %), with batch statistics (mean, %), final train loss,
  epochs to the target accuracy, wall time.
  """
  axes = _shown_axes(summaries)
  workdir_column = any("workdir" in s for s in summaries)
  targets = {s["target"] for s in summaries}
  target_header = (f"epochs to {_percent(next(iter(targets)))}"
                   if len(targets) == 1 else "epochs to target")
  precise = any(s.get("test_accuracy_precise_mean") is not None
                for s in summaries)
  header = ((["workdir"] if workdir_column else []) + list(axes) +
            ["runs", "test acc (eval mode)", "test acc (batch stats)"]
            + (["test acc (precise BN)"] if precise else [])
            + ["train loss", target_header, "wall time (s)"])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for s in summaries:
    cells = (([str(s.get("workdir", "-"))] if workdir_column else []) +
             [_cell(s.get(a)) for a in axes] +
             _metric_cells(s, show_target=len(targets) > 1, precise=precise))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\n" + _notes(summaries)


def _shown_axes(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
  """The axes that differ between the rows; a constant one adds nothing."""
  names = list(dict.fromkeys(
      a for s in summaries for a in s.get("axes", DEFAULT_AXES)))
  varying = [a for a in names
             if len({repr(s.get(a)) for s in summaries}) > 1]
  return varying or (["placement"] if "placement" in names else names[:1])


def _metric_cells(s: Mapping[str, Any], show_target: bool,
                  precise: bool = False) -> list[str]:
  """The cells after the axes; `show_target` where the rows' targets differ
  (so the header cannot name one); `precise` adds the precise-BN column."""
  std, wall = s["test_accuracy_std"], s["wall_time"]
  target = f"{_percent(s['target'])}" if show_target else ""
  if s["epochs_to_target_mean"] is None:
    to_target = "not reached" + (f" ({target})" if target else "")
  else:
    to_target = (f"{s['epochs_to_target_mean']:.1f} "
                 f"({s['runs_reaching_target']}/{s['runs']} runs"
                 + (f", {target})" if target else ")"))
  cells = [
      str(s["runs"]),
      f"{100 * s['test_accuracy_mean']:.2f} +- "
      + ("-" if std is None else f"{100 * std:.2f}"),
      f"{100 * s['test_accuracy_batch_stats_mean']:.2f}"]
  if precise:
    value = s.get("test_accuracy_precise_mean")
    cells.append("-" if value is None else f"{100 * value:.2f}")
  return cells + [
      f"{s['train_loss_mean']:.4f}", to_target,
      "-" if wall is None else f"{wall:.1f}"]


def _notes(summaries: Sequence[Mapping[str, Any]]) -> str:
  notes = ["+- is the sample standard deviation over runs (ddof=1)"
           + ("; - for a single run." if any(
               s["test_accuracy_std"] is None for s in summaries) else ".")]
  partial = [s for s in summaries if not s.get("complete", True)]
  if partial:
    epochs = ", ".join(f"{run_name(s)}: {s['epochs']}" for s in partial)
    notes.append("No results.json (interrupted or still running): those "
                 f"rows are at their last recorded epoch ({epochs}).")
  return "\n".join(notes) + "\n"


def _percent(fraction: float) -> str:
  return f"{round(100 * fraction, 4):g}%"


def _cell(value) -> str:
  return "-" if value is None else str(value)


def run_name(item: Mapping[str, Any]) -> str:
  """A combination (row or summary), prefixed by its workdir label if any."""
  workdir = item.get("workdir")
  return item["combo"] if workdir is None else f"{workdir}/{item['combo']}"


def curves_filename(item: Mapping[str, Any]) -> str:
  """curves_<combo>.png for a combination (a row or a summary), with the
  workdir label in front when it has one; only [A-Za-z0-9_.=-] are kept,
  anything else becomes "_"."""
  return "curves_" + re.sub(r"[^A-Za-z0-9_.=-]", "_", run_name(item)) + ".png"


# ----------------------------------------------------------------------------
# Plots.


def new_figure(figsize: tuple[float, float]):
  """A Figure on the Agg canvas, without pyplot: no global backend switch
  (a notebook keeps its own) and nothing to close."""
  from matplotlib.backends import backend_agg  # slow import; plots only
  from matplotlib import figure
  fig = figure.Figure(figsize=figsize)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def save_figure(fig, path: Path | str | None) -> None:
  if path is not None:
    with workdir_lib.atomic_file(Path(path), "wb") as f:
      fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight")


def epoch_axis(ax) -> None:
  """Whole epochs on the x axis (not 1.25, 1.5, ... for a short run)."""
  from matplotlib import ticker
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)


def x_axis(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
  """(row field, axis label) of the x axis of curves of `rows`: optimizer
  steps ("step") where no run has more than FEW_EPOCHS epochs and every
  row carries its step, so that a short run is a curve over its steps, not
  a point or two over epochs; else "epoch"."""
  if rows and max(r["epoch"] for r in rows) <= FEW_EPOCHS and all(
      _is_number(r.get("step")) for r in rows):
    return "step", "optimizer steps"
  return "epoch", "epoch"


def _finish_x_axis(ax, label: str) -> None:
  """Integer ticks from 0 (a single point gets a real axis, not 0.945 to
  1.050), the label and a grid; after the curves are drawn."""
  epoch_axis(ax)
  ax.set_xlim(left=0)
  ax.set_xlabel(label)


def mean_std_by(rows: Sequence[Mapping[str, Any]], key: str,
                x: str = "epoch", scale: float = 1.0):
  """The x values (sorted), then `scale` times the mean and the sample std
  (ddof=1; 0 where one run has that x) over the rows at each x."""
  xs = sorted({r[x] for r in rows})
  values = [[scale * r[key] for r in rows if r[x] == v] for v in xs]
  mean = np.array([np.mean(v) for v in values])
  std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
  return xs, mean, std


def runs_per_combination(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
  """{combination name (`run_name`): how many runs its rows hold}."""
  runs: dict[str, set] = {}
  for row in rows:
    runs.setdefault(run_name(row), set()).add(row["run"])
  return {name: len(r) for name, r in runs.items()}


def band_note(rows: Sequence[Mapping[str, Any]]) -> str:
  """What the curves of `plot_comparison` are (its title): the mean over a
  combination's runs, and the shaded band +- one sample std over them
  ("seeds" where the runs differ only by seed, else "runs")."""
  counts = sorted(set(runs_per_combination(rows).values()))
  if counts == [1]:
    return "one run per combination: the line is that run, no band"
  swept = any(len({repr(r.get(h)) for r in rows
                   if run_name(r) == name}) > 1
              for name in runs_per_combination(rows) for h in _RUN_HPARAMS)
  unit = "runs (seeds x swept values)" if swept else "seeds"
  n = (str(counts[0]) if len(counts) == 1
       else f"{counts[0]} to {counts[-1]}")
  return (f"line: mean over {n} {unit}; shaded band (error bar at a single "
          "point): mean ± 1 sample std (ddof=1) over them")


def has_running_statistics(row: Mapping[str, Any]) -> bool:
  """Whether a combination's model normalizes with running statistics, so
  that its test accuracy with batch statistics differs in meaning from the
  eval-mode one (for any other model the trainer measures the same network
  twice). From the row's axes: placement "none" or norm "none" place no
  normalization; a norm that reads no momentum (layer, group, instance,
  RMS: `models.NORM_FIELDS`) keeps no running statistics. A row without
  these fields is from the BN-only trainer; an unknown norm (a study's own,
  not registered here) counts as having them."""
  if row.get("placement") == "none":
    return False
  norm = row.get("norm") or "batch"
  if norm == "none":
    return False
  fields = models.NORM_FIELDS.get(norm)
  return fields is None or "momentum" in fields


def load_steps(workdir: Path | str) -> list[dict[str, Any]]:
  """The step-level training rows of a workdir's steps.jsonl ({"combo",
  "run", "seed", "step", "train_loss", "train_accuracy"}: each run's
  training-mode loss and accuracy over a window of `config.log_every_steps`
  optimizer steps, at its last step); [] where the file does not exist
  (older workdirs).

  A row appended twice (a resumed run) counts once, the last one. Lines
  that are not a JSON object with a combination, run and step are left
  out, and so is a cut-off last line.

  Raises:
    ReportError: the file cannot be read, or a complete line is not JSON.
  """
  path = Path(workdir) / STEPS_FILE
  try:
    values = workdir_lib.read_jsonl(path)
  except OSError as e:
    raise ReportError(f"could not read {path} ({e.strerror or e}).") from e
  except workdir_lib.CorruptMetrics as e:
    raise ReportError(str(e)) from e
  rows: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
  for row in values:
    if (isinstance(row, dict) and isinstance(row.get("combo"), str)
        and _is_number(row.get("run")) and _is_number(row.get("step"))):
      rows[(row["combo"], row["run"], row["step"])] = row
  return list(rows.values())


def training_curve(rows: Sequence[Mapping[str, Any]],
                   steps: Sequence[Mapping[str, Any]], key: str, x: str,
                   scale: float = 1.0):
  """One combination's training curve of `key` (train_loss or
  train_accuracy): (xs, mean, std, from_steps) over its runs, from its
  steps.jsonl rows `steps` where they have `key`, else from its per-epoch
  `rows`. On an epoch axis (x="epoch") a step is the fraction
  step / steps per epoch (from the rows' "step" and "epoch")."""
  logged = [s for s in steps if _is_number(s.get(key))]
  if logged and x == "epoch":
    per_epoch = {r["step"] / r["epoch"] for r in rows
                 if _is_number(r.get("step")) and r["epoch"]}
    if len(per_epoch) != 1:  # no steps, or runs of different batch sizes
      logged = []
    else:
      size = per_epoch.pop()
      logged = [{**s, "epoch": s["step"] / size} for s in logged]
  if logged:
    return (*mean_std_by(logged, key, x, scale), True)
  return (*mean_std_by(rows, key, x, scale), False)


def _steps_interval(steps: Sequence[Mapping[str, Any]]) -> int | None:
  """The most common gap between logged steps of one run, or None."""
  gaps = []
  by_run: dict[tuple, list] = {}
  for s in steps:
    by_run.setdefault((run_name(s), s["run"]), []).append(s["step"])
  for xs in by_run.values():
    xs = sorted(xs)
    gaps += [b - a for a, b in zip(xs, xs[1:])]
  if not gaps:
    return None
  values, counts = np.unique(gaps, return_counts=True)
  return int(values[np.argmax(counts)])


def plot_comparison(rows: Sequence[Mapping[str, Any]],
                    path: Path | str | None = None, *,
                    steps: Sequence[Mapping[str, Any]] = ()):
  """Train loss (log scale), train accuracy and test accuracy (eval mode),
  accuracies in %, one line per combination: the mean over its runs, with
  a shaded band of +- one sample std over them (`band_note`, the figure's
  title). x: optimizer steps for runs of at most FEW_EPOCHS epochs, else
  epochs (`x_axis`).

  Args:
    rows: metrics rows; those with a "workdir" field are kept apart by it.
    path: where to write the PNG (atomically), or None.
    steps: steps.jsonl rows (`load_steps`, with the same "workdir" fields):
      a combination that has some draws its training curves from them
      (every logged step), else from the per-epoch rows.

  Returns:
    The matplotlib Figure (axes: loss, train accuracy, test accuracy).
  """
  fig = new_figure((14, 4.3))
  ax_loss, ax_train, ax_test = fig.subplots(1, 3)
  x, xlabel = x_axis(rows)
  series: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    series.setdefault(run_name(row), []).append(row)
  logged: dict[str, list[Mapping[str, Any]]] = {}
  for row in steps:
    logged.setdefault(run_name(row), []).append(row)
  from_steps = []
  for name, mine in series.items():
    curves = [(ax_loss, training_curve(mine, logged.get(name, ()),
                                       "train_loss", x)),
              (ax_train, training_curve(mine, logged.get(name, ()),
                                        "train_accuracy", x, 100.0)),
              (ax_test, (*mean_std_by(mine, "test_accuracy", x, 100.0),
                         False))]
    color = None
    for ax, (xs, mean, std, dense) in curves:
      line, = ax.plot(xs, mean, marker=None if dense else _marker(xs),
                      ms=3, label=name, color=color)
      color = line.get_color()
      _band(ax, xs, mean, std, color)
    from_steps.append(curves[0][1][3])
  source = _training_source(from_steps, steps)
  ax_loss.set(ylabel="train loss (training mode)", yscale="log",
              title=f"Training loss{source}")
  ax_train.set(ylabel="train accuracy (training mode, %)",
               title=f"Training accuracy{source}")
  ax_test.set(ylabel="test accuracy (eval mode, %)", title="Test accuracy")
  # Outside the axes: a study of many combinations would hide the curves.
  ax_test.legend(title="combination", fontsize=8 if len(series) > 4 else 10,
                 loc="upper left", bbox_to_anchor=(1.02, 1.0))
  for ax in (ax_loss, ax_train, ax_test):
    _finish_x_axis(ax, xlabel)
  fig.suptitle(band_note(rows), fontsize=10)
  save_figure(fig, path)
  return fig


def _marker(xs: Sequence[Any]) -> str | None:
  """A dot on each point of a short curve (a single point must show);
  none where the points would crowd."""
  return "o" if len(xs) <= 20 else None


def _band(ax, xs, mean, std, color) -> None:
  """The shaded band mean +- std (none where std is 0 everywhere: a single
  run); an error bar where there is one x, as a band would have no width."""
  if not np.any(std > 0):
    return
  if len(xs) == 1:
    ax.errorbar(xs, mean, yerr=std, color=color, capsize=4, alpha=0.5)
  else:
    ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=color)


def _training_source(from_steps: Sequence[bool],
                     steps: Sequence[Mapping[str, Any]]) -> str:
  """The training panels' title suffix: where their points come from."""
  if not any(from_steps):
    return " (epoch means)"
  every = _steps_interval(steps)
  logged = f"{every}-step means" if every else "logged steps"
  return f" ({logged})" if all(from_steps) else (
      f" ({logged}, else epoch means)")


def plot_runs(rows: Sequence[Mapping[str, Any]], combo: str,
              path: Path | str | None = None, *, workdir: str | None = None):
  """Every run of one combination: test accuracy (%) in eval mode (solid)
  and, where the model keeps running statistics
  (`has_running_statistics`), with batch statistics (dashed); x as
  `plot_comparison`'s.

  Args:
    rows: metrics rows.
    combo: the combination's name.
    path: where to write the PNG (atomically), or None.
    workdir: with rows of several workdirs, the label of the one to plot.

  Returns:
    The matplotlib Figure.
  """
  from matplotlib import lines
  mine = [r for r in rows
          if r["combo"] == combo and r.get("workdir") == workdir]
  if not mine:
    raise ValueError(f"no rows for combination {combo!r}.")
  varying = [h for h in _RUN_HPARAMS
             if len({repr(r.get(h)) for r in mine}) > 1]
  batch_stats = has_running_statistics(mine[0])
  x, xlabel = x_axis(mine)
  marker = _marker(sorted({r[x] for r in mine}))
  fig = new_figure((6, 4))
  ax = fig.subplots()
  for run in sorted({r["run"] for r in mine}):
    curve = sorted((r for r in mine if r["run"] == run),
                   key=lambda r: r["epoch"])
    xs = [r[x] for r in curve]
    line, = ax.plot(xs, [100 * r["test_accuracy"] for r in curve],
                    marker=marker, ms=3, label=_run_label(curve[0], varying))
    if batch_stats:
      ax.plot(xs, [100 * r["test_accuracy_batch_stats"] for r in curve],
              ls="--", marker=marker, ms=3, mfc="none",
              color=line.get_color())
  handles, _ = ax.get_legend_handles_labels()
  if batch_stats:
    handles += [lines.Line2D([], [], color="k", marker=marker, ms=3,
                             label="eval mode (running statistics)"),
                lines.Line2D([], [], color="k", ls="--", marker=marker, ms=3,
                             mfc="none", label="batch statistics")]
    title = f"{run_name(mine[0])}\neval mode (solid) vs batch stats (dashed)"
  else:
    title = (f"{run_name(mine[0])}\neval mode (no running statistics: "
             "nothing to compare)")
  ax.set(ylabel="test accuracy (%)", title=title)
  _finish_x_axis(ax, xlabel)
  ax.legend(handles=handles, fontsize=8)
  save_figure(fig, path)
  return fig


def _run_label(row: Mapping[str, Any], hparams: Sequence[str]) -> str:
  """"run 2 (seed 1)", plus the swept values that tell the runs apart."""
  extra = "".join(f", {h}={row.get(h)}" for h in hparams)
  return f"run {row['run']} (seed {row.get('seed', '?')}{extra})"


# ----------------------------------------------------------------------------
# The report of one or several workdirs.


def write_report(workdirs: Sequence[Path | str], out: Path | str,
                 extras: Sequence[Callable[[list, Path], str]] = ()) -> str:
  """(Re)writes summary.md, learning_curves.png and curves_<combo>.png.

  Every workdir is read before anything is written, so a bad one leaves
  `out` as it was. Each file is written atomically.

  Args:
    workdirs: training workdirs (finished or not); with several, the table
      gets a workdir column and the curves files a workdir prefix.
    out: the directory to write into (created if needed).
    extras: a study's additions, each `extra(rows, out) -> Markdown`
      (appended to the table; "" for none), writing its own figures.

  Returns:
    The markdown table with its notes (what the CLI prints).

  Raises:
    ReportError: a workdir that cannot be read (see `load_rows`).
    bn_lab.workdir.WriteError: a file of `out` could not be written.
  """
  paths = [Path(w) for w in workdirs]
  if not paths:
    raise ReportError("no workdir given.")
  if len({p.resolve() for p in paths}) < len(paths):
    raise ReportError(f"a workdir is given twice: {[str(p) for p in paths]}")
  labels = _labels(paths) if len(paths) > 1 else [None]
  studies = [_load_study(p, label) for p, label in zip(paths, labels)]
  summaries = [s for study in studies for s in study["summaries"]]
  rows = [r for study in studies for r in study["rows"]]
  table = summary_markdown(summaries)
  out = Path(out)
  make_directory(out)
  table += "".join(extra(rows, out) for extra in extras)
  workdir_lib.write_atomic(out / "summary.md", _header(studies) + table)
  steps = [r for study in studies for r in study["steps"]]
  plot_comparison(rows, out / "learning_curves.png", steps=steps)
  for s in summaries:
    plot_runs(rows, s["combo"], out / curves_filename(s),
              workdir=s.get("workdir"))
  return table


def _labels(paths: Sequence[Path]) -> list[str]:
  """Workdir names where they tell the workdirs apart, else the paths."""
  names = [p.name or str(p) for p in paths]
  return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _load_study(path: Path, label: str | None) -> dict[str, Any]:
  rows = load_rows(path)
  results = load_results(path)
  steps = load_steps(path)
  summaries = summarize(rows, results=results)
  if label is not None:  # several workdirs: keep their combinations apart
    rows = [{**r, "workdir": label} for r in rows]
    steps = [{**r, "workdir": label} for r in steps]
    summaries = [{"workdir": label, **s} for s in summaries]
  return {"path": path, "label": label, "rows": rows, "results": results,
          "steps": steps, "summaries": summaries}


def _header(studies: Sequence[Mapping[str, Any]]) -> str:
  """"# {dataset}: {study}" (one part per distinct study), then the data's
  origin where results.json gives it."""
  titles, origins = [], []
  for one in studies:
    results = one["results"] or {}
    if one["results"] is None:
      title = f"{one['path'].name or one['path']}: no results.json yet"
    else:
      title = ": ".join(str(results[k]) for k in ("dataset", "study")
                        if results.get(k)) or "results"
    titles.append(title)
    if results.get("data_origin"):
      origins.append((one["label"], str(results["data_origin"])))
  text = "# " + "; ".join(dict.fromkeys(titles)) + "\n\n"
  if len({o for _, o in origins}) == 1 and len(origins) == len(studies):
    text += f"Data: {origins[0][1]}\n\n"
  elif origins:
    text += "Data: " + "; ".join(f"{label}: {o}" for label, o in origins)
    text += "\n\n"
  return text


def make_directory(path: Path) -> None:
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise workdir_lib.WriteError(
        f"could not create the directory {path} ({e.strerror or e}).") from e
