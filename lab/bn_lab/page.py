r"""docs/studies.md from the studies' workdirs: the page toolkit.

    python -m experiments.report --page=docs/studies.md

The entry point reads every registered study's workdirs (`Study.commands`
makes them; --workdir flags name others instead). Each workdir goes to the
study its results.json names (`study_of`); a workdir of no listed study
gets a generic section (table and learning curves), and a benchmark's
directory (a results.json with "benchmark", from `benchmarks/bn_cost.py
--json=...`) feeds the section of the study that cites it. Each study
writes its own section (`Study.section`) with the helpers here; the
verdicts are computed from the numbers they cite, with bn_lab.stats, so a
rerun that changes the numbers changes the words with them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bn_lab import report
from bn_lab import stats
from bn_lab import study as study_lib
from bn_lab import workdir as workdir_lib

Rows = Sequence[Mapping[str, Any]]


# ----------------------------------------------------------------------------
# Loading.


def load_study(path: Path) -> dict[str, Any]:
  """A workdir (or a benchmark's JSON directory) with what the page needs:
  rows (metrics.jsonl, where the study writes one), results, config, the
  config file's name and argument (from results.json's command)."""
  results = report.load_results(path)
  benchmark = (results or {}).get("benchmark")
  rows, steps, config = [], [], {}
  if not benchmark:
    # A study without metrics.jsonl (transfer, domain shift) has only
    # results.json; with neither, load_rows says what is missing.
    if (path / report.METRICS_FILE).exists() or results is None:
      # Every study's rows have a run and an epoch; the rest is each
      # study's own (a GAN's have no accuracy), read by its section.
      rows = report.load_rows(path, numeric=("run", "epoch"))
      steps = report.load_steps(path)
    config_path = path / "config.json"
    try:
      config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
      raise report.ReportError(f"{config_path} is missing or not JSON ({e});"
                               " is this a study's workdir?") from e
  name, arg = config_file((results or {}).get("command"))
  return {"path": path, "label": path.name, "rows": rows, "steps": steps,
          "results": results, "config": config, "benchmark": benchmark,
          "config_name": name, "config_arg": arg}


def config_file(command: str | None) -> tuple[str | None, str | None]:
  """The config's name and argument in a command: the study folder of a
  `config.py` ("placements", "cnn" from
  "--config=studies/placements/config.py:cnn"), else the file's stem
  ("placement_study" from the older "--config=configs/placement_study.py");
  (None, None) without a command."""
  match = re.search(r"--config[= ](?:\S*?/)?(?:([A-Za-z0-9_]+)/)?"
                    r"([A-Za-z0-9_]+)\.py(?::(\S*))?", command or "")
  if not match:
    return None, None
  folder, stem, arg = match.groups()
  return (folder if stem == "config" and folder else stem), arg or None


# ----------------------------------------------------------------------------
# Numbers shared by the sections.


def by_combo(rows: Rows) -> dict[str, list[Mapping[str, Any]]]:
  """The rows by setting, in the order trained: a combination at one value
  of each hyperparameter swept within it (`report.swept_fields`), so that
  a group's runs differ only by their seed and swept values are never
  pooled. The key is the combination's name where nothing is swept within
  it, else `report.setting_name` ("placement=none__learning_rate=0.1")."""
  swept = report.swept_fields(rows)
  out: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    name = report.setting_name({**row, "workdir": None},
                               swept[report.run_name(row)])
    out.setdefault(name, []).append(row)
  return out


def final_rows(rows: Rows) -> list[Mapping[str, Any]]:
  """Each run's last recorded epoch."""
  last: dict[Any, Mapping[str, Any]] = {}
  for row in rows:
    if row["run"] not in last or row["epoch"] > last[row["run"]]["epoch"]:
      last[row["run"]] = row
  return [last[run] for run in sorted(last)]


