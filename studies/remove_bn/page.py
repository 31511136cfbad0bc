"""The BN-removal study's section of docs/studies.md: test accuracy by
variant and batch size (table and figure, the GN paper's batch-size curve in
shape) and the papers' claims judged by Welch's t test over seeds, the
section one Holm family."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

TITLE = "Can you remove BN? A residual CNN at batch sizes 2 to 512"
NAMES = {
    "bn": "BN", "gn": "GroupNorm", "ln": "LayerNorm", "frn": "FRN + TLU",
    "evonorm_s0": "EvoNorm-S0", "evonorm_b0": "EvoNorm-B0",
    "ws_gn": "WS + GN", "nf": "NF (Scaled WS + AGC + SkipInit)",
    "skip_init": "SkipInit alone", "none": "no norm"}
# "Matches" (an equivalence claim): the 95% interval of the difference lies
# within this many points of 0.
MATCH_MARGIN = 1.0

Cells = dict[tuple[str, int], dict[str, Any]]


class Claim(NamedTuple):
  claim: str  # the paper's claim
  a: str  # variant
  b: str  # variant
  batch: int
  expected: int  # +1: a above b; 0: a matches b (within MATCH_MARGIN)


CLAIMS = (
    Claim("Wu & He (2018): at batch 2, GroupNorm's error is far below "
          "BN's (10.6 points lower, ResNet-50 on ImageNet)",
          "gn", "bn", 2, +1),
    Claim("Wu & He (2018): at a normal batch BN is still ahead of GN "
          "(23.6 against 24.1% error at 32 per GPU)", "bn", "gn", 128, +1),
    Claim("Singh & Krishnan (2020): FRN + TLU beats BN at large batch",
          "frn", "bn", 128, +1),
    Claim("Singh & Krishnan (2020): FRN + TLU beats GN at small batch",
          "frn", "gn", 2, +1),
    Claim("Liu et al. (2020): EvoNorm-S0 beats GN at small batch",
          "evonorm_s0", "gn", 2, +1),
    Claim("Liu et al. (2020): EvoNorm-B0 beats BN", "evonorm_b0", "bn", 128,
          +1),
    Claim("Qiao et al. (2019): WS + GN beats GN", "ws_gn", "gn", 2, +1),
    Claim("Qiao et al. (2019): WS + GN beats BN at large batch", "ws_gn",
          "bn", 128, +1),
    Claim("Brock et al. (2021a, b): a normalizer-free ResNet (Scaled WS, "
          "AGC, a zero-initialized residual gain) matches the BN ResNet",
          "nf", "bn", 128, 0),
    Claim("... the same, at the batch with the most steps", "nf", "bn", 2,
          0),
    Claim("De & Smith (2020): SkipInit trains a residual net without "
          "normalization (better than none)", "skip_init", "none", 128, +1),
    Claim("... the same, at the batch with the most steps", "skip_init",
          "none", 2, +1),
)


def cells(rows) -> Cells:
  """(variant, batch size) -> {"accuracy": the final test accuracies of
  the runs that did not diverge, "diverged": how many did, "runs"}."""
  out: Cells = {}
  for mine in page.by_combo(rows).values():
    finals, lost = page.split_diverged(mine)
    key = (mine[0]["variant"], int(mine[0]["batch_size"]))
    out[key] = {"accuracy": np.array([r["test_accuracy"] for r in finals]),
                "loss": np.array([r["test_loss"] for r in finals]),
                "diverged": len(lost), "runs": len(finals) + len(lost)}
  return out


def _interval(values, scale: float = 100.0) -> str:
  """"87.31 [86.90, 87.72]": in points by default."""
  return page.interval(values, scale)


def accuracy_table(by: Cells, variants: Sequence[str],
                   sizes: Sequence[int]) -> str:
  lines = []
  for variant in variants:
    line = [NAMES.get(variant, variant)]
    for size in sizes:
      cell = by.get((variant, size))
      if cell is None:
        line.append("")
        continue
      text = _interval(cell["accuracy"])
      if cell["diverged"]:
        text += f" ({cell['diverged']} of {cell['runs']} diverged)"
      line.append(text)
    lines.append(line)
  return page.table(["variant", *(f"batch {s}" for s in sizes)], lines)


def best_per_size(by: Cells, variants, sizes) -> str:
  """One line per batch size: the variant with the highest mean."""
  parts = []
  for size in sizes:
    means = {v: by[(v, size)]["accuracy"].mean() for v in variants
             if (v, size) in by and len(by[(v, size)]["accuracy"])}
    if means:
      best = max(means, key=means.get)
      parts.append(f"batch {size}: {NAMES.get(best, best)} "
                   f"({100 * means[best]:.2f}%)")
  return "Highest mean test accuracy per batch size: " + "; ".join(
      parts) + ".\n"


def claims(by: Cells, config: Mapping[str, Any],
           family: page.Family) -> list[list[str]]:
  rows = []
  for claim in CLAIMS:
    a, b = by.get((claim.a, claim.batch)), by.get((claim.b, claim.batch))
    if a is None or b is None:
      continue
    c = family.compare(a["accuracy"], b["accuracy"],
                       label=f"{claim.a} - {claim.b}, batch {claim.batch}")
    verdict = (page.equivalence_verdict(c, MATCH_MARGIN)
               if claim.expected == 0
               else page.claim_verdict(c, claim.expected))
    steps = (config["train_examples"] // claim.batch) * config["num_epochs"]
    setting = (f"ResNet-8 (widths {tuple(config['channels'])}) on "
               f"{config['dataset']}, batch {claim.batch} ({steps:,} "
               f"steps), {NAMES[claim.a]} - {NAMES[claim.b]}, test accuracy")
    if claim.expected == 0:
      setting += f"; 'matches' = the interval within +-{MATCH_MARGIN:g} point"
    rows.append([claim.claim, setting,
                 page.judged(c) + " (Welch)", verdict])
  return rows


def plot_batch_sizes(by: Cells, variants, sizes, path: Path | None = None):
  """Test error against batch size (log scale), one line per variant, the
  95% t interval as error bars: the GN paper's Figure 1 in shape."""
  fig = report.new_figure((7.5, 4.5))
  ax = fig.add_subplot()
  for variant in variants:
    xs, ys, lows, highs = [], [], [], []
    for size in sizes:
      cell = by.get((variant, size))
      if cell is None or not len(cell["accuracy"]):
        continue
      mean, low, high = stats.mean_interval(100 * (1 - cell["accuracy"]))
      xs.append(size)
      ys.append(mean)
      lows.append(mean - low if np.isfinite(low) else 0.0)
      highs.append(high - mean if np.isfinite(high) else 0.0)
    if xs:
      ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=2,
                  label=NAMES.get(variant, variant))
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(sizes), [str(s) for s in sizes])
  ax.set_xlabel("batch size")
  ax.set_ylabel("test error (%), mean and 95% t interval")
  ax.legend(fontsize=7, ncol=2)
  report.save_figure(fig, path)
  return fig


