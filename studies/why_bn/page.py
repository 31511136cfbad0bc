"""The studies page's section on why BN helps (studies/why_bn/config.py): internal
covariate shift and the loss landscape, as Santurkar et al. (2018) measure
them, against their qualitative claims.

`why_bn_section(studies, out)` takes the workdirs of studies/why_bn/config.py as
`studies_page.load_study` returns them (any of its variants; a workdir is
an ICS study if its rows carry `ics_l2`, a landscape study if they carry
`landscape_losses`) and returns the markdown, its figures written to
`out`. Every verdict is computed here from the numbers it cites: Welch's
t test over seeds (the networks differ, so one seed's runs share no
initialization), every comparison of the section one Holm family
(`bn_lab.page.in_one_family`: the verdicts are worded twice, the first
time to collect the comparisons).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

Rows = Sequence[Mapping[str, Any]]
NETWORKS = ("standard", "BN", "noisy BN")  # in the page's order
# stats.verdict's word for a comparison it cannot judge (one seed, or no
# spread over seeds): neither within nor beyond noise.
UNDETERMINED = "undetermined"


# ----------------------------------------------------------------------------
# Reading the rows.


def network(row: Mapping[str, Any]) -> str:
  """"standard" (no normalization), "BN" or "noisy BN" of a row."""
  if row.get("norm") == "none" or row.get("placement") == "none":
    return "standard"
  return "noisy BN" if row.get("norm") == "noisy_batch" else "BN"


def by_network(rows: Rows) -> dict[str, list[Mapping[str, Any]]]:
  out: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    out.setdefault(network(row), []).append(row)
  return {name: out[name] for name in NETWORKS if name in out}


def series(rows: Rows, name: str, field: str):
  """The measurement `name` ("ics", "landscape") over training: (steps
  (T,), values (runs, T, ...)), each run's epochs in order; runs cut to
  the measurements every run has."""
  runs = page.by_run(rows)
  steps, values = [], []
  for run in sorted(runs):
    mine = sorted(runs[run], key=lambda r: r["epoch"])
    steps.append([s for r in mine for s in r[f"{name}_steps"]])
    values.append([v for r in mine for v in r[f"{name}_{field}"]])
  common = min(len(s) for s in steps)
  return (np.asarray(steps[0][:common]),
          np.asarray([v[:common] for v in values], float))


def _finals(rows: Rows, key: str = "test_accuracy") -> list[float]:
  return [r[key] for r in page.final_rows(rows)]


def _direction(c: stats.Comparison) -> str:
  """"lower" / "higher" (mean(a) - mean(b) beyond noise, by its sign),
  "within noise" or UNDETERMINED: `stats.verdict` with the direction."""
  verdict = stats.verdict(c)
  if verdict != "beyond noise":
    return verdict
  return "lower" if c.diff < 0 else "higher"


def _judged(c: stats.Comparison) -> str:
  """A measure's difference (no unit) with its interval, p, Holm's p and
  verdict, to 3 significant digits."""
  return page.judged(c, unit="", scale=1.0, digits=None)


def _why_undetermined(c: stats.Comparison) -> str:
  return ("one seed: no seed noise to judge by" if min(c.n_a, c.n_b) < 2
          else "no spread over seeds")


# ----------------------------------------------------------------------------
# Internal covariate shift.


def ics_numbers(rows: Rows) -> dict[str, dict[str, Any]]:
  """Per network: steps, layers, and per run (runs, T, layers) arrays of
  l2, cosine and l2 / ||G|| (the relative shift)."""
  out = {}
  for name, mine in by_network(rows).items():
    steps, l2 = series(mine, "ics", "l2")
    _, cosine = series(mine, "ics", "cosine")
    _, norm = series(mine, "ics", "grad_norm")
    with np.errstate(divide="ignore", invalid="ignore"):
      relative = np.where(norm > 0, l2 / norm, np.nan)
    out[name] = {"steps": steps, "layers": mine[0]["ics_layers"], "l2": l2,
                 "cosine": cosine, "relative": relative, "rows": mine}
  return out


def smoothing_window(num_points: int) -> int:
  """The figures' moving-average window: about 1/25 of the series."""
  return max(1, num_points // 25)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """The mean of each run of `window` consecutive points along the last
  axis ("valid": `window - 1` fewer points)."""
  kernel = np.ones(window) / window
  return np.apply_along_axis(lambda v: np.convolve(v, kernel, "valid"), -1,
                             values)


def _plot_ics(numbers, path: Path):
  """Per layer above the first, l2 and cosine over training: the mean over
  seeds and its min-max band, each a moving average."""
  layers = next(iter(numbers.values()))["layers"][1:]
  fig = report.new_figure((3.4 * len(layers), 6.4))
  fig.set_layout_engine("constrained")
  axes = fig.subplots(2, len(layers), squeeze=False)
  for i, (name, n) in enumerate(numbers.items()):
    window = smoothing_window(len(n["steps"]))
    steps = moving_average(n["steps"].astype(float), window)
    for row, (key, label) in enumerate((("l2", "l2 of G - G'"),
                                        ("cosine", "cos(G, G')"))):
      for j, layer in enumerate(layers, 1):
        values = moving_average(n[key][:, :, j], window)
        axis = axes[row, j - 1]
        axis.plot(steps, np.nanmean(values, 0), color=f"C{i}", label=name,
                  lw=1.2)
        axis.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0),
                          color=f"C{i}", alpha=0.2)
        axis.set(title=f"{layer}: {label}", xlabel="step",
                 yscale="log" if key == "l2" else "linear")
        axis.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=8)
  fig.suptitle("line: mean over seeds; shaded band: min to max over seeds "
               "(each a moving average over about 1/25 of the measurements)",
               fontsize=10)
  report.save_figure(fig, path)
  return fig


def _ics_table(numbers) -> str:
  lines = []
  for name, n in numbers.items():
    for j, layer in enumerate(n["layers"]):
      per_run = lambda key: np.nanmean(n[key][:, :, j], axis=1)
      cells = []
      for key, fmt in (("l2", "{:.4g}"), ("relative", "{:.3f}"),
                       ("cosine", "{:.3f}")):
        mean, std = page.mean_std(per_run(key))
        cells.append(fmt.format(mean)
                     + ("" if std is None else " +- " + fmt.format(std)))
      lines.append([name, layer, *cells])
  return page.table(["network", "layer", "ICS: l2 norm of G - G'",
                     "relative: that / l2 norm of G", "cosine(G, G')"],
                    lines)


def layer_shifts(bn, plain, key: str, family: page.Family,
                 ) -> list[tuple[str, stats.Comparison]]:
  """Per layer above the first (whose ICS is 0 by definition), BN's
  per-seed mean over training of the measure `key` ("l2", "relative",
  "cosine") against the standard network's (Welch, in `family`):
  ("reduced" / "raised" / "within noise" / UNDETERMINED, the comparison
  BN - standard)."""
  shifts = []
  for j in range(1, len(plain["layers"])):
    c = family.compare(np.nanmean(bn[key][:, :, j], 1),
                       np.nanmean(plain[key][:, :, j], 1),
                       label=f"{plain['layers'][j]} {key}: BN - standard")
    verdict = _direction(c)
    if verdict in ("lower", "higher"):
      # Less shift: a lower (relative) l2, a higher cosine.
      verdict = ("reduced" if (verdict == "lower") == (key != "cosine")
                 else "raised")
    shifts.append((verdict, c))
  return shifts


def ics_answer(shifts: Sequence[str]) -> str:
  """Did BN reduce ICS, from each layer's l2 shift ("reduced", "raised",
  "within noise", UNDETERMINED): "yes" only where every layer is reduced
  beyond noise, "no" where none is, "mixed" where some are and others
  are not. Not a majority of layers: that would call one reduced layer of
  three "no"."""
  if not shifts or UNDETERMINED in shifts:
    return UNDETERMINED
  reduced = list(shifts).count("reduced")
  if reduced == len(shifts):
    return "yes"
  return "mixed" if reduced else "no"


def _no_reduction_claim(answer: str, layers: Sequence[str],
                        shifts: Sequence[str]):
  """Santurkar et al.'s claim that BN does not reduce ICS, given
  `ics_answer`'s answer: its text, and its outcome for the tally (True,
  False, where it held, or None: undetermined)."""
  if answer == "mixed":
    reduced = [l for l, s in zip(layers, shifts) if s == "reduced"]
    not_reduced = [l for l, s in zip(layers, shifts) if s != "reduced"]
    return ("**holds in part** here (by the l2 measure: BN reduced it "
            f"beyond noise in {', '.join(reduced)}, not in "
            f"{', '.join(not_reduced)}).",
            f"in {', '.join(not_reduced)} only")
  return {"yes": ("**does not hold** here (by the l2 measure).", False),
          "no": ("**holds** here (by the l2 measure).", True),
          UNDETERMINED: ("is **undetermined** here (a layer's difference "
                         "cannot be judged: one seed, or no spread over "
                         "seeds).", None)}[answer]


def ics_reduction_verdict(plain, bn, tally: list,
                          family: page.Family) -> str:
  """Did BN reduce ICS here, each layer above the bottom judged by its
  per-seed means over training, BN against standard (`layer_shifts`,
  `ics_answer`). Appends (claim, outcome) to `tally`."""
  layers = plain["layers"][1:]
  shifts = {key: layer_shifts(bn, plain, key, family)
            for key in ("l2", "relative", "cosine")}
  count = lambda key, outcome: [v for v, _ in shifts[key]].count(outcome)
  l2 = [v for v, _ in shifts["l2"]]
  answer = ics_answer(l2)
  claim, outcome = _no_reduction_claim(answer, layers, l2)
  tally.append(("BN does not reduce ICS", outcome))
  details = [f"{layer} {key} {_judged(c)}"
             for j, layer in enumerate(layers) for key in shifts
             for _, c in [shifts[key][j]]]
  total = len(layers)
  return (
      f"* **Did BN reduce ICS here? {answer}.** (\"yes\" needs a lower l2 "
      "ICS beyond noise in every layer, \"no\" in none.) Of the "
      f"{total} layer{'s' * (total != 1)} above the first (whose ICS is 0 "
      "by definition), BN "
      f"has a lower l2 ICS beyond noise in {count('l2', 'reduced')}, a "
      f"higher one in {count('l2', 'raised')}; a lower l2 relative to the "
      f"gradient's norm in {count('relative', 'reduced')} (higher in "
      f"{count('relative', 'raised')}); a higher cosine (less shift) in "
      f"{count('cosine', 'reduced')} (lower in {count('cosine', 'raised')})."
      " Per-seed means over training, BN - standard: " + "; ".join(details)
      + ". Santurkar et al.'s claim, that BN does not reduce ICS (their Fig. "
      "5: as much or more of it with BN): " + claim)


def ics_verdicts(numbers, tally: list, family: page.Family) -> list[str]:
  """Did BN reduce ICS here; is noisy BN's larger; does noisy BN train as
  well as BN. Appends (claim, outcome) pairs to `tally`."""
  text = []
  if {"standard", "BN"} <= numbers.keys():
    text.append(ics_reduction_verdict(numbers["standard"], numbers["BN"],
                                      tally, family))
  if {"BN", "noisy BN"} <= numbers.keys():
    bn, noisy = numbers["BN"], numbers["noisy BN"]
    higher = []
    for j, layer in enumerate(bn["layers"][1:], 1):
      c = family.compare(np.nanmean(noisy["l2"][:, :, j], 1),
                         np.nanmean(bn["l2"][:, :, j], 1),
                         label=f"{layer} l2: noisy BN - BN")
      higher.append(f"{layer} {_judged(c)}")
    text.append("* **Noisy BN's ICS against BN's** (l2, noisy - BN, "
                "per-seed means over training): " + "; ".join(higher) + ".")
    text.append(noisy_trains_verdict(numbers, tally, family))
  return text


def _against_standard(noisy: Sequence[float], standard: Sequence[float],
                      tally: list, family: page.Family) -> str:
  """The "better than standard" half of the noisy BN claim."""
  c = family.compare(noisy, standard, label="final test accuracy: noisy BN "
                     "- standard")
  verdict = _direction(c)
  outcome = None if verdict == UNDETERMINED else verdict == "higher"
  tally.append(("noisy BN trains better than standard", outcome))
  return (" Against standard: noisy - standard "
          f"{page.judged(c)}: the \"better than standard\" part "
          + {True: "**holds**.", False: "**does not hold**.",
             None: "is **undetermined**."}[outcome])


def noisy_trains_verdict(numbers, tally: list, family: page.Family) -> str:
  """Does noisy BN train as well as BN: "yes" unless its final test
  accuracy is lower than BN's beyond noise, undetermined where that cannot
  be judged (one seed, no spread); and against standard where there is
  one. Appends (claim, outcome) pairs to `tally`."""
  bn, noisy = (_finals(numbers[k]["rows"]) for k in ("BN", "noisy BN"))
  c = family.compare(noisy, bn, label="final test accuracy: noisy BN - BN")
  answer = {UNDETERMINED: UNDETERMINED, "lower": "no"}.get(_direction(c),
                                                           "yes")
  tally.append(("noisy BN trains as well as BN",
                {"yes": True, "no": False}.get(answer)))
  loss = {k: np.mean(_finals(numbers[k]["rows"], "train_loss"))
          for k in numbers}
  plain, against_standard = "", ""
  if "standard" in numbers:
    standard = _finals(numbers["standard"]["rows"])
    plain = f"; standard {page.percent(standard)}"
    against_standard = _against_standard(noisy, standard, tally, family)
  return (f"* **Does noisy BN train as well as BN? {answer}.** Final test "
          f"accuracy noisy BN {page.percent(noisy)} against "
          f"BN {page.percent(bn)}{plain} (%): noisy - BN "
          f"{page.judged(c)}. Final training loss (training mode, "
          "epoch mean): " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items())
          + ". Santurkar et al.'s claim (noisy BN trains about as well as "
          "BN, better than standard): "
          + {"yes": "**holds** against BN.",
             "no": "**does not hold** against BN.",
             UNDETERMINED: "is **undetermined** against BN."}[answer]
          + against_standard)


def ics_part(study, numbers, out: Path, verdicts: Sequence[str]) -> str:
  """The ICS part of a workdir: `numbers` from `ics_numbers`, `verdicts`
  from `ics_verdicts`."""
  config = study["config"]
  label = study["label"]
  steps = max(r["step"] for r in study["rows"])
  text = [f"### Internal covariate shift: {label}\n",
          page.setup_line(config).rstrip("\n")
          + f" {steps:,} steps. ICS of every layer every "
          f"{config['ics']['every_steps']} steps, on that step's training "
          "batch at the state before its update: G is a layer's gradient, "
          "G' the same gradient after the layers below took this step's "
          f"update ({config['optimizer']}'s actual update). Noisy BN: "
          "Algorithm 1 with n_mu "
          f"{config['noisy_bn']['n_mu']}, n_sigma "
          f"{config['noisy_bn']['n_sigma']}, r_mu {config['noisy_bn']['r_mu']},"
          f" r_sigma {config['noisy_bn']['r_sigma']}.\n",
          "Mean over training (all measurements) per seed, then mean +- "
          "sample std over seeds:\n",
          _ics_table(numbers),
          page.figure(out, f"{label}_ics.png",
                      lambda p: _plot_ics(numbers, p),
                      f"ICS per layer over training, {label}"),
          "The figure: per layer above the first, the mean over seeds "
          "(line) and the range over seeds (band), each a moving average "
          f"over {smoothing_window(len(next(iter(numbers.values()))['steps']))}"
          " measurements (single measurements are one batch's and scatter "
          "widely).\n",
          "Final test accuracy (eval mode, %): " + "; ".join(
              f"{k} {page.percent(_finals(n['rows']))}"
              for k, n in numbers.items()) + ".\n"]
  text += verdicts
  return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------
# The loss landscape.


def landscape_numbers(rows: Rows) -> dict[str, dict[str, Any]]:
  """Per network: steps, step sizes, and per run (runs, T, k) losses and
  gradient changes along the gradient, (runs, T) beta-smoothness."""
  out = {}
  for name, mine in by_network(rows).items():
    steps, losses = series(mine, "landscape", "losses")
    _, changes = series(mine, "landscape", "grad_changes")
    _, beta = series(mine, "landscape", "beta_smoothness")
    out[name] = {"steps": steps, "losses": losses, "changes": changes,
                 "beta": beta, "etas": mine[0]["landscape_step_sizes"],
                 "rows": mine}
  return out


def _plot_landscape(numbers, path: Path):
  """Fig. 4 of the paper: per checkpoint the band from the smallest to the
  largest loss (gradient change) over the step sizes, and the effective
  beta; means over seeds, each a moving average."""
  fig = report.new_figure((15, 4))
  fig.set_layout_engine("constrained")
  ax_loss, ax_grad, ax_beta = fig.subplots(1, 3)
  for i, (name, n) in enumerate(numbers.items()):
    window = smoothing_window(len(n["steps"]))
    steps = moving_average(n["steps"].astype(float), window)
    for ax, key in ((ax_loss, "losses"), (ax_grad, "changes")):
      low, high = (moving_average(np.mean(f(n[key], axis=2), 0), window)
                   for f in (np.min, np.max))
      ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.35,
                      label=name)
    ax_beta.plot(steps, moving_average(np.mean(n["beta"], 0), window),
                 color=f"C{i}", label=name, lw=1.2)
  ax_loss.set(title="loss landscape: loss along the gradient",
              ylabel="training loss (min-max over step sizes)")
  ax_grad.set(title="gradient predictiveness",
              ylabel="||grad L(w) - grad L(w - eta g)||")
  ax_beta.set(title="effective beta-smoothness",
              ylabel="max ||grad change|| / ||eta g||")
  for ax in (ax_loss, ax_grad, ax_beta):
    ax.set(xlabel="step", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("shaded bands: min to max over the step sizes (of the mean "
               "over seeds); beta: mean over seeds; each a moving average",
               fontsize=10)
  report.save_figure(fig, path)
  return fig


# Per run, over training: (name, what it summarizes, per-run values).
_LANDSCAPE_MEASURES = (
    ("loss variation", "max - min loss over the step sizes",
     lambda n: np.mean(np.max(n["losses"], 2) - np.min(n["losses"], 2), 1)),
    ("gradient change", "max over the step sizes of the gradient's l2 "
     "change", lambda n: np.mean(np.max(n["changes"], 2), 1)),
    ("beta-smoothness", "max change per distance",
     lambda n: np.mean(n["beta"], 1)),
)


# Per run and checkpoint, (runs, T): each measure of `_LANDSCAPE_MEASURES`.
_LANDSCAPE_POINTS = {
    "loss variation": lambda n: np.ptp(n["losses"], 2),
    "gradient change": lambda n: np.max(n["changes"], 2),
    "beta-smoothness": lambda n: n["beta"],
}


def halves_verdict(bn: np.ndarray, plain: np.ndarray, family: page.Family,
                   name: str = "") -> tuple[str, list[stats.Comparison]]:
  """Whether BN's measure `name` ((runs, T) per checkpoint) is lower than
  the standard network's beyond noise, judged on the per-seed means over
  the first and the second half of training (Welch, in `family`): the
  verdict, and per half the comparison BN - standard. Undetermined, with
  no halves, where a run has too few checkpoints to split in two (an empty
  half's mean is nan, which would read as "within noise"); undetermined
  where a half cannot be judged (one seed, or no spread)."""
  checkpoints = min(bn.shape[1], plain.shape[1])
  if checkpoints < 2:
    return (f"{UNDETERMINED} (too few measurements: {checkpoints} per run,"
            " each half of training needs one)", [])
  half = checkpoints // 2
  halves = [family.compare(np.mean(b, 1), np.mean(p, 1),
                           label=f"{name} {which} half: BN - standard")
            for which, b, p in (("first", bn[:, :half], plain[:, :half]),
                                ("second", bn[:, half:], plain[:, half:]))]
  unjudged = [c for c in halves if _direction(c) == UNDETERMINED]
  if unjudged:
    return f"{UNDETERMINED} ({_why_undetermined(unjudged[0])})", halves
  lower = [_direction(c) == "lower" for c in halves]
  verdict = ("holds" if all(lower) else
             "holds in the first half of training only" if lower[0] else
             "holds in the second half of training only" if lower[1] else
             "does not hold")
  return verdict, halves


def _halves_outcome(verdict: str):
  """`halves_verdict`'s verdict as the tally's outcome: True, False, where
  it held, or None (undetermined)."""
  if verdict.startswith(UNDETERMINED):
    return None
  return {"holds": True, "does not hold": False}.get(
      verdict, verdict.removeprefix("holds "))


def _landscape_verdicts(numbers, tally: list,
                        family: page.Family) -> list[str]:
  if not {"standard", "BN"} <= numbers.keys():
    return []
  plain, bn = numbers["standard"], numbers["BN"]
  text = []
  claims = {"loss variation": "smaller loss variation",
            "gradient change": "more predictive gradients (smaller change)",
            "beta-smoothness": "a smaller effective beta"}
  for name, _, per_run in _LANDSCAPE_MEASURES:
    point = _LANDSCAPE_POINTS[name]
    verdict, halves = halves_verdict(point(bn), point(plain), family,
                                     name)
    tally.append((f"BN gives {claims[name]}", _halves_outcome(verdict)))
    overall = family.compare(per_run(bn), per_run(plain),
                             label=f"{name} overall: BN - standard")
    below = np.mean(point(bn), 0) < np.mean(point(plain), 0)
    text.append(
        f"* **BN gives {claims[name]}: {verdict}.** "
        + "".join(
            f"{half} half of training, BN - standard {_judged(c)}{end} "
            for half, end, c in zip(("First", "second"), (";", "."),
                                    halves))
        + f"Over all of training BN {np.mean(per_run(bn)):.4g} against "
        f"standard {np.mean(per_run(plain)):.4g} ({_judged(overall)}); BN "
        f"lower at {int(below.sum())} of {below.size} checkpoints (seed "
        "means).")
  return text


def landscape_part(study, numbers, out: Path,
                   verdicts: Sequence[str]) -> str:
  """The landscape part of a workdir: `numbers` from `landscape_numbers`,
  `verdicts` from `_landscape_verdicts`."""
  config = study["config"]
  label = study["label"]
  etas = next(iter(numbers.values()))["etas"]
  steps = max(r["step"] for r in study["rows"])
  lines = []
  for name, n in numbers.items():
    cells = []
    for _, _, per_run in _LANDSCAPE_MEASURES:
      mean, std = page.mean_std(per_run(n))
      cells.append(f"{mean:.4g}" + ("" if std is None else f" +- {std:.2g}"))
    lines.append([name, *cells, page.percent(_finals(n["rows"]))])
  text = [f"### The loss landscape: {label}\n",
          page.setup_line(config).rstrip("\n")
          + f" {steps:,} steps. Every {config['landscape']['every_steps']} "
          "steps, on that step's training batch at the state before its "
          "update (BN in training mode, the batch's statistics), along the "
          f"gradient g at the step sizes eta = "
          + ", ".join(f"{e:g}" for e in etas)
          + f" ({len(etas)} points over {config['landscape']['step_factors']}"
          f" x the learning rate, the paper's VGG grid): the loss L(w - eta "
          "g), the gradient's l2 change, and the largest change per "
          "distance. Shaded: the band from the smallest to the largest "
          "value over the step sizes (the mean over seeds of each), as the "
          "paper's Fig. 4; the lines and bands are moving averages over "
          f"{smoothing_window(len(next(iter(numbers.values()))['steps']))} "
          "checkpoints.\n",
          page.figure(out, f"{label}_landscape.png",
                      lambda p: _plot_landscape(numbers, p),
                      f"loss landscape, {label}"),
          "Per seed, the mean over training of each measure; mean +- "
          "sample std over seeds:\n",
          page.table(["network"] + [f"{n} ({what})" for n, what, _ in
                                    _LANDSCAPE_MEASURES]
                     + ["final test acc (%)"], lines),
          "Santurkar et al.'s claims (Sec. 3.1, Fig. 4), judged by the per-"
          "seed means over each half of training (BN lower beyond noise): "
          "\"holds\" needs both halves. The networks are compared at the same step and "
          "learning rate, as in the paper; they are not at the same loss "
          "(the standard network's gradients shrink as its training loss "
          "goes to 0, which shrinks its gradient changes late in "
          "training).\n"]
  text += verdicts
  return "\n".join(text) + "\n"


# ----------------------------------------------------------------------------
# The section.


def section(studies, out: Path) -> str:
  ics = [s for s in studies if s["rows"] and "ics_l2" in s["rows"][0]]
  land = [s for s in studies if s["rows"]
          and "landscape_losses" in s["rows"][0]]
  text = ["## Why BN helps: internal covariate shift and the loss "
          "landscape (Santurkar et al. 2018)\n",
          page.provenance_markdown(ics + land),
          "Santurkar et al. measured internal covariate shift (ICS) "
          "directly and found BN networks with as much or more of it; they "
          "found instead that BN smooths the loss landscape, and that BN "
          "with injected, ever-changing noise after it (\"noisy BN\") still "
          "trains well. The same measurements on MNIST "
          "(studies.why_bn.landscape; studies/why_bn/config.py). Every "
          "difference below is Welch's t test over seeds (the networks "
          "differ, so one seed's runs share no initialization), all of "
          "this section's comparisons one Holm family.\n"]
  parts = ([(ics_part, ics_verdicts, s, ics_numbers(s["rows"]))
            for s in ics]
           + [(landscape_part, _landscape_verdicts, s,
               landscape_numbers(s["rows"])) for s in land])

  def words(family):
    tally: list[tuple[str, list]] = []
    lines = []
    for _, verdicts, s, numbers in parts:
      tally.append((s["label"], []))
      try:
        lines.append(verdicts(numbers, tally[-1][1], family))
      except ValueError as e:  # a NaN measure (a diverged run): say where
        raise report.ReportError(f"{s['path']}: {e}") from e
    return lines, tally

  lines, tally = page.in_one_family(words)
  for (part, _, s, numbers), verdicts in zip(parts, lines):
    text.append(part(s, numbers, out, verdicts))
  text.append(_against_the_paper(tally))
  return "\n".join(text)


def _against_the_paper(tally: Sequence[tuple[str, list]]) -> str:
  """The section's summary: each of the paper's claims, per workdir,
  matched or not (or matched only in part: a str says where), or
  undetermined (None: one seed, too few measurements), from the verdicts
  above."""
  matched, partly, not_matched, undetermined = [], [], [], []
  for label, claims in tally:
    for claim, outcome in claims:
      if outcome is True:
        matched.append(f"{claim} ({label})")
      elif outcome is None:
        undetermined.append(f"{claim} ({label})")
      elif outcome:  # a str: where it held
        partly.append(f"{claim} ({label}: {outcome})")
      else:
        not_matched.append(f"{claim} ({label})")
  return ("### Against Santurkar et al.'s qualitative claims\n\n"
          "* **Matched:** " + ("; ".join(matched) or "none") + ".\n"
          + ("* **Matched in part:** " + "; ".join(partly) + ".\n"
             if partly else "")
          + "* **Not matched:** " + ("; ".join(not_matched) or "none")
          + ".\n"
          + ("* **Undetermined:** " + "; ".join(undetermined) + ".\n"
             if undetermined else ""))
