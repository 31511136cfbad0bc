"""Tests for bn_jax.doctor: one model broken on purpose per check, flagged;
healthy models (an MLP and a CNN trained a few dozen SGD steps, their
statistics recomputed) flagged for nothing; the fixes.

The numbers are checked against NumPy transcriptions of the formulas in
float64: each BN layer's input written out by hand from the weights
(training mode: each batch normalized with its own statistics), the
pooled statistics, the z-scores and log variance ratios, and the eval
logits with one layer's statistics replaced.
"""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import doctor
from bn_jax import nn as bn_nn
from bn_jax import nnx as bn_nnx

EPS = 1e-5
NUM_TRAIN, BATCH, FEATURES, CLASSES = 256, 32, 6, 3
STEPS = 40  # trained; momentum 0.9 averages over 10


class MLP(nn.Module):
  """Dense -> BN -> relu, twice, then a Dense readout."""
  widths: tuple[int, ...] = (8, 8)
  bias: bool = False  # a bias before BN (broken on purpose)
  norm: type = bn_nn.BatchNorm
  momentum: float | None = 0.9
  eval_in_training: bool = False  # BN on running statistics in training

  @nn.compact
  def __call__(self, x, train: bool):
    for width in self.widths:
      x = nn.Dense(width, use_bias=self.bias)(x)
      use_running_average = self.eval_in_training or not train
      x = nn.relu(self.norm(momentum=self.momentum, epsilon=EPS)(
          x, use_running_average=use_running_average))
    return nn.Dense(CLASSES)(x)


class CNN(nn.Module):
  """Conv(3x3, no bias) -> BN -> relu -> global mean -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape(x.shape[0], 4, 4, 1)
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(bn_nn.BatchNorm(momentum=0.9, epsilon=EPS)(
        x, use_running_average=not train))
    return nn.Dense(CLASSES)(jnp.mean(x, axis=(1, 2)))


def make_data(features=FEATURES, seed=0):
  """(inputs (N/B, B, features), labels): a linear teacher's classes."""
  rng = np.random.default_rng(seed)
  x = 1.5 + 2.0 * rng.standard_normal((NUM_TRAIN, features))
  labels = np.argmax(x @ rng.standard_normal((features, CLASSES)), -1)
  return (jnp.asarray(x, jnp.float32).reshape(-1, BATCH, features),
          jnp.asarray(labels, jnp.int32).reshape(-1, BATCH))


@functools.partial(jax.jit, static_argnames=("model", "lr", "keep_stats"))
def sgd_step(variables, x, y, *, model, lr, keep_stats):
  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    onehot = jax.nn.one_hot(y, CLASSES)
    loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
    return loss, updates["batch_stats"]

  grads, stats = jax.grad(loss_fn, has_aux=True)(variables["params"])
  params = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
  return {"params": params,
          "batch_stats": stats if keep_stats else variables["batch_stats"]}


def train(model, variables, xs, ys, steps=STEPS, lr=0.1, keep_stats=True):
  """Plain SGD in training mode; `keep_stats=False` drops every update of
  the running statistics (a classic bug)."""
  for i in range(steps):
    variables = sgd_step(variables, xs[i % len(xs)], ys[i % len(ys)],
                         model=model, lr=lr, keep_stats=keep_stats)
  return variables


def init(model, x):
  """Jitted: an eager init runs op by op (seconds for the CNN)."""
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), x)


def trained(model, xs, ys, recompute=True, **kwargs):
  variables = init(model, xs[0])
  variables = train(model, variables, xs, ys, **kwargs)
  return doctor.recompute(model, variables, xs) if recompute else variables


@pytest.fixture(scope="module")
def data():
  return make_data()


@pytest.fixture(scope="module")
def healthy(data):
  """The MLP trained and recomputed: (model, variables)."""
  model = MLP()
  return model, trained(model, *data)


HEALTHY_RUN = dict(steps_trained=STEPS, train_batch_size=BATCH,
                   train_examples=NUM_TRAIN)


def checks(report):
  """The checks with an error or warning, as {check: {severities}}."""
  found = {}
  for f in report.problems():
    found.setdefault(f.check, set()).add(f.severity)
  return found


def with_stats(variables, layer, **values):
  """variables with batch_stats[layer][name] = value."""
  stats = flax.core.unfreeze(variables["batch_stats"])
  stats[layer] = {**stats[layer], **{k: jnp.asarray(v, stats[layer][k].dtype)
                                     for k, v in values.items()}}
  return {**variables, "batch_stats": stats}


