"""The domain-shift study's section (studies.domain_shift.domain_shift):
tables, a figure and the verdicts on the issue's prediction, from
results.json.

The section (`section(studies, out)`) is the studies page's;
studies.domain_shift.report writes the same text to the workdir's
report.md.
The prediction, checked per model and activation: for the affine intensity
shifts (brightness, contrast, unclipped), adapted statistics recover clean
accuracy exactly for `input` and `before_activation`, partly for
`after_activation`, not at all for `none`; Gaussian noise recovers partly
everywhere.

Judged with bn_lab.stats: a shift's cost (clean - shifted accuracy with the
running statistics) and a recovery (adapted - running on the shifted set)
compare the same runs evaluated two ways, so both are paired t tests over
the seeds; every one the section judges is in one Holm family
(`comparisons`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats as stats_lib

PLACEMENTS = ("none", "before_activation", "after_activation", "input")
STATISTICS = ("running", "adapted", "test_batch")
AFFINE = ("brightness", "contrast")
EXACT_PLACEMENTS = ("input", "before_activation")
STYLES = {"running": "-", "adapted": "--", "test_batch": ":"}


# ----------------------------------------------------------------------------
# Numbers.

Key = tuple  # (group, placement, shift, severity, clip, statistics)


def accuracy_table(rows: Sequence[Mapping[str, Any]]) -> dict[Key, np.ndarray]:
  """(model/activation group, placement, shift, severity, clip, statistics)
  -> the runs' test accuracies, in seed order."""
  table: dict[Key, list] = {}
  for row in sorted(rows, key=lambda r: r["seed"]):
    key = (_group(row), row["placement"], row["shift"], row["severity"],
           row["clip"], row["statistics"])
    table.setdefault(key, []).append(row["test_accuracy"])
  return {k: np.asarray(v) for k, v in table.items()}


def _group(row) -> str:
  return f"{row.get('model') or 'mlp'}, {row.get('activation') or 'relu'}"


def _cases(acc) -> list[tuple[str, int, bool]]:
  return list(dict.fromkeys(k[2:5] for k in acc))


def recovered_fraction(acc, group, placement, shift, severity, clip):
  """(adapted - running) / (clean - running) of the mean accuracies, clean
  being the running statistics on the clean test set: the share of the
  accuracy the shift cost that adapted statistics win back."""
  get = lambda s, v, c, stats: acc[(group, placement, s, v, c, stats)].mean()
  clean = get("clean", 0, False, "running")
  running = get(shift, severity, clip, "running")
  adapted = get(shift, severity, clip, "adapted")
  return (adapted - running) / (clean - running)


def exact_gap(acc, group, placement, shift, severity, clip) -> float:
  """The largest per-seed |adapted accuracy on the shifted test set -
  adapted accuracy on the clean one|: 0 where adaptation undoes the shift
  exactly."""
  adapted = acc[(group, placement, shift, severity, clip, "adapted")]
  clean = acc[(group, placement, "clean", 0, False, "adapted")]
  return float(np.max(np.abs(adapted - clean)))


def judged_cases(acc, group, placements) -> list[tuple[str, tuple]]:
  """(placement, (shift, severity, clip)) of every case whose recovery
  `_verdicts` judges: after_activation on the unclipped affine shifts, and
  every BN placement on noise and on the other shifts (translation, the
  clipped ones). The exact placements on the affine shifts are judged by
  the tolerance alone."""
  cases = [c for c in _cases(acc) if c[0] != "clean"]
  affine = [c for c in cases if c[0] in AFFINE and not c[2]]
  bn_placements = [p for p in placements if p != "none"]
  out = [("after_activation", c) for c in affine
         if "after_activation" in placements]
  out += [(p, c) for p in bn_placements for c in cases if c not in affine]
  return [(p, c) for p, c in out if (group, p, *c, "running") in acc]


