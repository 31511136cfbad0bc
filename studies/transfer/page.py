"""The transfer-learning study's section of docs/studies.md (and the report
the study's report writes, bn_lab.page.section_report): the accuracies,
the convex probe's convergence, the frozen features' rank and saturation,
a figure, and the claims judged, computed from results.json
(studies.transfer.transfer).

Where only the readout trains (frozen, recomputed*), a cell's score is the
convex probe's (studies.transfer.probe: logistic regression solved to a
gradient tolerance), not the Adam readout's, which is shown beside it: a
comparison of feature sets must not be one of optimizers stopped early.

The claims (`claims`), per labeled budget: recomputing BN's statistics
against frozen ones (AdaBN's operation, in a label shift), fine-tuning
against frozen features and against training from scratch (Yosinski et
al. 2014), BN against LayerNorm and no norm (frozen, fine-tuned, and each
norm's best variant, picked on the validation images). Every comparison is
within one budget, where seed i of every cell trains on the same labeled
subset in the same order from the same random keys (and, within one norm,
the pretrained variants start from the same pretrained network): paired t
tests over seeds. All of the section's comparisons are one Holm family
(bn_lab.page.in_one_family); a verdict is "supported", "contradicted" or
"not resolved at this power" (bn_lab.page.claim_verdict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

NORM_NAMES = {"batch": "BN", "layer": "LayerNorm", "none": "no norm"}
VARIANT_NAMES = {
    "frozen": "frozen features",
    "recomputed": "statistics recomputed on the budget",
    "recomputed_unlabeled": "statistics recomputed on the unlabeled pool",
    "trained": "fine-tuned (every layer)",
    "scratch": "from scratch (no pretraining)",
}
# Variants in which only the readout trains: scored by the convex probe.
READOUT_ONLY = ("frozen", "recomputed", "recomputed_unlabeled")

Key = tuple  # (norm, variant, budget)


def variant_name(norm: str, variant: str) -> str:
  """A table row's label; only BN has a training mode worth naming (the
  other norms compute the same thing in training and in eval)."""
  if norm == "batch" and variant == "trained":
    return "fine-tuned (every layer; BN in training mode)"
  return VARIANT_NAMES[variant]


def _by_key(results) -> dict[Key, Mapping[str, Any]]:
  return {(c["norm"], c["variant"], c["budget"]): c
          for c in results["variants"]}


def scores(results, split: str = "test") -> dict[Key, np.ndarray]:
  """Each cell's accuracies on `split` ("test" or "validation"), seed
  order: the convex probe's where only the readout trains, else the
  trained network's."""
  out = {}
  for key, cell in _by_key(results).items():
    source = cell["probe"] if key[1] in READOUT_ONLY else cell
    out[key] = np.asarray(source[f"{split}_accuracy"], np.float64)
  return out


def best_variants(results) -> dict[tuple[str, int], str]:
  """(norm, budget) -> the variant with the highest mean validation
  accuracy (the validation images, never the test set)."""
  validation = scores(results, "validation")
  best: dict[tuple[str, int], str] = {}
  for (norm, variant, budget), acc in validation.items():
    current = best.get((norm, budget))
    if current is None or acc.mean() > validation[(norm, current,
                                                    budget)].mean():
      best[(norm, budget)] = variant
  return best


class Claim(NamedTuple):
  claim: str  # the paper's claim, or the study's question
  setting: str  # ours, and how it differs
  a: Key
  b: Key
  expected: int  # +1: a above b


LABEL_SHIFT = ("0-4 -> 5-9 is a label shift (new classes), not AdaBN's "
               "covariate shift of the same classes")


def pool_images(transfer: Mapping[str, Any]) -> int:
  """The unlabeled images recomputed_unlabeled reads: the pool in whole
  chunks (the last partial chunk is left out)."""
  chunk = transfer["recompute_chunk"]
  return transfer["target_train_images"] // chunk * chunk


