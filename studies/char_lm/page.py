"""The char-LM study's section of docs/studies.md (and its report.md): the
bpc table, the curves, bpc by position in long windows, and the paper's
claims judged by paired t tests over seeds (one Holm family)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

NAMES = {"batch": "BN-LSTM", "layer": "LN-LSTM", "none": "LSTM"}
TITLE = "BN-LSTM, LN-LSTM and LSTM character-level language models"


def _variants(results) -> dict[str, Mapping[str, Any]]:
  return {v["norm"]: v for v in results["variants"]}


def _interval(values) -> str:
  return page.interval(values, digits=3)


def _early_index(curve) -> int:
  """The evaluation at a quarter of training (the convergence claim)."""
  return max(0, len(curve["step"]) // 4 - 1)


def results_table(results) -> str:
  variants = _variants(results)
  lines = []
  for norm, v in variants.items():
    early = _early_index(v["curve"])
    lines.append([
        NAMES[norm], _interval(v["test_bpc"]),
        f"{_interval(v['curve']['valid_bpc'][early])} (step "
        f"{v['curve']['step'][early]:,})",
        _interval(v["long"]["within_t_max"]),
        _interval(v["long"]["past_t_max"])])
  return page.table(
      ("model", "test bpc, windows of T_max", "validation bpc early",
       "long windows: bpc at t < T_max", "long windows: bpc at t >= T_max"),
      lines)


def claims(results, family: page.Family) -> list[list[str]]:
  """The claim rows; every comparison paired by seed (same initial weights
  and training windows across norms)."""
  variants = _variants(results)
  rows = []
  bn, plain, ln = (variants.get(n) for n in ("batch", "none", "layer"))

  def row(claim, setting, a, b, label, expected):
    """expected: the claim's sign of a - b; None: no claim, the verdict
    says only whether the difference is beyond noise."""
    c = family.compare(a, b, paired=True, label=label)
    rows.append([claim, setting, page.judged(c, "bpc", 1.0, 3) + " (paired t)",
                 stats.verdict(c) if expected is None
                 else page.claim_verdict(c, expected)])

  if bn and plain:
    row("BN-LSTM reaches a lower bpc than the LSTM (Cooijmans et al., "
        "character-level Penn Treebank)",
        "fortunes text, test bpc after a fixed budget, smaller net and "
        "budget than the paper's (a longer one could change it: see the "
        "last quarter's drop above)", bn["test_bpc"], plain["test_bpc"],
        "test bpc BN-LSTM - LSTM", -1)
    early = _early_index(bn["curve"])
    row("BN-LSTM converges faster than the LSTM",
        f"validation bpc at step {bn['curve']['step'][early]:,} (a quarter "
        "of the budget)", bn["curve"]["valid_bpc"][early],
        plain["curve"]["valid_bpc"][early],
        "early validation bpc BN-LSTM - LSTM", -1)
  if bn:
    row("BN-LSTM generalizes to sequences longer than T_max with the "
        "statistics of T_max (its bpc keeps falling with more context)",
        f"test windows of {bn['long']['length']} characters: bpc at "
        "t >= T_max minus bpc at t < T_max", bn["long"]["past_t_max"],
        bn["long"]["within_t_max"], "BN-LSTM past - within T_max", -1)
  if bn and plain:
    gain = lambda v: np.subtract(v["long"]["past_t_max"],
                                 v["long"]["within_t_max"])
    row("... at least as much as the LSTM, which needs no statistics",
        "the same difference, BN-LSTM minus LSTM", gain(bn), gain(plain),
        "past-T_max gain BN-LSTM - LSTM", -1)
  if bn and ln:
    row("(no paper's claim) BN-LSTM against LN-LSTM (Ba et al. propose LN "
        "for recurrent nets)", "test bpc", bn["test_bpc"], ln["test_bpc"],
        "test bpc BN-LSTM - LN-LSTM", None)
  return rows


def last_quarter_drops(results) -> str:
  """How much each model's mean validation bpc fell over the last quarter
  of the budget: how far from converged the fixed budget left it."""
  parts = []
  for norm, v in _variants(results).items():
    bpc = np.asarray(v["curve"]["valid_bpc"]).mean(axis=1)
    start = bpc[-1 - max(1, len(bpc) // 4)]
    parts.append(f"{NAMES[norm]} {start - bpc[-1]:.3f}")
  return ("Validation bpc fell over the last quarter of the budget by: "
          + ", ".join(parts) + " (a model still falling fast is not "
          "converged, and a longer budget could change a verdict on it).\n")


def plot_curves(results, t_max: int, path: Path | None = None):
  """Validation bpc by step (mean over seeds, band: min to max), and bpc by
  position in the long test windows (mean over seeds)."""
  fig = report.new_figure((10, 4))
  curves, positions = fig.subplots(1, 2)
  for i, (norm, v) in enumerate(_variants(results).items()):
    bpc = np.asarray(v["curve"]["valid_bpc"])
    curves.plot(v["curve"]["step"], bpc.mean(axis=1), color=f"C{i}",
                label=NAMES[norm])
    curves.fill_between(v["curve"]["step"], bpc.min(axis=1),
                        bpc.max(axis=1), color=f"C{i}", alpha=0.2)
    by_position = np.asarray(v["long"]["mean_by_position"])
    window = max(1, by_position.size // 40)
    smooth = np.convolve(by_position, np.ones(window) / window, "valid")
    positions.plot(np.arange(smooth.size) + window / 2, smooth,
                   color=f"C{i}", label=NAMES[norm])
  curves.set(xlabel="training step", ylabel="validation bpc",
             title="validation bpc (band: seeds' range)")
  positions.set(xlabel="position in the test window",
                ylabel=f"test bpc (moving mean of {window})",
                title="long windows (dashed: T_max)")
  positions.axvline(t_max, color="k", ls="--", lw=0.8)
  for ax in (curves, positions):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  report.save_figure(fig, path)
  return fig


def section(studies, out: Path) -> str:
  study = studies[0]
  results, config = study["results"], study["config"]
  chars = results["characters"]
  text = [
      f"## {TITLE}\n",
      page.provenance_markdown(studies),
      f"One LSTM layer of {config['hidden_size']} units on one-hot "
      f"characters ({results['vocab_size']} symbols) of {results['corpus']} "
      f"({chars['train']:,} / {chars['validation']:,} / {chars['test']:,} "
      "characters of train / validation / test), a Dense readout. Training "
      f"windows of T_max = {config['seq_len']} characters from random "
      f"starting points, each from h_0 = c_0 = 0; batch "
      f"{config['batch_size']}, Adam {config['learning_rate']:g}, gradients "
      f"clipped to global norm {config['grad_clip_norm']:g}, "
      f"{config['steps']:,} steps, {len(results['seeds'])} seeds (seed i of "
      "every cell starts from the same weights and reads the same windows). "
      "BN per time step (the paper's): epsilon "
      f"{config['bn']['epsilon']:g}, gammas from {config['bn']['scale_init']:g}"
      f"; LN's gammas from {config['layer_scale_init']:g}. The paper's setup "
      "(Cooijmans et al. 2016, character-level Penn Treebank) is larger: "
      "1,000 units, T_max 100, batch 64. Test bpc reads non-overlapping "
      "test windows of T_max characters, in eval mode with population "
      f"statistics recomputed over {config['population_batches']} training "
      "batches; long windows are "
      f"{config['long_factor']} x T_max, the steps past T_max reading the "
      "statistics of step T_max. Mean [95% t interval] over seeds:\n",
      results_table(results),
      last_quarter_drops(results),
      page.figure(out, f"{study['label']}.png",
                  lambda p: plot_curves(results, config["seq_len"], p),
                  "validation bpc by step; test bpc by position"),
      "Claims, each a paired t test over seeds, the section one Holm "
      "family:\n",
      page.in_one_family(lambda family: page.claims_table(
          claims(results, family))),
  ]
  bn = _variants(results).get("batch")
  if bn and "test_bpc_running_averages" in bn:
    text.append(
        "The BN-LSTM's test bpc with the running averages (momentum "
        f"{config['bn']['momentum']}) instead of recomputed population "
        f"statistics: {_interval(bn['test_bpc_running_averages'])}.\n")
  return "\n".join(text)