def comparisons(acc, groups, placements, tol) -> dict[tuple, Any]:
  """The section's family, Holm-corrected: per group and judged case
  (`judged_cases`), ("drop", group, placement, case): clean - shifted
  accuracy with the running statistics, and where adaptation is not exact
  ("recovery", ...): adapted - running on the shifted set; both paired
  over the seeds (the same runs evaluated two ways)."""
  out = {}
  for group in groups:
    for placement, case in judged_cases(acc, group, placements):
      running = acc[(group, placement, *case, "running")]
      out[("drop", group, placement, case)] = stats_lib.paired(
          acc[(group, placement, "clean", 0, False, "running")], running,
          label=f"{group}, {placement}, {case}: clean - shifted, running")
      if exact_gap(acc, group, placement, *case) > tol:
        out[("recovery", group, placement, case)] = stats_lib.paired(
            acc[(group, placement, *case, "adapted")], running,
            label=f"{group}, {placement}, {case}: adapted - running")
  return dict(zip(out, stats_lib.holm_family(out.values())))


def _dropped(family, group, placement, shift, severity, clip) -> bool:
  """Whether the shift costs the running statistics accuracy beyond noise
  (only then is a recovered share meaningful)."""
  c = family[("drop", group, placement, (shift, severity, clip))]
  return c.diff > 0 and c.significant


def _outcome(acc, family, group, placement, shift, severity, clip,
             tol) -> str:
  """exact | partly | not at all | worse | undetermined, for one case
  with a drop."""
  if exact_gap(acc, group, placement, shift, severity, clip) <= tol:
    return "exact"
  c = family[("recovery", group, placement, (shift, severity, clip))]
  if stats_lib.verdict(c) == "undetermined":
    return "undetermined"
  if c.significant:
    return "partly" if c.diff > 0 else "worse"
  return "not at all"


# ----------------------------------------------------------------------------
# The section.


def section(studies, out: Path) -> str:
  study = studies[0]
  results = study["results"]["domain_shift"]
  acc = accuracy_table(results["rows"])
  tol = results["exact_tolerance"]
  groups = list(dict.fromkeys(k[0] for k in acc))
  placements = [p for p in PLACEMENTS if any(k[1] == p for k in acc)]
  source = results["source_config"]
  family = comparisons(acc, groups, placements, tol)
  text = [
      "## Domain shift: running, adapted and test-batch statistics\n",
      page.provenance_markdown(studies),
      f"No training: the {len(source['seeds'])} seeds of every combination "
      f"of `{results['source_workdir']}` (made by "
      f"`{results['source_command']}`), restored after their last epoch "
      f"({results['source_epochs']}). Source: " + page.setup_line(source),
      f"Evaluated on the {results['test_examples']:,} test images shifted "
      "by `bn_lab.data.shift_images` (unit scale; brightness x + b, "
      "contrast a (x - m) + m around MNIST's mean pixel, Gaussian noise, "
      "translation down and right; parameters at severities 1..5: "
      + "; ".join(f"{k} {', '.join(map(str, v))}"
                  for k, v in results["shift_parameters"].items())
      + "), unclipped unless marked *clipped* (to [0, 1]). BN statistics "
      "three ways: **running** (eval mode, the moving averages); "
      f"**adapted** (AdaBN): the mean and biased variance recomputed, "
      f"weights frozen, over the first {results['adapt_examples']:,} "
      "*training* images shifted the same way (their noise from another "
      "seed), never over an evaluated image or label; **test batch**: each "
      f"test batch of {results['test_batch_size']} normalized with its own "
      "statistics, as in training (the last partial batch left out). "
      "Cells: test accuracy (%), mean over seeds, running / adapted / test "
      "batch; `none` has no statistics, so its three are one number.\n"]
  for group in groups:
    text.append(f"### {group}\n")
    text.append(_table(acc, group, placements))
  text.append(page.figure(
      out, f"{study['label']}.png",
      lambda p: plot_domain_shift(acc, groups, placements, p),
      "accuracy against severity, per shift and placement"))
  text.append(
      f"Verdicts. *Exact* recovery: every seed's adapted accuracy on the "
      f"shifted test set within {100 * tol:g} points "
      f"({tol * results['test_examples']:g} of "
      f"{results['test_examples']:,} images) "
      "of its adapted accuracy on the clean test set. *Partly*: adapted "
      "above running beyond noise, but not exact. Recovered share: "
      "(adapted - running) / (clean - running), means over seeds, clean = "
      "running statistics on the clean test set; judged only where the "
      "shift costs the running statistics accuracy beyond noise (clean - "
      "shifted). Both differences compare the same runs evaluated two "
      "ways: paired t tests over the seeds, all of this section's "
      f"({len(family)}) one Holm family. "
      "Why a contrast change (x -> a x + b, a < 1) need not be undone "
      "exactly: with adapted statistics BN computes (h - mu) / sqrt(var + "
      "eps / a^2) where the clean network computed (h - mu) / sqrt(var + "
      "eps), the same only where var is large against eps / a^2 (400 eps "
      "at a = 0.05), which input BN's near-constant border pixels are not "
      "(studies.domain_shift.domain_shift). Clipping makes brightness non-affine for the "
      "pixels pushed past 1.\n")
  for group in groups:
    text.append(_verdicts(acc, family, group, placements, tol))
  return "\n".join(text)


