"""The source article's claims: their section of docs/studies.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import bn_jax
from bn_lab import page
from bn_lab import report
from bn_lab import stats

# The article's worked example: batch mean, variance, epsilon, gamma, beta.
WORKED_EXAMPLE = (0.5, 0.2, 1e-4, 2.0, 0.1)


def section(studies, out: Path) -> str:
  scaled = next((s for s in studies if s["config"].get("input_scaling")
                 != "raw" and not s["benchmark"]), None)
  raw = next((s for s in studies if s["config"].get("input_scaling")
              == "raw"), None)
  cost = next((s for s in studies if s["benchmark"] == "bn_cost"), None)
  if scaled is None:
    raise report.ReportError("the claims section needs the article_claims "
                             "workdir with scaled inputs.")
  finals = {rows[0]["placement"]: page.final_rows(rows)
            for rows in page.by_combo(scaled["rows"]).values()}
  combos = {rows[0]["placement"]: rows
            for rows in page.by_combo(scaled["rows"]).values()}
  acc = lambda placement, key="test_accuracy", src=finals: [
      r[key] for r in src[placement]]
  bn, plain = "after_activation", "none"
  n = len(finals[bn])
  train_ok = sum(a >= 0.99 for a in acc(bn, "train_accuracy_eval"))
  test_ok = sum(a >= 0.98 for a in acc(bn))
  gap = lambda p, src=finals: [r["train_accuracy_eval"] - r["test_accuracy"]
                               for r in src[p]]
  claims = [
      ["the example reaches 99% train and 98% test accuracy",
       f"the example, {scaled['config']['num_epochs']} epochs",
       f"train (eval mode) {page.percent(acc(bn, 'train_accuracy_eval'))} "
       f"({train_ok}/{n} seeds >= 99%), test {page.percent(acc(bn))} "
       f"({test_ok}/{n} seeds >= 98%)",
       f"train {'yes' if train_ok == n else 'no'}, test "
       f"{'yes' if test_ok == n else 'no'}"],
      ["BN speeds up convergence",
       "epochs to 97% test accuracy, BN after the ReLU vs none",
       f"{page.epochs_to(combos[bn], 0.97)} vs {page.epochs_to(combos[plain], 0.97)}",
       _faster(combos[bn], combos[plain])]]
  # The section's family (Welch: different networks), Holm-corrected:
  # BN's train - test gap against no BN's, and with raw pixels BN on the
  # input against the scaled network without BN.
  family = {"gap": stats.welch(gap(bn), gap(plain),
                               label="gap: BN - no BN")}
  if raw is not None:
    raw_finals = {rows[0]["placement"]: page.final_rows(rows)
                  for rows in page.by_combo(raw["rows"]).values()}
    family["raw"] = stats.welch(acc("input", src=raw_finals), acc(plain),
                                label="raw with BN on the input - scaled "
                                "without BN")
  family = dict(zip(family, stats.holm_family(family.values())))
  if raw is not None:
    c = family["raw"]
    claims.append(
        ["BN removes the need for input preprocessing",
         "raw 0..255 pixels with BN on the input vs [0, 1] pixels without BN",
         f"{page.percent(acc('input', src=raw_finals))} vs {page.percent(acc(plain))}"
         f" ({page.judged(c)});"
         f" raw pixels without BN: {page.percent(acc(plain, src=raw_finals))}",
         "yes" if c.diff >= 0 else
         "no: below the scaled network beyond noise" if c.significant else
         "undetermined" if stats.verdict(c) == "undetermined" else "yes"])
  if cost is not None:
    cells = {(r["model"], r["placement"]): r for r in cost["results"]["rows"]}
    parts = [f"{model}: {cells[(model, bn)]['time_ratio']:.2f}x time, "
             f"{cells[(model, bn)]['memory_ratio']:.2f}x temporary memory"
             for model in ("mlp", "cnn") if (model, bn) in cells]
    more = all(cells[(m, bn)]["time_ratio"] > 1
               or cells[(m, bn)]["memory_ratio"] > 1
               for m in ("mlp", "cnn") if (m, bn) in cells)
    claims.append(["BN costs computation and memory",
                   "benchmarks/bn_cost.py: one training step, batch 128, with "
                   "vs without BN after the ReLU", "; ".join(parts),
                   "yes" if more else "no"])
  c = family["gap"]
  claims.append(
      ["BN may hurt generalization",
       "the train (eval mode) - test gap, with vs without BN",
       f"{page.percent(gap(bn))} vs {page.percent(gap(plain))} points "
       f"({page.judged(c)})",
       ("yes in this sense: the gap is wider with BN" if c.diff > 0 and
        c.significant else
        "undetermined" if c.diff > 0 and stats.verdict(c) == "undetermined"
        else "no: the gap is not wider with BN")])
  claims.append(_worked_example_claim())
  text = ["## The source article's claims\n",
          page.provenance_markdown([s for s in (scaled, raw, cost) if s]),
          "The article's Keras example, Dense(50, relu) -> BN -> Dense(10), "
          "Adam 1e-3, batch 128, against the same network without BN and "
          "with BN on the input only. Its code declares `input_shape=(100,)`,"
          " which cannot take MNIST's 784 pixels; the fix is the one change: "
          "784 inputs (the flattened 28 x 28 image). \"Train accuracy\" is "
          "measured as Keras' `evaluate` does, over the whole training set "
          "in eval mode (`config.eval_train`). Mean +- sample std over "
          f"{n} seeds; differences by Welch's t test (different networks), "
          "the section's comparisons one Holm family.\n",
          page.table(["claim", "experiment", "measured", "holds?"], claims)]
  if cost is not None:
    text.append(page.table(
        ["model", "placement", "ms per step", "vs none",
         "temporary memory (KiB)", "vs none"],
        [[r["model"], r["placement"], f"{r['ms_per_step']:.2f}",
          f"{r['time_ratio']:.2f}", f"{r['temp_bytes'] / 1024:.0f}",
          f"{r['memory_ratio']:.2f}"] for r in cost["results"]["rows"]]))
  return "\n".join(text)


def _faster(bn_rows, plain_rows) -> str:
  def first(rows):
    epochs = [min((r["epoch"] for r in mine if r["test_accuracy"] >= 0.97),
                  default=np.inf) for mine in page.by_run(rows).values()]
    return np.mean(epochs)  # inf when a run never reaches it
  a, b = first(bn_rows), first(plain_rows)
  if np.isinf(a) and np.isinf(b):
    return "not measured: neither network reaches 97%"
  return ("yes" if a < b else "no") + (
      " (a run that never reaches 97% counts as never)")


def _worked_example_claim() -> list[str]:
  """The article's example through the pure API: a batch with exactly its
  mean and variance (mean +- sqrt(var))."""
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
          f"gives {beta - expected:.4f}, {beta + expected:.4f}",
          "yes" if ok else "no"]