def claims(results) -> list[Claim]:
  """The claims the results' cells allow, budget by budget, in a fixed
  order."""
  cells = scores(results)
  best = best_variants(results)
  tr = results["transfer"]
  out = []
  for b in results["budgets"]:
    labels = f"{b:,} labels"
    mine = [
        Claim("AdaBN (Li et al. 2016): BN's statistics recomputed on the "
              "target's images improve accuracy on the target",
              f"{labels}; {LABEL_SHIFT}; statistics recomputed on the "
              "budget's images − the pretraining's (convex probe on each)",
              ("batch", "recomputed", b), ("batch", "frozen", b), 1),
        Claim("AdaBN, with the statistics of many unlabeled target images",
              f"{labels}; {LABEL_SHIFT}; statistics recomputed on "
              f"{pool_images(tr):,} unlabeled images of 5-9 − the "
              "pretraining's (convex probe on each)",
              ("batch", "recomputed_unlabeled", b), ("batch", "frozen", b),
              1),
        Claim("Yosinski et al. (2014): fine-tuning the transferred layers "
              "beats keeping them frozen",
              f"{labels}; BN; every layer by Adam − the convex probe on the "
              "frozen features", ("batch", "trained", b),
              ("batch", "frozen", b), 1),
        Claim("Yosinski et al. (2014): transfer with fine-tuning beats "
              "training on the target task alone",
              f"{labels}; BN; fine-tuned − from scratch on the budget",
              ("batch", "trained", b), ("batch", "scratch", b), 1)]
    for other in ("layer", "none"):
      mine.append(Claim(
          f"The study's question (no paper claim): BN's frozen features "
          f"transfer better than {NORM_NAMES[other]}'s",
          f"{labels}; convex probe on each norm's frozen features",
          ("batch", "frozen", b), (other, "frozen", b), 1))
    for other in ("layer", "none"):
      mine.append(Claim(
          f"The study's question: BN fine-tunes better than "
          f"{NORM_NAMES[other]}",
          f"{labels}; both fine-tuned", ("batch", "trained", b),
          (other, "trained", b), 1))
    for other in ("layer", "none"):
      if ("batch", b) in best and (other, b) in best:
        x, y = best[("batch", b)], best[(other, b)]
        mine.append(Claim(
            f"The study's question: BN's best variant beats "
            f"{NORM_NAMES[other]}'s best",
            f"{labels}; each picked on the {tr['target_validation_images']:,}"
            f" validation images: BN {VARIANT_NAMES[x]}, "
            f"{NORM_NAMES[other]} {VARIANT_NAMES[y]}", ("batch", x, b),
            (other, y, b), 1))
    out += [c for c in mine if c.a in cells and c.b in cells]
  return out


def is_paired(a: Key, b: Key) -> bool:
  """Cells of one budget pair seed by seed: seed i of each trains on the
  same labeled subset, in the same order, from the same random keys
  (transfer.TRANSFER_SEED_OFFSET + seed i), whatever its norm or
  variant."""
  return a[2] == b[2]


def claim_rows(family: page.Family, results,
               ) -> tuple[list[list[str]], int]:
  """The claims table's rows and the family's size; each distinct pair
  (a, b) is compared once (two claims may name one pair) and the family
  corrects them together."""
  cells = scores(results)
  compared: dict[tuple[Key, Key], stats.Comparison] = {}
  rows = []
  for claim in claims(results):
    pair = (claim.a, claim.b)
    if pair not in compared:
      compared[pair] = family.compare(
          cells[claim.a], cells[claim.b], paired=is_paired(*pair),
          label=f"{claim.a} - {claim.b}")
    c = compared[pair]
    test = (f"paired t, {c.n_a} seeds" if c.paired
            else f"Welch, {c.n_a} and {c.n_b} seeds")
    rows.append([claim.claim, claim.setting,
                 f"{100 * cells[claim.a].mean():.2f} − "
                 f"{100 * cells[claim.b].mean():.2f}%: {page.judged(c)}; "
                 f"{test}", f"**{page.claim_verdict(c, claim.expected)}**"])
  return rows, len(compared)