def split_diverged(rows: Rows) -> tuple[list[Mapping[str, Any]],
                                        list[Mapping[str, Any]]]:
  """Each run's last recorded epoch (`final_rows`), split into the runs
  that did not diverge and those that did (`report.divergence`:
  nan_guard="record"'s diverged_at, or a non-finite loss or accuracy). A
  diverged run is shown as diverged, never averaged in."""
  runs: dict[Any, list[Mapping[str, Any]]] = {}
  for row in rows:
    runs.setdefault(row["run"], []).append(row)
  finals = final_rows(rows)
  diverged = [f for f in finals if report.divergence(runs[f["run"]])]
  return [f for f in finals if f not in diverged], diverged


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample std (ddof=1; None for one value)."""
  values = np.asarray(values, dtype=float)
  return float(values.mean()), (float(values.std(ddof=1))
                                if values.size > 1 else None)


def interval(values: Sequence[float], scale: float = 1.0,
             digits: int = 2) -> str:
  """"97.09 [96.99, 97.19]": the mean of values x scale and its 95% t
  interval (`stats.mean_interval`); the mean alone for one value, "-" for
  none."""
  if not len(values):
    return "-"
  mean, low, high = stats.mean_interval(np.asarray(values) * scale)
  if not np.isfinite(low):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def percent(values: Sequence[float]) -> str:
  """"97.09 +- 0.08" (%, mean +- sample std) of fractions."""
  mean, std = mean_std(values)
  return f"{100 * mean:.2f}" + ("" if std is None else f" +- {100 * std:.2f}")


# ----------------------------------------------------------------------------
# Comparisons: bn_lab.stats, one Holm family per section.


def judged(c: stats.Comparison, unit: str = "points", scale: float = 100.0,
           digits: int | None = 2) -> str:
  """`stats.describe(c, unit, scale, digits)` and `stats.verdict(c)`:
  "+0.16 [+0.05, +0.27] points, p = 0.004 (Holm 0.012), beyond noise"; an
  undetermined one says so once ("+0.16 points, undetermined (n < 2)").
  digits=None: enough decimals for 3 significant digits of the largest of
  the difference and its interval's ends (for measures of any size)."""
  if digits is None:
    largest = max((abs(v * scale) for v in (c.diff, c.low, c.high)
                   if np.isfinite(v)), default=0.0)
    digits = (max(0, 2 - int(np.floor(np.log10(largest)))) if largest > 0
              else 2)
  text = stats.describe(c, unit, scale, digits)
  verdict = stats.verdict(c)
  return text if verdict == "undetermined" else f"{text}, {verdict}"


class Family:
  """One section's comparisons, a single Holm-Bonferroni family
  (`stats.holm_family`), for code that words each verdict where it computes
  the comparison. `in_one_family(render)` calls render(family) twice: in
  the first pass `compare` records each comparison and returns it
  uncorrected (that pass's text is dropped); `correct` then adjusts all of
  them together, and in the second pass `compare` returns the corrected
  comparisons in the order asked for, the first pass's (checked)."""

  def __init__(self):
    self._recorded: list[stats.Comparison] = []
    self._corrected: list[stats.Comparison] | None = None
    self._next = 0

  def compare(self, a, b, *, paired: bool = False,
              label: str = "") -> stats.Comparison:
    """`stats.compare(a, b, paired=paired, label=label)`; corrected over the
    whole family once `correct` has run."""
    c = stats.compare(a, b, paired=paired, label=label)
    if self._corrected is None:
      self._recorded.append(c)
      return c
    if self._next >= len(self._corrected):
      raise RuntimeError(f"{label!r}: a comparison the first pass did not "
                         "make; render must ask for the same ones each time.")
    got = self._corrected[self._next]
    self._next += 1
    if not ((got.label, got.n_a, got.n_b, got.paired)
            == (c.label, c.n_a, c.n_b, c.paired)
            and np.array_equal([got.diff, got.p], [c.diff, c.p],
                               equal_nan=True)):
      raise RuntimeError(f"{label!r} is not the first pass's comparison "
                         f"{got.label!r} at this place; render must ask for "
                         "the same ones in the same order each time.")
    return got

  def correct(self) -> list[stats.Comparison]:
    """Holm's correction over every recorded comparison; returns them."""
    self._corrected, self._next = stats.holm_family(self._recorded), 0
    return self._corrected

  @property
  def comparisons(self) -> list[stats.Comparison]:
    """The family so far: corrected once `correct` has run."""
    return list(self._recorded if self._corrected is None
                else self._corrected)


