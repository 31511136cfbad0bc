"""The staleness study's section of docs/studies.md: per network (the
reference MLP, whose one BN layer feeds the readout, and the deep probe
with three), the moving average against recomputed statistics by momentum
and epoch (table, figure), and the claims judged by paired t tests over
seeds at the last epoch, the whole section one Holm family."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import train

TITLE = "How stale is the moving average"
MOVING, EXACT, NLL = "test_accuracy", train.PRECISE_METRIC, "test_loss"
EXACT_NLL = train.PRECISE_LOSS_METRIC
MEAN_GAP, VAR_GAP = train.STALENESS_METRICS

Rows = Sequence[Mapping[str, Any]]


# ----------------------------------------------------------------------------
# The networks.


def bn_layer_count(config: Mapping[str, Any]) -> int:
  """The BN layers of the lab's MLP: one per hidden layer where the
  placement is before or after the activation."""
  if config["placement"] in ("before_activation", "after_activation"):
    return len(config["widths"])
  return int(config["placement"] == "input")


def network_text(config: Mapping[str, Any]) -> str:
  """"784 -> Dense(50) -> relu -> BN -> Dense(10)"."""
  act = config["activation"]
  hidden = ((f"Dense({w}) -> BN -> {act}" if config["placement"]
             == "before_activation" else f"Dense({w}) -> {act} -> BN")
            for w in config["widths"])
  return " -> ".join(["784", *hidden, "Dense(10)"])


def network_name(config: Mapping[str, Any]) -> str:
  """What the claims call the network: where its BN layers are."""
  count = bn_layer_count(config)
  if config["placement"] == "after_activation" and count == 1:
    return "reference MLP (one BN layer, right before the readout)"
  return (f"deep probe ({count} BN layers, each followed by a "
          f"{config['activation']})")


def network_short_name(config: Mapping[str, Any]) -> str:
  """The network in a claim row: "reference MLP (1 BN layer, before the
  readout)" or "deep probe (3 BN layers)"."""
  count = bn_layer_count(config)
  if config["placement"] == "after_activation" and count == 1:
    return "reference MLP (1 BN layer, before the readout)"
  return f"deep probe ({count} BN layers)"


# ----------------------------------------------------------------------------
# Numbers.


def values(rows: Rows, momentum: float, epoch: int, key: str,
           seeds: Sequence[int]) -> np.ndarray:
  """`key` of the runs at (momentum, epoch), in the order of `seeds`: runs
  of one seed share initialization and data order at every momentum, so
  arrays in one seed order pair up."""
  by_seed = {r["seed"]: r[key] for r in rows
             if r["bn_momentum"] == momentum and r["epoch"] == epoch}
  return np.array([by_seed[s] for s in seeds], dtype=np.float64)


def common_seeds(rows: Rows, epoch: int) -> list[int]:
  """The seeds trained to `epoch` at every momentum (the pairs)."""
  momenta = {r["bn_momentum"] for r in rows}
  per_momentum = [{r["seed"] for r in rows if r["bn_momentum"] == m
                   and r["epoch"] == epoch} for m in momenta]
  return sorted(set.intersection(*per_momentum)) if per_momentum else []


def mean_at(rows: Rows, momentum: float, epoch: int, key: str) -> float:
  """The mean of `key` over the runs at (momentum, epoch)."""
  return float(np.mean([r[key] for r in rows if r["bn_momentum"] == momentum
                        and r["epoch"] == epoch]))


def cells_at_or_above(rows: Rows) -> tuple[int, int]:
  """(cells where the exact statistics' test accuracy is at or above the
  moving average's on average over seeds, all (momentum, epoch) cells)."""
  cells = {(r["bn_momentum"], r["epoch"]) for r in rows}
  above = sum(
      np.mean([r[EXACT] - r[MOVING] for r in rows
               if (r["bn_momentum"], r["epoch"]) == cell]) >= 0
      for cell in cells)
  return int(above), len(cells)


def exact_spread_across_momenta(rows: Rows) -> float:
  """The largest difference of the exact statistics' test accuracy between
  momenta within one (seed, epoch): 0 when momentum leaves the training
  alone, as it should (the built-in control)."""
  by_run: dict[tuple[int, int], list[float]] = {}
  for r in rows:
    by_run.setdefault((r["seed"], r["epoch"]), []).append(r[EXACT])
  return max((max(v) - min(v) for v in by_run.values()), default=0.0)


class Claim(NamedTuple):
  """a - b at the last epoch, paired by seed; `expected` the sign the
  claim predicts."""
  claim: str
  measure: str  # what is compared, for "our setting"
  a: tuple[float, str]  # (momentum, metric)
  b: tuple[float, str]
  expected: int
  unit: str  # page.judged's unit and scale
  scale: float


