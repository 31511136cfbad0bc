"""The Ioffe & Szegedy (2015) Figure 1 section of docs/studies.md.

Per initialization (a workdir each) the two networks, no BN and BN before
each sigmoid, are summarized per seed (`summarize`): the final test
accuracy, the steps to 97% (censored at the budget), and the drift of the
last hidden layer's sigmoid inputs over the first half of training, of
their median (`probes.drift_of_probes`) and of their p15-p85 spread
(`probes.spread_drift_of_probes`). The paper's claims (`CLAIMS`) are judged
on these with Welch's t test, BN - no BN over seeds: the two networks
differ (BN's scale and shift, no hidden biases), so a seed's two runs are
not one network with one setting changed, although the same seed gives
them the same kernel draw and data order. All comparisons of the section,
both initializations, are one Holm family (`page.in_one_family`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from bn_lab import page
from studies.ioffe2015 import figure
from studies.ioffe2015 import probes

PLAIN, BN = "placement=none", "placement=before_activation"
NETWORKS = {PLAIN: "no BN", BN: "BN"}
TARGET = 0.97  # the accuracy whose first step times "trains faster"
EARLY = 0.5  # the drift is averaged over the probes in this first part
OPTIMIZERS = {"sgd": "plain SGD", "momentum": "SGD with momentum",
              "adam": "Adam", "adamw": "AdamW"}


class Runs(NamedTuple):
  """One network's runs that did not diverge, in seed order."""
  seeds: np.ndarray  # (K,)
  final: np.ndarray  # (K,) final test accuracy, a fraction
  steps_to: np.ndarray  # (K,) first evaluated step at TARGET, else budget
  censored: np.ndarray  # (K,) bool: never reached TARGET (steps_to=budget)
  probe_steps: np.ndarray  # (T,)
  drift: np.ndarray  # (K, T) probes.drift_of_probes per run
  spread: np.ndarray  # (K, T) probes.spread_drift_of_probes per run
  diverged: int  # runs left out
  budget: int  # the last step trained
  late_gain: float  # points the mean accuracy gains in the last fifth


class Claim(NamedTuple):
  claim: str  # the paper's, with where in the paper
  field: str  # the Runs summary compared, BN - no BN
  expected: int  # the claimed sign of BN - no BN
  measure: str  # what the field is, for the setting column
  unit: str
  scale: float
  digits: int | None


CLAIMS = (
    Claim("BN helps the network \"achieve higher accuracy\" (Fig. 1a's "
          "caption)", "final", +1, "final test accuracy (eval mode)",
          "points", 100.0, 2),
    Claim("BN \"helps the network train faster\" (Fig. 1a's caption)",
          "steps_to", -1,
          f"optimizer steps to {TARGET:.0%} test accuracy, checked at the "
          "end of each epoch", "thousand steps", 1e-3, 1),
    Claim("Without BN a sigmoid's input distribution changes significantly "
          "in its mean; with BN it is much more stable (Sec. 4.1, Fig. 1b, "
          "c: p50)", "early_drift", -1,
          f"mean over the first {EARLY:.0%} of training of the median over "
          "units of abs(p50(t) - p50(end)) / IQR(end)", "x IQR(end)", 1.0,
          None),
    Claim("... and in its variance (Sec. 4.1, Fig. 1b, c: p15 to p85)",
          "early_spread", -1,
          f"mean over the first {EARLY:.0%} of training of the median over "
          "units of abs(ln(spread(t) / spread(end))), spread = p85 - p15",
          "", 1.0, None),
)


def _by_seed(rows):
  out: dict[int, list] = {}
  for row in rows:
    out.setdefault(int(row["seed"]), []).append(row)
  return {s: sorted(out[s], key=lambda r: r["epoch"]) for s in sorted(out)}


def steps_to(run_rows, target: float, budget: int) -> tuple[int, bool]:
  """(the first evaluated step whose test accuracy is >= target, False),
  or (budget, True) where the run never reaches it: censored."""
  hit = [r["step"] for r in run_rows if r["test_accuracy"] >= target]
  return (min(hit), False) if hit else (budget, True)