def setting_text(config: Mapping[str, Any], by: Cells) -> str:
  sizes = sorted({s for _, s in by})
  return (
      f"ResNet-8 ({config['resnet']['blocks_per_stage']} basic block per "
      f"stage, widths {tuple(config['channels'])}, a stride-"
      f"{config['resnet']['stem_stride']} stem) on {config['dataset']}: "
      f"{config['num_epochs']} epoch(s) over a fixed subset of "
      f"{config['train_examples']:,} training images, batch sizes "
      f"{', '.join(map(str, sizes))}, {len(config['seeds'])} seeds per "
      "cell (one data order for all). SGD with Nesterov momentum 0.9, "
      f"rate {config['learning_rate']:g} x B / "
      f"{config['lr_reference_batch_size']} (the linear rule of Goyal et "
      "al., as the GN paper), cosine decay to 0; BN momentum "
      f"{config['bn']['momentum']} (PyTorch's {1 - config['bn']['momentum']:.1f}"
      f"), epsilon {config['bn']['epsilon']:g}; GN and EvoNorm-S0 with "
      f"{config['bn']['num_groups']} groups. NF: Scaled WS, SkipInit and "
      f"AGC with clip {config['variant_settings']['nf']['agc_clip']:g} at "
      f"batch {config['lr_reference_batch_size']}, scaled as 1 / the "
      "rate's factor. No rate or epoch is tuned (so no validation split is "
      "read), and the budget is small: the large batches take few steps "
      f"({config['train_examples'] // max(sizes)} at batch {max(sizes)}), "
      "so a longer budget could change the large-batch verdicts. Cells: "
      "test accuracy (%) in eval mode, mean [95% t interval] over the runs "
      "that did not diverge.\n")


def section(studies, out: Path) -> str:
  study = studies[0]
  config, by = study["config"], cells(study["rows"])
  variants = [v for v in config["variants"] if any(k[0] == v for k in by)]
  sizes = sorted({s for _, s in by})
  return "\n".join([
      f"## {TITLE}\n", page.provenance_markdown(studies),
      setting_text(config, by), accuracy_table(by, variants, sizes),
      best_per_size(by, variants, sizes),
      page.figure(out, f"{study['label']}.png",
                  lambda p: plot_batch_sizes(by, variants, sizes, p),
                  "test error against batch size per variant"),
      "Claims, each Welch's t test over seeds (different networks), the "
      "section one Holm family:\n",
      page.in_one_family(lambda family: page.claims_table(
          claims(by, config, family)))])
