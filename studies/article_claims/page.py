"""The source article's claims: their section of docs/studies.md.

Each claim is a row (the article's claim, our setting, the effect with its
95% t interval and test, the verdict), every comparison of the section one
Holm family (`page.in_one_family`). Networks differ in initialization, so
two networks are compared by Welch's t test; a level the article states
("99% train accuracy") by the one-sample t test of the seeds' mean against
it. Nothing is selected (no rate, no epoch), so no validation split is
read: every number is the last epoch's, or a fixed epoch's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

import bn_jax
from bn_lab import page
from bn_lab import report
from bn_lab import stats

# The article's worked example: batch mean, variance, epsilon, gamma, beta.
WORKED_EXAMPLE = (0.5, 0.2, 1e-4, 2.0, 0.1)
# The networks: the example (BN after the ReLU), no BN, BN on the input.
BN, NONE, INPUT = "after_activation", "none", "input"
# The levels the article says its example reaches.
TRAIN_LEVEL, TEST_LEVEL = 0.99, 0.98
# "Speeds up convergence": epochs to this test accuracy, and the accuracy
# after this (fixed, early) epoch, for every run.
CONVERGENCE_LEVEL, EARLY_EPOCH = 0.97, 1
# "Removes the need for preprocessing" is a claim of no loss: raw pixels
# with BN are no worse than preprocessed ones without it when the 95%
# interval of the difference stays above -this many points (a sixth of the
# errors at 97%), fixed before the run.
NO_WORSE_MARGIN = 0.5

Network = dict[str, Any]  # {"runs": [rows of one run by epoch], "diverged"}


def networks(rows) -> dict[str, Network]:
  """placement -> {"runs": each run's rows in epoch order, the runs that
  did not diverge; "diverged": how many did (named on the page, never
  averaged in)}."""
  out = {}
  for mine in page.by_combo(rows).values():
    runs = list(page.by_run(mine).values())
    kept = [sorted(run, key=lambda r: r["epoch"]) for run in runs
            if report.divergence(run) is None]
    out[mine[0]["placement"]] = {"runs": kept,
                                 "diverged": len(runs) - len(kept)}
  return out


def final(net: Network, key: str) -> np.ndarray:
  """Each run's `key` at its last epoch."""
  return np.array([run[-1][key] for run in net["runs"]])


def at_epoch(net: Network, key: str, epoch: int) -> np.ndarray:
  """Each run's `key` after `epoch`."""
  return np.array([next(r[key] for r in run if r["epoch"] == epoch)
                   for run in net["runs"]])


def epochs_to(net: Network, level: float, budget: int) -> np.ndarray:
  """Each run's first epoch with test accuracy >= level; budget + 1 for a
  run that never reaches it (censored: it needs budget + 1 or more)."""
  return np.array([next((r["epoch"] for r in run
                         if r["test_accuracy"] >= level), budget + 1)
                   for run in net["runs"]], dtype=float)


def one_sample(family: page.Family, values, level: float,
               label: str) -> stats.Comparison:
  """The one-sample t test of mean(values) - level: the paired t test
  against a constant (the differences' spread is the values')."""
  return family.compare(values, np.full(len(values), level), paired=True,
                        label=label)


def no_worse_verdict(c: stats.Comparison, control: stats.Comparison) -> str:
  """A claim of no loss (a - b not below 0), shown to be a need by the
  control (without BN, raw pixels below preprocessed ones, beyond noise):
  "supported" when the control shows the need and a - b's 95% interval
  stays above -NO_WORSE_MARGIN points; "contradicted" when a - b is below
  0 beyond noise and its whole interval below the margin; else not
  resolved (also when the control shows no need to remove)."""
  low, high = 100 * c.low, 100 * c.high
  if c.significant and high < -NO_WORSE_MARGIN:
    return page.CLAIM_VERDICTS[1]
  needed = page.claim_verdict(control, -1) == page.CLAIM_VERDICTS[0]
  if needed and np.isfinite(low) and low > -NO_WORSE_MARGIN:
    return page.CLAIM_VERDICTS[0]
  return page.CLAIM_VERDICTS[2]


def interval(values, scale: float = 100.0, digits: int = 2) -> str:
  """"97.09 [96.99, 97.19]": in points by default."""
  return page.interval(values, scale, digits)


def welch_text(c: stats.Comparison, **kw) -> str:
  return page.judged(c, **kw) + " (Welch)"