def in_one_family(render: Callable[[Family], Any]) -> Any:
  """render(family) with every comparison it makes corrected together: a
  first pass collects them (its result dropped), then `Family.correct`,
  then the second pass's result. render must be free of side effects
  (build its tallies inside) and ask for the same comparisons each time."""
  family = Family()
  render(family)
  family.correct()
  out = render(family)
  if family._next != len(family._corrected):  # pylint: disable=protected-access
    raise RuntimeError("the second pass asked for fewer comparisons than "
                       "the first; render must ask for the same ones.")
  return out


# A paper's claim judged by one comparison (a - b, the claim's direction
# `expected`: -1 claims a < b, +1 a > b), after the section's Holm family.
CLAIM_VERDICTS = ("supported", "contradicted", "not resolved at this power")


def claim_verdict(c: stats.Comparison, expected: int) -> str:
  """"supported" where c is beyond noise in the claimed direction,
  "contradicted" where beyond noise against it, else "not resolved at this
  power" (within noise or undetermined: more seeds or a longer budget could
  still decide it)."""
  if expected not in (-1, 1):
    raise ValueError(f"expected={expected!r}: -1 (a < b) or +1 (a > b).")
  if not c.significant:
    return CLAIM_VERDICTS[2]
  return CLAIM_VERDICTS[0] if np.sign(c.diff) == expected else (
      CLAIM_VERDICTS[1])


def equivalence_verdict(c: stats.Comparison, margin: float,
                        scale: float = 100.0) -> str:
  """A claim of no difference ("matches", "little or no benefit") judged
  against `margin` (in the unit of c times `scale`: points by default):
  "supported" when the whole 95% interval lies within the margin,
  "contradicted" when the difference is beyond noise and its interval lies
  wholly outside the margin, else "not resolved at this power"."""
  low, high = scale * c.low, scale * c.high
  if np.isfinite(low) and -margin <= low and high <= margin:
    return CLAIM_VERDICTS[0]
  if c.significant and (low > margin or high < -margin):
    return CLAIM_VERDICTS[1]
  return CLAIM_VERDICTS[2]


def claims_table(rows: Sequence[Sequence[str]]) -> str:
  """The claim rows every NLP-era section prints: the paper's claim, our
  setting (where it differs), the effect with its 95% CI and test, the
  verdict."""
  return table(("paper's claim", "our setting", "effect [95% CI], test",
                "verdict"), rows)


def mean_curve(rows: Rows, key: str, x: str = "epoch"):
  """The x values and the mean of `key` over runs at each."""
  xs = sorted({r[x] for r in rows})
  return xs, np.array([np.mean([r[key] for r in rows if r[x] == v])
                       for v in xs])


def first_reaching(rows: Rows, target: float, x: str = "epoch"):
  """The first x at which the mean over runs reaches target; None if never."""
  xs, mean = mean_curve(rows, "test_accuracy", x)
  hit = [v for v, m in zip(xs, mean) if m >= target]
  return hit[0] if hit else None


def epochs_to(rows: Rows, target: float) -> str:
  """"7.4 (5/5)": the mean first epoch of the runs that reach target."""
  runs = by_run(rows)
  hit = [min(r["epoch"] for r in mine if r["test_accuracy"] >= target)
         for mine in runs.values()
         if any(r["test_accuracy"] >= target for r in mine)]
  if not hit:
    return "not reached"
  return f"{np.mean(hit):.1f} ({len(hit)}/{len(runs)})"


