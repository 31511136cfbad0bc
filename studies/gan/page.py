"""The GAN study's section of docs/studies.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bn_lab import page
from bn_lab import stats
from studies.gan import report as gan_report


GAN_METRICS = (("coverage_entropy", "coverage entropy (nats)", "{:.3f}"),
               ("classes_5pct", "classes >= 5%", "{:.1f}"),
               ("frechet_distance", "Frechet distance", "{:.2f}"))


def section(studies, out: Path) -> str:
  study = studies[0]
  results = study["results"]
  variants = results["variants"]
  cell = lambda values, fmt: (fmt.format(np.mean(values)) + " +- "
                              + fmt.format(np.std(values, ddof=1))
                              if len(values) > 1 else fmt.format(values[0]))
  lines = [[v["generator_norm"], v["discriminator_norm"]]
           + [cell(v["eval_mode"][k], fmt) for k, _, fmt in GAN_METRICS]
           for v in variants]
  finals = {v["variant"]: np.load(study["path"] / "samples" / v["variant"]
                                  / "final.npy") for v in variants}
  text = ["## BN in a GAN: does it reduce mode collapse?\n",
          page.provenance_markdown(studies),
          f"{len(variants)} variants x {len(results['seeds'])} seeds, "
          f"{results['steps']:,} steps of batch {results['batch_size']}; "
          f"{results['eval_samples']:,} samples per run, drawn with G in eval "
          "mode, labeled by a classifier bn_jax trained "
          f"({100 * results['classifier']['test_accuracy']:.2f}% test "
          "accuracy): mean +- sample std over seeds. Setup, figures over "
          "training and the per-variant grids: [gan.md](gan.md).\n",
          page.table(["G norm", "D norm"] + [h for _, h, _ in GAN_METRICS], lines),
          page.figure(out, f"{study['label']}_samples.png",
                 lambda p: gan_report.plot_overview(finals, variants, p),
                 "samples, first seed")]
  by = {(v["generator_norm"], v["discriminator_norm"]): v["eval_mode"]
        for v in variants}
  family = comparisons(by)
  if family:
    text.append("BN in G against no norm in G, per D norm: Welch's t test "
                "over seeds (different generators), every metric and D norm "
                "one Holm family; BN - none with its 95% interval.\n")
  for d_norm in dict.fromkeys(d for _, d in family):
    bn, plain = by[("batch", d_norm)], by[("none", d_norm)]
    parts = [f"{name} {np.mean(plain[key]):.2f} -> {np.mean(bn[key]):.2f} "
             f"({page.judged(family[(key, d_norm)], '', 1.0)})"
             for key, name, _ in GAN_METRICS]
    text.append(f"* **BN in G, D norm {d_norm}:** " + "; ".join(parts)
                + ".")
  collapsed = [(v["variant"], seed) for v in variants
               for seed, n in zip(v["seeds"], v["eval_mode"]["classes_5pct"])
               if n <= 1]
  text.append("* Runs collapsed to at most one class: "
              + (", ".join(f"{name} seed {seed}" for name, seed in collapsed)
                 or "none") + f", of {len(variants) * len(results['seeds'])}"
              " runs.\n")
  return "\n".join(text)


def comparisons(by) -> dict[tuple[str, str], stats.Comparison]:
  """(metric, D norm) -> BN in G against none in G (Welch: different
  generators), for every D norm with both; Holm-corrected together."""
  out = {}
  for d_norm in dict.fromkeys(d for _, d in by):
    if ("batch", d_norm) not in by or ("none", d_norm) not in by:
      continue
    bn, plain = by[("batch", d_norm)], by[("none", d_norm)]
    for key, _, _ in GAN_METRICS:
      out[(key, d_norm)] = stats.welch(bn[key], plain[key],
                                       label=f"{key}, D {d_norm}: BN in G "
                                       "- none")
  return dict(zip(out, stats.holm_family(out.values())))
