"""The transfer-learning study's section of docs/studies.md (and the report
the study's report writes, bn_lab.page.section_report): the table of target test accuracies and the
verdicts, and a figure of the same accuracies, computed from results.json
(studies.transfer.transfer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

NORM_NAMES = {"batch": "BN", "layer": "LayerNorm", "none": "no norm"}
VARIANT_NAMES = {
    "frozen": "frozen (readout only)",
    "recomputed": "statistics recomputed on the budget",
    "recomputed_unlabeled": "statistics recomputed on all unlabeled 5-9",
    "trained": "fine-tuned (every layer)",
    "scratch": "from scratch (no pretraining)",
}
# A claim's verdict by `sign`: +1 / -1 beyond noise for / against it, 0
# within noise, None undetermined (one seed, or no spread).
VERDICTS = {1: "holds", -1: "does not hold (the opposite, beyond noise)",
            0: "not shown (within noise)",
            None: "not shown (undetermined)"}
# Variants that start from the pretrained network: for one norm, seed i of
# each has the same pretrained network, labeled subset, readout
# initialization and data order (studies.transfer.transfer).
PRETRAINED = ("frozen", "recomputed", "recomputed_unlabeled", "trained")


def variant_name(norm: str, variant: str) -> str:
  """A table row's label; only BN has a training mode worth naming (the
  other norms compute the same thing in training and in eval)."""
  if norm == "batch" and variant == "trained":
    return "fine-tuned (every layer; BN in training mode)"
  return VARIANT_NAMES[variant]


def _cells(results, key: str = "test_accuracy",
           ) -> dict[tuple[str, str, int], list[float]]:
  return {(c["norm"], c["variant"], c["budget"]): c[key]
          for c in results["variants"]}


def is_paired(a_key, b_key) -> bool:
  """Two cells (norm, variant, budget) pair seed by seed where both start
  from the same pretrained networks: one norm, neither from scratch."""
  return (a_key[0] == b_key[0] and a_key[2] == b_key[2]
          and a_key[1] in PRETRAINED and b_key[1] in PRETRAINED)


def compare(cells, a_key, b_key) -> stats.Comparison:
  """Cell a's accuracies against cell b's: paired where `is_paired`, else
  Welch."""
  return stats.compare(cells[a_key], cells[b_key],
                       paired=is_paired(a_key, b_key),
                       label=f"{a_key} - {b_key}")


def sign(c: stats.Comparison) -> int | None:
  """+1 / -1 where a is above / below b beyond noise, 0 within it, None
  where undetermined."""
  verdict = stats.verdict(c)
  if verdict == "undetermined":
    return None
  return int(np.sign(c.diff)) if verdict == "beyond noise" else 0


def words(cells, a_key, b_key, c: stats.Comparison) -> str:
  """"91.00% vs 81.00%: +10.00 [+7.52, +12.48] points, p = 0.0033 (Holm
  0.013), beyond noise" (paired: ..., "paired")."""
  return (f"{100 * np.mean(cells[a_key]):.2f}% vs "
          f"{100 * np.mean(cells[b_key]):.2f}%: {page.judged(c)}"
          + (", paired over seeds" if c.paired else ""))


def verdict(sign_: int | None) -> str:
  return VERDICTS[sign_]


def results_table(results: Mapping[str, Any]) -> str:
  """norm x variant rows, a column per budget: "test (train)" accuracy, %,
  mean +- sample std over seeds (train: the last pass over the budget)."""
  cells, train = _cells(results), _cells(results, "train_accuracy")
  budgets = results["budgets"]
  lines = []
  for norm in results["norms"]:
    for variant in VARIANT_NAMES:
      if any((norm, variant, b) in cells for b in budgets):
        lines.append([NORM_NAMES.get(norm, norm),
                      variant_name(norm, variant)]
                     + [f"{page.percent(cells[(norm, variant, b)])} "
                        f"({100 * np.mean(train[(norm, variant, b)]):.1f})"
                        if (norm, variant, b) in cells else "-"
                        for b in budgets])
  return page.table(["norm", "variant"]
                    + [f"{b:,} labeled" for b in budgets], lines)