def by_run(rows: Rows) -> dict[Any, list[Mapping[str, Any]]]:
  out: dict[Any, list[Mapping[str, Any]]] = {}
  for row in rows:
    out.setdefault(row["run"], []).append(row)
  return out


def table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
  return "\n".join(out) + "\n"


def provenance_markdown(studies: Sequence[Mapping[str, Any]]) -> str:
  """The commands as a code block, then when, how long and on what."""
  commands, notes = [], []
  for study in studies:
    results = study["results"] or {}
    commands.append(results.get("command")
                    or f"(command not recorded: {study['path']})")
    wall = sum(c.get("wall_time") or 0 for c in results.get("combos", [])
               ) or results.get("wall_time") or 0
    what = ("the benchmark" if study["benchmark"] else
            f"{wall:.0f} s of evaluation" if "domain_shift" in results
            else f"{wall:.0f} s of training")
    notes.append(f"`{study['label']}`: {what}, finished "
                 f"{results.get('finished', 'at an unrecorded time')}"
                 + ("" if study["results"] else " (no results.json: "
                    "unfinished, the last recorded epochs are shown)"))
  machines = {machine_line(s["results"]) for s in studies}
  return ("    " + "\n    ".join(f".venv/bin/{c}" if c.startswith("python")
                                 else c for c in commands) + "\n\n"
          + "Recorded on " + "; ".join(sorted(machines)) + ". "
          + "; ".join(notes) + ".\n")


def machine_line(results: Mapping[str, Any] | None) -> str:
  machine = (results or {}).get("machine")
  if not machine:
    return "an unrecorded machine"
  return (f"{machine['cpu']} ({machine['cpu_count']} CPUs, "
          f"{machine['device_count']} {machine['platform']} device(s)), "
          f"jax {machine['jax']}, flax {machine['flax']}")


def setup_line(config: Mapping[str, Any]) -> str:
  """The model and training of a config, in one sentence."""
  norm = config.get("norm", "batch")
  layers = (f"conv 3x3 {' -> '.join(map(str, config['channels']))} (each "
            "followed by a 2x2 max-pool), " if config["model"] == "cnn"
            else "784 -> ")
  dense = "".join(f"Dense({w}) -> act -> " for w in config["widths"])
  activations = config.get("activations") or [config["activation"]]
  return (f"{config['model'].upper()}: {layers}{dense}Dense(10), act = "
          f"{' or '.join(activations)}; {config['optimizer']} "
          f"{config['learning_rate']:g}, batch {config['batch_size']}, "
          f"{config['num_epochs']} epochs, {len(config['seeds'])} seeds; "
          f"{norm} norm where the placement puts it (momentum "
          f"{config['bn']['momentum']}, epsilon {config['bn']['epsilon']:g}; "
          "before_activation: the layer before it has no bias).\n")


def figure(out: Path, name: str, plot: Callable[[Path], Any],
           caption: str) -> str:
  """Draws plot(out / name) and returns its markdown line."""
  plot(out / name)
  return f"![{caption}]({name})\n"


# ----------------------------------------------------------------------------
# Any other workdir.


def generic_section(studies, out: Path) -> str:
  text = []
  for study in studies:
    summaries = report.summarize(study["rows"], results=study["results"])
    title = (study["results"] or {}).get("study") or study["label"]
    text += [f"## {title}\n", provenance_markdown([study]),
             report.summary_markdown(summaries),
             figure(out, f"{study['label']}.png",
                    lambda p, s=study: report.plot_comparison(
                        s["rows"], p, steps=s.get("steps", ())),
                    title)]
  return "\n".join(text)


