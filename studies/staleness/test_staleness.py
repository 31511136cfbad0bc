"""Tests for the staleness study: its two networks (the BN layers each
config builds), and its page's logic on synthetic rows, every number
checked against scipy or NumPy computed here."""

import math

from flax import traverse_util
import jax
import numpy as np
import pytest
from scipy import stats as scipy_stats

from bn_lab import page
from bn_lab import sweep
from bn_lab import train
from studies.staleness import config as staleness_config
from studies.staleness import page as staleness_page

MOMENTA = (0.9, 0.99, 0.999)


@pytest.mark.parametrize("arg, bn_layers", [("reference", 1), ("deep", 3)])
def test_each_network_has_the_bn_layers_the_page_names(arg, bn_layers):
  config = staleness_config.get_config(arg)
  combo, = sweep.combinations(config)
  spec = sweep.make_spec(combo.config, 60_000)
  # Shapes only (no compilation): the layers the model would create.
  variables = jax.eval_shape(lambda: spec.make_model({}).init(
      jax.random.key(0), np.zeros((1, 784), np.float32), train=False))
  stats_layers = {path[0] for path in traverse_util.flatten_dict(
      variables["batch_stats"])}
  assert len(stats_layers) == bn_layers
  assert staleness_page.bn_layer_count(config.to_dict()) == bn_layers
  assert len(config.seeds) >= 5 and config.data_seed is not None


def test_an_unknown_network_is_refused():
  with pytest.raises(ValueError, match="reference, deep"):
    staleness_config.get_config("wide")


