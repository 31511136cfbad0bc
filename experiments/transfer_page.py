"""The transfer-learning study's section of docs/studies.md (and the report
experiments.transfer writes): the table of target test accuracies and the
verdicts, and a figure of the same accuracies, computed from results.json
(bn_jax.transfer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import report

NORM_NAMES = {"batch": "BN", "layer": "LayerNorm", "none": "no norm"}
VARIANT_NAMES = {
    "frozen": "frozen (readout only)",
    "recomputed": "statistics recomputed on the budget",
    "recomputed_unlabeled": "statistics recomputed on all unlabeled 5-9",
    "trained": "fine-tuned (every layer)",
    "scratch": "from scratch (no pretraining)",
}
# A claim's verdict by the sign `compare` returns; None: a side has one
# seed, so there is no spread to judge the difference against.
VERDICTS = {1: "holds", -1: "does not hold (the opposite, beyond noise)",
            0: "not shown (within seed noise)",
            None: "not shown (one seed: no noise estimate)"}


def _page():
  """experiments.studies_page, imported when used: it imports this module
  for its SECTIONS, so importing it here at load time would be circular."""
  from experiments import studies_page  # pylint: disable=g-import-not-at-top
  return studies_page


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


def compare(a: Sequence[float], b: Sequence[float],
            ) -> tuple[str, int | None]:
  """("97.1% vs 95.0%: +2.10 +- 0.30 points, beyond seed noise", sign):
  sign is +1 / -1 where a is above / below b beyond seed noise, 0 within
  it, None where a side has one seed (its standard error is nan)."""
  page = _page()
  diff, se = page.difference(a, b)
  means = f"{100 * np.mean(a):.2f}% vs {100 * np.mean(b):.2f}%: "
  if np.isnan(se):
    return means + f"{100 * diff:+.2f} points, one seed", None
  beyond = page.beyond_noise(diff, se)
  words = (means + f"{100 * diff:+.2f} +- {100 * se:.2f} points, "
           + ("beyond" if beyond else "within") + " seed noise")
  return words, (int(np.sign(diff)) if beyond else 0)


def verdict(sign: int | None) -> str:
  return VERDICTS[sign]


def _claim(cells, claim: str, a_key, b_key) -> str | None:
  """One verdict line: does cell a beat cell b?"""
  if a_key not in cells or b_key not in cells:
    return None
  words, sign = compare(cells[a_key], cells[b_key])
  return f"* {claim}: **{verdict(sign)}** ({words})."


def results_table(results: Mapping[str, Any]) -> str:
  """norm x variant rows, a column per budget: "test (train)" accuracy, %,
  mean +- sample std over seeds (train: the last pass over the budget)."""
  page = _page()
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


def verdicts(results: Mapping[str, Any]) -> list[str]:
  """The claims the study tests, each decided by its numbers."""
  cells = _cells(results)
  out = []
  for b in results["budgets"]:
    out.append(f"\n**{b:,} labeled examples of 5-9:**\n")
    claims = [
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
        claims.append((f"BN beats {NORM_NAMES[other]}, both {variant}",
                       ("batch", variant, b), (other, variant, b)))
    out += [line for line in (_claim(cells, *c) for c in claims) if line]
    best = {norm: max((v for (n, v, bb) in cells if n == norm and bb == b),
                      key=lambda v: np.mean(cells[(norm, v, b)]))
            for norm in results["norms"]
            if any(n == norm and bb == b for (n, _, bb) in cells)}
    if "batch" in best:
      for other in ("none", "layer"):
        if other in best:
          line = _claim(
              cells, f"BN's best variant ({best['batch']}) beats "
              f"{NORM_NAMES[other]}'s best ({best[other]})",
              ("batch", best["batch"], b), (other, best[other], b))
          out.append(line)
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
  fig = report._figure(size)  # pylint: disable=protected-access
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
  report._save(fig, path)  # pylint: disable=protected-access
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


def transfer_section(studies, out: Path) -> str:
  """The section: setup, table, figure (written into `out`), verdicts."""
  page = _page()
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
      "Each claim below holds where the difference is beyond seed noise "
      f"({page.NOISE_SE:g} standard errors) in its favour.",
      *verdicts(results), ""]
  return "\n".join(text)

