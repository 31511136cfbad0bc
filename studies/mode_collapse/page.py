"""The mode-collapse study's section of docs/studies.md and its report.

Claims tested (each a comparison of two variants, 10 seeds each):
DCGAN (Radford et al. 2016, section 3) puts BN in G and D and says it
"prevented the generator from collapsing all samples to a single point";
the source article says BN "reduces mode collapse". Per comparison: Welch's
t test on modes covered and on KL to uniform (mean difference, 95%
interval), Fisher's exact test on the collapsed-seed counts; every test of
the section one Holm family. A verdict: "supported" where a test is
beyond noise (Holm) in BN's favour and none against it; "contradicted"
where one is against it and none in favour; else "not resolved at this
power".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bn_lab import page as page_lib
from bn_lab import report as report_lib
from bn_lab import stats
from bn_lab import workdir as workdir_lib
from studies.mode_collapse import mode_collapse

ReportError = report_lib.ReportError

# (label, variant "a", variant "b"): does a collapse less than b? Variants
# are (generator_norm, discriminator_norm).
CLAIMS = (
    ("BN in G and D (DCGAN) vs neither", ("batch", "batch_separate"),
     ("none", "none")),
    ("BN in G, D without norm", ("batch", "none"), ("none", "none")),
    ("BN in G, D with BN", ("batch", "batch_separate"),
     ("none", "batch_separate")),
    ("BN in D, G without norm", ("none", "batch_separate"), ("none", "none")),
    ("BN in D, G with BN", ("batch", "batch_separate"), ("batch", "none")),
)

# Published Stacked-MNIST numbers (modes of 1,000; KL to uniform), as
# given in the papers' tables; their nets and training differ from ours.
LITERATURE = (
    ("DCGAN (VEEGAN's table; PacGAN repeats it)", "99", "3.40"),
    ("Unrolled GAN (VEEGAN's table)", "48.7", "4.32"),
    ("VEEGAN (Srivastava et al. 2017)", "150", "2.95"),
    ("PacDCGAN2 (Lin et al. 2018)", "1000.0 ± 0.0", "0.06 ± 0.01"),
    ("DCGAN, D of 1/4 size (Metz et al. 2017)", "30.6 ± 20.7",
     "5.99 ± 0.42"),
    ("DCGAN, D of 1/2 size (Metz et al. 2017)", "628.0 ± 140.9",
     "2.58 ± 0.75"),
)


# ----------------------------------------------------------------------------
# The analysis: pure functions of results.json.


def by_variant(results) -> dict[tuple[str, str], Mapping[str, Any]]:
  return {(v["generator_norm"], v["discriminator_norm"]): v
          for v in results["variants"]}


def claim_tests(results) -> list[dict[str, Any]]:
  """One entry per CLAIMS comparison whose two variants ran: its Welch
  comparisons (modes covered, KL) and Fisher p, Holm across all of them,
  and the verdict."""
  by = by_variant(results)
  threshold = results["collapse_modes"]
  claims = []
  for label, a, b in CLAIMS:
    if a not in by or b not in by:
      continue
    va, vb = by[a], by[b]
    n_a, n_b = len(va["modes_covered"]), len(vb["modes_covered"])
    ca = mode_collapse.count_below(va["modes_covered"], threshold)
    cb = mode_collapse.count_below(vb["modes_covered"], threshold)
    claims.append({
        "label": label, "a": a, "b": b, "collapsed": (ca, n_a, cb, n_b),
        "modes": stats.welch(va["modes_covered"], vb["modes_covered"],
                             label=f"{label}: modes covered"),
        "kl": stats.welch(va["kl_to_uniform"], vb["kl_to_uniform"],
                          label=f"{label}: KL"),
        "fisher_p": mode_collapse.fisher_exact(
            [[ca, n_a - ca], [cb, n_b - cb]])})
  # One Holm family: 2 Welch p and 1 Fisher p per claim.
  raw = [p for c in claims for p in (c["modes"].p, c["kl"].p, c["fisher_p"])]
  adjusted = stats.holm(raw) if raw else []
  for i, c in enumerate(claims):
    q_modes, q_kl, q_fisher = adjusted[3 * i:3 * i + 3]
    c["modes"] = _with_holm(c["modes"], q_modes)
    c["kl"] = _with_holm(c["kl"], q_kl)
    c["fisher_holm"] = float(q_fisher)
    c["verdict"] = verdict(c)
  return claims


def _with_holm(c: stats.Comparison, q) -> stats.Comparison:
  return dataclasses.replace(c, p_holm=float(q))


def verdict(claim) -> str:
  """BN's side (a) helps where it covers more modes, has lower KL, or has
  fewer collapsed seeds; judged on the Holm-adjusted p values."""
  ca, n_a, cb, n_b = claim["collapsed"]
  signs = []  # +1: a test beyond noise in BN's favour; -1: against
  for c, better in ((claim["modes"], 1), (claim["kl"], -1)):
    if c.significant:
      signs.append(better * np.sign(c.diff))
  if claim["fisher_holm"] < stats.ALPHA:
    signs.append(np.sign(cb / n_b - ca / n_a))
  if any(s > 0 for s in signs) and not any(s < 0 for s in signs):
    return "supported"
  if any(s < 0 for s in signs) and not any(s > 0 for s in signs):
    return "contradicted"
  return "not resolved at this power"


def plateau(rows, name: str) -> stats.Comparison | None:
  """Modes covered on the curve samples at the last epoch minus at the
  epoch three quarters through (paired over seeds); None without a
  curve or with fewer than two epochs."""
  rows = [r for r in rows if r.get("combo") == name and "modes_covered" in r]
  epochs = sorted({r["epoch"] for r in rows})
  if len(epochs) < 2:
    return None
  last, earlier = epochs[-1], epochs[max(0, round(0.75 * len(epochs)) - 1)]
  if earlier == last:
    earlier = epochs[-2]
  at = lambda e: [r["modes_covered"] for r in sorted(
      (r for r in rows if r["epoch"] == e), key=lambda r: r["run"])]
  return stats.paired(at(last), at(earlier),
                      label=f"{name}: epoch {last} - epoch {earlier}")


def _range(values, fmt: str) -> str:
  return (f"{fmt.format(np.median(values))} "
          f"[{fmt.format(np.min(values))}, {fmt.format(np.max(values))}]")


# ----------------------------------------------------------------------------
# Figures.


def plot_curves(rows, results, path: Path) -> bool:
  """Modes covered (curve samples) per epoch, median and range over seeds,
  one line per variant; False (nothing drawn) without a curve."""
  rows = [r for r in rows if "modes_covered" in r]
  if not rows:
    return False
  fig = report_lib.new_figure((6.0, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  for v in results["variants"]:
    mine = [r for r in rows if r["combo"] == v["variant"]]
    epochs = sorted({r["epoch"] for r in mine})
    values = [[r["modes_covered"] for r in mine if r["epoch"] == e]
              for e in epochs]
    steps = [e * results["steps_per_epoch"] for e in epochs]
    line, = ax.plot(steps, [np.median(x) for x in values], marker="o",
                    label=v["variant"])
    ax.fill_between(steps, [min(x) for x in values],
                    [max(x) for x in values], color=line.get_color(),
                    alpha=0.15)
  ax.set_xlabel("training step")
  ax.set_ylabel(f"modes covered of {results['num_modes']}\n"
                f"({results['curve_samples']:,} samples)")
  ax.legend(fontsize=7)
  report_lib.save_figure(fig, path)
  return True


def plot_samples(workdir: Path, results, path: Path) -> None:
  """The first seed's first final samples, one row per variant, as RGB."""
  variants = results["variants"]
  fig = report_lib.new_figure((6.0, 1.0 * len(variants) + 0.3))
  for i, v in enumerate(variants):
    samples = np.load(workdir / "samples" / v["variant"] / "final.npy")[0]
    n = min(8, len(samples))
    ax = fig.add_subplot(len(variants), 1, i + 1)
    ax.imshow(np.concatenate(list(samples[:n]), axis=1),
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(v["variant"].replace("_", "\n"), fontsize=6, rotation=0,
                  ha="right", va="center")
  report_lib.save_figure(fig, path)


# ----------------------------------------------------------------------------
# Text.


def body(results, rows, workdir: Path, figures: Path, prefix: str = ""
         ) -> str:
  """The section's text after the heading and provenance; figures are
  written into `figures` and linked as `prefix` + name."""
  ref, cls = results["reference"], results["classifier"]
  threshold, n_modes = results["collapse_modes"], results["num_modes"]
  seeds = len(results["seeds"])
  text = [
      f"{len(results['variants'])} variants x {seeds} seeds (vmapped), "
      f"{results['steps']:,} steps of batch {results['batch_size']} on "
      f"Stacked-MNIST; the GAN study's nets with 3-channel images. "
      f"{results['eval_samples']:,} samples per run (G in eval mode), each "
      f"channel read by a CNN trained here on MNIST "
      f"({100 * cls['test_accuracy']:.2f}% test accuracy; its cube, "
      f"{100 * cls['test_accuracy'] ** 3:.1f}%, approximates a three-digit "
      f"read). The ceiling, {ref['images']:,} real Stacked-MNIST test "
      f"images as the classifier reads them: all three digits right "
      f"{100 * ref['three_digit_accuracy']:.1f}%, {ref['modes_covered']} "
      f"modes covered, KL {ref['kl_to_uniform']:.3f} (true labels: "
      f"{ref['true_modes_covered']} modes, KL "
      f"{ref['true_kl_to_uniform']:.3f}). A seed counts as collapsed below "
      f"{threshold} of {n_modes} modes (fixed before the run). Median "
      "[min, max] over seeds.\n"]
  lines, rising = [], []
  for v in results["variants"]:
    change = plateau(rows, v["variant"])
    if change is not None and change.significant and change.diff > 0:
      rising.append(v["variant"])
    lines.append([
        v["generator_norm"], v["discriminator_norm"],
        _range(v["modes_covered"], "{:.0f}"),
        _range(v["kl_to_uniform"], "{:.2f}"),
        f"{v['collapsed']} of {len(v['seeds'])}",
        "-" if change is None else page_lib.judged(change, "", 1.0, 1)])
  text.append(page_lib.table(
      ["G norm", "D norm", "modes covered", "KL to uniform",
       f"seeds < {threshold} modes",
       f"modes covered, last epoch - 3/4 through ({results['curve_samples']:,}"
       " samples; paired over seeds)"], lines))
  if rising:
    text.append(
        f"**Not plateaued:** {len(rising)} of {len(results['variants'])} "
        f"variants ({', '.join(rising)}) still gained modes over the last "
        "quarter of training, beyond noise; the comparisons below hold at "
        f"{results['steps']:,} steps, not at convergence.\n")
  counts = []
  for cut in (10, 100, 500, 900):
    counts.append(f"< {cut} modes: " + ", ".join(
        f"{v['variant']} {mode_collapse.count_below(v['modes_covered'], cut)}"
        f" of {len(v['seeds'])}" for v in results["variants"]))
  text.append("Seeds below other thresholds (counts, not tested): "
              + "; ".join(counts) + ".\n")
  if plot_curves(rows, results, figures / "mode_collapse_curves.png"):
    text.append(f"![modes covered over training]({prefix}"
                "mode_collapse_curves.png)\n")
  plot_samples(workdir, results, figures / "mode_collapse_samples.png")
  text.append(f"![samples, first seed]({prefix}mode_collapse_samples.png)\n")
  claims = claim_tests(results)
  if claims:
    text.append(
        "Claims: BN's side against the other, Welch's t on modes covered "
        "and on KL (difference of means, 95% interval), Fisher's exact "
        "test on the collapsed seeds; all "
        f"{3 * len(claims)} tests one Holm family.\n")
  for c in claims:
    ca, n_a, cb, n_b = c["collapsed"]
    text.append(
        f"* **{c['label']}** ({'G-{}_D-{}'.format(*c['a'])} vs "
        f"{'G-{}_D-{}'.format(*c['b'])}): modes "
        f"{page_lib.judged(c['modes'], '', 1.0, 1)}; KL "
        f"{page_lib.judged(c['kl'], '', 1.0, 3)}; collapsed {ca} of {n_a} "
        f"vs {cb} of {n_b}, Fisher p = {c['fisher_p']:.3g} (Holm "
        f"{c['fisher_holm']:.3g}). **Verdict: {c['verdict']}.**")
  text.append(
      "\nPublished Stacked-MNIST numbers (modes of 1,000, KL), from the "
      "papers' tables (VEEGAN, Srivastava et al. 2017; PacGAN, Lin et al. "
      "2018; Unrolled GAN, Metz et al. 2017) as recalled, not re-checked "
      "against the papers when this page was written: larger DCGAN-style "
      "nets trained for many epochs, 26,000 samples (VEEGAN, PacGAN), a "
      "classifier of their own. "
      "Ours are much smaller nets and "
      f"{results['steps']:,} steps, so the levels are not comparable; the "
      "comparison between norms is the result.\n")
  text.append(page_lib.table(["model (source)", "modes", "KL"],
                             [list(r) for r in LITERATURE]))
  return "\n".join(text)


def section(studies, out: Path) -> str:
  study = studies[0]
  results = study["results"]
  return "\n".join([
      "## BN against mode collapse (Stacked-MNIST)\n",
      page_lib.provenance_markdown(studies),
      body(results, study["rows"], study["path"], out)])


def write_report(workdir) -> str:
  """report.md and its figures in `workdir`; returns its path."""
  workdir = Path(workdir)
  try:
    results = json.loads((workdir / "results.json").read_text())
  except (OSError, ValueError) as e:
    raise ReportError(f"{workdir}/results.json cannot be read ({e}); run "
                      "the study first.") from None
  rows = workdir_lib.read_jsonl(workdir / "metrics.jsonl")
  figures = workdir / "figures"
  figures.mkdir(exist_ok=True)
  text = (f"# {results['study']}\n\n"
          + body(results, rows, workdir, figures, "figures/"))
  path = workdir / "report.md"
  workdir_lib.write_atomic(path, text + "\n")
  return str(path)