@functools.partial(jax.jit, static_argnames="model")
def _eval(variables, x, *, model):
  return model.apply(variables, x, train=False)


def eval_logits(model, variables, xs):
  return np.concatenate([np.asarray(_eval(variables, x, model=model))
                         for x in xs])


# ----------------------------------------------------------------------------
# NumPy references.


def numpy_mlp_inputs(params, xs):
  """Each BN layer's input over all batches (training mode: each batch
  normalized with its own biased statistics), float64."""
  inputs = {name: [] for name in ("BatchNorm_0", "BatchNorm_1")}
  for x in np.asarray(xs, np.float64):
    for i in range(2):
      h = x @ np.asarray(params[f"Dense_{i}"]["kernel"], np.float64)
      inputs[f"BatchNorm_{i}"].append(h)
      bn = params[f"BatchNorm_{i}"]
      x = np.maximum(0.0, (h - h.mean(0)) / np.sqrt(h.var(0) + EPS)
                     * np.asarray(bn["scale"]) + np.asarray(bn["bias"]))
  return {k: np.concatenate(v) for k, v in inputs.items()}


def numpy_eval_logits(params, stats, x):
  x = np.asarray(x, np.float64)
  for i in range(2):
    h = x @ np.asarray(params[f"Dense_{i}"]["kernel"], np.float64)
    bn, s = params[f"BatchNorm_{i}"], stats[f"BatchNorm_{i}"]
    x = np.maximum(0.0, (h - s["mean"]) / np.sqrt(s["var"] + EPS)
                   * np.asarray(bn["scale"]) + np.asarray(bn["bias"]))
  readout = params["Dense_2"]
  return x @ np.asarray(readout["kernel"]) + np.asarray(readout["bias"])


# ----------------------------------------------------------------------------
# Healthy models: nothing flagged.


def test_healthy_mlp_is_flagged_for_nothing(healthy, data):
  model, variables = healthy
  report = doctor.diagnose(model, variables, data[0], **HEALTHY_RUN)
  assert report.problems() == (), doctor.format_report(report)
  assert [row.values_per_channel for row in report.layers] == [BATCH, BATCH]
  # Recomputed on these batches: no gap, and folding is exact.
  for row in report.layers:
    assert row.mean_z < 1e-4 and abs(row.log_var_ratio) < 1e-4
  assert {f.layer for f in report.findings if f.check == "fold"} == {
      "BatchNorm_0", "BatchNorm_1"}


def test_healthy_cnn_is_flagged_for_nothing():
  xs, ys = make_data(features=16)
  model = CNN()
  variables = trained(model, xs, ys, steps=30)
  report = doctor.diagnose(model, variables, xs, **HEALTHY_RUN)
  assert report.problems() == (), doctor.format_report(report)
  row, = report.layers
  assert row.values_per_channel == BATCH * 4 * 4  # N * H * W
  fold, = [f for f in report.findings if f.check == "fold"]
  assert fold.severity == "info" and "exactly" in fold.message


def test_a_model_without_batch_norm_says_so(data):
  model = nn.Dense(CLASSES)
  variables = model.init(jax.random.key(0), data[0][0])
  report = doctor.diagnose(model, variables, data[0],
                           train_kwargs={}, eval_kwargs={})
  assert report.layers == () and report.problems() == ()
  assert "no BatchNorm layer" in doctor.format_report(report)


# ----------------------------------------------------------------------------
# One broken model per check.