def claims(results: Mapping[str, Any]) -> list[tuple[int, str, tuple,
                                                     tuple]]:
  """The claims the study tests whose cells it has: (budget, claim, cell a,
  cell b), each "a beats b"."""
  cells = _cells(results)
  out = []
  for b in results["budgets"]:
    mine = [
        ("Recomputing BN's statistics on the budget's images beats frozen "
         "statistics", ("batch", "recomputed", b), ("batch", "frozen", b)),
        ("Recomputing them on all unlabeled 5-9 images (AdaBN) beats frozen "
         "statistics", ("batch", "recomputed_unlabeled", b),
         ("batch", "frozen", b)),
        ("Fine-tuning everything beats frozen BN statistics and layers",
         ("batch", "trained", b), ("batch", "frozen", b)),
        ("Pretraining helps BN (fine-tuned beats from scratch)",
         ("batch", "trained", b), ("batch", "scratch", b))]
    for variant in ("frozen", "trained"):
      for other in ("none", "layer"):
        mine.append((f"BN beats {NORM_NAMES[other]}, both {variant}",
                     ("batch", variant, b), (other, variant, b)))
    best = {norm: max((v for (n, v, bb) in cells if n == norm and bb == b),
                      key=lambda v: np.mean(cells[(norm, v, b)]))
            for norm in results["norms"]
            if any(n == norm and bb == b for (n, _, bb) in cells)}
    if "batch" in best:
      for other in ("none", "layer"):
        if other in best:
          mine.append((f"BN's best variant ({best['batch']}) beats "
                       f"{NORM_NAMES[other]}'s best ({best[other]})",
                       ("batch", best["batch"], b), (other, best[other], b)))
    out += [(b, claim, x, y) for claim, x, y in mine
            if x in cells and y in cells]
  return out


def comparisons(results: Mapping[str, Any]) -> dict[tuple, stats.Comparison]:
  """(cell a, cell b) -> `compare`, for every claim's pair (once, where two
  claims name one pair), Holm-corrected together: the section's family."""
  cells = _cells(results)
  pairs = list(dict.fromkeys((x, y) for _, _, x, y in claims(results)))
  return dict(zip(pairs, stats.holm_family(compare(cells, *p)
                                           for p in pairs)))


def verdicts(results: Mapping[str, Any]) -> list[str]:
  """The claims the study tests, each decided by its numbers."""
  cells, family = _cells(results), comparisons(results)
  by_budget = {b: [] for b in results["budgets"]}
  for b, claim, x, y in claims(results):
    c = family[(x, y)]
    by_budget[b].append(f"* {claim}: **{verdict(sign(c))}** "
                        f"({words(cells, x, y, c)}).")
  out = []
  for b, lines in by_budget.items():
    out += [f"\n**{b:,} labeled examples of 5-9:**\n", *lines]
  return out


def plot_transfer(results: Mapping[str, Any], path: Path | None = None):
  """Target test accuracy (%) of each variant, grouped by norm, a panel per
  labeled budget: the mean over seeds with sample-std error bars, and each
  seed as a dot. The y axis is not from 0, so that the variants' gaps show
  (points, not bars, for that reason)."""
  cells = _cells(results)
  budgets, norms = results["budgets"], results["norms"]
  variants = [v for v in VARIANT_NAMES if any(k[1] == v for k in cells)]
  width = 0.8 / len(variants)
  size = (5 * len(budgets), 4.2)
  fig = report.new_figure(size)  # pylint: disable=protected-access
  axes = np.atleast_1d(fig.subplots(1, len(budgets), sharey=True))
  for ax, budget in zip(axes, budgets):
    for i, variant in enumerate(variants):
      offset = (i - (len(variants) - 1) / 2) * width
      _plot_variant(ax, cells, norms, variant, budget, offset, f"C{i}")
    ax.set_xticks(range(len(norms)),
                  [NORM_NAMES.get(n, n) for n in norms])
    ax.set(title=f"{budget:,} labeled examples of 5-9")
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("target test accuracy (%)")
  axes[0].legend(fontsize=7, loc="lower left", title_fontsize=7,
                 title="mean +- sample std; dots: seeds")
  report.save_figure(fig, path)  # pylint: disable=protected-access
  return fig


