"""The Transformer study's parts (its short run, end to end, is
tests/test_config_commands.py's): padding reaches no statistic and no real
token's output, the moments and deviations against NumPy, PowerNorm's nu
advanced by the study's train step, and the claims against scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from bn_lab import page as studies_page
from bn_lab import sweep
from studies.transformer import config as transformer_config
from studies.transformer import model as model_lib
from studies.transformer import page
from studies.transformer import train


def tiny_config(**changes):
  config = transformer_config.get_config("short")
  config.update({"width": 8, "num_heads": 2, "mlp_width": 16,
                 "vocab_size": 11, "max_length": 12, **changes})
  return config


def padded_batch(pad_value: int, extra: int = 0):
  """4 sequences of lengths 3..12 (+ `extra` columns of padding) whose
  padded positions hold `pad_value`."""
  rng = np.random.default_rng(0)
  lengths = np.array([3, 12, 7, 5])
  tokens = np.pad(rng.integers(2, 11, (4, 12)), ((0, 0), (0, extra)))
  mask = np.arange(12 + extra)[None, :] < lengths[:, None]
  return np.where(mask, tokens, pad_value).astype(np.int32), mask


@pytest.mark.parametrize("norm", ["batch", "power"])
def test_padding_changes_no_statistic_and_no_real_output(norm):
  config = tiny_config(max_length=16)
  model = train.make_model(config, norm)
  tx = train.optimizer(config, 10)
  tokens, mask = padded_batch(0)
  state = train.init_state(model, tx, 0, tokens, mask)
  step = train.make_train_step(model, tx)
  state, _ = step(state, tokens, mask, np.array([0, 1, 0, 1]))
  variables = train._variables(state)  # pylint: disable=protected-access
  both_modes = jax.jit(lambda t, m: (
      model.apply(variables, t, m, train=False),
      model.apply(variables, t, m, train=True, mutable=["batch_stats"])))
  outputs = [both_modes(*padded_batch(pad_value, extra))
             for pad_value, extra in ((0, 0), (7, 0), (3, 4))]
  for other in outputs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-6),
                 outputs[0], other)


def test_masked_moments_are_numpy_s_over_the_real_tokens():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, (3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  got = model_lib.masked_moments(jnp.asarray(x), jnp.asarray(mask))
  real = x[mask].astype(np.float64)  # (tokens, C)
  np.testing.assert_allclose(got["mean"], real.mean(0), rtol=1e-5)
  np.testing.assert_allclose(got["var"], real.var(0), rtol=1e-5)
  np.testing.assert_allclose(got["square"], (real**2).mean(0), rtol=1e-5)


def test_fluctuation_against_numpy():
  rng = np.random.default_rng(2)
  batch = lambda: {k: np.abs(rng.normal(1, 0.3, 6)) + 0.1
                   for k in ("mean", "var", "square")}
  moments = {"block0": {"attention_norm": {"x": (batch(),)}},
             "final_norm": {"x": (batch(),)}}
  running = {"block0": {"attention_norm": {"BatchNorm_0": {
      "mean": rng.normal(size=6), "var": np.abs(rng.normal(1, .2, 6))}}},
             "final_norm": {"BatchNorm_0": {
                 "mean": rng.normal(size=6),
                 "var": np.abs(rng.normal(1, .2, 6))}}}
  got = train.fluctuation(moments, running, 1e-5)
  pairs = [(moments["block0"]["attention_norm"]["x"][0],
            running["block0"]["attention_norm"]["BatchNorm_0"]),
           (moments["final_norm"]["x"][0], running["final_norm"]["BatchNorm_0"])]
  mean_dev = np.mean([np.mean(np.abs(b["mean"] - r["mean"])
                              / np.sqrt(r["var"] + 1e-5)) for b, r in pairs])
  var_dev = np.mean([np.mean(np.abs(b["var"] / r["var"] - 1))
                     for b, r in pairs])
  assert got == pytest.approx({"mean": mean_dev, "var": var_dev}, rel=1e-5)
  power = {"final_norm": {"PowerNorm_0": {"psi2": np.full(6, 2.0),
                                          "nu": np.zeros(6)}}}
  got = train.fluctuation({"final_norm": {"x": (pairs[1][0],)}}, power, 1e-5)
  assert got == pytest.approx(
      {"square": np.mean(np.abs(pairs[1][0]["square"] / 2.0 - 1))}, rel=1e-5)


def test_the_train_step_advances_power_norm_s_nu():
  config = tiny_config()
  model = train.make_model(config, "power")
  tx = train.optimizer(config, 10)
  tokens, mask = padded_batch(0)
  state = train.init_state(model, tx, 0, tokens, mask)
  assert state["probes"], "PowerNorm's probes must reach the train step"
  new_state, _ = train.make_train_step(model, tx)(
      state, tokens, mask, np.array([0, 1, 0, 1]))
  nus = [v for path, v in jax.tree_util.tree_leaves_with_path(
      new_state["batch_stats"]) if "nu" in jax.tree_util.keystr(path)]
  assert len(nus) == 2 * config.num_layers + 1
  assert all(np.any(np.asarray(nu) != 0) for nu in nus)


def fake_results(n=5):
  rng = np.random.default_rng(4)
  variant = lambda norm, acc, fluct: {"norm": norm, "seed_results": [
      {"test_accuracy": acc + 0.01 * rng.normal(), "test_nll": 0.4,
       "curve": {"fluctuation": [{k: fluct + 0.02 * rng.normal()
                                  for k in ("mean", "var", "square")}]}}
      for _ in range(n)]}
  return {"variants": [variant("layer", 0.85, 0), variant("rms", 0.85, 0),
                       variant("batch", 0.84, 0.3),
                       variant("power", 0.86, 0.1)]}


def test_claims_are_scipy_s_paired_t_tests():
  results = fake_results()
  family = studies_page.Family()
  page.claims(results, family)
  corrected = family.correct()
  v = {r["norm"]: r for r in results["variants"]}
  acc = lambda n: [s["test_accuracy"] for s in v[n]["seed_results"]]
  fl = lambda n, k: [s["curve"]["fluctuation"][-1][k]
                     for s in v[n]["seed_results"]]
  expected = [(acc("batch"), acc("layer")), (acc("power"), acc("layer")),
              (acc("power"), acc("batch")),
              (fl("batch", "var"), fl("power", "square"))]
  assert len(corrected) == len(expected)
  for c, (a, b) in zip(corrected, expected):
    reference = scipy_stats.ttest_rel(a, b)
    assert c.p == pytest.approx(reference.pvalue, rel=1e-6)
    assert c.diff == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-9)


def test_bad_configs_get_one_line_errors():
  config = tiny_config(width=10, num_heads=4)
  with pytest.raises(sweep.ConfigError,
                     match="config.width=10 must be a multiple of num_heads"):
    train.validate_config(config)
  config = tiny_config(norms=("batch", "group"))
  with pytest.raises(sweep.ConfigError, match="config.norms="):
    train.validate_config(config)
