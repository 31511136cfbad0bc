r"""Summary table and plots of a finished (or interrupted) training workdir.

Reads the workdir's metrics.jsonl (and results.json, written when the run
finished) and (re)writes summary.md, learning_curves.png (the combinations
compared) and curves_<combo>.png (every run of one combination), and
returns the table. Several workdirs put all their combinations into one
table, with a workdir column. The command line is experiments/report.py.

The runner calls `write_report` at the end of a classifier run (a study
adds its own parts through `extras`); the pure helpers (`load_rows`,
`load_results`, `summarize`, `summary_markdown`, `plot_comparison`,
`plot_runs`) are for tests, notebooks and the studies' page sections. The
library never imports this module.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib

# The study axes of the trainer's rows when results.json (which lists them
# under "axes") is absent: the fields the trainer's axes set.
DEFAULT_AXES = tuple(sweep.AXES.values())
DEFAULT_TARGET = 0.97
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
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


def _mean_std_by_epoch(rows: Sequence[Mapping[str, Any]], key: str):
  """Epochs, then mean and std over runs (ddof=1; 0 for a single run)."""
  epochs = sorted({r["epoch"] for r in rows})
  values = [[r[key] for r in rows if r["epoch"] == e] for e in epochs]
  mean = np.array([np.mean(v) for v in values])
  std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
  return epochs, mean, std


def plot_comparison(rows: Sequence[Mapping[str, Any]],
                    path: Path | str | None = None):
  """Train loss (log scale) and test accuracy (eval mode) against epoch,
  one line per combination: the mean over runs, a band of +- one std.

  Args:
    rows: metrics rows; those with a "workdir" field are kept apart by it.
    path: where to write the PNG (atomically), or None.

  Returns:
    The matplotlib Figure.
  """
  fig = new_figure((11, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  series: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    series.setdefault(run_name(row), []).append(row)
  for name, mine in series.items():
    for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_accuracy")):
      epochs, mean, std = _mean_std_by_epoch(mine, key)
      line, = ax.plot(epochs, mean, marker="o", ms=3, label=name)
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                      color=line.get_color())
  ax_loss.set(xlabel="epoch", ylabel="train loss (training mode)",
              yscale="log", title="Training loss")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (eval mode)",
             title="Test accuracy")
  # Outside the axes: a study of many combinations would hide the curves.
  ax_acc.legend(title="combination", fontsize=8 if len(series) > 4 else 10,
                loc="upper left", bbox_to_anchor=(1.02, 1.0))
  for ax in (ax_loss, ax_acc):
    epoch_axis(ax)
  save_figure(fig, path)
  return fig


def plot_runs(rows: Sequence[Mapping[str, Any]], combo: str,
              path: Path | str | None = None, *, workdir: str | None = None):
  """Every run of one combination: test accuracy in eval mode (solid) and
  with batch statistics (dashed) against epoch.

  Args:
    rows: metrics rows.
    combo: the combination's name.
    path: where to write the PNG (atomically), or None.
    workdir: with rows of several workdirs, the label of the one to plot.

  Returns:
    The matplotlib Figure.
  """
  mine = [r for r in rows
          if r["combo"] == combo and r.get("workdir") == workdir]
  if not mine:
    raise ValueError(f"no rows for combination {combo!r}.")
  varying = [h for h in _RUN_HPARAMS
             if len({repr(r.get(h)) for r in mine}) > 1]
  fig = new_figure((6, 4))
  ax = fig.subplots()
  for run in sorted({r["run"] for r in mine}):
    curve = sorted((r for r in mine if r["run"] == run),
                   key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in curve]
    line, = ax.plot(epochs, [r["test_accuracy"] for r in curve],
                    label=_run_label(curve[0], varying))
    ax.plot(epochs, [r["test_accuracy_batch_stats"] for r in curve],
            ls="--", color=line.get_color())
  ax.set(xlabel="epoch", ylabel="test accuracy",
         title=f"{run_name(mine[0])}\neval mode (solid) vs batch stats (dashed)")
  epoch_axis(ax)
  ax.legend(fontsize=8)
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
  plot_comparison(rows, out / "learning_curves.png")
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
  summaries = summarize(rows, results=results)
  if label is not None:  # several workdirs: keep their combinations apart
    rows = [{**r, "workdir": label} for r in rows]
    summaries = [{"workdir": label, **s} for s in summaries]
  return {"path": path, "label": label, "rows": rows, "results": results,
          "summaries": summaries}


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