def claims_for(momenta: Sequence[float]) -> list[Claim]:
  """The section's claims for one network: exact against moving at each
  momentum, then the slowest average against the fastest."""
  fast, slow = min(momenta), max(momenta)
  out = [Claim("Recomputed (exact) statistics are at least as good as the "
               "moving average (Wu & Johnson 2021, PreciseBN)",
               f"momentum {m}: test accuracy, exact - moving average",
               (m, EXACT), (m, MOVING), +1, "points", 100.0)
         for m in momenta]
  out += [Claim("... in test NLL",
                f"momentum {m}: test NLL, moving average - exact",
                (m, NLL), (m, EXACT_NLL), +1, "nats", 1.0)
          for m in momenta]
  out += [
      Claim("Staleness grows with momentum",
            f"running variance gap (absolute log ratio), momentum {slow} "
            f"- {fast}",
            (slow, VAR_GAP), (fast, VAR_GAP), +1, "", 1.0),
      Claim("A staler average costs test accuracy",
            f"test accuracy (moving average), momentum {fast} - {slow}",
            (fast, MOVING), (slow, MOVING), +1, "points", 100.0),
      Claim("A staler average costs test NLL",
            f"test NLL (moving average), momentum {slow} - {fast}",
            (slow, NLL), (fast, NLL), +1, "nats", 1.0),
  ]
  return out


def claim_rows(networks: Sequence[Mapping[str, Any]],
               family: page.Family) -> list[list[str]]:
  """The claims table's rows, every network's claims in one family."""
  out = []
  for net in networks:
    rows, config = net["rows"], net["config"]
    last = max(r["epoch"] for r in rows)
    seeds = common_seeds(rows, last)
    momenta = sorted({r["bn_momentum"] for r in rows})
    for claim in claims_for(momenta):
      (m_a, key_a), (m_b, key_b) = claim.a, claim.b
      c = family.compare(values(rows, m_a, last, key_a, seeds),
                         values(rows, m_b, last, key_b, seeds), paired=True,
                         label=f"{net['label']}: {claim.measure}")
      setting = (f"{network_short_name(config)}, epoch {last} of "
                 f"{config['num_epochs']}: {claim.measure}")
      effect = page.judged(c, claim.unit, claim.scale,
                           2 if claim.unit == "points" else None)
      out.append([claim.claim, setting,
                  f"{effect} (paired t, {len(seeds)} seeds)",
                  page.claim_verdict(c, claim.expected)])
  return out


# ----------------------------------------------------------------------------
# The section.


