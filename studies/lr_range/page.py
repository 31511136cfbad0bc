"""The studies page's section on the learning-rate range (studies/lr_range/config.py).

Final test accuracy against the learning rate with and without BN, which
runs diverged (their rows' `diverged_at`, from nan_guard="record"), and
the claims of Bjorck et al. (2018), judged on the recorded runs: BN
permits larger learning rates, they give better accuracy, and BN gives
little or no benefit when both networks use the same small rate (compared
at a matched training loss: at a fixed epoch the slower network has not
converged). Selection reads the validation split; the test set reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report

BN, PLAIN = "before_activation", "none"
NAMES = {PLAIN: "no BN", BN: "BN"}
# "Little or no benefit" at the small rate: BN - no BN within this many
# points of test accuracy (the whole 95% interval).
SMALL_RATE_MARGIN = 0.5


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
  """A run trains when it did not diverge and its final validation accuracy
  reaches `threshold` (a run frozen by the NaN guard counts as failed
  whatever its frozen weights score). Validation, not test: this picks the
  rates the claims read."""
  return run.get("diverged_at") is None and run["val_accuracy"] >= threshold


def largest_training_rate(by_rate: Mapping[float, Sequence[Mapping]],
                          threshold: float) -> float | None:
  """The largest learning rate at which every seed trains; None if none."""
  ok = [lr for lr, runs in by_rate.items()
        if all(trains(r, threshold) for r in runs)]
  return max(ok) if ok else None


def best_rate(by_rate: Mapping[float, Sequence[Mapping]]) -> float:
  """The learning rate of the highest mean final validation accuracy."""
  return max(by_rate, key=lambda lr: np.mean(
      [r["val_accuracy"] for r in by_rate[lr]]))


def matched_loss(rows: Sequence[Mapping[str, Any]], small: float):
  """The small pair at a matched training loss, per seed: no BN's loss
  after its last epoch, and the BN run of the same seed at the first epoch
  whose mean training loss is at or below it. Returns (BN's test
  accuracies there, no BN's final ones, BN's epochs, no BN's losses);
  a seed whose BN run never gets there is left out."""
  runs = {}
  for row in rows:
    if row["learning_rate"] == small:
      runs.setdefault((row["placement"], row["seed"]), []).append(row)
  bn_acc, plain_acc, epochs, losses = [], [], [], []
  for (placement, seed), plain in sorted(runs.items()):
    if placement != PLAIN or (BN, seed) not in runs:
      continue
    target = max(plain, key=lambda r: r["epoch"])
    at = next((r for r in sorted(runs[BN, seed], key=lambda r: r["epoch"])
               if r["train_loss"] <= target["train_loss"]), None)
    if at is not None:
      bn_acc.append(at["test_accuracy"])
      plain_acc.append(target["test_accuracy"])
      epochs.append(at["epoch"])
      losses.append(target["train_loss"])
  return bn_acc, plain_acc, epochs, losses


def _accuracies(runs, key: str = "test_accuracy") -> list[float]:
  return [r[key] for r in runs]


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
  if "val_accuracy" not in rows[0]:
    raise report.ReportError(
        f"{study['path']}: its rows have no val_accuracy; the section picks "
        "rates on a validation split (config.validation_examples > 0): "
        "rerun the study with studies/lr_range/config.py.")
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
      f"{config['validation_examples']:,} training images are held out as "
      "a validation split: every selection (which runs *train*, the best "
      "rate) reads it; the test set only reports. A run whose loss or "
      "weights turn NaN/inf"
      + (f", or whose loss passes {config['divergence_factor']:g} x ln(10) "
         "(config.divergence_factor)," if config.get("divergence_factor")
         else "") + " is frozen at its last finite state "
      "(nan_guard=\"record\"); \"diverged at\" is the global step of its "
      "first such update. A run *trains* when it did not "
      f"diverge and ends at >= {100 * threshold:g}% validation accuracy. "
      "Final accuracies in eval mode, mean +- sample std over seeds.\n"]
  text.append(page.in_one_family(lambda family: _body(
      family, study, finals, rates, small, threshold, out)))
  return "\n".join(text)


def _body(family: page.Family, study, finals, rates, small, threshold,
          out: Path) -> str:
  """The table, figure and claims; every comparison in `family` (one Holm
  family for the section)."""
  config, rows = study["config"], study["rows"]
  compared = {}
  lines = []
  for lr in rates:
    plain, bn = finals[PLAIN][lr], finals[BN][lr]
    if any(trains(r, threshold) for r in plain + bn):
      compared[lr] = family.compare(
          _accuracies(bn), _accuracies(plain), label=f"BN - no BN at {lr:g}")
      verdict = page.judged(compared[lr], unit="")
    else:  # two failed networks: their difference says nothing
      verdict = "neither trains: not compared"
    lines.append([f"{lr:g}" + (" (small pair)" if lr == small else ""),
                  page.percent(_accuracies(plain, "val_accuracy")),
                  page.percent(_accuracies(plain)), _diverged(plain),
                  page.percent(_accuracies(bn, "val_accuracy")),
                  page.percent(_accuracies(bn)), _diverged(bn), verdict])
  text = [page.table(
      ["learning rate", "no BN: val acc", "no BN: test acc",
       "no BN: diverged at", "BN: val acc", "BN: test acc",
       "BN: diverged at", "BN - no BN, test (points)"], lines)]
  text.append(
      "BN - no BN: Welch's t test over seeds (the two networks differ, so "
      "a seed shares no initialization), at every rate where at least one "
      "network trains; every comparison of the section is one Holm family. "
      "A diverged run counts with the accuracy its frozen weights score.\n")
  text.append(page.figure(
      out, f"{study['label']}.png",
      lambda p: plot_lr_range(finals, rates, small, threshold, p),
      "final test accuracy against the learning rate"))
  text.append(page.claims_table(_claims(family, config, rows, finals, rates,
                                        small, threshold, compared)))
  return "\n".join(text)


def _claims(family, config, rows, finals, rates, small, threshold,
            compared) -> list[list[str]]:
  show = lambda lr: "none" if lr is None else f"{lr:g}"
  largest = {p: largest_training_rate(
      {lr: finals[p][lr] for lr in rates}, threshold) for p in (PLAIN, BN)}
  # The rates BN trains at and no BN does not: the range's extension.
  beyond = [lr for lr in rates if largest[BN] is not None
            and lr <= largest[BN]
            and (largest[PLAIN] is None or lr > largest[PLAIN])]
  wins = [compared[lr] for lr in beyond if lr in compared]
  if beyond and all(c.significant and c.diff > 0 for c in wins):
    wider = page.CLAIM_VERDICTS[0]
  elif largest[PLAIN] is not None and (largest[BN] is None
                                       or largest[PLAIN] > largest[BN]):
    wider = page.CLAIM_VERDICTS[1]
  else:
    wider = page.CLAIM_VERDICTS[2]
  effect = (f"largest rate at which every seed trains: {show(largest[BN])} "
            f"with BN, {show(largest[PLAIN])} without"
            + "".join(f"; at {lr:g}: {page.judged(compared[lr], unit='')}"
                      for lr in beyond if lr in compared))
  claims = [["BN permits larger learning rates",
             f"plain SGD, {config['num_epochs']} epochs; \"trains\": not "
             f"diverged and >= {100 * threshold:g}% validation accuracy",
             effect + " (Welch)", wider]]
  best = {p: best_rate({lr: finals[p][lr] for lr in rates})
          for p in (PLAIN, BN)}
  at_best = family.compare(_accuracies(finals[BN][best[BN]]),
                           _accuracies(finals[PLAIN][best[PLAIN]]),
                           label=f"BN at {best[BN]:g} - no BN at "
                           f"{best[PLAIN]:g}")
  claims.append(
      ["BN's larger rates give better accuracy",
       f"each network at its best rate on validation (BN {best[BN]:g}, no "
       f"BN {best[PLAIN]:g}), test accuracy",
       f"BN - no BN {page.judged(at_best)} (Welch)",
       page.claim_verdict(at_best, +1)])
  bn_acc, plain_acc, epochs, losses = matched_loss(rows, small)
  if len(epochs) < 2:
    claims.append(["little or no benefit from BN at the same small rate",
                   f"rate {small:g}, at a matched training loss",
                   f"BN reaches no BN's final training loss in {len(epochs)}"
                   " seed(s): no comparison", page.CLAIM_VERDICTS[2]])
    return claims
  at_small = family.compare(bn_acc, plain_acc,
                            label=f"BN - no BN at {small:g}, matched loss")
  claims.append(
      ["little or no benefit from BN at the same small rate",
       f"rate {small:g}; no BN after {config['num_epochs']} epochs (mean "
       f"training loss {np.mean(losses):.3f}) against BN at the first "
       "epoch its training loss is as low (epochs "
       f"{', '.join(map(str, epochs))}; {len(epochs)} seeds); \"little\": "
       f"the interval within +-{SMALL_RATE_MARGIN:g} point",
       f"BN - no BN {page.judged(at_small)} (Welch); at the same epoch "
       f"{config['num_epochs']}: {100 * compared[small].diff:+.2f} points"
       if small in compared else
       f"BN - no BN {page.judged(at_small)} (Welch)",
       page.equivalence_verdict(at_small, SMALL_RATE_MARGIN)])
  return claims


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
             label=f"\"trains\": {100 * threshold:g}% on validation")
  ax.set(xscale="log", xlabel="learning rate (plain SGD)",
         ylabel="final test accuracy (%)", ylim=(0, 100),
         title="mean over seeds, band: min to max")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  report.save_figure(fig, path)  # pylint: disable=protected-access
  return fig
