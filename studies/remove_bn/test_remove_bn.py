"""Tests for the BN-removal study: its config's programs (each variant the
layers and the rule the README states), a tiny run through the runner and
its page section, and the equivalence verdict."""

import json
import math

from flax import traverse_util
import helpers
import jax
import numpy as np
import pytest

from bn_lab import page
from bn_lab import stats
from bn_lab import sweep
from studies import remove_bn
from studies.remove_bn import config as remove_bn_config
from studies.remove_bn import page as remove_bn_page


def test_every_variant_builds_what_its_name_says():
  config = remove_bn_config.get_config()
  combos = sweep.combinations(config)
  assert len(combos) == len(remove_bn_config.VARIANTS) * len(
      remove_bn_config.BATCH_SIZES)
  for combo in combos:
    c, variant, batch = (combo.config, combo.values["variant"],
                         combo.values["batch_size"])
    spec = sweep.make_spec(c, c.train_examples)
    # The linear rule: 0.1 x B / 256.
    lr, = {r["hparams"]["learning_rate"] for r in sweep.run_grid(c)}
    assert math.isclose(lr, 0.1 * batch / 256)
    expected_norm = {"bn": "batch", "gn": "group", "ln": "layer",
                     "ws_gn": "group", "nf": "none", "skip_init": "none",
                     "none": "none"}.get(variant, variant)
    assert spec.norm == expected_norm, variant
    assert spec.standardize == {"ws_gn": "ws", "nf": "scaled"}.get(
        variant, "none")
    assert spec.skip_init == (variant in ("nf", "skip_init"))
    # AGC only in NF: 0.16 at batch 256, scaled as 1 / (B / 256).
    if variant == "nf":
      assert math.isclose(spec.agc_clip, 0.16 * 256 / batch)
    else:
      assert spec.agc_clip is None
    if batch != remove_bn_config.BATCH_SIZES[0]:
      continue  # the model does not depend on the batch size
    # The model's own layers: a norm exactly where the variant has one.
    variables = spec.make_model({}).init(
        jax.random.key(0), np.zeros((1, 784), np.float32), train=False)
    names = " ".join("/".join(path) for path in traverse_util.flatten_dict(
        variables["params"]))
    assert ("norm_" in names) == (expected_norm != "none"), variant
    assert ("skip_init" in names) == spec.skip_init, variant


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  """The study on tiny IDX data: BN and NF at batch 8, one epoch of 80
  examples, 2 seeds, in a process of its own (helpers.run_studies)."""
  idx = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 120, 40)
  config = remove_bn_config.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx),
                       "seeds": (0, 1), "train_examples": 80,
                       "batch_sizes": (8,), "variants": ("bn", "nf"),
                       "progress_seconds": 0.0}.items():
    config[field] = value
  workdir = tmp_path_factory.mktemp("remove_bn")
  results, = helpers.run_studies([(remove_bn.STUDY.name, config, workdir,
                                   None)])
  return workdir, results


@pytest.mark.slow
def test_tiny_run_rows_and_section(tiny_study, tmp_path):
  workdir, results = tiny_study
  assert [c["combo"] for c in results["combos"]] == [
      f"batch_size=8__variant={v}" for v in ("bn", "nf")]
  rows = [json.loads(l) for l in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * 2
  for row in rows:
    assert row["norm"] == {"bn": "batch"}.get(row["variant"], "none")
    assert math.isclose(row["learning_rate"], 0.1 * 8 / 256, rel_tol=1e-6)
    assert 0.0 <= row["test_accuracy"] <= 1.0
  loaded = page.load_study(workdir)
  by = remove_bn_page.cells(loaded["rows"])
  np.testing.assert_allclose(
      sorted(by[("bn", 8)]["accuracy"]),
      sorted(r["test_accuracy"] for r in rows if r["variant"] == "bn"))
  text = remove_bn_page.section([loaded], tmp_path)
  assert "| BN |" in text and "| NF (Scaled WS + AGC + SkipInit) |" in text
  # The one claim the run can judge: NF against BN at batch 128 is absent
  # (only batch 8 ran), so the claims table has a header and no row.
  claims = text.split("paper's claim")[1]
  assert "Brock" not in claims
  assert (tmp_path / f"{workdir.name}.png").stat().st_size > 5000


def test_cells_leave_diverged_runs_out_of_the_means():
  rows = []
  for run, (accuracy, diverged_at) in enumerate(
      [(0.8, None), (0.7, None), (0.1, 12)]):
    rows.append({"combo": "c", "run": run, "epoch": 1, "variant": "none",
                 "batch_size": 16, "test_accuracy": accuracy,
                 "test_loss": 1.0, "train_loss": 1.0,
                 **({"diverged_at": diverged_at} if diverged_at else {})})
  cell = remove_bn_page.cells(rows)[("none", 16)]
  np.testing.assert_allclose(sorted(cell["accuracy"]), [0.7, 0.8])
  assert (cell["diverged"], cell["runs"]) == (1, 3)
  table = remove_bn_page.accuracy_table({("none", 16): cell}, ["none"], [16])
  assert "(1 of 3 diverged)" in table


def _comparison(a, b):
  return stats.holm_family([stats.welch(a, b)])[0]


@pytest.mark.parametrize("a, b, verdict", [
    # Equal to 0.1 point, tight: the interval within +-1 point.
    ([0.900, 0.901, 0.899, 0.900, 0.902], [0.899, 0.900, 0.901, 0.900,
                                           0.899], "supported"),
    # 5 points worse, tight: beyond noise and outside the margin.
    ([0.85, 0.851, 0.849, 0.85, 0.852], [0.90, 0.901, 0.899, 0.90, 0.902],
     "contradicted"),
    # Equal on average but noisy: the interval spans more than the margin.
    ([0.80, 0.95, 0.85, 0.92, 0.88], [0.90, 0.82, 0.93, 0.84, 0.91],
     "not resolved at this power"),
])
def test_equivalence_verdict_at_the_study_margin(a, b, verdict):
  assert page.equivalence_verdict(_comparison(a, b),
                                  remove_bn_page.MATCH_MARGIN) == verdict