def write_run_report(workdir: Path | str, *, extras=(),
                     section: Callable[..., str] | None = None) -> str:
  """One run's report: summary.md with the table and the study's `extras`
  (`report.write_report`), then the study's page `section` of this run
  alone, its figures beside it; returns the Markdown. A section that needs
  more than this run (another workdir, more seeds) says why instead."""
  workdir = Path(workdir)
  text = report.write_report([workdir], workdir, extras=extras)
  if section is None:
    return text
  try:
    part = section([load_study(workdir)], workdir)
  except report.ReportError as e:
    part = f"(The study's section needs more than this run: {e})\n"
  summary = workdir / "summary.md"
  workdir_lib.write_atomic(summary, summary.read_text() + "\n" + part)
  return text + "\n" + part


def section_report(section: Callable[[Sequence[Mapping[str, Any]], Path],
                                    str]) -> Callable[[Path | str], str]:
  """A study's `report` from its page `section`: report.md in the workdir,
  the section of that run alone (figures beside it); returns its path."""
  def write_report(workdir: Path | str) -> str:
    workdir = Path(workdir)
    text = section([load_study(workdir)], workdir)
    path = workdir / "report.md"
    workdir_lib.write_atomic(path, text)
    return str(path)
  return write_report


def missing_workdirs(studies: Sequence[study_lib.Study]) -> list[str]:
  """Every study's default workdirs (`Study.commands`), or ReportError
  naming the missing ones with the commands that make them."""
  commands = {w: c for s in studies for w, c in s.commands.items()}
  missing = [w for w in commands if not (Path(w) / "results.json").exists()]
  if missing:
    raise report.ReportError(
        f"no finished run in {', '.join(missing)}; run "
        + "; ".join(commands[w] for w in missing)
        + " (or name the workdirs with --workdir).")
  return list(commands)


PAGE_INTRO = """\
# Studies

Generated by `experiments.report` from the studies' workdirs; do not edit
by hand. Each study is a folder under `studies/` with its config, code and
section, and every table, figure and verdict below is computed from its
recorded runs (the commands, the machine and the time are under each
heading). The normalization family's comparison is in
[norms.md](norms.md), the GAN study's details in [gan.md](gan.md).

{rule}

    .venv/bin/{command}

"""


def study_of(loaded: Mapping[str, Any],
             studies: Sequence[study_lib.Study]) -> study_lib.Study | None:
  """The study a loaded workdir belongs to: results.json's "study_id"; for
  a results.json from before it named its study (schema 1), the config
  file of its command (`Study.legacy_configs`) or its benchmark."""
  by_name = {s.name: s for s in studies}
  results = loaded["results"] or {}
  if "study_id" in results:
    return by_name.get(results["study_id"])
  for study in studies:
    if loaded["benchmark"] and loaded["benchmark"] == study.benchmark:
      return study
    if loaded["config_name"] in (study.name, *study.legacy_configs):
      return study
  return None


def write_page(workdirs: Sequence[Path | str], page: Path | str,
               command: str, studies: Sequence[study_lib.Study]) -> str:
  """Writes the studies page and its figures (next to it); returns it.

  `studies`: the registry's, in page order; each loaded workdir goes to
  its study's section (`study_of`), a workdir of no listed study to a
  generic one. Every workdir is read before anything is written, so a bad
  workdir leaves the old page and figures as they were; the page is
  written last, each file atomically."""
  page = Path(page)
  loaded = [load_study(Path(w)) for w in workdirs]
  grouped: dict[str | None, list] = {}
  for one in loaded:
    study = study_of(one, studies)
    grouped.setdefault(study.name if study else None, []).append(one)
  report.make_directory(page.parent)
  sections = []
  for study in studies:
    mine = grouped.get(study.name, [])
    if any(not one["benchmark"] for one in mine):
      sections.append((study.section or generic_section)(mine, page.parent))
  if None in grouped:
    sections.append(generic_section(
        [one for one in grouped[None] if not one["benchmark"]], page.parent))
  text = PAGE_INTRO.format(command=command, rule=stats.RULE) + "\n".join(
      sections)
  workdir_lib.write_atomic(page, text)
  return text