def _rows(exact_minus_moving, slow_cost, seeds=(0, 1, 2, 3, 4), epochs=2,
          noise=0.002, rng_seed=0):
  """Synthetic rows of one network: per seed a shared exact accuracy (the
  same weights at every momentum); the moving average below it by
  `exact_minus_moving[momentum]` plus noise, its NLL up by `slow_cost` x
  the staleness, and a variance gap growing with momentum. Shuffled, so
  pairing must go by seed."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  for seed in seeds:
    for epoch in range(1, epochs + 1):
      exact = 0.95 + 0.005 * epoch + rng.normal(0, 0.003)
      for i, momentum in enumerate(MOMENTA):
        gap = 0.1 * 3 ** i * (1 + rng.normal(0, 0.05))
        rows.append({
            "seed": seed, "epoch": epoch, "bn_momentum": momentum,
            "run": seed * len(MOMENTA) + i,
            train.PRECISE_METRIC: exact,
            "test_accuracy": (exact - exact_minus_moving[momentum]
                              + rng.normal(0, noise)),
            "test_loss": 0.1 + slow_cost * gap + rng.normal(0, 0.001),
            train.PRECISE_LOSS_METRIC: 0.1 + rng.normal(0, 0.001),
            "running_mean_gap": gap / 2, "running_var_gap": gap})
  order = rng.permutation(len(rows))
  return [rows[i] for i in order]


def _network(rows, arg="reference", label="staleness"):
  config = staleness_config.get_config(arg).to_dict()
  config["num_epochs"] = max(r["epoch"] for r in rows)
  return {"rows": rows, "config": config, "label": label, "results": None,
          "path": label, "benchmark": None}


def _claim_rows(networks):
  return page.in_one_family(
      lambda family: staleness_page.claim_rows(networks, family))


def test_values_pair_runs_by_seed():
  rows = _rows({m: 0.01 for m in MOMENTA}, 0.1)
  seeds = staleness_page.common_seeds(rows, 2)
  assert seeds == [0, 1, 2, 3, 4]
  exact = staleness_page.values(rows, 0.9, 2, train.PRECISE_METRIC, seeds)
  moving = staleness_page.values(rows, 0.999, 2, "test_accuracy", seeds)
  for seed, e, m in zip(seeds, exact, moving):
    row, = [r for r in rows if (r["seed"], r["epoch"], r["bn_momentum"])
            == (seed, 2, 0.999)]
    assert (e, m) == (row[train.PRECISE_METRIC], row["test_accuracy"])
  # A seed missing at one momentum is left out of every pair.
  partial = [r for r in rows if not (r["seed"] == 3 and r["epoch"] == 2
                                     and r["bn_momentum"] == 0.99)]
  assert staleness_page.common_seeds(partial, 2) == [0, 1, 2, 4]


def test_claims_match_scipy_and_holm_by_hand():
  networks = [_network(_rows({0.9: 0.0, 0.99: 0.003, 0.999: 0.02}, 0.5)),
              _network(_rows({0.9: 0.01, 0.99: 0.1, 0.999: 0.3}, 2.0,
                             rng_seed=1), "deep", "staleness_deep")]
  lines = _claim_rows(networks)
  claims = staleness_page.claims_for(MOMENTA)
  assert len(lines) == 2 * len(claims) == 18
  # Independently: scipy's paired t test and its t interval of every
  # claim, then Holm over the eighteen.
  expected = []
  for net in networks:
    rows, seeds = net["rows"], [0, 1, 2, 3, 4]
    for claim in claims:
      a = np.array([r[claim.a[1]] for s in seeds for r in rows
                    if (r["seed"], r["epoch"], r["bn_momentum"])
                    == (s, 2, claim.a[0])])
      b = np.array([r[claim.b[1]] for s in seeds for r in rows
                    if (r["seed"], r["epoch"], r["bn_momentum"])
                    == (s, 2, claim.b[0])])
      d = a - b
      half = (scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1)
              / math.sqrt(len(d)))
      expected.append((d.mean(), d.mean() - half, d.mean() + half,
                       scipy_stats.ttest_rel(a, b).pvalue, claim))
  p = np.array([e[3] for e in expected])
  order = np.argsort(p)
  holm = np.empty_like(p)
  holm[order] = np.minimum(1, np.maximum.accumulate(
      (len(p) - np.arange(len(p))) * p[order]))
  for line, (diff, low, high, _, claim), p_holm in zip(lines, expected, holm):
    scale = claim.scale
    digits = 2 if claim.unit == "points" else None
    if digits is None:  # three significant digits of the largest value
      largest = max(abs(v * scale) for v in (diff, low, high))
      digits = max(0, 2 - int(np.floor(np.log10(largest))))
    numbers = f"{diff * scale:+.{digits}f} [{low * scale:+.{digits}f}, " \
              f"{high * scale:+.{digits}f}]"
    assert line[2].startswith(numbers), (line[2], numbers)
    significant = p_holm < 0.05
    verdict = ("not resolved at this power" if not significant else
               "supported" if diff > 0 else "contradicted")
    assert line[3] == verdict, (line, p_holm)


def test_a_verdict_follows_the_data_either_way():
  """The exact-against-moving claim is supported where the moving average
  is clearly worse, contradicted where it is clearly better (as a buggy
  recomputation would make it), not resolved where they tie."""
  worse = {0.9: 0.0, 0.99: 0.0, 0.999: 0.05}
  better = {0.9: 0.0, 0.99: 0.0, 0.999: -0.05}
  for shift, verdict in ((worse, "supported"), (better, "contradicted")):
    lines = _claim_rows([_network(_rows(shift, 0.1, noise=0.001))])
    at_999, = [line for line in lines if "momentum 0.999: test accuracy, "
               "exact - moving" in line[1]]
    assert at_999[3] == verdict, at_999
  tied = _claim_rows([_network(_rows({m: 0.0 for m in MOMENTA}, 0.1))])
  assert tied[0][3] == "not resolved at this power", tied[0]


def test_cells_at_or_above_and_the_control_against_numpy():
  rows = _rows({0.9: -0.01, 0.99: 0.0005, 0.999: 0.02}, 0.1, noise=0.0)
  cells = {(r["bn_momentum"], r["epoch"]) for r in rows}
  above = sum(
      np.mean([r[train.PRECISE_METRIC] - r["test_accuracy"] for r in rows
               if (r["bn_momentum"], r["epoch"]) == c]) >= 0 for c in cells)
  assert staleness_page.cells_at_or_above(rows) == (above, 6)
  assert above == 4  # 0.9 below at both epochs
  assert staleness_page.exact_spread_across_momenta(rows) == 0.0
  broken = [dict(r) for r in rows]
  broken[0][train.PRECISE_METRIC] += 0.01
  assert staleness_page.exact_spread_across_momenta(broken) == (
      pytest.approx(0.01))


def test_section_of_two_networks(tmp_path):
  networks = [_network(_rows({m: 0.01 for m in MOMENTA}, 1.0, rng_seed=2),
                       "deep", "staleness_deep"),
              _network(_rows({m: 0.001 for m in MOMENTA}, 0.1))]
  text = staleness_page.section(networks, tmp_path)
  # The reference first, then the deep probe; one claims table of both.
  first = text.index("### reference MLP")
  assert first < text.index("### deep probe (3 BN layers")
  assert text.count("| paper's claim |") == 1
  assert "784 -> Dense(50) -> relu -> BN -> Dense(10)" in text
  assert ("784 -> Dense(100) -> BN -> sigmoid -> Dense(100) -> BN -> "
          "sigmoid -> Dense(100) -> BN -> sigmoid -> Dense(10)") in text
  # Every table line has the header's number of cells (no stray "|").
  for block in text.split("\n\n"):
    lines = [l for l in block.splitlines() if l.startswith("|")]
    assert len({l.count("|") for l in lines}) <= 1, block
  assert (tmp_path / "staleness.png").stat().st_size > 5000
  assert (tmp_path / "staleness_deep.png").stat().st_size > 5000
