"""The real-shift study's section (studies.real_shift.real_shift): per
direction a table of target accuracy by method and adaptation batch size
(95% t intervals over seeds), the in-domain accuracies and the ceiling, a
figure, and the papers' claims judged.

The claims (`CLAIMS`), each a comparison on the BN nets of one direction:
  AdaBN (Li et al. 2016): target statistics beat the source statistics;
  TENT (Wang et al. 2021): adapting BN's scale and bias by entropy
    minimization beats the source statistics, test-batch statistics (the
    paper's "BN" baseline) and AdaBN, at each adaptation batch size;
  small batches: test-batch statistics at a smaller batch are worse than
    at the largest one.
Each compares the same trained nets evaluated two ways (the same seeds):
paired t tests. The GN and LN nets are other nets: Welch's t test against
BN's (no paper claim; references). All of the section's comparisons are
one Holm family (bn_lab.page.in_one_family); a verdict is "supported",
"contradicted" or "not resolved at this power" (bn_lab.page.claim_verdict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

PRETTY = {"printed_digits": "printed digits", "mnist": "MNIST"}
NORM_NAMES = {"batch": "BN", "group": "GN", "layer": "LN"}
METHOD_NAMES = {"source": "source statistics (eval mode)",
                "source_precise": "source statistics recomputed (PreciseBN)",
                "adabn": "AdaBN (target statistics)",
                "test_batch": "test-batch statistics", "tent": "TENT (online)"}
# claim key -> (the paper's claim, method a, method b, expected sign of a - b)
CLAIMS = {
    "adabn": ("AdaBN (Li et al. 2016): recomputing BN's statistics on "
              "the target improves target accuracy", "adabn", "source", 1),
    "adabn_precise": ("AdaBN, against the source statistics recomputed "
                      "the same way on source images (our control for "
                      "stale running averages)", "adabn", "source_precise",
                      1),
    "tent_source": ("TENT (Wang et al. 2021): entropy minimization of BN's "
                    "scale and bias on target batches improves target "
                    "accuracy", "tent", "source", 1),
    "tent_test_batch": ("TENT beats test-batch statistics (the paper's "
                        "\"BN\" baseline) at the same batches", "tent",
                        "test_batch", 1),
    "tent_adabn": ("TENT beats BN adaptation (AdaBN's statistics)", "tent",
                   "adabn", 1),
    "small_batch": ("At small batches test-batch statistics degrade "
                    "(against the largest batch)", "test_batch",
                    "test_batch", -1),
}

Table = dict  # (direction, norm, method, batch_size) -> (K,) in seed order


def accuracy_table(rows: Sequence[Mapping[str, Any]]) -> Table:
  """(direction, norm, method, batch_size) -> the accuracies, seed order."""
  table: dict[tuple, list] = {}
  for row in sorted(rows, key=lambda r: r["seed"]):
    key = (row["direction"], row["norm"], row["method"], row["batch_size"])
    table.setdefault(key, []).append(row["accuracy"])
  return {k: np.asarray(v) for k, v in table.items()}


def batch_sizes(acc: Table) -> list[int]:
  return sorted({k[3] for k in acc if k[3] is not None})


def _pretty(direction: str, directions: Mapping[str, Sequence[str]]) -> str:
  source, target = directions[direction]
  return f"{PRETTY.get(source, source)} → {PRETTY.get(target, target)}"


def _cell(values) -> str:
  return page.interval(values, 100.0, 1)


def ceiling(acc: Table, directions, direction: str, norm: str = "batch"):
  """The accuracies of nets of `norm` trained on this direction's target,
  on all of its test set (the reverse direction's in-domain rows), or
  None where the reverse direction did not run."""
  source, target = directions[direction]
  for other, (s, t) in directions.items():
    if (s, t) == (target, source):
      return acc.get((other, norm, "in_domain", None))
  return None


def direction_table(acc: Table, directions, direction: str,
                    norms: Sequence[str]) -> str:
  """Target accuracy (%) by method (rows) and adaptation batch size
  (columns); a batch-independent method fills the "any" column."""
  sizes = batch_sizes(acc)
  lines = []
  for method in ("source", "source_precise", "adabn", "test_batch", "tent"):
    if method in ("test_batch", "tent"):
      cells = ["·"] + [_cell(acc[(direction, "batch", method, b)])
                       for b in sizes]
    else:
      cells = [_cell(acc[(direction, "batch", method, None)])] + [
          "·"] * len(sizes)
    lines.append([f"BN, {METHOD_NAMES[method]}", *cells])
  for norm in norms:
    if norm != "batch":
      lines.append([f"{NORM_NAMES[norm]} net (as it is)",
                    _cell(acc[(direction, norm, "source", None)]),
                    *["·"] * len(sizes)])
  top = ceiling(acc, directions, direction)
  if top is not None:
    lines.append(["BN net trained on the target (ceiling; all of its test "
                  "set)", _cell(top), *["·"] * len(sizes)])
  return page.table(["method", "any batch",
                     *[f"B = {b}" for b in sizes]], lines)


def _comparisons(family, acc: Table, direction: str, norms, sizes):
  """The direction's comparisons, in a fixed order: {claim: {B or None:
  Comparison}} and the references {(norm, bn method): Comparison}."""
  get = lambda method, b=None, norm="batch": acc[(direction, norm, method,
                                                  b)]
  label = lambda text: f"{direction}: {text}"
  claims = {key: {None: family.compare(
      get("adabn"), get(other), paired=True,
      label=label(f"adabn - {other}"))}
            for key, other in (("adabn", "source"),
                               ("adabn_precise", "source_precise"))}
  for key, b_method in (("tent_source", "source"),
                        ("tent_test_batch", "test_batch"),
                        ("tent_adabn", "adabn")):
    claims[key] = {b: family.compare(
        get("tent", b), get(b_method, b if b_method == "test_batch"
                            else None), paired=True,
        label=label(f"tent - {b_method} at B={b}")) for b in sizes}
  largest = max(sizes)
  claims["small_batch"] = {b: family.compare(
      get("test_batch", b), get("test_batch", largest), paired=True,
      label=label(f"test_batch B={b} - B={largest}"))
      for b in sizes if b != largest}
  references = {}
  for norm in norms:
    if norm == "batch":
      continue
    for method in ("source", "adabn"):
      references[(norm, method)] = family.compare(
          get("source", norm=norm), get(method), paired=False,
          label=label(f"{norm} - batch {method}"))
  return claims, references


def _effect(c: stats.Comparison) -> str:
  """"+3.1 [+1.2, +5.0] points (Holm p 0.012)"."""
  if not np.isfinite(c.p):
    return f"{100 * c.diff:+.1f} points, undetermined"
  p = c.p if c.p_holm is None else c.p_holm
  p = "< 0.001" if p < 0.001 else f"{p:.2g}"
  return (f"{100 * c.diff:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}] "
          f"points (Holm p {p})")


def _grouped_verdict(by_size: Mapping[Any, stats.Comparison],
                     expected: int) -> str:
  """One claim's verdicts over the batch sizes, grouped: "supported at
  B = 16, 64; not resolved at this power at B = 1"."""
  verdicts = {b: page.claim_verdict(c, expected) for b, c in by_size.items()}
  if list(verdicts) == [None]:
    return f"**{verdicts[None]}**"
  parts = []
  for v in page.CLAIM_VERDICTS:
    bs = [b for b, got in verdicts.items() if got == v]
    if bs:
      parts.append(f"**{v}** at B = {', '.join(map(str, bs))}")
  return "; ".join(parts)