def results_table(results: Mapping[str, Any]) -> str:
  """norm x variant rows, a column per budget: "test (train)" accuracy, %,
  mean +- sample std over seeds (train: the probe's on the whole budget,
  or the last pass over the budget in the training step's mode). Each
  readout-only variant twice: its convex probe (the score) and the Adam
  readout trained as the network would be."""
  by_key = _by_key(results)
  budgets = results["budgets"]

  def entry(cell, source) -> str:
    return (f"{page.percent(source['test_accuracy'])} "
            f"({100 * np.mean(source['train_accuracy']):.1f})")

  lines = []
  for norm in results["norms"]:
    for variant in VARIANT_NAMES:
      keys = [(norm, variant, b) for b in budgets]
      if not any(k in by_key for k in keys):
        continue
      name = f"{NORM_NAMES.get(norm, norm)}"
      if variant in READOUT_ONLY:
        lines.append([name, f"{variant_name(norm, variant)}: convex probe"]
                     + [entry(by_key[k], by_key[k]["probe"]) if k in by_key
                        else "-" for k in keys])
        lines.append([name, f"{variant_name(norm, variant)}: Adam readout"]
                     + [entry(by_key[k], by_key[k]) if k in by_key else "-"
                        for k in keys])
      else:
        lines.append([name, variant_name(norm, variant)]
                     + [entry(by_key[k], by_key[k]) if k in by_key else "-"
                        for k in keys])
  return page.table(["norm", "variant"]
                    + [f"{b:,} labeled" for b in budgets], lines)


def probe_table(results: Mapping[str, Any]) -> str:
  """Per readout-only cell: the penalties chosen, the largest iteration
  count and final gradient norm over seeds, whether every fit converged,
  and the probe's and the Adam readout's training accuracy."""
  lines = []
  for key, cell in _by_key(results).items():
    if key[1] not in READOUT_ONLY:
      continue
    p = cell["probe"]
    chosen = sorted(set(p["l2"]))
    lines.append([
        NORM_NAMES.get(key[0], key[0]), VARIANT_NAMES[key[1]],
        f"{key[2]:,}", ", ".join(f"{v:g}" for v in chosen),
        f"{max(p['iterations']):,}", f"{max(p['gradient_norm']):.1e}",
        f"{sum(p['converged'])}/{len(p['converged'])}",
        f"{100 * np.mean(p['train_accuracy']):.1f}",
        f"{100 * np.mean(cell['train_accuracy']):.1f}"])
  return page.table(["norm", "features", "budget", "L2 chosen",
                     "iterations (max)", "final gradient L2 norm (max)",
                     "converged", "probe train acc. %",
                     "Adam readout train acc. %"], lines)


def _mean_std(values, digits: int = 1) -> str:
  values = np.asarray(values, np.float64)
  std = values.std(ddof=1) if values.size > 1 else 0.0
  return f"{values.mean():.{digits}f} +- {std:.{digits}f}"


def features_table(results: Mapping[str, Any]) -> str:
  """The last hidden layer's effective and numerical rank and each hidden
  layer's saturated fraction, on the validation images, mean +- std over
  the seeds' networks. Features that do not depend on the budget (frozen,
  the unlabeled pool) once; those recomputed on the budget per budget."""
  lines = []
  width = results["network"]["widths"][-1]
  for key, cell in _by_key(results).items():
    if key[1] not in READOUT_ONLY:
      continue
    if key[1] != "recomputed" and key[2] != results["budgets"][0]:
      continue  # the same features at every budget
    f = cell["features"]
    saturated = f["saturated"]
    layers = ("-" if saturated[0] is None else " / ".join(
        _mean_std(100 * np.asarray(s), 1) for s in np.transpose(saturated)))
    where = (f" ({key[2]:,} images)" if key[1] == "recomputed" else "")
    lines.append([NORM_NAMES.get(key[0], key[0]),
                  VARIANT_NAMES[key[1]] + where,
                  _mean_std(f["effective_rank"]),
                  _mean_std(f["numerical_rank"]), layers])
  numbers = " / ".join(str(i + 1)
                       for i in range(len(results["network"]["widths"])))
  return page.table([
      "norm", "features", f"effective rank (of {width})",
      "numerical rank", f"saturated % (layer {numbers})"], lines)


