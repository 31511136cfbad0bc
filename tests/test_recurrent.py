"""Tests for bn_jax.recurrent against references independent of the code.

The reference is a float64 NumPy transcription of the three cells
(Cooijmans et al., 2016, equations (6)-(8); the plain LSTM; the LN-LSTM of
Ba et al., 2016), unrolled step by step with its own per-step running
statistics: plain BN of each step's batch in training, with the momentum
update of slot min(t, T_max - 1), and that slot's running statistics in
evaluation. Gradients are checked by finite differences in float64, and the
flax module against the pure functions it wraps.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bn_jax import core
from bn_jax import recurrent

BATCH, INPUT, HIDDEN = 6, 3, 4
EPSILON = 1e-5


def random_params(norm, seed=0, dtype=jnp.float32):
  """Params with every entry random, so that no gamma, beta or gate bias
  can be confused with another, and the recurrence matters (W_h large)."""
  rng = np.random.default_rng(seed)
  params = recurrent.init_params(jax.random.key(seed), INPUT, HIDDEN,
                                 norm=norm)
  shapes = {name: None if v is None else v.shape
            for name, v in params._asdict().items()}
  values = {
      "input_kernel": rng.normal(0.0, 0.8, shapes["input_kernel"]),
      "hidden_kernel": rng.normal(0.0, 0.8, shapes["hidden_kernel"]),
      "bias": rng.normal(0.0, 0.5, shapes["bias"])}
  if norm != "none":
    values.update(
        input_scale=rng.uniform(0.5, 1.5, shapes["input_scale"]),
        hidden_scale=rng.uniform(0.5, 1.5, shapes["hidden_scale"]),
        cell_scale=rng.uniform(0.5, 1.5, shapes["cell_scale"]),
        cell_bias=rng.normal(0.0, 0.5, shapes["cell_bias"]))
  return recurrent.LSTMParams(**{
      name: jnp.asarray(value, dtype) for name, value in values.items()})


def random_stats(t_max, seed=1):
  """Per-step running statistics that differ between steps and features."""
  rng = np.random.default_rng(seed)
  fresh = recurrent.init_stats(HIDDEN, t_max)
  return recurrent.LSTMStats(*(core.BNState(
      mean=jnp.asarray(rng.normal(0.0, 0.5, s.mean.shape), jnp.float32),
      var=jnp.asarray(rng.uniform(0.3, 2.0, s.var.shape), jnp.float32),
      count=jnp.asarray(rng.integers(0, 5, s.count.shape), jnp.int32))
      for s in fresh))


def random_x(steps, seed=2):
  rng = np.random.default_rng(seed)
  return jnp.asarray(0.3 + rng.normal(0.0, 1.0, (BATCH, steps, INPUT)),
                     jnp.float32)


def np_unroll(params, x, norm, *, training=True, stats=None, momentum=0.99):
  """The cell of the paper in float64 NumPy, h_0 = c_0 = 0.

  Returns (hs (batch, T, H), stats as {name: (mean, var, count)} NumPy
  arrays after the unroll, or None).
  """
  p = {name: None if v is None else np.asarray(v, np.float64)
       for name, v in params._asdict().items()}
  x = np.asarray(x, np.float64)
  sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))
  running = None if stats is None else {
      name: [np.array(s.mean, np.float64), np.array(s.var, np.float64),
             np.array(s.count)]
      for name, s in stats._asdict().items()}

  def batch_norm(name, v, t, gamma, beta):
    mean, var, count = running[name]
    slot = min(t, mean.shape[0] - 1)
    if training:  # Algorithm 1 on this step's batch, then the update
      batch_mean, batch_var = v.mean(0), v.var(0)
      mean[slot] = momentum * mean[slot] + (1 - momentum) * batch_mean
      var[slot] = momentum * var[slot] + (1 - momentum) * batch_var
      count[slot] += 1
      use_mean, use_var = batch_mean, batch_var
    else:
      use_mean, use_var = mean[slot], var[slot]
    return gamma * (v - use_mean) / np.sqrt(use_var + EPSILON) + beta

  def layer_norm(v, gamma, beta):
    mean = v.mean(1, keepdims=True)
    var = v.var(1, keepdims=True)
    return gamma * (v - mean) / np.sqrt(var + EPSILON) + beta

  h = c = np.zeros((x.shape[0], p["hidden_kernel"].shape[0]))
  hs = []
  for t in range(x.shape[1]):
    wx, wh = x[:, t] @ p["input_kernel"], h @ p["hidden_kernel"]
    if norm == "batch":
      wx = batch_norm("input", wx, t, p["input_scale"], 0.0)
      wh = batch_norm("hidden", wh, t, p["hidden_scale"], 0.0)
    elif norm == "layer":
      wx = layer_norm(wx, p["input_scale"], 0.0)
      wh = layer_norm(wh, p["hidden_scale"], 0.0)
    f, i, o, g = np.split(wh + wx + p["bias"], 4, axis=1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    if norm == "batch":
      cell = batch_norm("cell", c, t, p["cell_scale"], p["cell_bias"])
    elif norm == "layer":
      cell = layer_norm(c, p["cell_scale"], p["cell_bias"])
    else:
      cell = c
    h = sigmoid(o) * np.tanh(cell)
    hs.append(h)
  return np.stack(hs, axis=1), running


def assert_stats_close(stats, expected):
  for name, (mean, var, count) in expected.items():
    state = getattr(stats, name)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.var, var, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state.count, count)


# ----------------------------------------------------------------------------
# The BN-LSTM: per-step statistics in training and in evaluation.


@pytest.mark.parametrize("steps,t_max", [(3, 3), (2, 4), (5, 3)],
                         ids=["T=T_max", "T<T_max", "T>T_max"])
def test_training_is_plain_bn_of_each_steps_batch(steps, t_max):
  """Each step normalizes with its own batch's moments, and slot
  min(t, T_max - 1) receives their momentum update (the last slot once per
  step beyond T_max); slots no step reached are unchanged."""
  params, stats, x = random_params("batch"), random_stats(t_max), random_x(
      steps)
  hs, new_stats = jax.jit(
      lambda p, s, x: recurrent.unroll(p, s, x, norm="batch", training=True,
                                       momentum=0.9))(params, stats, x)
  expected_hs, expected_stats = np_unroll(params, x, "batch", stats=stats,
                                          momentum=0.9)
  np.testing.assert_allclose(hs, expected_hs, rtol=1e-5, atol=1e-5)
  assert_stats_close(new_stats, expected_stats)


@pytest.mark.parametrize("steps", [2, 5], ids=["T<T_max", "T>T_max"])
def test_eval_uses_each_steps_running_stats(steps):
  """Step t normalizes with slot min(t, T_max - 1) of distinct per-step
  statistics, and evaluation changes no statistic."""
  t_max = 3
  params, stats, x = random_params("batch"), random_stats(t_max), random_x(
      steps)
  hs, same_stats = recurrent.unroll(params, stats, x, norm="batch",
                                    training=False)
  expected_hs, _ = np_unroll(params, x, "batch", training=False,
                             stats=stats)
  np.testing.assert_allclose(hs, expected_hs, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(same_stats, stats)


# ----------------------------------------------------------------------------
# The baselines.


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_baselines_match_numpy(norm):
  params, x = random_params(norm), random_x(4)
  hs, stats = recurrent.unroll(params, None, x, norm=norm, training=True)
  expected_hs, _ = np_unroll(params, x, norm)
  np.testing.assert_allclose(hs, expected_hs, rtol=1e-5, atol=1e-5)
  assert stats is None


def test_layer_norm_lstm_is_per_example():
  """LN-LSTM: an example's hidden states do not depend on the others."""
  params, x = random_params("layer"), random_x(4)
  hs, _ = recurrent.unroll(params, None, x, norm="layer", training=True)
  alone, _ = recurrent.unroll(params, None, x[:1], norm="layer",
                              training=True)
  np.testing.assert_allclose(alone, hs[:1], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("norm,training", [
    ("batch", True), ("batch", False), ("layer", True), ("none", True)],
                         ids=["batch-train", "batch-eval", "layer", "none"])
def test_grad_finite_differences(norm, training):
  """d loss / d (params, x) through the scan against central differences,
  in float64 (with a step of 1e-6: the normalizations are curved enough
  that the default 1e-4 leaves truncation errors near 1e-5)."""
  with jax.enable_x64(True):
    params = random_params(norm, dtype=jnp.float64)
    x = random_x(3).astype(jnp.float64)
    stats = random_stats(2) if norm == "batch" else None
    dy = jnp.asarray(np.random.default_rng(3).normal(
        size=(BATCH, 3, HIDDEN)))

    def loss(params, x):
      hs, _ = recurrent.unroll(params, stats, x, norm=norm,
                               training=training)
      return jnp.sum(hs * dy + 0.1 * jnp.sin(hs))
    check_grads(jax.jit(loss), (params, x), order=1, modes=["rev"],
                atol=1e-6, rtol=1e-6, eps=1e-6)


# ----------------------------------------------------------------------------
# Initialization and the flax module.


def test_init_follows_the_papers():
  bn = recurrent.init_params(jax.random.key(0), INPUT, HIDDEN, norm="batch")
  for scale in (bn.input_scale, bn.hidden_scale, bn.cell_scale):
    np.testing.assert_array_equal(scale, np.float32(0.1))  # Cooijmans et al.
  np.testing.assert_array_equal(bn.cell_bias, 0.0)
  expected_bias = np.zeros(4 * HIDDEN)
  expected_bias[:HIDDEN] = 1.0  # the forget gate, the first of (f, i, o, g)
  np.testing.assert_array_equal(bn.bias, expected_bias)
  for gate in range(4):  # W_h orthogonal per gate
    block = np.asarray(bn.hidden_kernel[:, gate * HIDDEN:(gate + 1) * HIDDEN])
    np.testing.assert_allclose(block.T @ block, np.eye(HIDDEN), atol=1e-5)
  ln = recurrent.init_params(jax.random.key(0), INPUT, HIDDEN, norm="layer")
  np.testing.assert_array_equal(ln.input_scale, 1.0)
  plain = recurrent.init_params(jax.random.key(0), INPUT, HIDDEN,
                                norm="none")
  assert plain.input_scale is None and plain.cell_bias is None
  stats = recurrent.init_stats(HIDDEN, 7)
  assert stats.input.mean.shape == stats.hidden.var.shape == (7, 4 * HIDDEN)
  assert stats.cell.mean.shape == (7, HIDDEN)
  assert stats.cell.count.shape == (7,)
  np.testing.assert_array_equal(stats.hidden.var, 1.0)


def test_module_wraps_the_pure_functions():
  """LSTM(norm="batch"): per-step batch_stats with a leading t_max axis,
  left alone by init and by training with immutable batch_stats, updated as
  `unroll` updates them, and read in evaluation."""
  t_max, x = 3, random_x(4)
  model = recurrent.LSTM(HIDDEN, "batch", t_max=t_max)
  variables = model.init(jax.random.key(0), x, train=True)
  stats = variables["batch_stats"]
  assert stats["input"]["mean"].shape == (t_max, 4 * HIDDEN)
  assert stats["cell"]["var"].shape == (t_max, HIDDEN)
  assert "count" not in stats["input"]  # momentum 0.99 does not read it
  fresh = recurrent.init_stats(HIDDEN, t_max)
  chex.assert_trees_all_equal(stats["hidden"], {
      "mean": fresh.hidden.mean, "var": fresh.hidden.var})
  np.testing.assert_array_equal(variables["params"]["input_scale"],
                                np.float32(0.1))

  params = recurrent.LSTMParams(**variables["params"])
  hs, updates = model.apply(variables, x, train=True,
                            mutable=["batch_stats"])
  expected_hs, expected_stats = recurrent.unroll(params, fresh, x,
                                                 norm="batch", training=True)
  np.testing.assert_allclose(hs, expected_hs, rtol=1e-6, atol=1e-6)
  for name, state in expected_stats._asdict().items():
    chex.assert_trees_all_close(updates["batch_stats"][name],
                                {"mean": state.mean, "var": state.var})

  np.testing.assert_allclose(model.apply(variables, x, train=True), hs,
                             rtol=1e-6, atol=1e-6)
  trained = {**variables, **updates}
  eval_hs, _ = recurrent.unroll(params, expected_stats, x, norm="batch",
                                training=False)
  np.testing.assert_allclose(model.apply(trained, x, train=False), eval_hs,
                             rtol=1e-6, atol=1e-6)


def test_module_keeps_counts_for_cumulative_averages():
  x = random_x(3)
  model = recurrent.LSTM(HIDDEN, "batch", t_max=2, momentum=None)
  variables = model.init(jax.random.key(0), x, train=True)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # Steps 1 and 2 share the last slot: two updates there.
  np.testing.assert_array_equal(updates["batch_stats"]["cell"]["count"],
                                [1, 2])


@pytest.mark.parametrize("norm", ["layer", "none"])
def test_module_baselines_have_no_batch_stats(norm):
  x = random_x(3)
  model = recurrent.LSTM(HIDDEN, norm)
  variables = model.init(jax.random.key(0), x, train=True)
  assert set(variables) == {"params"}
  hs = model.apply(variables, x, train=False)
  expected, _ = recurrent.unroll(
      recurrent.LSTMParams(**variables["params"]), None, x, norm=norm,
      training=False)
  np.testing.assert_allclose(hs, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Errors.


def _unroll(norm="batch", x_shape=(BATCH, 3, INPUT), params_norm=None,
            stats=True, hidden=HIDDEN):
  params = recurrent.init_params(jax.random.key(0), INPUT, HIDDEN,
                                 norm=params_norm or norm)
  stats = recurrent.init_stats(hidden, 3) if stats else None
  return recurrent.unroll(params, stats, jnp.ones(x_shape), norm=norm,
                          training=True)


def _module(x_shape=(BATCH, 3, INPUT), **options):
  model = recurrent.LSTM(HIDDEN, **{"norm": "batch", **options})
  return model.init(jax.random.key(0), jnp.ones(x_shape), train=True)


@pytest.mark.parametrize("call,message", [
    (lambda: _unroll(x_shape=(BATCH, INPUT)),
     r"^x has shape \(6, 3\); unroll takes \(batch, time, features\)"),
    (lambda: _module(x_shape=(BATCH, INPUT), t_max=3),
     r"^x has shape \(6, 3\); LSTM takes \(batch, time, features\)"),
    (lambda: recurrent.init_stats(HIDDEN, 0),
     r"^t_max=0 must be a positive integer"),
    (lambda: _module(t_max=0), r"^t_max=0 must be a positive integer"),
    (lambda: _module(), r"^norm='batch' keeps statistics per time step and "
     "needs t_max"),
    (lambda: _unroll(x_shape=(BATCH, 3, 5)),
     r"^x has 5 features but params.input_kernel expects 3; create params "
     r"with init_params\(key, 5, 4, ...\)"),
    (lambda: _unroll(norm="group"), r"^norm='group'; choose one of"),
    (lambda: _unroll(stats=False), r"^norm='batch' needs stats"),
    (lambda: _unroll(norm="layer"), r"^stats are the BN-LSTM's per-step"),
    (lambda: _unroll(params_norm="none"), r"^params has no gammas but "
     r"norm='batch' needs them"),
    (lambda: _unroll(norm="none", params_norm="layer", stats=False),
     r"^params has gammas but norm='none'"),
    (lambda: _unroll(hidden=5), r"^stats.input.mean has shape \(3, 20\)"),
    (lambda: recurrent.step(
        recurrent.init_params(jax.random.key(0), INPUT, HIDDEN, norm="none"),
        None, recurrent.init_carry(2, HIDDEN), jnp.ones((BATCH, INPUT)), 0,
        norm="none", training=True), r"^carry has h \(2, 4\)"),
], ids=["x-rank", "module-x-rank", "t-max-zero", "module-t-max-zero",
        "module-t-max-missing", "features", "norm", "stats-missing",
        "stats-for-layer", "params-without-gammas", "params-with-gammas",
        "stats-hidden-size", "carry"])
def test_errors_are_helpful(call, message):
  with pytest.raises(ValueError, match=message) as error:
    call()
  assert "\n" not in str(error.value)  # one line