def summarize(rows) -> Runs:
  """`Runs` of one network's rows (one combination); a diverged run
  (`page.split_diverged`) is counted and left out."""
  kept, lost = page.split_diverged(rows)
  kept_runs = {r["run"] for r in kept}
  by_seed = _by_seed([r for r in rows if r["run"] in kept_runs])
  budget = max(r["step"] for r in rows)
  seeds, final, to, censored, drift, spread = [], [], [], [], [], []
  probe_steps = None
  for seed, mine in by_seed.items():
    seeds.append(seed)
    final.append(mine[-1]["test_accuracy"])
    step, never = steps_to(mine, TARGET, budget)
    to.append(step)
    censored.append(never)
    steps = np.array([s for r in mine for s in r["probe_steps"]])
    series = np.array([p for r in mine for p in r["probe_percentiles"]])
    if probe_steps is None:
      probe_steps = steps
    elif not np.array_equal(steps, probe_steps):
      raise ValueError(f"seed {seed}: probed at other steps than seed "
                       f"{seeds[0]}; the runs must share the probe schedule.")
    drift.append(np.asarray(probes.drift_of_probes(series)))
    spread.append(np.asarray(probes.spread_drift_of_probes(series)))
  return Runs(np.array(seeds), np.array(final), np.array(to),
              np.array(censored, bool), probe_steps, np.array(drift),
              np.array(spread), len(lost), budget,
              late_gain([r for r in rows if r["run"] in kept_runs]))


def field(runs: Runs, name: str) -> np.ndarray:
  """A per-seed summary: a Runs field, or the early means of the drifts."""
  if name == "early_drift":
    return probes.early_mean(runs.drift, runs.probe_steps, EARLY)
  if name == "early_spread":
    return probes.early_mean(runs.spread, runs.probe_steps, EARLY)
  return getattr(runs, name)


def drift_lead(drift_plain: np.ndarray, drift_bn: np.ndarray,
               steps: np.ndarray) -> str:
  """Whether BN's drift (one curve, e.g. the median over seeds) is below the
  plain network's at every probe that can differ: every probe but the
  last, where both are 0 by construction."""
  calmer = (drift_bn < drift_plain)[:-1]
  count = (f"BN's is lower at {int(calmer.sum())} of {calmer.size} probes "
           "(the last is 0 for both by construction)")
  if calmer.all():
    return f"holds at every probe: {count}"
  if calmer[0]:
    first = int(steps[int(np.argmin(calmer))])
    return (f"holds early, not late: BN's drift is first at or above the "
            f"plain network's at step {first:,}; {count}")
  return f"does not hold from the first probe: {count}"


def censoring_note(plain: Runs, bn: Runs, budget: int) -> str:
  """What the budget does to the steps-to comparison."""
  n_plain, n_bn = int(plain.censored.sum()), int(bn.censored.sum())
  if not n_plain and not n_bn:
    return "every run reaches it"
  text = (f"{n_plain} of {plain.seeds.size} runs without BN and {n_bn} of "
          f"{bn.seeds.size} with BN never reach it and count as the budget, "
          f"{budget:,} (censored)")
  if n_bn == 0:
    return text + ": the true difference is larger than shown"
  return text + ": a longer budget could move the difference either way"


def budget_note(plain: Runs, bn: Runs) -> str:
  """What a longer budget could do to the final accuracies' gap, from how
  much each network's mean still gains over the last fifth of training."""
  text = (f"over the last fifth of training the mean gains "
          f"{plain.late_gain:+.2f} points without BN and "
          f"{bn.late_gain:+.2f} with it")
  if plain.late_gain > max(bn.late_gain, 0.0):
    return (text + ": the plain network still closes in, so a longer "
            "budget could narrow the gap")
  return text + ": the gap does not narrow at the budget"


