"""The char-LM study's parts (its short run, end to end, is
tests/test_config_commands.py's): the evaluation windows, the pairing of
norms by seed, the population statistics against NumPy, the claims against
scipy, and the config's one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from bn_lab import page as studies_page
from bn_lab import sweep
from studies.char_lm import config as char_lm_config
from studies.char_lm import lm
from studies.char_lm import page


def short_config(**changes):
  config = char_lm_config.get_config("short")
  config.update(changes)
  return config


def test_eval_windows_predict_every_character_after_the_first_once():
  ids = np.arange(103)
  windows = lm.eval_windows(ids, 10)
  assert windows.shape == (10, 11)
  # Targets (every window's characters 1..10) are ids 1..100, once each.
  np.testing.assert_array_equal(windows[:, 1:].ravel(), ids[1:101])
  np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])
  assert lm.eval_windows(ids, 10, limit=31).shape == (3, 11)
  with pytest.raises(ValueError, match="no window of 11"):
    lm.eval_windows(np.arange(5), 10)


def test_seed_i_of_every_norm_starts_from_the_same_weights():
  config = short_config()
  models = {norm: lm.init_model(jax.random.key(3), 20, config, norm)[0]
            for norm in lm.NORMS}
  for norm in ("layer", "batch"):
    for field in ("input_kernel", "hidden_kernel", "bias"):
      np.testing.assert_array_equal(getattr(models[norm].lstm, field),
                                    getattr(models["none"].lstm, field))
    np.testing.assert_array_equal(models[norm].readout_kernel,
                                  models["none"].readout_kernel)
  np.testing.assert_allclose(models["batch"].lstm.input_scale, 0.1)
  np.testing.assert_allclose(models["layer"].lstm.input_scale, 1.0)


def test_population_statistics_average_the_batches_at_each_step():
  """The input term W_x x_t does not depend on the recurrence, so its
  per-step population mean and variance are NumPy's average over the
  batches of each batch's mean and biased variance at step t."""
  config = short_config(seeds=(0,), population_batches=3)
  vocab = 7
  ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, 400))
  models, _, _ = lm.init_states(config, vocab, "batch")
  stats = lm.population_statistics(config, models, ids, "batch")
  starts = np.random.default_rng(10_000).integers(
      0, ids.shape[0] - config.seq_len - 1,
      (config.population_batches, config.batch_size))
  kernel = np.asarray(models.lstm.input_kernel[0], np.float64)
  ids = np.asarray(ids)
  terms = np.stack([
      np.eye(vocab)[ids[s[:, None] + np.arange(config.seq_len)]] @ kernel
      for s in starts])  # (batches, B, T, 4H)
  np.testing.assert_allclose(stats.input.mean[0], terms.mean(axis=(0, 1)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.input.var[0],
                             terms.var(axis=1).mean(axis=0),
                             rtol=1e-4, atol=1e-6)


def fake_results(seed=0, n=5):
  rng = np.random.default_rng(seed)
  variant = lambda norm, shift: {
      "norm": norm,
      "test_bpc": (2.0 + shift + 0.05 * rng.normal(size=n)).tolist(),
      "curve": {"step": [10, 20, 30, 40],
                "valid_bpc": (3.0 + shift + 0.1 * rng.normal(size=(4, n))
                              ).tolist()},
      "long": {"length": 40,
               "within_t_max": (2.1 + shift + 0.05 * rng.normal(size=n)
                                ).tolist(),
               "past_t_max": (2.0 + shift + 0.05 * rng.normal(size=n)
                              ).tolist()}}
  return {"variants": [variant("none", 0.0), variant("layer", -0.02),
                       variant("batch", -0.05)]}


def test_claims_are_scipy_s_paired_t_tests_with_holm():
  results = fake_results()
  family = studies_page.Family()
  page.claims(results, family)
  corrected = family.correct()
  v = {r["norm"]: r for r in results["variants"]}
  expected = [
      (v["batch"]["test_bpc"], v["none"]["test_bpc"]),
      (v["batch"]["curve"]["valid_bpc"][0], v["none"]["curve"]["valid_bpc"][0]),
      (v["batch"]["long"]["past_t_max"], v["batch"]["long"]["within_t_max"]),
      (np.subtract(v["batch"]["long"]["past_t_max"],
                   v["batch"]["long"]["within_t_max"]),
       np.subtract(v["none"]["long"]["past_t_max"],
                   v["none"]["long"]["within_t_max"])),
      (v["batch"]["test_bpc"], v["layer"]["test_bpc"]),
  ]
  assert len(corrected) == len(expected)
  ps = []
  for c, (a, b) in zip(corrected, expected):
    reference = scipy_stats.ttest_rel(a, b)
    interval = reference.confidence_interval(0.95)
    assert c.p == pytest.approx(reference.pvalue, rel=1e-6)
    assert (c.low, c.high) == pytest.approx(
        (interval.low, interval.high), rel=1e-6)
    ps.append(reference.pvalue)
  # Holm by hand: sorted p times (m - rank), running maximum, capped at 1.
  order = np.argsort(ps)
  holm = np.minimum(1, np.maximum.accumulate(
      (len(ps) - np.arange(len(ps))) * np.asarray(ps)[order]))
  np.testing.assert_allclose([corrected[i].p_holm for i in order], holm,
                             rtol=1e-6)


def test_page_section_names_each_claim_with_a_verdict(tmp_path):
  config = short_config().to_dict()
  results = {**fake_results(), "characters": {"train": 1000,
                                              "validation": 100, "test": 100},
             "vocab_size": 50, "corpus": "fortunes", "seeds": [0, 1, 2, 3, 4],
             "command": "python -m experiments.main --config=x"}
  for v in results["variants"]:
    v["long"]["mean_by_position"] = list(np.linspace(3, 2, 40))
  text = page.section([{"path": tmp_path, "label": "lm", "results": results,
                        "config": config, "benchmark": None}], tmp_path)
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  claim_rows = [r for r in rows if r.rstrip(" |").endswith(
      studies_page.CLAIM_VERDICTS)]
  assert len(claim_rows) == 4  # and one comparison with no paper's claim
  assert any(r.rstrip(" |").endswith(("beyond noise", "within noise"))
             and "no paper's claim" in r for r in rows)
  assert (tmp_path / "lm.png").stat().st_size > 1000


@pytest.mark.parametrize("field, value, message", [
    ("norms", ("batch", "group"), "config.norms="),
    ("steps", 45, "config.steps=45 must be a multiple of eval_every=20"),
    ("seq_len", 0, "config.seq_len=0 must be a positive integer"),
])
def test_bad_configs_get_one_line_errors(field, value, message):
  config = short_config()
  config[field] = value
  with pytest.raises(sweep.ConfigError, match=message) as error:
    lm.validate_config(config)
  assert "\n" not in str(error.value)
