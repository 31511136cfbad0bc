r"""Summary table and plots of a finished (or interrupted) training workdir.

Reads the workdir's metrics.jsonl (and results.json, written when the run
finished, and steps.jsonl, the training curves' step-level points, where
the trainer wrote one) and (re)writes summary.md, learning_curves.png (the
settings compared) and curves_<combo>.png (every run of one combination),
and returns the table. A setting, a line of the table and of the curves,
is a combination at one value of each hyperparameter swept within it: the
"+-" and the bands are over seeds only, swept values are never pooled, and
a diverged run is in no mean. Several workdirs put all their settings into
one table, with a workdir column. The command line is
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

from bn_lab import doctor
from bn_lab import models
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib

# The study axes of the trainer's rows when results.json (which lists them
# under "axes") is absent: the fields the trainer's axes set (`variant`
# only where a study has variants, which results.json then lists).
DEFAULT_AXES = tuple(f for f in sweep.AXES.values() if f != "variant")
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
# Per-run hyperparameters a sweep may vary within one combination
# (`sweep.run_grid`: seeds x swept values). Everything else that differs
# between the runs of a combination is the seed (and the run's index).
_RUN_HPARAMS = train.SWEEPABLE
# A run with one of these non-finite in a row diverged, as did one that
# nan_guard="record" froze (its rows carry "diverged_at").
_FINITE_FIELDS = ("train_loss", "test_loss", "test_accuracy")
_DPI = 110


class ReportError(ValueError):
  """A workdir that cannot be reported on; the message names the file."""


# ----------------------------------------------------------------------------
# Reading a workdir.


def load_rows(workdir: Path | str, numeric: Sequence[str] = _NUMERIC_FIELDS,
              ) -> list[dict[str, Any]]:
  """The rows of a workdir's metrics.jsonl, one per (combo, run, epoch).

  A resumed run may have appended a row twice after a crash: the last one
  wins, at the place of the first, so the rows stay in the order trained.

  Args:
    workdir: a training workdir.
    numeric: the fields every row must hold as numbers (default: a
      classifier's, which the summary table reads).

  Returns:
    The rows as dicts. Rows without "combo" (from the trainer before
    combinations) get "placement=<placement>".

  Raises:
    ReportError: no such directory, no or an empty metrics.jsonl, or a
      complete line (one ending in a newline) that is not a JSON object with
      numeric run, epoch and metrics (the message names the file and line).
  """
  path = _metrics_path(Path(workdir))
  rows: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
  for number, value in _jsonl_lines(path):
    row = _check_row(value, path, number, numeric)
    rows[(row["combo"], row["run"], row["epoch"])] = row
  if not rows:
    raise ReportError(f"{path} is empty: no epoch has finished yet.")
  return list(rows.values())


def _jsonl_lines(path: Path) -> list[tuple[int, Any]]:
  """(line number, value) of a JSON-lines file (workdir.numbered_jsonl: a
  cut-off last line is a row being appended as we read, left out); a file
  that cannot be read or a complete line that is not JSON is a
  ReportError."""
  try:
    return workdir_lib.numbered_jsonl(path)
  except OSError as e:
    raise ReportError(f"could not read {path} ({e.strerror or e}).") from e
  except workdir_lib.CorruptMetrics as e:
    raise ReportError(str(e)) from e


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


def _check_row(row: Any, path: Path, number: int,
               numeric: Sequence[str] = _NUMERIC_FIELDS) -> dict[str, Any]:
  """A parsed line as a row with what the table needs, or ReportError."""
  where = f"{path}, line {number}"
  if not isinstance(row, dict):
    raise ReportError(f"{where} is not a JSON object but "
                      f"{type(row).__name__}.")
  bad = [k for k in numeric
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
  """One summary per setting of one workdir, in the order trained: a
  setting is a combination at one value of each hyperparameter swept
  within it (`swept_fields`), so that its runs differ only by their seed.
  Swept values are never pooled, and a diverged run (`divergence`) is in
  no mean.

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
    "axes" (the axis names), one field per sweepable hyperparameter
    (`train.SWEEPABLE`: the setting's value, None where the rows lack it),
    "swept" (those swept within the combination: what tells its settings
    apart), "runs" (the setting's runs: one per seed), "seeds" (their
    seeds), "diverged" (one dict per diverged run: "run", "seed", "step"
    (its diverged_at, or None) and "epoch" (its first epoch with a
    non-finite loss or accuracy, or None)), "finite_runs" (the others,
    which every mean below is over), "epochs" (the last one recorded),
    "test_accuracy_mean", "test_accuracy_std" (sample standard deviation
    over the finite runs' seeds, ddof=1; None for fewer than two),
    "test_accuracy_batch_stats_mean", "test_accuracy_precise_mean" (None
    also where a row lacks it), "train_loss_mean" (the means None where
    every run diverged),
    "epochs_to_target_mean" (over the finite runs that reach the target;
    None if none does), "runs_reaching_target", "target", "wall_time",
    "compile_time" (the combination's, None where unknown) and "complete"
    (whether results.json exists).
  """
  axes = tuple(axes) if axes is not None else study_axes(results)
  target = float(target) if target is not None else study_target(results)
  info = _combos_info(results)
  swept = swept_fields(rows)
  by_setting: dict[tuple, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_setting.setdefault(_setting_key(row, swept), []).append(row)
  return [{**_summarize_setting(mine, axes, target,
                                info.get(mine[0]["combo"], {}),
                                swept[run_name(mine[0])]),
           "combo": mine[0]["combo"], "complete": results is not None}
          for mine in by_setting.values()]


def swept_fields(rows: Sequence[Mapping[str, Any]]
                 ) -> dict[str, tuple[str, ...]]:
  """{combination name (`run_name`): the hyperparameters of
  `train.SWEEPABLE` whose value differs between its runs}: what,
  besides the seed, tells the runs of one combination apart."""
  values: dict[str, dict[str, set]] = {}
  for row in rows:
    mine = values.setdefault(run_name(row), {h: set() for h in _RUN_HPARAMS})
    for h in _RUN_HPARAMS:
      mine[h].add(repr(row.get(h)))
  return {name: tuple(h for h in _RUN_HPARAMS if len(v[h]) > 1)
          for name, v in values.items()}


def _setting_key(row: Mapping[str, Any],
                 swept: Mapping[str, tuple[str, ...]]) -> tuple:
  name = run_name(row)
  return (name, *(repr(row.get(h)) for h in swept[name]))


def setting_name(item: Mapping[str, Any],
                 swept: Sequence[str] | None = None) -> str:
  """A setting (a row or a summary): its combination (`run_name`), then
  "__<field>=<value>" for each hyperparameter swept within it (`swept`,
  default the summary's "swept"), e.g.
  "norm=layer__bn_epsilon=0.001"; the combination alone where nothing is
  swept."""
  swept = item.get("swept", ()) if swept is None else swept
  return "__".join([run_name(item)] + [f"{h}={value_text(item.get(h))}"
                                       for h in swept])


def value_text(value) -> str:
  """A cell's text: "-" for None, a float in at most 6 significant digits
  (0.001, 1e-05, 0.00282843), anything else as str."""
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.6g}"
  return str(value)


def divergence(run: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
  """How one run's rows (any order) diverged, or None where it did not:
  {"step": its first diverged_at (nan_guard="record" froze it there), or
  None; "epoch": the first epoch with a non-finite train loss, test loss
  or test accuracy, or None}. A diverged run is never averaged in."""
  rows = sorted(run, key=lambda r: r["epoch"])
  step = next((r["diverged_at"] for r in rows
               if r.get("diverged_at") is not None), None)
  epoch = next((r["epoch"] for r in rows if any(
      _is_number(r.get(k)) and not np.isfinite(r[k])
      for k in _FINITE_FIELDS)), None)
  if step is None and epoch is None:
    return None
  return {"step": step, "epoch": epoch}


def _summarize_setting(rows: list[Mapping[str, Any]], axes: tuple[str, ...],
                       target: float, info: Mapping[str, Any],
                       swept: tuple[str, ...]) -> dict:
  by_run: dict[Any, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_run.setdefault(row["run"], []).append(row)
  final = {run: max(mine, key=lambda r: r["epoch"])
           for run, mine in by_run.items()}
  diverged = []
  for run, mine in by_run.items():
    how = divergence(mine)
    if how is not None:
      diverged.append({"run": run, "seed": final[run].get("seed"), **how})
  out = {d["run"] for d in diverged}
  kept = [final[run] for run in by_run if run not in out]
  mean = lambda key: (float(np.mean([r[key] for r in kept]))
                      if kept and all(key in r for r in kept) else None)
  accuracy = np.array([r["test_accuracy"] for r in kept], dtype=float)
  reached = [_first_epoch_at(by_run[r["run"]], target) for r in kept]
  hit = [e for e in reached if e is not None]
  wall_time = info.get("wall_time", rows[-1].get("wall_time"))
  return {
      **{axis: rows[0].get(axis, info.get(axis)) for axis in axes},
      "axes": axes,
      **{h: rows[0].get(h) for h in _RUN_HPARAMS}, "swept": swept,
      "runs": len(by_run),
      "seeds": [final[run].get("seed") for run in by_run],
      "diverged": diverged, "finite_runs": len(kept),
      "epochs": max(r["epoch"] for r in final.values()),
      "test_accuracy_mean": mean("test_accuracy"),
      "test_accuracy_std": (float(accuracy.std(ddof=1))
                            if len(accuracy) > 1 else None),
      "test_accuracy_batch_stats_mean": mean("test_accuracy_batch_stats"),
      "test_accuracy_precise_mean": mean(train.PRECISE_METRIC),
      "train_loss_mean": mean("train_loss"),
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

  One line per summary: a setting (a combination at one value of what is
  swept within it). Columns: "workdir" when the summaries carry one
  (`write_report` adds it for several workdirs), then the axes whose value
  differs between the lines ("placement" if none does), then the
  hyperparameters (`train.SWEEPABLE`) whose value differs between them,
  seeds, test accuracy in eval mode (mean +- sample std over the seeds, %),
  with batch statistics (mean, %), final train loss, epochs to the target
  accuracy, "diverged" (where a run diverged: how many seeds, and when;
  those are in no mean), wall time.
  """
  axes = _shown_axes(summaries)
  hparams = _shown_hparams(summaries)
  workdir_column = any("workdir" in s for s in summaries)
  targets = {s["target"] for s in summaries}
  target_header = (f"epochs to {_percent(next(iter(targets)))}"
                   if len(targets) == 1 else "epochs to target")
  precise = any(s.get("test_accuracy_precise_mean") is not None
                for s in summaries)
  diverged = any(s.get("diverged") for s in summaries)
  header = ((["workdir"] if workdir_column else []) + list(axes) + hparams
            + ["seeds", "test acc (eval mode)", "test acc (batch stats)"]
            + (["test acc (precise BN)"] if precise else [])
            + ["train loss", target_header]
            + (["diverged"] if diverged else []) + ["wall time (s)"])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for s in summaries:
    cells = (([str(s.get("workdir", "-"))] if workdir_column else []) +
             [_cell(s.get(a)) for a in axes] +
             [value_text(s.get(h)) for h in hparams] +
             _metric_cells(s, show_target=len(targets) > 1, precise=precise,
                           diverged=diverged))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\n" + _notes(summaries)


def _shown_axes(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
  """The axes that differ between the rows; a constant one adds nothing."""
  names = list(dict.fromkeys(
      a for s in summaries for a in s.get("axes", DEFAULT_AXES)))
  varying = [a for a in names
             if len({repr(s.get(a)) for s in summaries}) > 1]
  return varying or (["placement"] if "placement" in names else names[:1])


def _shown_hparams(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
  """The hyperparameters swept within a combination, and those that differ
  between the rows otherwise (a learning rate scaled with the batch size,
  workdirs trained at different rates)."""
  return [h for h in _RUN_HPARAMS
          if any(h in s.get("swept", ()) for s in summaries)
          or len({repr(s.get(h)) for s in summaries}) > 1]


def _metric_cells(s: Mapping[str, Any], show_target: bool,
                  precise: bool = False, diverged: bool = False) -> list[str]:
  """The cells after the axes and swept values; `show_target` where the
  rows' targets differ (so the header cannot name one); `precise` adds the
  precise-BN column, `diverged` the diverged one. A diverged run is in no
  mean: the accuracy cell says over how many of the seeds it is, and a
  line whose seeds all diverged says so instead of a number."""
  std, wall = s["test_accuracy_std"], s["wall_time"]
  runs = s["runs"]
  finite = s.get("finite_runs", runs)
  target = f"{_percent(s['target'])}" if show_target else ""
  number = lambda v, f: "-" if v is None else f(v)
  if not finite:
    to_target = "-"
  elif s["epochs_to_target_mean"] is None:
    to_target = "not reached" + (f" ({target})" if target else "")
  else:
    to_target = (f"{s['epochs_to_target_mean']:.1f} "
                 f"({s['runs_reaching_target']}/{finite} seeds"
                 + (f", {target})" if target else ")"))
  if not finite:
    accuracy = f"all {runs} seeds diverged" if runs > 1 else "diverged"
  else:
    accuracy = (f"{100 * s['test_accuracy_mean']:.2f} +- "
                + ("-" if std is None else f"{100 * std:.2f}")
                + (f" ({finite} of {runs} seeds)" if finite < runs else ""))
  cells = [
      str(runs), accuracy,
      number(s["test_accuracy_batch_stats_mean"],
             lambda v: f"{100 * v:.2f}")]
  if precise:
    cells.append(number(s.get("test_accuracy_precise_mean"),
                        lambda v: f"{100 * v:.2f}"))
  cells += [number(s["train_loss_mean"], lambda v: f"{v:.4f}"), to_target]
  if diverged:
    cells.append(diverged_text(s))
  return cells + ["-" if wall is None else f"{wall:.1f}"]


def diverged_text(s: Mapping[str, Any]) -> str:
  """A summary's diverged runs: "-" for none, else "1 of 3 seeds (seed 2
  at step 1,200)"; a run with a non-finite loss but no diverged_at (no
  NaN guard) "at epoch 3"."""
  diverged = s.get("diverged") or []
  if not diverged:
    return "-"
  when = [f"seed {d['seed']} at " + (f"step {d['step']:,}"
                                     if d["step"] is not None
                                     else f"epoch {d['epoch']}")
          for d in diverged]
  return f"{len(diverged)} of {s['runs']} seeds ({'; '.join(when)})"


def _notes(summaries: Sequence[Mapping[str, Any]]) -> str:
  counts = sorted({s["runs"] for s in summaries})
  n = (f"{counts[0]} seed" + ("s" if counts[0] > 1 else "")
       if len(counts) == 1 else f"{counts[0]} to {counts[-1]} seeds")
  swept = [h for h in _RUN_HPARAMS
           if any(h in s.get("swept", ()) for s in summaries)]
  notes = ["Each line: one combination"
           + (f" at one value of {', '.join(swept)} (swept within it, "
              "never pooled)" if swept else "")
           + f"; means over {n}, +- the sample standard deviation "
           "(ddof=1) over those seeds"
           + ("; - for a single seed." if any(
               s["test_accuracy_std"] is None and s.get("finite_runs", 1)
               for s in summaries) else ".")]
  if any(s.get("diverged") for s in summaries):
    notes.append(
        "A diverged seed (frozen at its first non-finite step by "
        "nan_guard=\"record\", or with a non-finite loss or accuracy) is in "
        "no mean, +- or count of its line: the diverged column says which "
        "and when, the accuracy cell over how many seeds it is.")
  combos = [run_name(s) for s in summaries]
  if len(set(combos)) < len(combos):
    notes.append("Wall time is the combination's: its swept values train "
                 "together, so its lines share it.")
  partial = [s for s in summaries if not s.get("complete", True)]
  if partial:
    epochs = ", ".join(dict.fromkeys(f"{run_name(s)}: {s['epochs']}"
                                     for s in partial))
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


def settings(rows: Sequence[Mapping[str, Any]]
             ) -> dict[str, dict[str, Any]]:
  """The rows by setting (a combination at one value of each
  hyperparameter swept within it, `swept_fields`), in the order trained:
  {setting name (`setting_name`): {"rows": its rows of runs that did not
  diverge, "runs": how many runs (one per seed) it has, "diverged": how
  many of them diverged (`divergence`), "run_ids": the (workdir, combo,
  run) of its finite runs}}. What the curves average: a diverged run is
  left out whole."""
  swept = swept_fields(rows)
  runs: dict[str, dict[Any, list[Mapping[str, Any]]]] = {}
  for row in rows:
    name = setting_name(row, swept[run_name(row)])
    runs.setdefault(name, {}).setdefault(row["run"], []).append(row)
  out = {}
  for name, by_run in runs.items():
    kept = {run: mine for run, mine in by_run.items()
            if divergence(mine) is None}
    out[name] = {
        "rows": [r for mine in kept.values() for r in mine],
        "runs": len(by_run), "diverged": len(by_run) - len(kept),
        "run_ids": {(r.get("workdir"), r["combo"], r["run"])
                    for mine in kept.values() for r in mine[:1]}}
  return out


def band_note(rows: Sequence[Mapping[str, Any]]) -> str:
  """What the curves of `plot_comparison` are (its title): one line per
  setting (a combination at one value of what is swept within it), the
  mean over its seeds, and the shaded band +- one sample std over them; a
  diverged seed is in no line (the legend says how many)."""
  found = settings(rows).values()
  counts = sorted({s["runs"] - s["diverged"] for s in found} - {0})
  diverged = (" (diverged seeds left out)"
              if any(s["diverged"] for s in found) else "")
  if counts in ([], [1]):
    return f"one seed per line{diverged}: the line is that run, no band"
  n = (str(counts[0]) if len(counts) == 1
       else f"{counts[0]} to {counts[-1]}")
  return (f"line: mean over {n} seeds{diverged}; shaded band (error bar at "
          "a single point): mean ± 1 sample std (ddof=1) over them")


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
  if not path.exists():
    return []
  rows: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
  for _, row in _jsonl_lines(path):
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
  accuracies in %, one line per setting (`settings`: a combination at one
  value of what is swept within it, never pooled): the mean over its
  seeds, with a shaded band of +- one sample std over them (`band_note`,
  the figure's title). A diverged run is in no line: the legend says how
  many of a setting's seeds diverged, and a setting whose seeds all
  diverged has a legend entry and no line. x: optimizer steps for runs of
  at most FEW_EPOCHS epochs, else epochs (`x_axis`).

  Args:
    rows: metrics rows; those with a "workdir" field are kept apart by it.
    path: where to write the PNG (atomically), or None.
    steps: steps.jsonl rows (`load_steps`, with the same "workdir" fields):
      a setting that has some draws its training curves from them (every
      logged step), else from the per-epoch rows.

  Returns:
    The matplotlib Figure (axes: loss, train accuracy, test accuracy).
  """
  fig = new_figure((14, 4.3))
  ax_loss, ax_train, ax_test = fig.subplots(1, 3)
  x, xlabel = x_axis(rows)
  series = settings(rows)
  logged: dict[tuple, list[Mapping[str, Any]]] = {}
  for row in steps:
    logged.setdefault((row.get("workdir"), row["combo"], row["run"]),
                      []).append(row)
  from_steps = []
  for name, setting in series.items():
    mine = setting["rows"]
    label = name + (f" ({setting['diverged']} of {setting['runs']} seeds "
                    "diverged, left out)" if setting["diverged"] else "")
    if not mine:
      ax_test.plot([], [], ls="none", marker="x",
                   label=f"{name} (all {setting['runs']} seeds diverged)")
      continue
    mine_steps = [r for run in sorted(setting["run_ids"], key=repr)
                  for r in logged.get(run, ())]
    curves = [(ax_loss, training_curve(mine, mine_steps, "train_loss", x)),
              (ax_train, training_curve(mine, mine_steps, "train_accuracy",
                                        x, 100.0)),
              (ax_test, (*mean_std_by(mine, "test_accuracy", x, 100.0),
                         False))]
    color = None
    for ax, (xs, mean, std, dense) in curves:
      line, = ax.plot(xs, mean, marker=None if dense else _marker(xs),
                      ms=3, label=label, color=color)
      color = line.get_color()
      _band(ax, xs, mean, std, color)
    from_steps.append(curves[0][1][3])
  source = _training_source(from_steps, steps)
  ax_loss.set(ylabel="train loss (training mode)", yscale="log",
              title=f"Training loss{source}")
  ax_train.set(ylabel="train accuracy (training mode, %)",
               title=f"Training accuracy{source}")
  ax_test.set(ylabel="test accuracy (eval mode, %)", title="Test accuracy")
  # Outside the axes: a study of many settings would hide the curves.
  ax_test.legend(title="setting" if any(
      swept_fields(rows).values()) else "combination",
                 fontsize=8 if len(series) > 4 else 10,
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
                    marker=marker, ms=3,
                    label=_run_label(curve[0], varying, divergence(curve)))
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


def _run_label(row: Mapping[str, Any], hparams: Sequence[str],
               diverged: Mapping[str, Any] | None = None) -> str:
  """"run 2 (seed 1)", plus the swept values that tell the runs apart,
  and where the run diverged ("diverged at step 1,200")."""
  extra = "".join(f", {h}={value_text(row.get(h))}" for h in hparams)
  if diverged is not None:
    extra += ", diverged at " + (f"step {diverged['step']:,}"
                                 if diverged["step"] is not None
                                 else f"epoch {diverged['epoch']}")
  return f"run {row['run']} (seed {row.get('seed', '?')}{extra})"


# ----------------------------------------------------------------------------
# The report of one or several workdirs.


def write_report(workdirs: Sequence[Path | str], out: Path | str,
                 extras: Sequence[Callable[[list, Path], str]] = ()) -> str:
  """(Re)writes summary.md, learning_curves.png and curves_<combo>.png,
  and for one trained workdir (a checkpoints directory) doctor.md, the BN
  doctor's report of its runs, linked from summary.md.

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
  # A trained run's BN doctor (bn_lab.doctor), written last: its failures
  # are its own file's text, never the rest of the report's.
  diagnosis = None
  if len(paths) == 1 and (paths[0] / "checkpoints").is_dir():
    diagnosis, line = doctor.report_files(paths[0])
    table += f"\n{line}\n"
  workdir_lib.write_atomic(out / "summary.md", _header(studies) + table)
  steps = [r for study in studies for r in study["steps"]]
  plot_comparison(rows, out / "learning_curves.png", steps=steps)
  # One figure per combination: its runs, each labelled with its swept
  # values (a combination has a line per setting in the table).
  for s in {(s.get("workdir"), s["combo"]): s for s in summaries}.values():
    plot_runs(rows, s["combo"], out / curves_filename(s),
              workdir=s.get("workdir"))
  if diagnosis is not None:
    workdir_lib.write_atomic(out / doctor.DOCTOR_FILE, diagnosis)
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