def _table(acc, group, placements) -> str:
  lines = []
  for shift, severity, clip in _cases(acc):
    if not any(k[:2] == (group, placements[0]) and k[2:5] == (
        shift, severity, clip) for k in acc):
      continue
    name = shift + (" (clipped)" if clip else "")
    cells = []
    for placement in placements:
      means = [100 * acc[(group, placement, shift, severity, clip, s)].mean()
               for s in STATISTICS]
      cells.append(f"{means[0]:.2f}" if placement == "none" else
                   " / ".join(f"{m:.2f}" for m in means))
    lines.append([name, severity or "-", *cells])
  return page.table(["shift", "severity", *placements], lines)


def _verdicts(acc, family, group, placements, tol) -> str:
  cases = [c for c in _cases(acc) if c[0] != "clean"]
  affine = [c for c in cases if c[0] in AFFINE and not c[2]]
  lines = []
  outcomes = lambda placement, which: {
      c: _outcome(acc, family, group, placement, *c, tol) for c in which}
  if affine:
    for placement in [p for p in EXACT_PLACEMENTS if p in placements]:
      gaps = {c: exact_gap(acc, group, placement, *c) for c in affine}
      missed = [c for c, g in gaps.items() if g > tol]
      lines.append(
          f"* **{group}, {placement}, brightness and contrast: adapted "
          "statistics recover clean accuracy exactly: "
          + ("holds" if not missed else
             f"holds in {len(affine) - len(missed)} of {len(affine)} cases"
             if len(missed) < len(affine) else "does not hold")
          + f".** Largest per-seed gap {100 * max(gaps.values()):.2f} "
          "points" + ("" if not missed else "; beyond the tolerance at "
                      + ", ".join(f"{s} {v} ({100 * gaps[(s, v, c)]:.2f})"
                                  for s, v, c in missed))
          + ".")
    if "after_activation" in placements:
      lines.append(_partly_line(acc, family, group, "after_activation",
                                affine, outcomes("after_activation", affine),
                                "brightness and contrast"))
    if "none" in placements:
      same = all(np.array_equal(
          acc[(group, "none", *c, "adapted")],
          acc[(group, "none", *c, "running")]) for c in affine)
      means = [100 * acc[(group, "none", *c, "running")].mean()
               for c in affine]
      # Not a test of the prediction: without BN the three evaluations
      # are one network by construction; `same` guards the evaluation code.
      lines.append(
          f"* {group}, none, brightness and contrast: nothing to adapt "
          "(no BN), so no recovery by construction"
          + (": the three evaluations are one network, "
             if same else "; yet the evaluations differ (a bug), ")
          + f"at {min(means):.2f} to {max(means):.2f}% accuracy over these "
          "shifts.")
  noise = [c for c in cases if c[0] == "noise" and not c[2]]
  if noise:
    bn_placements = [p for p in placements if p != "none"]
    parts, all_partly = [], True
    for placement in bn_placements:
      judged = {c: o for c, o in outcomes(placement, noise).items()
                if _dropped(family, group, placement, *c)}
      # A placement no noise level hurts is no evidence either way.
      all_partly &= bool(judged) and all(o == "partly"
                                         for o in judged.values())
      parts.append(_partly_line(acc, family, group, placement, noise,
                                outcomes(placement, noise), "noise",
                                bullet=False))
    anything_judged = any(
        _dropped(family, group, p, *c) for p in bn_placements for c in noise)
    lines.append(
        f"* **{group}, Gaussian noise: adapted statistics recover partly, "
        "at every BN placement: " + ("not shown" if not anything_judged
                                     else "holds" if all_partly
                                     else "does not hold")
        + ".** " + " ".join(parts)
        + (" Without BN (none) nothing adapts." if "none" in placements
           else ""))
  bn_placements = [p for p in placements if p != "none"]
  if bn_placements and cases:
    gaps = [acc[(group, p, *c, "test_batch")].mean()
            - acc[(group, p, *c, "adapted")].mean()
            for p in bn_placements for c in cases]
    lines.append(
        f"* {group}, test-batch against adapted statistics (no prediction): "
        f"test batch - adapted {100 * np.mean(gaps):+.2f} points on average "
        f"over the {len(gaps)} shifted cases with BN, from "
        f"{100 * min(gaps):+.2f} to {100 * max(gaps):+.2f}.")
  other = [c for c in cases if c[0] not in AFFINE + ("noise",) or c[2]]
  for shift, clip in dict.fromkeys((c[0], c[2]) for c in other):
    mine = [c for c in other if (c[0], c[2]) == (shift, clip)]
    parts = [_partly_line(acc, family, group, p, mine, outcomes(p, mine), "",
                          bullet=False)
             for p in placements if p != "none"]
    lines.append(f"* {group}, {shift}{' (clipped)' if clip else ''} (no "
                 "prediction): " + " ".join(parts))
  return "\n".join(lines) + "\n"