def claim_rows(family, acc, directions, norms) -> tuple[list, list, int]:
  """The claims table's rows, the reference lines and the family's size,
  every direction."""
  rows, refs = [], []
  sizes = batch_sizes(acc)
  for direction in directions:
    if not any(k[0] == direction for k in acc):
      continue
    claims, references = _comparisons(family, acc, direction, norms, sizes)
    where = _pretty(direction, directions)
    for key, by_size in claims.items():
      if not by_size:  # one batch size: no smaller one to compare
        continue
      text, a, b, expected = CLAIMS[key]
      effect = "; ".join(
          (f"B = {bs}: " if bs is not None else "") + _effect(c)
          for bs, c in by_size.items())
      setting = (f"{where}; test-batch statistics at B − at B = "
                 f"{max(sizes)}" if key == "small_batch" else
                 f"{where}; {METHOD_NAMES[a]} − {METHOD_NAMES[b]}")
      rows.append([text, setting, effect,
                   _grouped_verdict(by_size, expected)])
    for (norm, method), c in references.items():
      refs.append(f"* {where}: {NORM_NAMES[norm]} net − BN with "
                  f"{METHOD_NAMES[method]}: {page.judged(c)} (Welch; no "
                  "paper claim).")
  return rows, refs, len(family.comparisons)