def claim_rows(panels, family: page.Family) -> list[list[str]]:
  """The claims table's rows, per initialization and claim: Welch's t test
  of BN - no BN over seeds, in the section's family."""
  rows = []
  for init, config, plain, bn in panels:
    budget = max(plain.budget, bn.budget)
    for claim in CLAIMS:
      c = family.compare(field(bn, claim.field), field(plain, claim.field),
                         label=f"{init}: {claim.field}, BN - no BN")
      setting = (f"{init} initialization; "
                 f"{OPTIMIZERS.get(config['optimizer'], config['optimizer'])}"
                 f" {config['learning_rate']:g} (the paper names neither "
                 f"optimizer nor rate), batch {config['batch_size']}, "
                 f"{budget:,} steps; {claim.measure}")
      if claim.field == "steps_to":
        setting += "; " + censoring_note(plain, bn, budget)
      if claim.field == "final":
        setting += "; " + budget_note(plain, bn)
      effect = page.judged(c, claim.unit, claim.scale, claim.digits)
      rows.append([claim.claim, setting, f"BN - no BN {effect} (Welch, "
                   f"{c.n_a} + {c.n_b} seeds)",
                   page.claim_verdict(c, claim.expected)])
  return rows


def _interval(values, scale: float = 1.0, digits: int = 3) -> str:
  return page.interval(values, scale, digits)


def table_line(init: str, network: str, runs: Runs) -> list[str]:
  to = [(f">{s:,}" if never else f"{s:,}")
        for s, never in zip(runs.steps_to, runs.censored)]
  return [init, network + (f" ({runs.diverged} diverged, left out)"
                           if runs.diverged else ""),
          " / ".join(f"{100 * a:.2f}" for a in runs.final),
          _interval(runs.final, 100.0, 2), " / ".join(to),
          _interval(field(runs, "early_drift")),
          _interval(field(runs, "early_spread"))]


def late_gain(rows, fraction: float = 0.2) -> float:
  """The mean test accuracy's gain (points) over the last `fraction` of the
  evaluated steps: how far the network still climbs at the budget."""
  xs, mean = page.mean_curve(rows, "test_accuracy", "step")
  start = int(np.searchsorted(xs, (1 - fraction) * xs[-1]))
  return 100 * float(mean[-1] - mean[start])


def setting_text(config: Mapping[str, Any], steps: int) -> str:
  return (
      f"MNIST, 784 -> {len(config['widths'])} x (Dense({config['widths'][0]})"
      f" -> [BN] -> {config['activation']}) -> Dense(10), batch "
      f"{config['batch_size']}, {steps:,} steps of "
      f"{OPTIMIZERS.get(config['optimizer'], config['optimizer'])} "
      f"with learning rate {config['learning_rate']:g} for both networks "
      "(the paper names neither optimizer nor rate; nothing is tuned or "
      "selected, so no validation split is read), BN before each sigmoid "
      f"with epsilon {config['bn']['epsilon']:g}"
      + (" and the unbiased running variance of the paper's Algorithm 2"
         if config["bn"]["unbiased_running_var"] else "")
      + f", {len(config['seeds'])} seeds (seed s gives both networks the "
      "same kernel draw and data order). Every "
      f"{config['probe']['every_steps']} steps, the percentiles "
      f"{', '.join(map(str, probes.QS))} of every input to the last hidden "
      f"layer's sigmoids over the first {config['probe']['num_images']:,} "
      "test images, in eval mode (so BN's inputs also move with its running "
      f"averages). The panels (b, c) plot unit {probes.FIGURE_UNIT} (a fixed "
      "index, not a chosen \"typical\" unit) of the first seed on one y "
      "range; the drifts take every unit: of the median, |p50(t) - "
      "p50(end)| / IQR(end), and of the spread, |ln(spread(t) / "
      "spread(end))| with spread = p85 - p15, each the median over units "
      "per seed and probe, 0 at the last probe by construction. Per seed, "
      f"a drift is averaged over the probes of the first {EARLY:.0%} of "
      "training, and that mean is compared over seeds.\n")