def _partly_line(acc, family, group, placement, cases, outcomes, what,
                 bullet: bool = True) -> str:
  judged = {c: o for c, o in outcomes.items()
            if _dropped(family, group, placement, *c)}
  counts = {o: sum(v == o for v in judged.values())
            for o in ("exact", "partly", "not at all", "worse",
                      "undetermined")}
  shares = [recovered_fraction(acc, group, placement, *c) for c in judged]
  if judged:
    summary = (f"{placement}: of {len(judged)} cases where the shift costs "
               "accuracy, " + ", ".join(f"{n} {o}"
                                        for o, n in counts.items() if n)
               + f"; recovered share {min(shares):.2f} to "
               f"{max(shares):.2f}.")
  else:  # e.g. one seed: no spread to judge a drop by
    summary = (f"{placement}: no case where the shift costs accuracy "
               "beyond noise, nothing to judge.")
  if not bullet:
    return summary
  verdict = ("not shown" if not judged else "holds"
             if counts["partly"] == len(judged) else "undetermined"
             if counts["partly"] + counts["undetermined"] == len(judged)
             else "does not hold")
  return (f"* **{group}, {placement}, {what}: adapted statistics recover "
          f"partly: {verdict}.** " + summary)


def plot_domain_shift(acc, groups, placements, path: Path | None = None):
  """Test accuracy (%) against severity (0: clean), one panel per shift
  (rows) and placement (columns); color: model/activation, line style:
  statistics."""
  shifts = list(dict.fromkeys((c[0], c[2]) for c in _cases(acc)
                              if c[0] != "clean"))
  size = (3.2 * len(placements), 2.6 * len(shifts))
  fig = report.new_figure(size)  # pylint: disable=protected-access
  axes = np.atleast_2d(fig.subplots(len(shifts), len(placements),
                                    sharey=True, squeeze=False))
  for r, (shift, clip) in enumerate(shifts):
    for c, placement in enumerate(placements):
      ax = axes[r, c]
      for i, group in enumerate(groups):
        for stats in STATISTICS if placement != "none" else ("running",):
          points = [(0, acc[(group, placement, "clean", 0, False, stats)])]
          points += [(v, acc[(group, placement, s, v, k, stats)])
                     for s, v, k in _cases(acc) if (s, k) == (shift, clip)]
          if len(points) < 2:
            continue
          xs = [v for v, _ in points]
          ax.plot(xs, [100 * a.mean() for _, a in points], marker="o",
                  ms=2.5, color=f"C{i}", ls=STYLES[stats],
                  label=f"{group}, {stats}")
      ax.set_title(f"{shift}{' (clipped)' if clip else ''}, {placement}",
                   fontsize=8)
      ax.grid(alpha=0.3)
      if r == len(shifts) - 1:
        ax.set_xlabel("severity (0: clean)")
      if c == 0:
        ax.set_ylabel("test accuracy (%)")
  axes[0, -1].legend(fontsize=6)
  fig.subplots_adjust(hspace=0.4)
  report.save_figure(fig, path)  # pylint: disable=protected-access
  return fig
