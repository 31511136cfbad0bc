"""The studies page's section on the learning-rate range (studies/lr_range/config.py).

Final test accuracy against the learning rate with and without BN, which
runs diverged (their rows' `diverged_at`, from nan_guard="record"), and
the verdicts on Bjorck et al. (2018), computed from the recorded runs: BN
permits larger learning rates, and its benefit comes from them (little or
none when both networks use the same small rate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

BN, PLAIN = "before_activation", "none"
NAMES = {PLAIN: "no BN", BN: "BN"}


def final_runs(rows: Sequence[Mapping[str, Any]],
               ) -> dict[str, dict[float, list[Mapping[str, Any]]]]:
  """placement -> learning rate -> each run's last row (seed order)."""
  out: dict[str, dict[float, list]] = {}
  for combo_rows in page.by_combo(rows).values():
    for row in page.final_rows(combo_rows):
      out.setdefault(row["placement"], {}).setdefault(
          row["learning_rate"], []).append(row)
  return out


def trains(run: Mapping[str, Any], threshold: float) -> bool:
  """A run trains when it did not diverge and its final test accuracy
  reaches `threshold` (a run frozen by the NaN guard counts as failed
  whatever its frozen weights score)."""
  return run.get("diverged_at") is None and run["test_accuracy"] >= threshold


def largest_training_rate(by_rate: Mapping[float, Sequence[Mapping]],
                          threshold: float) -> float | None:
  """The largest learning rate at which every seed trains; None if none."""
  ok = [lr for lr, runs in by_rate.items()
        if all(trains(r, threshold) for r in runs)]
  return max(ok) if ok else None


def best_rate(by_rate: Mapping[float, Sequence[Mapping]]) -> float:
  """The learning rate of the highest mean final test accuracy."""
  return max(by_rate, key=lambda lr: np.mean(
      [r["test_accuracy"] for r in by_rate[lr]]))


def _accuracies(runs) -> list[float]:
  return [r["test_accuracy"] for r in runs]


def _diverged(runs) -> str:
  steps = [r["diverged_at"] for r in runs if r.get("diverged_at") is not None]
  if not steps:
    return "-"
  return (", ".join(f"{s:,}" for s in sorted(steps))
          + f" ({len(steps)}/{len(runs)})")


def _check_small_rate(config: Mapping[str, Any], rates) -> float:
  small = config["lr_range"]["small_learning_rate"]
  if small not in rates:
    raise report.ReportError(
        f"config.lr_range.small_learning_rate={small!r} is not one of the "
        f"learning rates trained ({', '.join(f'{r:g}' for r in rates)}); "
        "choose a grid point of config.sweep.learning_rate.")
  return small


def section(studies, out: Path) -> str:
  study = studies[0]
  config, rows = study["config"], study["rows"]
  finals = final_runs(rows)
  missing = [p for p in (PLAIN, BN) if p not in finals]
  if missing:
    raise report.ReportError(
        f"{study['path']}: no runs with placement {', '.join(missing)}; the "
        "learning-rate section compares placements none and "
        "before_activation (studies/lr_range/config.py).")
  rates = sorted(set(finals[PLAIN]) & set(finals[BN]))
  small = _check_small_rate(config, rates)
  threshold = config["lr_range"]["trains_at"]
  steps = max(r["step"] for r in rows)
  text = [
      "## The learning-rate range (Bjorck et al. 2018)\n",
      page.provenance_markdown(studies),
      f"MLP 784 -> {len(config['widths'])} x (Dense({config['widths'][0]}) "
      f"-> [BN] -> {config['activation']}) -> Dense(10), plain SGD (no "
      f"momentum), batch {config['batch_size']}, {config['num_epochs']} "
      f"epochs ({steps:,} steps), {len(config['seeds'])} seeds, one data "
      f"order; {len(rates)} learning rates from {rates[0]:g} to "
      f"{rates[-1]:g}, each network's runs one vmapped sweep. BN before "
      f"each {config['activation']} (epsilon {config['bn']['epsilon']:g}). "
      "A run whose loss or weights turn NaN/inf"
      + (f", or whose loss passes {config['divergence_factor']:g} x ln(10) "
         "(config.divergence_factor)," if config.get("divergence_factor")
         else "") + " is frozen at its last finite state "
      "(nan_guard=\"record\"); \"diverged at\" is the global step of its "
      "first such update. A run *trains* when it did not "
      f"diverge and ends at >= {100 * threshold:g}% test accuracy. Final "
      "test accuracy in eval mode, mean +- sample std over seeds.\n"]
  family = comparisons(finals, rates)
  lines = []
  for lr in rates:
    plain, bn = finals[PLAIN][lr], finals[BN][lr]
    lines.append([f"{lr:g}" + (" (small pair)" if lr == small else ""),
                  page.percent(_accuracies(plain)), _diverged(plain),
                  page.percent(_accuracies(bn)), _diverged(bn),
                  page.judged(family[lr, lr], unit="")])
  text.append(page.table(
      ["learning rate", "no BN: test acc", "no BN: diverged at",
       "BN: test acc", "BN: diverged at", "BN - no BN (points)"], lines))
  text.append(
      "BN - no BN: Welch's t test over seeds (the two networks differ, so "
      "a seed shares no initialization), at every rate and with each at "
      "its best rate, one Holm family; a diverged run counts with the "
      "accuracy its frozen weights score.\n")
  text.append(page.figure(
      out, f"{study['label']}.png",
      lambda p: plot_lr_range(finals, rates, small, threshold, p),
      "final test accuracy against the learning rate"))
  text.append(_verdicts(finals, rates, small, threshold, family))
  return "\n".join(text)