def _plot_variant(ax, cells, norms, variant, budget, offset, color) -> None:
  """One variant's mean +- std (and seeds) at each norm that ran it."""
  xs = [i + offset for i, n in enumerate(norms)
        if (n, variant, budget) in cells]
  accs = [100 * np.asarray(cells[(n, variant, budget)]) for n in norms
          if (n, variant, budget) in cells]
  if not xs:
    return
  stds = [a.std(ddof=1) if a.size > 1 else 0.0 for a in accs]
  ax.errorbar(xs, [a.mean() for a in accs], yerr=stds, fmt="o", ms=5,
              capsize=3, color=color, label=VARIANT_NAMES[variant])
  for x, a in zip(xs, accs):
    ax.scatter(np.full(a.size, x), a, s=6, color=color, alpha=0.4,
               zorder=3)


def section(studies, out: Path) -> str:
  """The section: setup, table, figure (written into `out`), verdicts."""
  study = studies[0]
  results = study["results"]
  net = results["network"]
  pre = results["pretrain"]
  tr = results["transfer"]
  source_acc = "; ".join(
      f"{NORM_NAMES.get(n, n)} {page.percent(pre[n]['test_accuracy'])}%"
      for n in results["norms"])
  text = [
      "## Transfer learning with BN: digits 0-4 -> 5-9\n",
      page.provenance_markdown(studies),
      f"MLP 784 -> {' -> '.join(map(str, net['widths']))} -> readout, "
      f"{net['activation']}, the normalization {net['placement']} "
      f"(BN momentum {net['momentum']}, epsilon {net['epsilon']:g}), "
      f"{len(results['seeds'])} seeds. Pretrained on digits "
      f"{results['source_classes']} with Adam({pre['learning_rate']:g}), "
      f"{pre[results['norms'][0]]['steps']:,} steps of batch "
      f"{pre[results['norms'][0]]['batch_size']} (source test accuracy: "
      f"{source_acc}). Transfer: a fresh 5-way readout for digits "
      f"{results['target_classes']}, trained on a labeled budget (the same "
      "number per class, another subset per seed) by "
      f"Adam({tr['learning_rate']:g}; {tr['readout_learning_rate']:g} where "
      f"only the readout trains), {tr['steps']:,} steps of batch "
      f"{tr['batch_size']} (or the budget). Frozen: only the readout trains, "
      "the hidden layers in eval mode with the pretraining's running "
      "statistics; recomputed: the same after each BN layer's mean and "
      "variance are recomputed (exactly, layer by layer) on the budget's "
      "images, or on all "
      f"{tr['target_train_images']:,} unlabeled training images of 5-9 "
      "(AdaBN); fine-tuned: everything trains, BN in training mode. Target "
      f"test accuracy on the {tr['target_test_images']:,} test images of "
      "5-9, mean +- sample std over seeds (%), and in parentheses the mean "
      "training accuracy on the budget (last pass, in the training step's "
      "mode):\n",
      results_table(results),
      page.figure(out, f"{study['label']}.png",
                  lambda p: plot_transfer(results, p),
                  "target test accuracy per variant, by norm and budget"),
      "Each claim below holds where the difference is beyond noise in "
      "its favour: the paired t test over seeds between variants of one "
      "norm that start from the same pretrained networks (seed by seed "
      "the same network, labeled subset, readout initialization and data "
      "order), Welch's across norms and against from scratch; every claim "
      "of the section one Holm family.",
      *verdicts(results), ""]
  return "\n".join(text)

