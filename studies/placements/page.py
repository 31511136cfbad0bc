"""The placement study's section of docs/studies.md."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

# CaffeNet-128 on ImageNet, top-1 (Mishkin et al., "Systematic evaluation of
# CNN advances on the ImageNet", 2017): BN after the ReLU against before it.
CAFFENET_TOP1 = {"after_activation": 0.499, "before_activation": 0.474}


def section(studies, out: Path) -> str:
  text = ["## Where BN goes, for which activation\n",
          page.provenance_markdown(studies)]
  lines, groups = [], {}
  for study in studies:
    text.append(page.setup_line(study["config"]))
    # Runs of different workdirs are never pooled: a second workdir of the
    # same model and activation (the main job beside the study) is a group
    # of its own, named by its workdir.
    model = study["config"]["model"]
    if any((model, r.get("activation")) in groups for r in study["rows"]):
      model = f"{model} ({study['label']})"
    for combo, rows in page.by_combo(study["rows"]).items():
      activation = rows[0].get("activation")
      placement = rows[0].get("placement")
      finals = [r["test_accuracy"] for r in page.final_rows(rows)]
      groups.setdefault((model, activation), {})[placement] = finals
      lines.append([model, activation, placement, page.percent(finals),
                    page.epochs_to(rows, 0.97), page.epochs_to(rows, 0.98)])
  lines.sort(key=lambda line: line[:2])  # stable: placements in study order
  text.append(
      "Final test accuracy in eval mode, mean +- sample std (ddof=1); "
      "epochs to a target: the mean first epoch of the runs that reach it "
      "(how many in brackets).\n")
  text.append(page.table(["model", "activation", "placement", "final test acc",
                     "epochs to 97%", "epochs to 98%"], lines))
  for study in studies:
    text.append(page.figure(out, f"{study['label']}.png",
                       lambda p, s=study: report.plot_comparison(
                           s["rows"], p, steps=s.get("steps", ())),
                       f"placements, {study['config']['model']}"))
  family = _placement_family(groups)
  text.append(
      "How differences were judged: every pair of placements within each "
      "model and activation, Welch's t test on the seeds' final test "
      "accuracies (different placements are different networks, so runs "
      "with one seed share no initialization), all of this section's pairs "
      "one Holm family; each difference, larger mean first, in points with "
      "its 95% interval, p and Holm's p.\n")
  for (model, activation), finals in groups.items():
    text.append(_placement_screen(model, activation, finals,
                                  family[(model, activation)]))
  text.append(_caffenet_comparison(family))
  return "\n".join(text)


def _placement_family(groups):
  """(model, activation) -> {(a, b): Comparison} for every pair of
  placements, a the one with the larger mean (Welch), all of them
  corrected together by Holm."""
  pairs = []
  for key, finals in groups.items():
    for a, b in itertools.combinations(finals, 2):
      if np.mean(finals[a]) < np.mean(finals[b]):
        a, b = b, a
      pairs.append((key, (a, b), stats.welch(
          finals[a], finals[b], label=f"{key[0]}, {key[1]}: {a} - {b}")))
  corrected = stats.holm_family(c for _, _, c in pairs)
  family = {key: {} for key in groups}
  for (key, pair, _), c in zip(pairs, corrected):
    family[key][pair] = c
  return family


def _placement_screen(model, activation, finals, comparisons) -> str:
  words = {"beyond noise": [], "within noise": [], "undetermined": []}
  for (a, b), c in comparisons.items():
    words[stats.verdict(c)].append(
        f"{a} over {b} {stats.describe(c, 'points', 100)}")
  best = max(finals, key=lambda p: np.mean(finals[p]))
  return (f"* **{model}, {activation}:** best mean: {best}. Beyond noise: "
          + ("; ".join(words["beyond noise"]) or "none") + ". Within noise: "
          + ("; ".join(words["within noise"]) or "none") + "."
          + ("" if not words["undetermined"] else " Undetermined: "
             + "; ".join(words["undetermined"]) + ".") + "\n")


def _caffenet_comparison(family) -> str:
  after, before = (CAFFENET_TOP1[k] for k in ("after_activation",
                                               "before_activation"))
  parts = []
  for (model, activation), comparisons in family.items():
    pair = next((p for p in comparisons if set(p) == {
        "after_activation", "before_activation"}), None)
    if pair is None:
      continue
    c = comparisons[pair]  # the screen's comparison, larger mean first
    diff = c.diff if pair[0] == "after_activation" else -c.diff
    sign = "the same sign" if diff > 0 else "the opposite sign"
    parts.append(f"{model} with {activation}: after - before "
                 f"{100 * diff:+.2f} points, {sign}, {stats.verdict(c)}")
  if not parts:  # no model here has BN both before and after its activation
    return ""
  return (f"* **Against CaffeNet-128 on ImageNet** (top-1 {after} with BN "
          f"after the ReLU against {before} before: after ahead): "
          + "; ".join(parts) + ". One small network on MNIST is no test of "
          "an ImageNet result; the comparison is of signs only.\n")