def section(studies, out: Path) -> str:
  study = studies[0]
  res = study["results"]["real_shift"]
  acc = accuracy_table(res["rows"])
  directions = res["directions"]
  norms = res["norms"]
  t, a = res["train"], res["adapt"]
  lrs = ", ".join(f"{v:.3g} at B = {b}"
                  for b, v in a["tent_learning_rates"].items())
  text = [
      "## A real domain shift: printed digits and MNIST\n",
      page.provenance_markdown(studies),
      "Source nets, trained by the run itself (bn_lab.classifier."
      "train_combination): the residual CNN (bn_lab.resnet, "
      f"{6 * t['blocks_per_stage'] + 2} layers, stage widths "
      f"{', '.join(map(str, t['channels']))}, stem stride "
      f"{t['stem_stride']}; a norm after every convolution) with "
      + ", ".join(f"{NORM_NAMES[n]}" + (f" ({t['num_groups']} groups)"
                                        if n == "group" else "")
                  for n in norms)
      + f"; {t['optimizer']} at a fixed {t['learning_rate']:g}, batch "
      f"{t['batch_size']}, {t['num_epochs']} epoch(s) over the first "
      f"{t['train_examples']:,} source training images, BN momentum "
      f"{t['bn_momentum']}, {len(res['seeds'])} seeds (vmapped; each its "
      "own initialization and data order). Nothing is selected: the net "
      "after the last epoch is used, and no test image is looked at "
      "before.\n",
      f"Evaluation: a fixed random subset of {a['eval_examples']:,} target "
      f"test images (seed {a['eval_seed']}, in that stream order), the same "
      "for every method and seed. BN with: **source statistics** (eval "
      "mode); **AdaBN**: the statistics recomputed over the first "
      f"{a['adabn_examples']:,} unlabeled target *training* images, "
      "weights frozen (pooled mean and biased variance), never over an "
      "evaluated image; as a control, **source statistics recomputed "
      "(PreciseBN)**: the same recomputation over the first "
      f"{a['adabn_examples']:,} *source* training images, which separates "
      "the domain from the moving averages' lag behind the weights after "
      "a short training; **test-batch statistics**: each batch of B "
      "normalized by its own statistics; **TENT**: on each batch of B, "
      "predict in training mode, then one Adam step on the mean entropy "
      "of those predictions over BN's scale and bias only, "
      + ("reset before every batch (episodic)" if a["episodic"] else
         "online (the adaptation carried from batch to batch over one "
         "pass of the stream; the accuracy is that of the predictions "
         "made on the way)")
      + f"; step size {a['tent_learning_rate']:g} x B / "
      f"{a['tent_reference_batch']}"
      + (" (linear scaling from TENT's CIFAR setting, Adam 1e-3 at "
         "batch 128; the reference code gives no rule; our choice)"
         if a["tent_lr_scaling"] == "linear" else " at every B")
      + f": {lrs}. GN and LN nets normalize each image on its own and are "
      "evaluated as they are. Cells: target accuracy (%), mean [95% t "
      "interval] over seeds. " + stats.RULE + "\n"]
  for direction in directions:
    if not any(k[0] == direction for k in acc):
      continue
    source, target = directions[direction]
    text.append(f"### {_pretty(direction, directions)}\n")
    text.append(direction_table(acc, directions, direction, norms))
    inside = "; ".join(
        f"{NORM_NAMES[n]} {_cell(acc[(direction, n, 'in_domain', None)])}"
        for n in norms) + (
            "; BN with its statistics recomputed on source training "
            f"images (PreciseBN) "
            f"{_cell(acc[(direction, 'batch', 'in_domain_precise', None)])}")
    text.append(f"In-domain accuracy of the same nets (all "
                f"{res['test_examples'][source]:,} {PRETTY.get(source)} "
                f"test images, eval mode): {inside}.\n")
  text.append(page.figure(
      out, f"{study['label']}.png",
      lambda p: plot_real_shift(acc, directions, norms, p),
      "target accuracy against the adaptation batch size, per method"))
  rows, refs, size = page.in_one_family(
      lambda family: claim_rows(family, acc, directions, norms))
  text.append(f"Verdicts ({size} comparisons in one Holm family; effects "
              "in percentage points of target accuracy, a − b; paired over "
              "the seeds, as both sides are the same trained nets):\n")
  text.append(page.claims_table(rows))
  if refs:
    text.append("References (other nets, so Welch's t test):\n")
    text.append("\n".join(refs) + "\n")
  return "\n".join(text)