def level_rows(nets, config, family) -> list[list[str]]:
  """The example's train (eval mode) and test accuracy against the levels
  the article states, each with its per-seed count."""
  rows = []
  for key, level, what in (("train_accuracy_eval", TRAIN_LEVEL, "train"),
                           ("test_accuracy", TEST_LEVEL, "test")):
    values = final(nets[BN], key)
    c = one_sample(family, values, level, f"{what} accuracy - {level}")
    reached = int(np.sum(values >= level))
    rows.append([
        f"the example reaches {level:.0%} {what} accuracy",
        f"784 inputs (the article's code declares `input_shape=(100,)`), "
        f"{config['num_epochs']} epochs; {what} accuracy "
        + ("over the whole training set in eval mode (Keras' `evaluate`)"
           if what == "train" else "on the test set")
        + f": {interval(values)}%, {reached} of {len(values)} seeds "
        f">= {level:.0%}",
        f"mean - {level:.0%}: {page.judged(c)} (one-sample t)",
        page.claim_verdict(c, +1)])
  return rows


def censoring_bound(bn_censored: int, plain_censored: int) -> str:
  """What counting a censored run as budget + 1 does to BN - none: a
  censored run needs budget + 1 epochs or more."""
  if not bn_censored and not plain_censored:
    return "no run is censored"
  if not bn_censored:
    return ("the censored runs need more, so the censoring can only shrink "
            "the difference: a longer budget could widen it, not reverse it")
  if not plain_censored:
    return "only BN runs are censored: the censoring favours BN"
  return "censored in both, so the censoring bounds neither direction"


def convergence_rows(nets, config, family) -> list[list[str]]:
  """"BN speeds up convergence", judged on every run: epochs to 97% with
  the runs that never get there censored at the budget, and the test
  accuracy after a fixed early epoch."""
  budget = config["num_epochs"]
  bn, plain = (epochs_to(nets[p], CONVERGENCE_LEVEL, budget)
               for p in (BN, NONE))
  c = family.compare(bn, plain, label="epochs to 97%: BN - none")
  censored = lambda e: int(np.sum(e > budget))
  bound = censoring_bound(censored(bn), censored(plain))
  early = [at_epoch(nets[p], "test_accuracy", EARLY_EPOCH)
           for p in (BN, NONE)]
  e = family.compare(*early, label=f"test accuracy after epoch "
                                   f"{EARLY_EPOCH}: BN - none")
  return [
      ["BN speeds up convergence",
       f"epochs to {CONVERGENCE_LEVEL:.0%} test accuracy, BN after the ReLU "
       f"- none, every run: a run that does not reach it in the {budget} "
       f"epochs counts as {budget + 1} ({censored(bn)} of {len(bn)} with "
       f"BN, {censored(plain)} of {len(plain)} without); {bound}. Mean: BN "
       f"{np.mean(bn):.1f}, none {np.mean(plain):.1f} epochs",
       welch_text(c, unit="epochs", scale=1.0, digits=1),
       page.claim_verdict(c, -1)],
      ["... the same, at a fixed early epoch",
       f"test accuracy after epoch {EARLY_EPOCH}, BN after the ReLU - none,"
       f" every run: {interval(early[0])} vs {interval(early[1])}%",
       welch_text(e), page.claim_verdict(e, +1)]]


def preprocessing_row(nets, raw_nets, family) -> list[str]:
  """Raw 0..255 pixels with BN on the input against [0, 1] pixels without
  BN, with raw pixels without BN as the control (the need)."""
  raw_bn = final(raw_nets[INPUT], "test_accuracy")
  raw_plain = final(raw_nets[NONE], "test_accuracy")
  scaled_plain = final(nets[NONE], "test_accuracy")
  c = family.compare(raw_bn, scaled_plain,
                     label="raw with BN on the input - scaled without BN")
  control = family.compare(raw_plain, scaled_plain,
                           label="raw without BN - scaled without BN")
  return ["BN removes the need for input preprocessing",
          "test accuracy, raw 0..255 pixels with BN on the input "
          f"({interval(raw_bn)}%) - [0, 1] pixels without BN "
          f"({interval(scaled_plain)}%); no loss = the interval above "
          f"-{NO_WORSE_MARGIN:g} point. The control, raw pixels without BN "
          f"({interval(raw_plain)}%) - [0, 1] without BN: "
          f"{welch_text(control)}",
          welch_text(c), no_worse_verdict(c, control)]