def plot_transfer(results: Mapping[str, Any], path: Path | None = None):
  """Target test accuracy (%) of each variant (the probe's where only the
  readout trains), grouped by norm, a panel per labeled budget: the mean
  over seeds with sample-std error bars, and each seed as a dot. The y
  axis is not from 0, so that the variants' gaps show (points, not bars,
  for that reason)."""
  cells = scores(results)
  budgets, norms = results["budgets"], results["norms"]
  variants = [v for v in VARIANT_NAMES if any(k[1] == v for k in cells)]
  width = 0.8 / len(variants)
  fig = report.new_figure((5 * len(budgets), 4.2))
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
  report.save_figure(fig, path)
  return fig


def _plot_variant(ax, cells, norms, variant, budget, offset, color) -> None:
  """One variant's mean +- std (and seeds) at each norm that ran it."""
  present = [(i, n) for i, n in enumerate(norms)
             if (n, variant, budget) in cells]
  if not present:
    return
  xs = [i + offset for i, _ in present]
  accs = [100 * cells[(n, variant, budget)] for _, n in present]
  stds = [a.std(ddof=1) if a.size > 1 else 0.0 for a in accs]
  label = VARIANT_NAMES[variant] + (" (probe)" if variant in READOUT_ONLY
                                    else "")
  ax.errorbar(xs, [a.mean() for a in accs], yerr=stds, fmt="o", ms=5,
              capsize=3, color=color, label=label)
  for x, a in zip(xs, accs):
    ax.scatter(np.full(a.size, x), a, s=6, color=color, alpha=0.4,
               zorder=3)


def readout_table(results: Mapping[str, Any]) -> str:
  """Frozen features per norm and budget: the Adam readout's and the
  probe's training and test accuracy, and the training accuracy of the fit
  at the grid's smallest penalty (how much of the budget the features can
  fit at all), means over seeds, %."""
  smallest = min(results["transfer"]["probe"]["l2_grid"])
  lines = []
  for (norm, variant, budget), cell in _by_key(results).items():
    if variant != "frozen":
      continue
    p = cell["probe"]
    mean = lambda values: f"{100 * np.mean(values):.1f}"
    lines.append([NORM_NAMES.get(norm, norm), f"{budget:,}",
                  mean(cell["train_accuracy"]), mean(cell["test_accuracy"]),
                  mean(p["train_accuracy"]), mean(p["test_accuracy"]),
                  mean(p["least_penalty_train_accuracy"])
                  + ("" if all(p["least_penalty_converged"])
                     else " (not all converged)")])
  return page.table(["norm", "budget", "Adam readout: train",
                     "Adam readout: test", "probe: train", "probe: test",
                     f"probe at L2 {smallest:g}: train"], lines)