def comparisons(finals, rates) -> dict[tuple[float, float], Any]:
  """The section's family, Holm-corrected: (BN rate, no-BN rate) -> BN's
  final test accuracies against no BN's (Welch), at every rate (lr, lr)
  and with each at its best rate (once, where the best rates differ)."""
  best = {p: best_rate({lr: finals[p][lr] for lr in rates})
          for p in (PLAIN, BN)}
  pairs = [(lr, lr) for lr in rates]
  if (best[BN], best[PLAIN]) not in pairs:
    pairs.append((best[BN], best[PLAIN]))
  return dict(zip(pairs, stats.holm_family(
      stats.welch(_accuracies(finals[BN][b]), _accuracies(finals[PLAIN][p]),
                  label=f"BN at {b:g} - no BN at {p:g}")
      for b, p in pairs)))


def _verdicts(finals, rates, small, threshold, family) -> str:
  largest = {p: largest_training_rate(
      {lr: finals[p][lr] for lr in rates}, threshold) for p in (PLAIN, BN)}
  first_nan = {p: next((lr for lr in rates if any(
      r.get("diverged_at") is not None for r in finals[p][lr])), None)
               for p in (PLAIN, BN)}
  show = lambda lr: "none" if lr is None else f"{lr:g}"
  wider = (largest[BN] is not None
           and (largest[PLAIN] is None or largest[BN] > largest[PLAIN]))
  lines = [
      f"* **BN permits larger learning rates: "
      f"{'holds' if wider else 'does not hold'}.** The largest rate at "
      f"which every seed trains: {show(largest[BN])} with BN, "
      f"{show(largest[PLAIN])} without"
      + (f" ({largest[BN] / largest[PLAIN]:.3g}x)" if wider and largest[PLAIN]
         else "")
      + f". First rate with a diverged (NaN) run: {show(first_nan[BN])} "
      f"with BN, {show(first_nan[PLAIN])} without."]
  best = {p: best_rate({lr: finals[p][lr] for lr in rates})
          for p in (PLAIN, BN)}
  at_best = family[best[BN], best[PLAIN]]
  at_small = family[small, small]
  best_acc = {p: _accuracies(finals[p][best[p]]) for p in (PLAIN, BN)}
  lines.append(
      f"* **Each at its best rate:** BN {page.percent(best_acc[BN])} at "
      f"{best[BN]:g}, no BN {page.percent(best_acc[PLAIN])} at "
      f"{best[PLAIN]:g}: BN - no BN {page.judged(at_best)}.")
  # "Little or no benefit": BN no better on average, or not beyond noise.
  little = ("holds" if at_small.diff <= 0 else
            "undetermined" if stats.verdict(at_small) == "undetermined" else
            "does not hold" if at_small.significant else "holds")
  lines.append(
      f"* **Little or no benefit from BN at the same small rate ({small:g}): "
      f"{little}.** BN "
      f"{page.percent(_accuracies(finals[BN][small]))} against "
      f"{page.percent(_accuracies(finals[PLAIN][small]))}: "
      f"{page.judged(at_small)}; "
      f"against {100 * at_best.diff:+.2f} with each at its best rate; "
      + ("BN's advantage is larger at the small rate than at the best "
         "rates, so here it does not come only from the larger rates."
         if at_small.diff > at_best.diff else
         "BN's advantage at the small rate is no larger than at the best "
         "rates."))
  return "\n".join(lines) + "\n"


def plot_lr_range(finals, rates, small: float, threshold: float,
                  path: Path | None = None):
  """Final test accuracy (%) against the learning rate (log x): the mean
  over seeds, a band from the lowest to the highest seed, an x where a run
  diverged; the small pair's rate dotted, the "trains" threshold dashed."""
  fig = report.new_figure((7, 4.2))  # pylint: disable=protected-access
  ax = fig.subplots()
  for i, placement in enumerate((PLAIN, BN)):
    accs = np.array([[100 * a for a in _accuracies(finals[placement][lr])]
                     for lr in rates])
    color = f"C{i}"
    ax.plot(rates, accs.mean(1), marker="o", ms=3, color=color,
            label=NAMES[placement])
    ax.fill_between(rates, accs.min(1), accs.max(1), color=color, alpha=0.2)
    bad = [(lr, np.mean(a)) for lr, a in zip(rates, accs) if any(
        r.get("diverged_at") is not None for r in finals[placement][lr])]
    if bad:
      ax.scatter(*zip(*bad), marker="x", s=60, color=color, zorder=3,
                 label=f"{NAMES[placement]}: a run diverged")
  ax.axvline(small, color="grey", ls=":", lw=1,
             label=f"small pair ({small:g})")
  ax.axhline(100 * threshold, color="grey", ls="--", lw=1,
             label=f"trains ({100 * threshold:g}%)")
  ax.set(xscale="log", xlabel="learning rate (plain SGD)",
         ylabel="final test accuracy (%)", ylim=(0, 100),
         title="mean over seeds, band: min to max")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  report.save_figure(fig, path)  # pylint: disable=protected-access
  return fig