# The example against no BN at the last epoch: the train - test gap and
# its two parts, and the test NLL. key -> (label, unit, scale, digits).
GAP_PARTS = {
    "train_accuracy_eval": ("train accuracy (eval mode, whole training "
                            "set), %", "points", 100.0, 2),
    "test_accuracy": ("test accuracy, %", "points", 100.0, 2),
    "gap": ("gap: train - test accuracy, points", "points", 100.0, 2),
    "test_loss": ("test NLL (cross-entropy), nats", "nats", 1.0, None),
}


def gap_values(net: Network, key: str) -> np.ndarray:
  if key == "gap":
    return final(net, "train_accuracy_eval") - final(net, "test_accuracy")
  return final(net, key)


def gap_comparisons(nets, family) -> dict[str, stats.Comparison]:
  return {key: family.compare(gap_values(nets[BN], key),
                              gap_values(nets[NONE], key),
                              label=f"{key}: BN - none")
          for key in GAP_PARTS}


def gap_table(nets, comparisons) -> str:
  lines = []
  for key, (label, unit, scale, digits) in GAP_PARTS.items():
    shown = lambda p: interval(gap_values(nets[p], key), scale,
                               digits if digits is not None else 4)
    lines.append([label, shown(NONE), shown(BN),
                  welch_text(comparisons[key], unit=unit, scale=scale,
                             digits=digits)])
  return page.table(["last epoch", "no BN", "BN after the ReLU (the example)",
                     "BN - no BN [95% CI], test"], lines)


def generalization_rows(config, comparisons) -> list[list[str]]:
  """"BN may hurt generalization", judged on what a reader takes it to
  mean: a lower test accuracy (and a higher test NLL); the wider train -
  test gap is reported with its two parts, not judged as harm."""
  test, nll = comparisons["test_accuracy"], comparisons["test_loss"]
  diff = lambda key: f"{100 * comparisons[key].diff:+.2f}"
  why = (f"BN - none: the train - test gap {diff('gap')} points, train "
         f"accuracy {diff('train_accuracy_eval')}, test accuracy "
         f"{diff('test_accuracy')} (each with its interval and test in the "
         "table below)")
  return [
      ["BN may hurt generalization",
       f"test accuracy after {config['num_epochs']} epochs, BN after the "
       "ReLU - none: harm is a lower test accuracy. " + why,
       welch_text(test), page.claim_verdict(test, -1)],
      ["... in test NLL", "test cross-entropy, BN after the ReLU - none "
       "(harm: a higher NLL)",
       welch_text(nll, unit="nats", scale=1.0, digits=None),
       page.claim_verdict(nll, +1)]]


def cost_row(cost) -> list[str]:
  """"BN costs computation and memory", from benchmarks/bn_cost.py: the
  temporary memory is XLA's analysis of the compiled step (exact, no
  noise); the time is one median of interleaved rounds, with no interval
  (the benchmark keeps no per-round times), so it is not judged."""
  cells = {(r["model"], r["placement"]): r for r in cost["results"]["rows"]}
  models = [m for m in ("mlp", "cnn") if (m, BN) in cells]
  parts = [f"{m}: {cells[(m, BN)]['memory_ratio']:.2f}x temporary memory, "
           f"{cells[(m, BN)]['time_ratio']:.2f}x time" for m in models]
  more = all(cells[(m, BN)]["memory_ratio"] > 1 for m in models)
  rounds = cost["results"].get("rounds", "its")
  return ["BN costs computation and memory",
          "benchmarks/bn_cost.py: one training step, batch 128, BN after the "
          "ReLU vs none; memory from XLA's analysis of the compiled step "
          f"(exact), time the median of {rounds} interleaved rounds (one "
          "number, no interval: not judged)", "; ".join(parts),
          f"memory: {page.CLAIM_VERDICTS[0] if more else page.CLAIM_VERDICTS[1]}"
          " (exact); time: no interval, not judged"]


def accuracy_by_epoch(nets, epochs: int) -> str:
  """Mean test accuracy [95% t interval] of each network after each epoch:
  the curves the convergence rows summarize."""
  shown = [p for p in (NONE, BN, INPUT) if p in nets]
  names = {NONE: "no BN", BN: "BN after the ReLU", INPUT: "BN on the input"}
  lines = [[str(epoch)] + [interval(at_epoch(nets[p], "test_accuracy", epoch))
                           for p in shown]
           for epoch in range(1, epochs + 1)]
  return page.table(["epoch", *(f"{names[p]}: test accuracy, %"
                                for p in shown)], lines)