def plot_real_shift(acc: Table, directions, norms, path: Path | None = None):
  """Target accuracy (%) against the adaptation batch size (log scale), one
  panel per direction; test batch and TENT as lines with 95% intervals,
  the batch-independent methods (source, PreciseBN, AdaBN, GN, LN,
  ceiling) as
  horizontal lines."""
  shown = [d for d in directions if any(k[0] == d for k in acc)]
  sizes = batch_sizes(acc)
  fig = report.new_figure((5.2 * len(shown), 3.8))
  axes = np.atleast_1d(fig.subplots(1, len(shown), squeeze=False)[0])
  for ax, direction in zip(axes, shown):
    for i, method in enumerate(("test_batch", "tent")):
      means, lows, highs = zip(*(stats.mean_interval(
          acc[(direction, "batch", method, b)]) for b in sizes))
      ax.plot(sizes, 100 * np.asarray(means), marker="o", color=f"C{i}",
              label=f"BN, {METHOD_NAMES[method]}")
      if np.all(np.isfinite(lows)):
        ax.fill_between(sizes, 100 * np.asarray(lows),
                        100 * np.asarray(highs), color=f"C{i}", alpha=0.2)
    flat = [("BN, source statistics", acc[(direction, "batch", "source",
                                            None)], "C2", "-"),
            ("BN, source statistics recomputed (PreciseBN)",
             acc[(direction, "batch", "source_precise", None)], "C8", "-."),
            ("BN, AdaBN", acc[(direction, "batch", "adabn", None)], "C3",
             "-")]
    flat += [(f"{NORM_NAMES[n]} net", acc[(direction, n, "source", None)],
              f"C{4 + j}", "--") for j, n in enumerate(norms) if n != "batch"]
    top = ceiling(acc, directions, direction)
    if top is not None:
      flat.append(("BN trained on the target", top, "k", ":"))
    for name, values, color, style in flat:
      ax.axhline(100 * np.mean(values), color=color, ls=style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("adaptation batch size B")
    ax.set_ylabel("target accuracy (%)")
    ax.set_title(_pretty(direction, directions), fontsize=9)
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=6, loc="lower right")
  report.save_figure(fig, path)
  return fig
