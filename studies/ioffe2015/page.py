"""The Ioffe & Szegedy (2015) Figure 1 section of docs/studies.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bn_lab import page
from bn_lab import stats
from studies.ioffe2015 import figure
from studies.ioffe2015 import probes


def section(studies, out: Path) -> str:
  studies = sorted(studies, key=lambda s: s["config"].get("init") != "default")
  config = studies[0]["config"]
  steps = max(r["step"] for r in studies[0]["rows"])
  text = [
      "## Ioffe & Szegedy (2015), Figure 1\n",
      page.provenance_markdown(studies),
      f"MNIST, 784 -> {len(config['widths'])} x (Dense({config['widths'][0]})"
      f" -> [BN] -> {config['activation']}) -> Dense(10), batch "
      f"{config['batch_size']}, {steps:,} steps of {config['optimizer']} "
      f"with learning rate {config['learning_rate']} for both networks (the "
      "paper names neither optimizer nor rate), BN before each sigmoid "
      f"with epsilon {config['bn']['epsilon']}"
      + (" and the unbiased running variance of the paper's Algorithm 2"
         if config["bn"]["unbiased_running_var"] else "")
      + f", {len(config['seeds'])} seeds. Every "
      f"{config['probe']['every_steps']} steps, the percentiles "
      f"{', '.join(map(str, probes.QS))} of every input to the last hidden "
      f"layer's sigmoids over the first {config['probe']['num_images']:,} "
      "test images, in eval mode. The figures plot unit "
      f"{probes.FIGURE_UNIT} (a fixed index, not a chosen \"typical\" unit) "
      "of the first seed, and the drift over all units: the median over "
      "units of |p50(t) - p50(end)| / IQR(end), per seed, then the median "
      "over seeds.\n"]
  lines, panels = [], []
  for study in studies:
    init = study["config"].get("init", "default")
    text.append(f"Initialization `{init}` ("
                + ("flax's LeCun normal" if init == "default" else
                   f"N(0, {study['config']['init_std']}^2) for every Dense "
                   "kernel, the paper's \"small random Gaussian values\"; "
                   "the paper gives no scale")
                + "):\n")
    text.append(page.figure(out, f"{study['label']}_figure1.png",
                       lambda p, s=study: figure.plot_probes(s["rows"], p),
                       f"Figure 1, {init} initialization"))
    combos = page.by_combo(study["rows"])
    plain, bn = combos["placement=none"], combos["placement=before_activation"]
    series = figure.probe_series(study["rows"])
    probe_steps = series["placement=none"][0]
    marks = sorted({probe_steps[0], *(probe_steps[int(np.argmin(np.abs(
        probe_steps - f * probe_steps[-1])))] for f in (0.1, 0.2, 0.5))})
    drifts = {name: np.median([probes.drift_of_probes(v) for v in values],
                              0)
              for name, (_, values) in series.items()}
    for network, rows in (("no BN", plain), ("BN", bn)):
      finals = [r["test_accuracy"] for r in page.final_rows(rows)]
      drift = drifts[rows[0]["combo"]]
      to = [page.first_reaching(rows, t, "step") for t in (0.97, 0.98)]
      lines.append([init, network, " / ".join(f"{100 * a:.2f}"
                                              for a in finals),
                    page.percent(finals)]
                   + [f"{s:,}" if s else "not reached" for s in to]
                   + [" / ".join(f"{drift[list(probe_steps).index(m)]:.3f}"
                                 for m in marks)])
    panels.append((init, plain, bn, drifts["placement=none"],
                     drifts["placement=before_activation"], probe_steps))
  text.append(page.table(
      ["init", "network", "final test acc (eval mode), per seed",
       "mean +- std", "steps to 97%", "steps to 98%",
       "drift at step " + " / ".join(f"{m:,}" for m in marks)], lines))
  text.append(
      "Steps to 97% and 98%: of the mean over seeds, checked once per "
      "epoch; +- is the sample standard deviation (ddof=1).\n")
  # One family: the final accuracies, BN - no BN, of every initialization
  # (Welch: the two networks differ, so a seed shares no initialization).
  finals = lambda rows: [r["test_accuracy"] for r in page.final_rows(rows)]
  family = stats.holm_family(
      stats.welch(finals(bn), finals(plain), label=f"{init}: BN - no BN")
      for init, plain, bn, *_ in panels)
  text.append("Against the paper's panels (the final accuracies, BN - no "
              "BN, Welch's t test, one Holm family over the "
              "initializations):\n")
  text += [_ioffe_verdicts(*v, c) for v, c in zip(panels, family)]
  return "\n".join(text)


def _ioffe_verdicts(init, plain, bn, drift_plain, drift_bn, steps,
                    final: stats.Comparison) -> str:
  """(a) from the mean curves and `final`, the final accuracies' BN - no
  BN comparison (Holm-corrected over the section); (b, c) from the
  drifts."""
  xs, acc_plain = page.mean_curve(plain, "test_accuracy", "step")
  _, acc_bn = page.mean_curve(bn, "test_accuracy", "step")
  ahead = int(np.sum(acc_bn > acc_plain))
  lead = ("holds" if ahead == len(xs) else
          "holds at most checkpoints" if ahead > len(xs) / 2 else
          "does not hold")
  first = (f"* **{init}: (a) BN ahead at every checkpoint: {lead}.** The BN "
           f"network's mean test accuracy is above the plain network's at "
           f"{ahead} of {len(xs)} checkpoints; at the end, BN - no BN "
           f"{page.judged(final)}.")
  calmer = drift_bn < drift_plain
  if calmer.all():
    drift = "holds at every probe"
  elif calmer[0]:
    flip = steps[int(np.argmin(calmer))]
    drift = (f"holds early, not late: from step {flip:,} the BN network's "
             "drift is at or above the plain network's")
  else:
    drift = "does not hold: BN's inputs drift as much from the first probe"
  second = (f"* **{init}: (b, c) stable inputs with BN, drifting without: "
            f"{drift}.** Drift at the first probe {drift_bn[0]:.3f} with BN "
            f"against {drift_plain[0]:.3f} without; BN's is lower at "
            f"{int(calmer.sum())} of {len(steps)} probes. (The BN network's "
            "eval-mode inputs also move with its running averages.)")
  return first + "\n" + second + "\n"