def diverged_note(*groups: Mapping[str, Network]) -> str:
  lost = [f"{n['diverged']} run(s) of {p}" for nets in groups
          for p, n in nets.items() if n["diverged"]]
  return (f"Left out as diverged: {', '.join(lost)}.\n" if lost else "")


def section(studies, out: Path) -> str:
  scaled = next((s for s in studies if s["config"].get("input_scaling")
                 != "raw" and not s["benchmark"]), None)
  raw = next((s for s in studies if s["config"].get("input_scaling")
              == "raw"), None)
  cost = next((s for s in studies if s["benchmark"] == "bn_cost"), None)
  if scaled is None:
    raise report.ReportError("the claims section needs the article_claims "
                             "workdir with scaled inputs.")
  config, nets = scaled["config"], networks(scaled["rows"])
  raw_nets = networks(raw["rows"]) if raw is not None else {}
  n = len(nets[BN]["runs"])

  def render(family: page.Family) -> str:
    claims = level_rows(nets, config, family)
    claims += convergence_rows(nets, config, family)
    if INPUT in raw_nets and NONE in raw_nets:
      claims.append(preprocessing_row(nets, raw_nets, family))
    comparisons = gap_comparisons(nets, family)
    claims += generalization_rows(config, comparisons)
    if cost is not None:
      claims.append(cost_row(cost))
    claims.append(_worked_example_claim())
    return "\n".join([
        page.claims_table(claims),
        "The example against no BN after the last epoch: the gap and its "
        "two parts (the same Holm family):\n",
        gap_table(nets, comparisons),
        f"Test accuracy after each epoch, mean [95% t interval] over "
        f"{n} seeds:\n", accuracy_by_epoch(nets, config["num_epochs"])])

  missing = ("" if cost is not None else
             " The cost row needs the benchmark's workdir (workdirs/bn_cost, "
             "from benchmarks/bn_cost.py); it is not on this page.")
  return "\n".join([
      "## The source article's claims\n",
      page.provenance_markdown([s for s in (scaled, raw, cost) if s]),
      "The article's Keras example, Dense(50, relu) -> BN -> Dense(10), "
      f"Adam {config['learning_rate']:g}, batch {config['batch_size']}, "
      f"{config['num_epochs']} epochs, against the same network without "
      "BN and with BN on the input only, "
      f"{n} seeds each. The article's code declares `input_shape=(100,)`, "
      "which cannot take MNIST's 784 pixels; the one change is 784 inputs "
      "(the flattened 28 x 28 image). \"Train accuracy\" is measured as "
      "Keras' `evaluate` does, over the whole training set in eval mode "
      "(`config.eval_train`). The networks differ in initialization, so "
      "two of them are compared by Welch's t test, and a level the article "
      "states by the one-sample t test of the seeds' mean against it; every "
      "comparison of the section (the claims and the gap table) is one "
      "Holm family. Nothing is selected, so no validation split is read. "
      f"The budget is {config['num_epochs']} epochs, the article's: a "
      "longer one could change the convergence and generalization "
      "verdicts." + missing + "\n",
      *filter(None, [diverged_note(nets, raw_nets)]),
      page.in_one_family(render)])


def _worked_example_claim() -> list[str]:
  """The article's example through the pure API: a batch with exactly its
  mean and variance (mean +- sqrt(var)); exact arithmetic, no test."""
  mean, var, epsilon, gamma, beta = WORKED_EXAMPLE
  x = np.asarray([[mean - var ** 0.5], [mean + var ** 0.5]], np.float32)
  params = bn_jax.BNParams(scale=np.asarray([gamma], np.float32),
                           bias=np.asarray([beta], np.float32))
  _, state = bn_jax.init(1)
  y, _ = bn_jax.apply(params, state, x, training=True, epsilon=epsilon)
  expected = gamma * (var / (var + epsilon)) ** 0.5
  ok = np.allclose(np.asarray(y)[:, 0], [beta - expected, beta + expected],
                   rtol=1e-5)
  return ["the worked example (mean 0.5, variance 0.2, epsilon 1e-4, gamma "
          "2, beta 0.1)", "bn_jax.apply on a batch 0.5 -+ sqrt(0.2) (and "
          "tests/test_study_tools.py)",
          f"y = {float(y[0, 0]):.4f}, {float(y[1, 0]):.4f}; the formula "
          f"gives {beta - expected:.4f}, {beta + expected:.4f} (exact "
          "arithmetic, no test)",
          page.CLAIM_VERDICTS[0] if ok else page.CLAIM_VERDICTS[1]]