def section(studies, out: Path) -> str:
  """The section: setup, tables, figure (written into `out`), claims."""
  study = studies[0]
  results = study["results"]
  net = results["network"]
  pre = results["pretrain"]
  tr = results["transfer"]
  pr = tr["probe"]
  first = results["norms"][0]
  source_acc = "; ".join(
      f"{NORM_NAMES.get(n, n)} {page.percent(pre[n]['test_accuracy'])}%"
      for n in results["norms"])
  rows, size = page.in_one_family(
      lambda family: claim_rows(family, results))
  text = [
      "## Transfer learning with BN: digits 0-4 -> 5-9\n",
      page.provenance_markdown(studies),
      f"MLP 784 -> {' -> '.join(map(str, net['widths']))} -> readout, "
      f"{net['activation']}, the normalization {net['placement']} "
      f"(BN momentum {net['momentum']}, epsilon {net['epsilon']:g}), "
      f"{len(results['seeds'])} seeds. Pretrained on digits "
      f"{results['source_classes']} with Adam({pre['learning_rate']:g}), "
      f"{pre[first]['steps']:,} steps of batch {pre[first]['batch_size']} "
      f"(source test accuracy: {source_acc}). "
      f"{tr['target_validation_images']:,} of the training images of "
      f"{results['target_classes']} are held out as validation images "
      f"(seed {tr['validation_seed']}); each seed's labeled budget (the "
      "same number per class) is drawn from the other "
      f"{tr['target_train_images']:,} (the unlabeled pool). Variants, each "
      "with a fresh 5-way readout: **frozen** (the hidden layers in eval "
      "mode with the pretraining's running statistics), **statistics "
      "recomputed** (each BN layer's mean and variance recomputed exactly, "
      "layer by layer, on the budget's images or on "
      f"{pool_images(tr):,} images of the unlabeled pool in chunks of "
      f"{tr['recompute_chunk']:,}: AdaBN's operation), **fine-tuned** "
      "(every layer by "
      f"Adam({tr['learning_rate']:g}), {tr['steps']:,} steps of batch "
      f"{tr['batch_size']} or the budget, BN in training mode) and **from "
      "scratch** (the same, from a fresh initialization).\n",
      "Where only the readout trains, the score is a **convex probe**: "
      "multinomial logistic regression on the last hidden layer's outputs "
      "(eval mode), a bias per class and an L2 penalty on the weights "
      f"chosen from {', '.join(f'{v:g}' for v in pr['l2_grid'])} by "
      f"{pr['folds']}-fold stratified cross-validation on the budget alone "
      "(held-out cross-entropy), solved in float64 by scipy's L-BFGS until "
      f"the largest gradient entry is below {pr['gradient_tolerance']:g} "
      f"(at most {pr['max_iterations']:,} iterations). The Adam readout "
      f"the network would get ({tr['steps']:,} steps of "
      f"Adam({tr['readout_learning_rate']:g})) is shown beside it. Target "
      f"test accuracy on the {tr['target_test_images']:,} test images of "
      "5-9, mean +- sample std over seeds (%), and in parentheses the mean "
      "training accuracy on the budget (the probe's; the last pass, in the "
      "training step's mode, for the others):\n",
      results_table(results),
      "The probe's fits (the penalties chosen across seeds; the largest "
      "iteration count and final gradient norm of the seeds' fits; how "
      "many met the tolerance):\n",
      probe_table(results),
      "Frozen features: the Adam readout against the probe, and how much "
      "of the budget a fit at the smallest penalty reaches (the chosen "
      "penalty trades training fit for held-out loss, so the probe's own "
      "training accuracy is no ceiling); mean accuracy over seeds, %:\n",
      readout_table(results),
      f"The features the probe reads, on the {tr['target_validation_images']:,}"
      " validation images: the last hidden layer's effective rank (exp of "
      "the entropy of its centred singular values, normalized to sum to "
      "1) and numerical rank (singular values above 1e-3 of the largest), "
      "and the fraction of each hidden layer's sigmoid outputs below "
      f"{pr['saturation']:g} or above {1 - pr['saturation']:g}; mean +- "
      "sample std over the seeds' networks:\n",
      features_table(results),
      page.figure(out, f"{study['label']}.png",
                  lambda p: plot_transfer(results, p),
                  "target test accuracy per variant, by norm and budget"),
      "**The setting is a label shift.** Digits 0-4 -> 5-9 changes the "
      "classes; the images' distribution changes with them, but AdaBN's "
      "premise, a covariate shift of the same classes (the same labels, "
      "new input statistics), is not this setting. The recomputation rows "
      "below therefore test whether the new classes' statistics help a new "
      "readout, not AdaBN's claim where it was made (the real-shift "
      "section above tests that).\n",
      "Fine-tuning and training from scratch run a fixed "
      f"{tr['steps']:,} Adam steps at {tr['learning_rate']:g}, neither "
      "tuned nor early-stopped (their training accuracy is in the first "
      "table): a claim that involves them could move with another budget "
      "or rate. The probe has no such budget: it is the optimum.\n",
      f"Claims ({size} comparisons in one Holm family; effects in "
      "percentage points of target test accuracy, a − b, 95% t interval; "
      "paired over seeds, as every cell of a budget trains seed i on the "
      "same labeled subset in the same order from the same keys, and "
      "within one norm from the same pretrained network):\n",
      page.claims_table(rows), ""]
  return "\n".join(text)