def shown_epochs(epochs: Sequence[int]) -> list[int]:
  """The first, second, middle and last epochs (the table's rows)."""
  return sorted({epochs[0], epochs[min(1, len(epochs) - 1)],
                 epochs[len(epochs) // 2 - 1 if len(epochs) > 2 else 0],
                 epochs[-1]})


def _loss(values_: Sequence[float]) -> str:
  mean, std = page.mean_std(values_)
  return f"{mean:.4f}" + ("" if std is None else f" +- {std:.4f}")


def network_table(rows: Rows) -> str:
  momenta = sorted({r["bn_momentum"] for r in rows})
  epochs = sorted({r["epoch"] for r in rows})
  lines = []
  for momentum in momenta:
    for epoch in shown_epochs(epochs):
      at = [r for r in rows
            if r["bn_momentum"] == momentum and r["epoch"] == epoch]
      lines.append([
          momentum, epoch, page.percent([r[MOVING] for r in at]),
          page.percent([r[EXACT] for r in at]),
          _loss([r[NLL] for r in at]), _loss([r[EXACT_NLL] for r in at]),
          f"{np.mean([r[MEAN_GAP] for r in at]):.3f}",
          f"{np.mean([r[VAR_GAP] for r in at]):.3f}"])
  return page.table(
      ["momentum", "epoch", "test acc, moving average", "test acc, exact",
       "test NLL, moving average", "test NLL, exact",
       "running mean gap (std)",
       "running var gap (log ratio)"], lines)


def network_part(net: Mapping[str, Any], out: Path) -> str:
  rows, config = net["rows"], net["config"]
  momenta = sorted({r["bn_momentum"] for r in rows})
  epochs = sorted({r["epoch"] for r in rows})
  above, cells = cells_at_or_above(rows)
  gaps = "; ".join(
      f"momentum {m}: " + ", ".join(
          f"{mean_at(rows, m, e, VAR_GAP):.3f}" for e in (epochs[0], epochs[-1]))
      for m in momenta)
  spread = exact_spread_across_momenta(rows)
  return "\n".join([
      f"### {network_name(config)}\n",
      f"`{net['label']}`: {network_text(config)}, "
      f"{len({r['seed'] for r in rows})} seeds.\n",
      network_table(rows),
      page.figure(out, f"{net['label']}.png",
                  lambda p: plot_staleness(rows, momenta, p),
                  f"moving average against exact statistics, "
                  f"{network_name(config)}"),
      f"* Running variance gap after epoch {epochs[0]} and {epochs[-1]}: "
      f"{gaps}.",
      "* Exact at or above the moving average in mean test accuracy over "
      f"the whole run (descriptive, not tested): ({above} of {cells} "
      "(momentum, epoch) cells).",
      "* Control: the exact statistics' test accuracy "
      + ("is identical at every momentum in every (seed, epoch), as it must "
         "be (momentum never changes the weights)." if spread == 0 else
         f"differs between momenta within a (seed, epoch) by up to "
         f"{100 * spread:.2f} points: the momenta did not train identical "
         "weights, so the pairing across momenta is not exact.") + "\n"])


def setting_text(networks: Sequence[Mapping[str, Any]]) -> str:
  config = networks[0]["config"]
  precise = config["precise_bn"]
  momenta = sorted({r["bn_momentum"] for n in networks for r in n["rows"]})
  over = (f"{precise['num_batches']} training batches"
          if precise["num_batches"] else
          f"{precise['num_examples']:,} training examples")
  return (
      f"BN momentum {', '.join(map(str, momenta))} x "
      f"{len(config['seeds'])} seeds as one vmapped sweep per network, "
      f"{config['optimizer']} {config['learning_rate']:g}, batch "
      f"{config['batch_size']}, {config['num_epochs']} epochs, one data "
      "order for every run. Momentum only shapes the running averages, "
      "never the training (BN normalizes with batch statistics in "
      "training), so the momenta train identical weights: runs of one seed "
      "are paired across momenta, and the exact and moving-average "
      "evaluations of one run are paired too. After every epoch every BN "
      f"layer's statistics are recomputed over {over} with the weights "
      f"frozen ({precise['estimator']}); the gaps compare the running "
      "statistics with them over every feature of every BN layer: the "
      "mean's error in population standard deviations, and |log| of the "
      "variance ratio. Test NLL (eval mode) with either statistics beside "
      "the accuracy: a statistic error that rescales the logits moves the "
      "NLL where it barely moves the argmax. Budget: the claims are "
      "read at the last epoch, fixed in advance (nothing is selected, so no "
      "validation split is read). How stale an average is depends on how "
      "fast the weights still move, so a longer budget or a decaying rate "
      "could change the last epoch's effects and a verdict with them.\n")


def section(studies, out: Path) -> str:
  # Fewer BN layers first: the reference MLP, then the deep probe.
  networks = sorted(studies, key=lambda s: (bn_layer_count(s["config"]),
                                            s["label"]))
  return "\n".join([
      f"## {TITLE}\n", page.provenance_markdown(networks),
      setting_text(networks),
      *(network_part(net, out) for net in networks),
      "Claims at the last epoch, each a paired t test over seeds (the same "
      "weights evaluated two ways, or the same seed at two momenta), the "
      "whole section one Holm family. They are accuracy (and NLL) effects: "
      "in the reference MLP BN precedes the readout, where an error in its "
      "statistics mostly rescales and shifts the logits and so barely moves "
      "the argmax; in the deep probe each BN layer's error passes through "
      "a sigmoid and the layers above.\n",
      page.in_one_family(lambda family: page.claims_table(
          claim_rows(networks, family)))])


def plot_staleness(rows: Rows, momenta: Sequence[float],
                   path: Path | None = None):
  """Test accuracy (moving average solid, exact dashed), the moving
  average's test NLL and the running variance gap against the epoch."""
  fig = report.new_figure((15, 4))
  ax_acc, ax_nll, ax_gap = fig.subplots(1, 3)
  for i, momentum in enumerate(momenta):
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    epochs, moving = page.mean_curve(mine, MOVING)
    _, exact = page.mean_curve(mine, EXACT)
    _, nll = page.mean_curve(mine, NLL)
    _, gap = page.mean_curve(mine, VAR_GAP)
    ax_acc.plot(epochs, 100 * moving, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}, moving average")
    ax_acc.plot(epochs, 100 * exact, color=f"C{i}", ls="--",
                label=f"momentum {momentum}, exact")
    ax_nll.plot(epochs, nll, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}")
    ax_gap.plot(epochs, gap, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="moving average (solid) vs exact (dashed)")
  ax_nll.set(xlabel="epoch", ylabel="test NLL (nats)", yscale="log",
             title="test NLL, moving average")
  ax_gap.set(xlabel="epoch", ylabel="|log var_running / var_exact|",
             yscale="log", title="running variance gap")
  for ax in (ax_acc, ax_nll, ax_gap):
    report.epoch_axis(ax)
    ax.legend(fontsize=7)
  report.save_figure(fig, path)
  return fig