def section(studies, out: Path) -> str:
  """The section from the study's workdirs, one per initialization
  (`default` first): the setting, a figure per initialization, the per-seed
  table, the claims (one Holm family) and the described curves."""
  studies = sorted(studies, key=lambda s: s["config"].get("init") != "default")
  config = studies[0]["config"]
  steps = max(r["step"] for r in studies[0]["rows"])
  text = ["## Ioffe & Szegedy (2015), Figure 1\n",
          page.provenance_markdown(studies), setting_text(config, steps)]
  panels, lines, notes = [], [], []
  for study in studies:
    init = study["config"].get("init", "default")
    text.append(f"Initialization `{init}` ("
                + ("flax's LeCun normal" if init == "default" else
                   f"N(0, {study['config']['init_std']:g}^2) for every Dense "
                   "kernel, the paper's \"small random Gaussian values\"; "
                   "the paper gives no scale")
                + "):\n")
    text.append(page.figure(out, f"{study['label']}_figure1.png",
                            lambda p, s=study: figure.plot_probes(s["rows"], p),
                            f"Figure 1, {init} initialization"))
    combos = page.by_combo(study["rows"])
    plain, bn = summarize(combos[PLAIN]), summarize(combos[BN])
    panels.append((init, study["config"], plain, bn))
    lines += [table_line(init, NETWORKS[PLAIN], plain),
              table_line(init, NETWORKS[BN], bn)]
    notes.append(_descriptive(init, combos[PLAIN], combos[BN], plain, bn))
  text.append(page.table(
      ["init", "network", "final test acc (eval mode, %), per seed",
       "mean [95% CI]", f"steps to {TARGET:.0%}, per seed",
       f"median drift, first {EARLY:.0%}, mean [95% CI]",
       f"spread drift, first {EARLY:.0%}, mean [95% CI]"], lines))
  epoch_steps = min(r["step"] for r in studies[0]["rows"])
  text.append(
      f"Steps to {TARGET:.0%}: the first end of an epoch (every "
      f"{epoch_steps:,} steps) at which the run's test accuracy is at "
      "least that; \">\" marks a run that never reaches it within the "
      "budget. Intervals: 95% t intervals over seeds.\n")
  text.append("The paper's claims, each Welch's t test of BN - no BN over "
              "seeds (the networks differ, so a seed's two runs are not one "
              "network with one setting changed, and are not paired), the "
              "section's comparisons (both initializations) one Holm "
              "family:\n")
  text.append(page.in_one_family(
      lambda family: page.claims_table(claim_rows(panels, family))))
  text.append("Described, not tested (over seeds: the mean accuracy "
              "curves, the median drift curves):\n")
  text += notes
  return "\n".join(text)


def checkpoint_lead(ahead: int, checkpoints: int) -> str:
  """Whether BN's mean accuracy curve is above the plain one's at every
  evaluation ("holds"), at most of them, or not."""
  return ("holds" if ahead == checkpoints else
          "holds at most checkpoints" if ahead > checkpoints / 2 else
          "does not hold")


def _descriptive(init, plain_rows, bn_rows, plain: Runs, bn: Runs) -> str:
  """(a) the lead of the mean accuracy curve; (b, c) the per-probe lead of
  the median drift curves (over seeds)."""
  xs, acc_plain = page.mean_curve(plain_rows, "test_accuracy", "step")
  _, acc_bn = page.mean_curve(bn_rows, "test_accuracy", "step")
  ahead = int(np.sum(acc_bn > acc_plain))
  median = lambda curves: np.median(curves, axis=0)
  return (
      f"* **{init}: (a) BN ahead at every checkpoint: "
      f"{checkpoint_lead(ahead, len(xs))}.** The BN network's mean test "
      f"accuracy is above the plain network's at {ahead} of {len(xs)} "
      "checkpoints.\n"
      f"* **{init}: (b, c) drift lower with BN at every probe.** Of the "
      "median: "
      + drift_lead(median(plain.drift), median(bn.drift), plain.probe_steps)
      + ". Of the spread: "
      + drift_lead(median(plain.spread), median(bn.spread),
                   plain.probe_steps)
      + ".\n")
