"""studies.ioffe2015.page on hand-made rows: the drift verdicts, the
censored steps to 97%, and the claims' Welch tests and Holm correction
against scipy and NumPy recomputations."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from bn_lab import page as page_lib

from studies.ioffe2015 import page
from studies.ioffe2015 import probes

SEEDS = (0, 1, 2, 3, 4)
EPOCHS, EPOCH_STEPS, UNITS = 6, 100, 6
PROBES_PER_EPOCH = 2


def _percentiles(rng, step, bn: bool):
  """(len(QS), UNITS) percentiles: medians that move towards the end, and
  spreads that grow, more without BN; noise per probe."""
  z = np.array([-1.04, -0.67, 0.0, 0.67, 1.04])[:, None]  # QS of N(0, 1)
  f = step / (EPOCHS * EPOCH_STEPS)
  move = 0.3 if bn else 2.0
  median = move * f + rng.normal(0, 0.05, UNITS)
  spread = (1 + (0.1 if bn else 1.0) * f) * rng.uniform(0.8, 1.2, UNITS)
  return median + z * spread


def rows(seeds=SEEDS, never_97=()):
  """Rows of both networks as the trainer writes them: per seed and epoch
  a test accuracy (BN's higher and earlier at 97%) and two probes. Seeds
  in `never_97` stay below 97% without BN."""
  rng = np.random.default_rng(7)
  out = []
  for combo, bn in ((page.PLAIN, False), (page.BN, True)):
    for run, seed in enumerate(seeds):
      offset = rng.normal(0, 0.003)  # so that the steps to 97% vary
      for epoch in range(1, EPOCHS + 1):
        step = epoch * EPOCH_STEPS
        base = (0.962 + 0.005 * epoch if bn else 0.95 + 0.006 * epoch)
        base = 0.96 if not bn and seed in never_97 else base + offset
        steps = [step - EPOCH_STEPS // 2, step]
        out.append({
            "combo": combo, "placement": combo.split("=")[1], "run": run,
            "seed": seed, "epoch": epoch, "step": step,
            "test_accuracy": base + rng.normal(0, 0.001),
            "train_loss": 0.1, "probe_steps": steps,
            "probe_percentiles": [_percentiles(rng, s, bn).tolist()
                                  for s in steps]})
  return out


def _combos(rows_):
  return ([r for r in rows_ if r["combo"] == page.PLAIN],
          [r for r in rows_ if r["combo"] == page.BN])


def test_drift_lead_holds_when_bn_is_lower_at_every_probe_but_the_last():
  """The last probe is 0 for both networks by construction: it cannot
  count against BN (it made "holds at every probe" unreachable)."""
  steps = np.arange(1, 101) * 500
  plain = np.linspace(1.0, 0.01, 100)
  plain[-1] = 0.0
  bn = plain / 2
  text = page.drift_lead(plain, bn, steps)
  assert text.startswith("holds at every probe")
  assert "lower at 99 of 99 probes" in text


def test_drift_lead_names_the_first_probe_where_bn_is_not_lower():
  steps = np.arange(1, 11) * 500
  plain = np.array([5, 4, 3, 2, 1, 1, 1, 1, 1, 0.0])
  bn = np.array([1, 1, 1, 1, 1, 2, 0.5, 2, 2, 0.0])  # equal at step 2,500
  text = page.drift_lead(plain, bn, steps)
  assert text.startswith("holds early, not late")
  assert "at step 2,500" in text and "lower at 5 of 9 probes" in text
  assert page.drift_lead(bn * 0 + 1, bn * 0 + 2, steps).startswith(
      "does not hold from the first probe")


def test_steps_to_is_censored_at_the_budget():
  run = [{"step": 100, "test_accuracy": 0.96},
         {"step": 200, "test_accuracy": 0.971},
         {"step": 300, "test_accuracy": 0.969}]
  assert page.steps_to(run, 0.97, 300) == (200, False)
  assert page.steps_to(run, 0.98, 300) == (300, True)


def _numpy_early(series, steps, which):
  """The early mean of one run's drift, from the percentiles by NumPy."""
  at = {q: series[:, i] for i, q in enumerate(probes.QS)}
  if which == "early_drift":
    per_unit = np.abs(at[50] - at[50][-1]) / (at[75][-1] - at[25][-1])
  else:
    spread = at[85] - at[15]
    per_unit = np.abs(np.log(spread / spread[-1]))
  curve = np.median(per_unit, axis=1)
  return curve[steps <= 0.5 * steps[-1]].mean()


def _expected(rows_, which):
  """Per seed, one network's summary, recomputed from the rows."""
  out = []
  for seed in sorted({r["seed"] for r in rows_}):
    mine = sorted((r for r in rows_ if r["seed"] == seed),
                  key=lambda r: r["epoch"])
    if which == "final":
      out.append(mine[-1]["test_accuracy"])
    elif which == "steps_to":
      hit = [r["step"] for r in mine if r["test_accuracy"] >= 0.97]
      out.append(hit[0] if hit else mine[-1]["step"])
    else:
      steps = np.array([s for r in mine for s in r["probe_steps"]])
      series = np.array([p for r in mine for p in r["probe_percentiles"]])
      out.append(_numpy_early(series, steps, which))
  return np.array(out)


def test_claims_match_scipy_welch_and_holm():
  """Each claim row's effect, interval and p are Welch's test of BN - no
  BN on per-seed summaries recomputed here (scipy), Holm-corrected over
  both initializations' claims (NumPy); the verdict follows."""
  inits = {"default": rows(), "gaussian": rows(never_97=(1, 3))}
  panels = []
  for init, rows_ in inits.items():
    plain, bn = _combos(rows_)
    config = {"optimizer": "sgd", "learning_rate": 0.5, "batch_size": 60}
    panels.append((init, config, page.summarize(plain), page.summarize(bn)))
  claim_rows = page_lib.in_one_family(
      lambda family: page.claim_rows(panels, family))
  assert len(claim_rows) == 2 * len(page.CLAIMS)
  tests = []
  for rows_ in inits.values():
    plain, bn = _combos(rows_)
    for claim in page.CLAIMS:
      a, b = _expected(bn, claim.field), _expected(plain, claim.field)
      t = scipy_stats.ttest_ind(a, b, equal_var=False)
      tests.append((claim, a.mean() - b.mean(), t.pvalue,
                    t.confidence_interval(0.95)))
  p = np.array([t[2] for t in tests])
  order = np.argsort(p)
  holm = np.empty_like(p)
  holm[order] = np.minimum(1, np.maximum.accumulate(
      (len(p) - np.arange(len(p))) * p[order]))
  for line, (claim, diff, _, ci), p_holm in zip(claim_rows, tests, holm):
    digits = 2 if claim.digits is None else claim.digits
    if claim.digits is None:  # page.judged: 3 significant digits
      largest = max(abs(diff), abs(ci.low), abs(ci.high)) * claim.scale
      digits = max(0, 2 - int(np.floor(np.log10(largest))))
    num = lambda v: f"{v * claim.scale:+.{digits}f}"
    assert f"{num(diff)} [{num(ci.low)}, {num(ci.high)}]" in line[2], line
    assert "(Welch, 5 + 5 seeds)" in line[2]
    significant = p_holm < 0.05
    want = ("not resolved at this power" if not significant else
            "supported" if np.sign(diff) == claim.expected else
            "contradicted")
    assert line[3] == want, (line, p_holm)
  # The hand-made data: BN is better on every claim, beyond noise.
  assert [line[3] for line in claim_rows] == ["supported"] * len(claim_rows)
  # Seeds 1 and 3 never reach 97% without BN in the gaussian rows: said.
  assert "2 of 5 runs without BN and 0 of 5 with BN never reach it" in (
      claim_rows[len(page.CLAIMS) + 1][1])
  assert "every run reaches it" in claim_rows[1][1]


def test_table_line_marks_censored_runs():
  plain, _ = _combos(rows(never_97=(1, 3)))
  line = page.table_line("gaussian", "no BN", page.summarize(plain))
  to = line[4].split(" / ")
  assert [t.startswith(">") for t in to] == [False, True, False, True, False]
  assert to[1] == f">{EPOCHS * EPOCH_STEPS:,}"


def test_a_run_missing_a_probe_step_is_refused():
  plain, _ = _combos(rows())
  bad = [dict(r, probe_steps=[s + 1 for s in r["probe_steps"]])
         if r["seed"] == 2 else r for r in plain]
  with pytest.raises(ValueError, match="seed 2: probed at other steps"):
    page.summarize(bad)


def test_checkpoint_lead_words():
  assert page.checkpoint_lead(50, 50) == "holds"
  assert page.checkpoint_lead(30, 50) == "holds at most checkpoints"
  assert page.checkpoint_lead(25, 50) == "does not hold"


def test_budget_note_says_when_the_gap_could_narrow():
  plain, bn = _combos(rows())
  plain, bn = page.summarize(plain), page.summarize(bn)
  # Recomputed: the mean over seeds at the last step minus at 80% of it.
  mean_at = lambda rows_, step: 100 * np.mean(
      [r["test_accuracy"] for r in rows_ if r["step"] == step])
  plain_rows, _ = _combos(rows())
  start = int(np.ceil(0.8 * EPOCHS)) * EPOCH_STEPS
  np.testing.assert_allclose(
      plain.late_gain, mean_at(plain_rows, EPOCHS * EPOCH_STEPS)
      - mean_at(plain_rows, start))
  assert page.budget_note(plain, bn).endswith("could narrow the gap")
  assert page.budget_note(plain._replace(late_gain=-0.01),
                          bn._replace(late_gain=-0.04)).endswith(
                              "does not narrow at the budget")