def test_gap_numbers_match_numpy_and_the_worst_layer_is_named(healthy,
                                                               data):
  """Stale statistics: layer 1's running mean shifted by 1.5 standard
  deviations, layer 0's variance doubled."""
  model, variables = healthy
  stats = variables["batch_stats"]
  broken = with_stats(variables, "BatchNorm_1", mean=stats["BatchNorm_1"][
      "mean"] + 1.5 * jnp.sqrt(stats["BatchNorm_1"]["var"]))
  broken = with_stats(broken, "BatchNorm_0",
                      var=2.0 * stats["BatchNorm_0"]["var"])
  report = doctor.diagnose(model, broken, data[0], **HEALTHY_RUN)
  assert checks(report) == {"gap": {"warning"}}

  params = jax.device_get(broken["params"])
  run = jax.device_get(broken["batch_stats"])
  inputs = numpy_mlp_inputs(params, data[0])
  rows = {row.name: row for row in report.layers}
  for name, h in inputs.items():
    mean, var = h.mean(0), h.var(0)
    run_mean = np.asarray(run[name]["mean"], np.float64)
    run_var = np.asarray(run[name]["var"], np.float64)
    z = np.mean(np.abs(mean - run_mean) / np.sqrt(run_var + EPS))
    varying = var >= EPS  # a constant feature's variance changes nothing
    ratio = np.mean(np.log((var + EPS) / (run_var + EPS))[varying])
    np.testing.assert_allclose(rows[name].data_mean, mean, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(rows[name].data_var, var, rtol=1e-5)
    np.testing.assert_allclose(rows[name].mean_z, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows[name].log_var_ratio, ratio, rtol=1e-5,
                               atol=1e-6)
    # The logits' change with this layer's statistics the data's.
    x = np.concatenate(np.asarray(data[0]))
    fixed = {**run, name: {"mean": mean, "var": var}}
    change = np.mean(np.abs(numpy_eval_logits(params, fixed, x)
                            - numpy_eval_logits(params, run, x)))
    np.testing.assert_allclose(rows[name].logit_change, change, rtol=1e-4)
  assert report.layers[0].name == "BatchNorm_1"  # ranked by logit change
  worst, = [f for f in report.findings
            if f.check == "gap" and f.severity == "info"]
  assert worst.layer == "BatchNorm_1"


@pytest.mark.parametrize("breakage", ["kept_initial", "nan", "count_0"])
def test_never_updated_statistics_are_an_error(healthy, data, breakage):
  """flax.linen.BatchNorm (the same variables) with trained weights but the
  initial statistics, as when a training step drops their updates; NaN
  statistics; bn_jax's exact average (momentum=None) with count 0."""
  model, variables = healthy
  fresh = init(MLP(norm=nn.BatchNorm), data[0][0])["batch_stats"]
  if breakage == "count_0":
    model = MLP(momentum=None)
    counts = {name: {**stats, "count": jnp.zeros((), jnp.int32)}
              for name, stats in variables["batch_stats"].items()}
    variables = with_stats({**variables, "batch_stats": counts},
                           "BatchNorm_1", count=7)
  elif breakage == "kept_initial":
    model = MLP(norm=nn.BatchNorm)
    variables = {**variables, "batch_stats": fresh}
  else:
    model = MLP(norm=nn.BatchNorm)
    variables = with_stats(variables, "BatchNorm_1", var=np.full(8, np.nan))
  report = doctor.diagnose(model, variables, data[0])
  assert {f.severity for f in report.flagged("never_updated")} == {"error"}
  expected = {"kept_initial": {"BatchNorm_0", "BatchNorm_1"},
              "nan": {"BatchNorm_1"}, "count_0": {"BatchNorm_0"}}[breakage]
  assert {f.layer for f in report.flagged("never_updated")} == expected
  if breakage == "nan":
    assert "NaN" in report.flagged("never_updated")[0].message
  if breakage == "kept_initial":  # PreciseBN needs bn_jax's layer
    assert set(checks(report)) == {"never_updated", "gap"}
    with pytest.raises(ValueError, match="not bn_jax.nn.BatchNorm"):
      doctor.recompute(model, variables, data[0])
  if breakage == "count_0":
    assert checks(report) == {"never_updated": {"error"}}


def test_too_few_values_per_channel_and_a_partial_last_batch(healthy, data):
  model, variables = healthy
  small = doctor.diagnose(model, variables, data[0], train_batch_size=4)
  assert checks(small) == {"few_values": {"warning"}}
  assert [row.values_per_channel for row in small.layers] == [4, 4]
  # 257 examples in batches of 32: a last batch of 1 example, variance 0.
  partial = doctor.diagnose(model, variables, data[0], train_batch_size=32,
                            train_examples=257)
  assert checks(partial) == {"few_values": {"error"}}
  assert "257 % 32" in partial.flagged("few_values")[0].message
  dropped = doctor.diagnose(model, variables, data[0], train_batch_size=32,
                            train_examples=257, drop_last=True)
  assert dropped.problems() == ()


def initial_weighted(variables, weight):
  """batch_stats that still hold `weight` of their initial values (mean 0,
  var 1), as an exponential average after too few steps leaves them."""
  return {**variables, "batch_stats": {
      name: {**layer, "mean": (1 - weight) * layer["mean"],
             "var": weight + (1 - weight) * layer["var"]}
      for name, layer in variables["batch_stats"].items()}}


def test_momentum_too_slow_for_the_run(healthy, data):
  model, variables = healthy
  stale = initial_weighted(variables, 0.9 ** 5)  # 5 steps at momentum 0.9
  short = doctor.diagnose(model, stale, data[0], steps_trained=5)
  assert checks(short) == {"momentum": {"error"}, "gap": {"warning"}}
  message = short.flagged("momentum")[0].message
  assert message == ("momentum=0.9 averages over ~10 steps, but the run "
                     "trained 5: the initial values still weigh 59%.")
  # Recomputed statistics: the cause without its effect, a note.
  recomputed = doctor.diagnose(model, variables, data[0], steps_trained=5)
  assert recomputed.problems() == ()
  assert any(f.check == "momentum" and "next run" in f.message
             for f in recomputed.findings)
  averaged = doctor.diagnose(model, initial_weighted(variables, 0.3),
                             data[0], steps_trained=STEPS,
                             steps_since_average=3)
  assert checks(averaged) == {"momentum": {"warning"}, "gap": {"warning"}}
  assert "averaged 3 step(s) ago" in averaged.flagged("momentum")[0].message
  pytorch = MLP(momentum=0.1)  # PyTorch's convention
  report = doctor.diagnose(pytorch, variables, data[0])
  assert checks(report) == {"momentum": {"warning"}}
  assert "write 0.9" in report.flagged("momentum")[0].fix


def test_bias_before_bn_is_flagged_and_drop_bias_keeps_outputs(healthy,
                                                               data):
  """The healthy MLP's weights, with random biases before its BN layers."""
  model = MLP(bias=True)
  rng = np.random.default_rng(0)
  params = {name: ({**value, "bias": jnp.asarray(
      rng.standard_normal(8), jnp.float32)} if name in ("Dense_0", "Dense_1")
                   else value) for name, value in healthy[1]["params"].items()}
  variables = doctor.recompute(model, {**healthy[1], "params": params},
                               data[0])
  report = doctor.diagnose(model, variables, data[0], **HEALTHY_RUN)
  assert checks(report) == {"bias_before_bn": {"warning"}}
  assert {f.layer for f in report.flagged("bias_before_bn")} == {
      "BatchNorm_0", "BatchNorm_1"}
  assert "use_bias=False" in report.flagged("bias_before_bn")[0].fix

  dropped = doctor.drop_bias(model, variables, data[0][0])
  for i in range(2):
    assert not np.any(dropped["params"][f"Dense_{i}"]["bias"])
  np.testing.assert_allclose(eval_logits(model, dropped, data[0]),
                             eval_logits(model, variables, data[0]),
                             rtol=1e-5, atol=1e-5)
  # The same numbers from the model built as the report says.
  without = MLP(bias=False)
  params = {k: ({"kernel": v["kernel"]} if k.startswith("Dense_")
                and k != "Dense_2" else v)
            for k, v in dropped["params"].items()}
  rebuilt = {"params": params, "batch_stats": dropped["batch_stats"]}
  np.testing.assert_allclose(eval_logits(without, rebuilt, data[0]),
                             eval_logits(model, variables, data[0]),
                             rtol=1e-5, atol=1e-5)
  assert doctor.diagnose(without, rebuilt, data[0],
                         **HEALTHY_RUN).problems() == ()


def test_frozen_bn_misuse_both_ways(healthy, data):
  model, variables = healthy
  # Marked frozen, yet it normalizes with batch statistics in training.
  report = doctor.diagnose(model, variables, data[0], frozen=["BatchNorm_0"],
                           **HEALTHY_RUN)
  assert checks(report) == {"frozen_bn": {"error"}}
  assert report.flagged("frozen_bn")[0].layer == "BatchNorm_0"
  assert "#9522" in report.flagged("frozen_bn")[0].message
  # Running statistics in the training pass while scale and bias train.
  stale = MLP(eval_in_training=True)
  report = doctor.diagnose(stale, variables, data[0], **HEALTHY_RUN)
  assert checks(report) == {"frozen_bn": {"warning"}}
  # Both layers frozen and on running statistics: consistent, no finding.
  assert doctor.diagnose(stale, variables, data[0],
                         frozen=["BatchNorm_0", "BatchNorm_1"],
                         **HEALTHY_RUN).problems() == ()
  with pytest.raises(ValueError, match="match no BatchNorm layer"):
    doctor.diagnose(model, variables, data[0], frozen=["Dense_0"])


class SharedDense(nn.Module):
  """A Dense whose output feeds BN and, beside it, a second Dense."""
  use_bias: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(8, use_bias=self.use_bias)(x)
    y = bn_nn.BatchNorm(momentum=0.9)(h, use_running_average=not train)
    return nn.Dense(CLASSES)(y) + nn.Dense(CLASSES, name="skip")(h)


def test_fold_matches_the_eval_model_and_a_shared_output_is_flagged(
    healthy, data):
  model, variables = healthy
  folded = doctor.fold(model, variables, data[0][0])
  assert {k: v.batch_norm for k, v in folded.items()} == {
      "Dense_0": "BatchNorm_0", "Dense_1": "BatchNorm_1"}
  # The inference model: Dense (with the folded bias) -> relu, no BN.
  x = np.concatenate(np.asarray(data[0]))
  for name in ("Dense_0", "Dense_1"):
    x = np.maximum(0.0, x @ np.asarray(folded[name].kernel)
                   + np.asarray(folded[name].bias))
  readout = variables["params"]["Dense_2"]
  np.testing.assert_allclose(
      x @ np.asarray(readout["kernel"]) + np.asarray(readout["bias"]),
      eval_logits(model, variables, data[0]), rtol=1e-4, atol=1e-4)

  shared = SharedDense()
  shared_vars = doctor.recompute(shared, init(shared, data[0][0]), data[0])
  report = doctor.diagnose(shared, shared_vars, data[0])
  assert checks(report) == {"fold": {"warning"}}
  assert "also feeds skip" in report.flagged("fold")[0].message
  assert doctor.fold(shared, shared_vars, data[0][0]) == {}
  # Its bias is not BN's twin: the skip path reads it, so it stays.
  biased = SharedDense(use_bias=True)
  biased_vars = init(biased, data[0][0])
  biased_vars = {**biased_vars, "params": jax.tree.map(
      lambda v: v + 0.5, biased_vars["params"])}
  biased_vars = doctor.recompute(biased, biased_vars, data[0])
  assert checks(doctor.diagnose(biased, biased_vars, data[0])) == {
      "fold": {"warning"}}
  kept = doctor.drop_bias(biased, biased_vars, data[0][0])
  jax.tree.map(np.testing.assert_array_equal, kept, biased_vars)


class HalfDense(nn.Module):
  """A bfloat16 Dense before BN: its eval output is rounded to bfloat16,
  the folded float32 layer's is not."""

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(8, use_bias=False, dtype=jnp.bfloat16)(x)
    h = bn_nn.BatchNorm(momentum=0.9)(h, use_running_average=not train)
    return nn.Dense(CLASSES)(nn.relu(h))


def test_a_fold_that_is_not_exact_is_flagged(data):
  model = HalfDense()
  variables = doctor.recompute(model, init(model, data[0][0]), data[0])
  report = doctor.diagnose(model, variables, data[0])
  assert checks(report) == {"fold": {"warning"}}
  assert "not exact" in report.flagged("fold")[0].message


def test_recompute_clears_the_gap_finding(healthy, data):
  model, variables = healthy
  stale = with_stats(variables, "BatchNorm_0",
                     mean=variables["batch_stats"]["BatchNorm_0"]["mean"]
                     + 1.0)
  assert checks(doctor.diagnose(model, stale, data[0], **HEALTHY_RUN)) == {
      "gap": {"warning"}}
  fixed = doctor.recompute(model, stale, data[0])
  assert doctor.diagnose(model, fixed, data[0],
                         **HEALTHY_RUN).problems() == ()


# ----------------------------------------------------------------------------
# nnx: the statistics checks.


class NnxMLP(nnx.Module):
  def __init__(self, norm, rngs, **norm_options):
    self.linear = nnx.Linear(FEATURES, 8, rngs=rngs)
    self.bn = norm(8, rngs=rngs, **norm_options)
    self.readout = nnx.Linear(8, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.readout(nnx.relu(self.bn(self.linear(x))))


def test_nnx_statistics_checks_and_numbers(data):
  """bn_jax.nnx's exact average over one pass of the batches is healthy
  (its numbers against NumPy); flax.nnx's untouched layer is flagged."""
  model = NnxMLP(bn_nnx.BatchNorm, nnx.Rngs(0), momentum=None)
  model.train()
  forward = nnx.jit(lambda module, x: module(x))  # eager: op by op, slow
  for x in data[0]:
    forward(model, x)
  report = doctor.diagnose(model, None, data[0], steps_trained=STEPS)
  assert report.frontend == "nnx" and report.problems() == ()
  assert any("linen only" in line for line in report.not_checked)
  h = np.concatenate(np.asarray(data[0], np.float64)) @ np.asarray(
      model.linear.kernel[...], np.float64) + np.asarray(
          model.linear.bias[...], np.float64)
  run_mean = np.asarray(model.bn.mean[...], np.float64)
  run_var = np.asarray(model.bn.var[...], np.float64)
  row, = report.layers
  np.testing.assert_allclose(
      row.mean_z, np.mean(np.abs(h.mean(0) - run_mean)
                          / np.sqrt(run_var + EPS)), rtol=1e-4, atol=1e-6)
  assert np.all(h.var(0) >= EPS)  # every feature varies
  np.testing.assert_allclose(
      row.log_var_ratio, np.mean(np.log((h.var(0) + EPS) / (run_var + EPS))),
      rtol=1e-4, atol=1e-6)

  fresh = NnxMLP(nnx.BatchNorm, nnx.Rngs(0))
  report = doctor.diagnose(fresh, None, data[0], steps_trained=5)
  assert checks(report) == {"never_updated": {"error"},
                            "momentum": {"error"}, "gap": {"warning"}}
  assert "nnx.update" in report.flagged("never_updated")[0].fix
  assert fresh.bn.mean[...].sum() == 0  # the model itself is untouched


# ----------------------------------------------------------------------------
# Arguments and the text.


def test_bad_arguments_are_one_line_errors(healthy, data):
  model, variables = healthy
  with pytest.raises(ValueError, match="give \\(N, B, ...\\) batches"):
    doctor.diagnose(model, variables, data[0][0, 0])
  with pytest.raises(ValueError, match="pass variables=None"):
    doctor.diagnose(NnxMLP(nnx.BatchNorm, nnx.Rngs(0)), variables, data[0])
  with pytest.raises(ValueError, match="give a list of layer names"):
    doctor.diagnose(model, variables, data[0], frozen="BatchNorm_0")
  with pytest.raises(ValueError, match="steps_trained=-1"):
    doctor.diagnose(model, variables, data[0], steps_trained=-1)
  with pytest.raises(ValueError, match="no statistics for BatchNorm_0"):
    doctor.diagnose(model, {"params": variables["params"]}, data[0])


def test_format_report_is_a_table_with_severity_and_fix(healthy, data):
  model, variables = healthy
  report = doctor.diagnose(model, initial_weighted(variables, 0.9 ** 5),
                           data[0], steps_trained=5)
  text = doctor.format_report(report)
  assert "| rank | layer | z (mean) | log var ratio | logit change |" in text
  assert "| 1 | BatchNorm_" in text and "error momentum" in text
  line, = [l for l in text.splitlines() if l.startswith(
      "- error [momentum] BatchNorm_0")]
  assert " Fix: use momentum <= 0.8" in line


class InputBN(nn.Module):
  """BN on the raw input, then a Dense readout."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = bn_nn.BatchNorm(momentum=0.9, epsilon=EPS)(
        x, use_running_average=not train)
    return nn.Dense(CLASSES)(x)


def test_a_constant_feature_s_variance_is_left_out_of_the_ratio(data):
  """A constant input (a border pixel) whose running variance is still the
  initial 1: its eval output is 0 either way, so no gap."""
  xs = data[0].at[:, :, 0].set(0.0)
  x = np.concatenate(np.asarray(xs, np.float64))
  model = InputBN()
  variables = init(model, xs[0])
  stats = {"BatchNorm_0": {"mean": jnp.asarray(x.mean(0), jnp.float32),
                           "var": jnp.asarray(x.var(0), jnp.float32).at[0]
                           .set(1.0)}}
  report = doctor.diagnose(model, {**variables, "batch_stats": stats}, xs)
  assert report.problems() == ()
  row, = report.layers
  assert abs(row.log_var_ratio) < 1e-5 and row.mean_z < 1e-5
