"""Tests for bn_lab.train on a tiny synthetic, learnable data set.

References are independent of the code under test where one exists: a loop
of single-run steps for the vmapped sweep, NumPy for evaluation and for the
running statistics.
"""

import dataclasses
import functools
import re

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_lab import models
from bn_lab import train

NUM_TRAIN, NUM_TEST = 512, 200
WIDTH = 16
# eval_chunk=128 over 200 test examples: the last chunk is padded.
SPEC = train.TrainSpec(
    model="mlp", placement="before_activation", activation="relu",
    widths=(WIDTH,), batch_size=64, steps_per_epoch=NUM_TRAIN // 64,
    num_epochs=3, eval_chunk=128)
# K = 3 runs that differ in everything a sweep can vary.
SEEDS = (0, 1, 2)
SWEEP = {"learning_rate": (3e-3, 1e-2, 2e-3),
         "bn_momentum": (0.9, 0.5, 0.99),
         "bn_epsilon": (1e-3, 1e-1, 1e-5)}


@pytest.fixture(scope="module")
def arrays():
  """A learnable task: each class is a random binary image, faint under
  uniform noise, in [-1, 1] (zero-mean, so that every placement, "none"
  included, learns within 3 epochs; the losses stay well above 0)."""
  rng = np.random.default_rng(0)
  prototypes = rng.integers(0, 2, (10, 784))
  labels = rng.integers(0, 10, NUM_TRAIN + NUM_TEST).astype(np.int32)
  pixels = (0.1 * prototypes[labels]
            + 0.9 * rng.uniform(0, 1, (len(labels), 784)))
  x = (2 * pixels - 1).astype(np.float32)
  return (x[:NUM_TRAIN], labels[:NUM_TRAIN], x[NUM_TRAIN:],
          labels[NUM_TRAIN:])


@pytest.fixture(scope="module")
def data(arrays):
  return train.to_device(*arrays)


def spec_for(placement, **changes):
  return dataclasses.replace(SPEC, placement=placement, **changes)


def run_hparams(i):
  return {name: values[i] for name, values in SWEEP.items()}


def copy_tree(tree):
  """A host copy: the jitted steps donate their input state."""
  return jax.tree.map(np.array, jax.device_get(tree))


def assert_trees_close(actual, expected, rtol=1e-4, atol=1e-5):
  actual_leaves, actual_def = jax.tree.flatten(actual)
  expected_leaves, expected_def = jax.tree.flatten(expected)
  assert actual_def == expected_def
  for a, e in zip(actual_leaves, expected_leaves):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol,
                               atol=atol)


class TraceCounter:
  """Counts traces of train steps: `train_step` calls `make_optimizer` once
  per trace (Python runs only while tracing), never per compiled call."""

  def __init__(self, monkeypatch):
    self.count = 0
    original = train.make_optimizer

    def counting(*args, **kwargs):
      self.count += 1
      return original(*args, **kwargs)

    monkeypatch.setattr(train, "make_optimizer", counting)


@pytest.fixture(scope="module")
def sweeps(data):
  """Trains K = 3 runs of each placement for 3 epochs with `sweep_epoch`,
  once per placement and module. Returns {placement: dict(initial,
  final states, per-epoch metrics, traces of the 3 epochs)}.

  These specs are used by nothing else, so the first epoch must trace and
  compile and the others must reuse it.
  """
  results = {}
  with pytest.MonkeyPatch.context() as monkeypatch:
    counter = TraceCounter(monkeypatch)
    for placement in models.PLACEMENTS:
      spec = spec_for(placement)
      states = train.create_sweep_states(spec, SEEDS, SWEEP)
      initial = copy_tree(states)
      counter.count, history = 0, []
      for _ in range(spec.num_epochs):
        states, metrics = train.sweep_epoch(states, data, spec=spec)
        history.append(jax.device_get(metrics))
      results[placement] = dict(initial=initial, final=copy_tree(states),
                                history=history, traces=counter.count)
  return results


# ----------------------------------------------------------------------------
# Learning, compiled once.


@pytest.mark.slow
@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_every_placement_lowers_the_loss(placement, sweeps):
  history = sweeps[placement]["history"]
  first, last = history[0], history[-1]
  for metrics in history:
    for key, value in metrics.items():
      assert value.shape == (len(SEEDS),)
      assert np.all(np.isfinite(value)), key
      if "accuracy" in key:
        assert np.all((0 <= value) & (value <= 1)), key
    if "nonfinite" in metrics:  # the NaN guard saw nothing wrong
      np.testing.assert_array_equal(metrics["nonfinite"], 0)
      np.testing.assert_array_equal(metrics["first_nonfinite_step"], -1)
  # Every run: the training loss falls, the test loss too, and the test set
  # is learned beyond chance (10 %).
  assert np.all(last["train_loss"] < 0.8 * first["train_loss"]), (
      first["train_loss"], last["train_loss"])
  assert np.all(last["test_loss"] < first["test_loss"]), (
      first["test_loss"], last["test_loss"])
  assert np.all(last["test_accuracy"] > 0.3), last["test_accuracy"]
  np.testing.assert_array_equal(sweeps[placement]["final"].step,
                                SPEC.total_steps)


def test_batch_sizes_share_one_compiled_initialization():
  """Specs that differ only in what training and evaluation read (here the
  batch size, the epochs, the warmup and the measurements' cadence) share
  the compiled initialization, and their states are those each spec's own
  `create_train_state` makes, op by op (so none of those fields is read)."""
  spec = spec_for("before_activation", optimizer="momentum",
                  schedule="warmup_cosine", warmup_steps=3, agc_clip=0.1)
  other = dataclasses.replace(spec, batch_size=2 * spec.batch_size,
                              steps_per_epoch=7, num_epochs=2,
                              warmup_steps=1, log_every_steps=5,
                              precise_batches=2, eval_train=True)
  train.create_sweep_states(spec, SEEDS, SWEEP)
  with helpers.count_compiles() as compiles:
    shared = train.create_sweep_states(other, SEEDS, SWEEP)
  assert not compiles
  own = jax.vmap(functools.partial(train.create_train_state, other))(
      jnp.asarray(SEEDS), {k: jnp.asarray(v, jnp.float32)
                           for k, v in SWEEP.items()})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-6, atol=1e-7), jax.tree.map(np.asarray, own),
               jax.tree.map(np.asarray, shared))


@pytest.mark.slow
@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_sweep_epoch_is_traced_once_across_epochs(placement, sweeps):
  assert sweeps[placement]["traces"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_bn_statistics_are_kept_per_run(placement, sweeps):
  k = len(SEEDS)
  features = {"before_activation": WIDTH, "after_activation": WIDTH,
              "input": 784}.get(placement)
  initial, final = sweeps[placement]["initial"], sweeps[placement]["final"]
  for state in (initial, final):
    stats = jax.tree.leaves(state.batch_stats)
    if features is None:
      assert not stats
    else:
      assert [s.shape for s in stats] == [(k, features)] * 2  # mean, var
    assert all(v.shape == (k,) for v in state.bn_hparams.values())
    assert optax.tree_utils.tree_get(state.opt_state,
                                     "learning_rate").shape == (k,)
    assert state.step.shape == (k,)
  for stat in jax.tree.leaves(final.batch_stats):
    # Each run moved its own statistics: no two runs share them.
    for i in range(k):
      for j in range(i):
        assert not np.allclose(stat[i], stat[j])


# ----------------------------------------------------------------------------
# K vmapped runs == K separate runs.

jit_create_train_state = jax.jit(train.create_train_state, static_argnums=0)


@functools.partial(jax.jit, static_argnames="spec")
def evaluate_both(state, data, spec):
  """`train.evaluate` in eval mode and with batch statistics, one program."""
  return (train.evaluate(state, data.test_images, data.test_labels,
                         spec=spec),
          train.evaluate(state, data.test_images, data.test_labels,
                         spec=spec, use_batch_stats=True))


def epoch_metrics(train_sums, test, test_bs):
  return {"train_loss": train_sums["loss_sum"] / train_sums["count"],
          "train_accuracy": train_sums["correct"] / train_sums["count"],
          "test_loss": test["loss_sum"] / test["count"],
          "test_accuracy": test["correct"] / test["count"],
          "test_accuracy_batch_stats": test_bs["correct"] / test_bs["count"]}


def separate_run(state, spec, data, on_step):
  """One run, unvmapped: a Python loop of `jit_train_step` over the batches
  of `epoch_batches`, evaluated after each epoch. `on_step(before, indices,
  after)` sees every step. Returns (state, metrics per epoch)."""
  history = []
  for epoch in range(spec.num_epochs):
    batches = train.epoch_batches(state.data_key, epoch, NUM_TRAIN, spec)
    sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for indices in np.asarray(batches):
      before = copy_tree(state)
      state, step = train.jit_train_step(
          state, data.train_images[indices], data.train_labels[indices],
          spec=spec)
      on_step(before, indices, state)
      sums = {k: v + float(step[k]) for k, v in sums.items()}
    history.append(epoch_metrics(sums, *jax.device_get(
        evaluate_both(state, data, spec))))
  return copy_tree(state), history


def assert_same_run(state, history, expected_state, expected_history):
  np.testing.assert_array_equal(state.data_key, expected_state.data_key)
  np.testing.assert_array_equal(state.step, expected_state.step)
  assert_trees_close(state.bn_hparams, expected_state.bn_hparams, rtol=0,
                     atol=0)
  assert_trees_close(state.params, expected_state.params)
  assert_trees_close(state.batch_stats, expected_state.batch_stats)
  assert_trees_close(state.opt_state, expected_state.opt_state)
  assert len(history) == len(expected_history)
  for epoch, (metrics, expected) in enumerate(zip(history,
                                                  expected_history)):
    assert set(expected) <= set(metrics)
    for key, value in expected.items():
      np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{key}, epoch {epoch + 1}")


@pytest.mark.slow
def test_vmapped_runs_equal_separate_runs(arrays, data, sweeps,
                                          monkeypatch):
  """The 3 runs of `sweeps` (seeds, learning rates, BN momenta and epsilons
  all different) against the same 3 runs one at a time. Along the way,
  every step's running statistics are checked against NumPy."""
  placement = "before_activation"
  spec, sweep = spec_for(placement), sweeps[placement]
  counter = TraceCounter(monkeypatch)
  initial = [jit_create_train_state(spec, seed, run_hparams(i))
             for i, seed in enumerate(SEEDS)]
  counter.count = 0
  train_x = arrays[0]

  for i, state in enumerate(initial):
    run = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    assert_trees_close(copy_tree(state), run(sweep["initial"]), 0, 0)

    def check_running_stats(before, indices, after, i=i):
      assert_momentum_update(before, after, train_x[indices], placement,
                             SWEEP["bn_momentum"][i], unbiased=False)

    state, history = separate_run(state, spec, data, check_running_stats)
    assert_same_run(run(sweep["final"]), [run(m) for m in sweep["history"]],
                    state, history)
  assert counter.count == 1  # jit_train_step: 3 runs x 24 steps, one trace

  # The differences between runs are real, so the comparison means something.
  final = sweep["history"][-1]["train_loss"]
  assert len(set(np.round(final, 4))) == len(SEEDS)


@pytest.mark.slow
def test_jit_train_epoch_equals_the_sweep_and_traces_once(data, sweeps,
                                                          monkeypatch):
  """Run 1 of `sweeps` again with the unvmapped `jit_train_epoch`: the epoch
  number comes from the step count, the order from the run's own key."""
  placement, i = "before_activation", 1
  spec, sweep = spec_for(placement), sweeps[placement]
  counter = TraceCounter(monkeypatch)
  state = jit_create_train_state(spec, SEEDS[i], run_hparams(i))
  counter.count = 0
  history = []
  for _ in range(spec.num_epochs):
    state, sums = train.jit_train_epoch(state, data, spec=spec)
    history.append(epoch_metrics(*jax.device_get(
        (sums, *evaluate_both(state, data, spec)))))
  assert counter.count == 1
  run = lambda tree: jax.tree.map(lambda x: x[i], tree)
  assert_same_run(run(sweep["final"]), [run(m) for m in sweep["history"]],
                  copy_tree(state), history)


# ----------------------------------------------------------------------------
# Data order.


def test_data_order_is_deterministic_and_differs_across_seeds_and_epochs():
  keys = train.create_sweep_states(spec_for("none"), SEEDS, SWEEP).data_key
  num_examples = NUM_TRAIN + 3  # the last partial batch is dropped
  order = lambda key, epoch: np.asarray(
      train.epoch_batches(key, epoch, num_examples, SPEC))
  first = order(keys[0], 0)
  assert first.shape == (SPEC.steps_per_epoch, SPEC.batch_size)
  # Part of a permutation: no example twice, all in range.
  assert len(np.unique(first)) == first.size
  assert first.min() >= 0 and first.max() < num_examples
  np.testing.assert_array_equal(order(keys[0].copy(), 0), first)
  # The same seed gives the same key whatever the hparams.
  other_runs = train.create_sweep_states(
      spec_for("none"), SEEDS, {k: v[::-1] for k, v in SWEEP.items()})
  np.testing.assert_array_equal(other_runs.data_key, keys)
  for other in (order(keys[1], 0), order(keys[2], 0), order(keys[0], 1),
                order(keys[0], 2)):
    assert np.mean(other != first) > 0.9
  # Every epoch is shuffled: not the identity, nor a shift of it.
  assert np.mean(np.diff(first.ravel()) == 1) < 0.1


jit_permutation = jax.jit(train.random_permutation, static_argnums=1)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 60000, 65537])
def test_random_permutation_is_a_permutation(n):
  order = np.asarray(jit_permutation(jax.random.key(n), n))
  assert order.dtype == np.int32
  np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_random_permutation_positions_are_uniform():
  """Over 4000 keys, where each of 8 elements lands: a chi-square test of
  the 8 x 8 (element, position) counts against uniform (df = 49; 85.35 is
  its 0.999 quantile, scipy.stats.chi2.ppf(0.999, 49)). The identity, a
  rotation, or a permutation that favours some positions fail by far."""
  keys = jax.random.split(jax.random.key(0), 4000)
  orders = np.asarray(jax.vmap(lambda k: train.random_permutation(k, 8))(keys))
  counts = np.zeros((8, 8))
  for order in orders:
    counts[order, np.arange(8)] += 1
  expected = len(keys) / 8
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 85.35, counts


def test_random_permutation_breaks_up_neighbours():
  """MNIST-sized: consecutive examples land in the same batch of 128 as
  often as in a uniform shuffle (about 128 / 60000), and the order is
  uncorrelated with the index (|Spearman r| < 5 / sqrt(n))."""
  n, batch = 60000, 128
  for seed in range(3):
    order = np.asarray(jit_permutation(jax.random.key(seed), n))
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    same_batch = np.mean(position[1:] // batch == position[:-1] // batch)
    assert 0.5 < same_batch / (batch / n) < 1.5, same_batch
    r = np.corrcoef(np.arange(n), position)[0, 1]  # ranks: Spearman
    assert abs(r) < 5 / np.sqrt(n), r

DATA_SEED = 7


@pytest.mark.slow
def test_shared_data_order_sweep_equals_separate_runs(data):
  """spec.data_seed: the vmapped sweep (batches gathered once for all runs)
  against each run alone with the per-run code path, its data key replaced
  by the one seed DATA_SEED gets: same init per seed, same order for all."""
  placement = "after_activation"
  shared = spec_for(placement, data_seed=DATA_SEED, num_epochs=2)
  per_run = spec_for(placement, num_epochs=2)
  states = train.create_sweep_states(shared, SEEDS, SWEEP)
  history = []
  for _ in range(shared.num_epochs):
    states, metrics = train.sweep_epoch(states, data, spec=shared)
    history.append(jax.device_get(metrics))
  order_key = np.asarray(jit_create_train_state(per_run, DATA_SEED,
                                                run_hparams(0)).data_key)
  for i, seed in enumerate(SEEDS):
    state = jit_create_train_state(per_run, seed, run_hparams(i))
    state = state._replace(data_key=jax.numpy.asarray(order_key))
    expected = []
    for _ in range(per_run.num_epochs):
      state, sums = train.jit_train_epoch(state, data, spec=per_run)
      expected.append(epoch_metrics(*jax.device_get(
          (sums, *evaluate_both(state, data, per_run)))))
    run = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    assert_same_run(run(copy_tree(states)), [run(m) for m in history],
                    copy_tree(state), expected)
  # The runs still differ (init seed and swept values), so this is no
  # comparison of one run with itself.
  assert len(set(np.round(history[-1]["train_loss"], 4))) == len(SEEDS)


def test_random_permutation_rejects_sizes_beyond_int32():
  for n in (0, 2**31 + 1):
    with pytest.raises(ValueError, match="1 to 2\\*\\*31"):
      train.random_permutation(jax.random.key(0), n)


@pytest.mark.slow
def test_shared_data_order_single_run_path(data):
  """K=1 with data_seed: `over_runs` unstacks the run (no vmap) and passes
  the shared batches in; the result equals the per-run path given the same
  key."""
  shared = spec_for("before_activation", data_seed=DATA_SEED, num_epochs=1)
  per_run = spec_for("before_activation", num_epochs=1)
  states = train.create_sweep_states(shared, SEEDS[1:2], {
      name: values[1:2] for name, values in SWEEP.items()})
  states, _ = train.sweep_epoch(states, data, spec=shared)
  order_key = jit_create_train_state(per_run, DATA_SEED, run_hparams(1))
  state = jit_create_train_state(per_run, SEEDS[1], run_hparams(1))
  state = state._replace(data_key=order_key.data_key)
  state, _ = train.jit_train_epoch(state, data, spec=per_run)
  assert_trees_close(jax.tree.map(lambda x: x[0], copy_tree(states.params)),
                     copy_tree(state.params))


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["unit", "standardize"])
def test_uint8_pixels_train_like_floats_scaled_on_the_host(arrays, scaling):
  """DeviceData with uint8 pixels (the CLI's: scaled per batch inside the
  step, `train.model_inputs`) trains and evaluates like float32 images
  scaled once on the host by `bn_lab.data.to_float`."""
  from bn_lab import data as data_lib
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (NUM_TRAIN + NUM_TEST, 784), dtype=np.uint8)
  labels = np.concatenate(arrays[1::2])
  # SGD: Adam's first steps amplify float-rounding differences in tiny
  # gradients (its update is about lr * sign(g)).
  spec = spec_for("after_activation", input_scaling=scaling, num_epochs=1,
                  optimizer="sgd")
  results = []
  for images in (pixels, data_lib.to_float(pixels, scaling)):
    device_data = train.to_device(images[:NUM_TRAIN], labels[:NUM_TRAIN],
                                  images[NUM_TRAIN:], labels[NUM_TRAIN:])
    assert device_data.train_images.dtype == images.dtype
    state = jit_create_train_state(spec, 0, run_hparams(0))
    state, sums = train.jit_train_epoch(state, device_data, spec=spec)
    results.append((copy_tree(state), epoch_metrics(*jax.device_get(
        (sums, *evaluate_both(state, device_data, spec))))))
  (state, metrics), (expected_state, expected_metrics) = results
  assert_same_run(state, [metrics], expected_state, [expected_metrics])


def test_to_device_rejects_integer_images_other_than_uint8(arrays):
  """int32 pixels would reach the model unscaled: an error instead."""
  pixels = np.zeros((4, 784), np.int32)
  with pytest.raises(ValueError, match="uint8 pixels"):
    train.to_device(pixels, arrays[1][:4], pixels, arrays[1][:4])


def _gather_result_types(spec, k, data):
  """Result types of the batch gathers in the lowered sweep epoch."""
  states = train.create_sweep_states(spec, SEEDS[:k], {
      name: values[:k] for name, values in SWEEP.items()})
  text = train.sweep_epoch.lower(states, data, spec=spec).as_text()
  return re.findall(r"stablehlo.gather.*-> (tensor<[0-9x]*xf32>)", text)


@pytest.mark.slow
def test_shared_data_order_gathers_each_batch_once(data):
  """With data_seed, the image gather inside the epoch is unbatched
  (B, 784), not one per run (K, B, 784), which is what lets XLA fuse the
  runs' first-layer matmuls."""
  batch = SPEC.batch_size
  shared = _gather_result_types(spec_for("none", data_seed=DATA_SEED), 3,
                                data)
  per_run = _gather_result_types(spec_for("none"), 3, data)
  assert f"tensor<{batch}x784xf32>" in shared
  assert f"tensor<3x{batch}x784xf32>" not in shared
  assert f"tensor<3x{batch}x784xf32>" in per_run


# ----------------------------------------------------------------------------
# Evaluation and running statistics against NumPy.

NP_RELU = lambda x: np.maximum(x, 0.0)


def bn_path(stats, path=()):
  """Where the (only) BN's variables live: the key path to {mean, var}."""
  if "mean" in stats:
    return path
  for name, sub in stats.items():
    found = bn_path(sub, path + (name,))
    if found is not None:
      return found
  return None


def at_path(tree, path):
  return functools.reduce(lambda subtree, key: subtree[key], path, tree)


def np_forward(state, x, placement, *, train_mode):
  """float64 NumPy forward pass of the one-hidden-layer relu MLP.

  Returns (logits, (mean, biased var) of the BN input's batch, or None).
  """
  as64 = lambda tree: jax.tree.map(lambda v: np.asarray(v, np.float64), tree)
  params, stats = as64(state.params), as64(state.batch_stats)
  epsilon = float(state.bn_hparams["epsilon"])
  batch = []

  def norm(h):
    path = bn_path(stats)
    p, s = at_path(params, path), at_path(stats, path)
    batch.append((h.mean(0), h.var(0)))
    mean, var = batch[-1] if train_mode else (s["mean"], s["var"])
    return (h - mean) / np.sqrt(var + epsilon) * p["scale"] + p["bias"]

  h = np.asarray(x, np.float64)
  if placement == "input":
    h = norm(h)
  dense = params["hidden_0"]["Dense_0"]
  h = h @ dense["kernel"]
  if placement == "before_activation":
    h = NP_RELU(norm(h))
  else:
    h = NP_RELU(h + dense["bias"])
    if placement == "after_activation":
      h = norm(h)
  logits = h @ params["readout"]["kernel"] + params["readout"]["bias"]
  return logits, (batch[0] if batch else None)


def np_metrics(logits, labels):
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return {"loss_sum": -log_probs[np.arange(len(labels)), labels].sum(),
          "correct": np.sum(logits.argmax(-1) == labels),
          "count": len(labels)}


def assert_momentum_update(before, after, x, placement, momentum, unbiased):
  """running = m * running + (1 - m) * batch statistic of the BN's input
  (for before_activation, the first hidden layer's pre-activation), from
  NumPy and the params before the step."""
  _, (mean, var) = np_forward(before, x, placement, train_mode=True)
  if unbiased:
    var = var * len(x) / (len(x) - 1)
  path = bn_path(before.batch_stats)
  old, new = at_path(before.batch_stats, path), at_path(
      jax.device_get(after.batch_stats), path)
  np.testing.assert_allclose(
      new["mean"], momentum * old["mean"] + (1 - momentum) * mean,
      rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      new["var"], momentum * old["var"] + (1 - momentum) * var, rtol=1e-4,
      atol=1e-6)


def test_epoch_scores_the_validation_split_in_eval_mode(arrays):
  """With validation arrays, each epoch's val_loss / val_accuracy are eval
  mode on exactly them, from the state the epoch leaves (NumPy); the
  training never sees them (the same epoch without them trains alike)."""
  train_x, train_y, test_x, test_y = arrays
  val = (test_x[:50], test_y[:50])
  spec = dataclasses.replace(SPEC, num_epochs=1)
  state = jit_create_train_state(spec, 0, run_hparams(0))
  epoch = jax.jit(functools.partial(train.epoch_and_eval, spec=spec))
  with_val, metrics = epoch(state, train.to_device(
      train_x, train_y, test_x, test_y, validation=val))
  without, plain = epoch(state, train.to_device(train_x, train_y, test_x,
                                                test_y))
  assert "val_accuracy" not in plain
  jax.tree.map(np.testing.assert_array_equal, with_val.params,
               without.params)
  expected = np_metrics(np_forward(jax.device_get(with_val), val[0],
                                   spec.placement, train_mode=False)[0],
                        val[1])
  assert round(float(metrics["val_accuracy"]) * 50) == expected["correct"]
  np.testing.assert_allclose(metrics["val_loss"], expected["loss_sum"] / 50,
                             rtol=1e-5)


@pytest.mark.slow
def test_evaluate_matches_numpy(arrays, data, sweeps):
  """`evaluate` called directly, on run 0 of the trained before_activation
  sweep: running statistics far from their initial 0 / 1."""
  placement = "before_activation"
  state = jax.tree.map(lambda x: x[0], sweeps[placement]["final"])
  _, _, test_x, test_y = arrays
  test, test_bs = jax.device_get(evaluate_both(state, data,
                                               spec_for(placement)))

  # Eval mode: running statistics, all 200 examples (chunks of 128, padded).
  expected = np_metrics(np_forward(state, test_x, placement,
                                   train_mode=False)[0], test_y)
  assert int(test["count"]) == NUM_TEST
  assert int(test["correct"]) == expected["correct"]
  np.testing.assert_allclose(test["loss_sum"], expected["loss_sum"],
                             rtol=1e-5)

  # Batch statistics: each full batch of 64 normalized by itself; the last
  # 200 - 3 * 64 = 8 examples dropped.
  chunks = [np_metrics(np_forward(state, test_x[i:i + 64], placement,
                                  train_mode=True)[0], test_y[i:i + 64])
            for i in range(0, 192, 64)]
  assert int(test_bs["count"]) == 192
  assert int(test_bs["correct"]) == sum(c["correct"] for c in chunks)
  np.testing.assert_allclose(test_bs["loss_sum"],
                             sum(c["loss_sum"] for c in chunks), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("placement", models.PLACEMENTS)
def test_sweep_test_metrics_match_numpy(placement, arrays, sweeps):
  """Every run's last-epoch test metrics (`evaluate` under the sweep's vmap)
  against NumPy with that run's final params and running statistics."""
  _, _, test_x, test_y = arrays
  final = sweeps[placement]["history"][-1]
  for i in range(len(SEEDS)):
    state = jax.tree.map(lambda x, i=i: x[i], sweeps[placement]["final"])
    expected = np_metrics(np_forward(state, test_x, placement,
                                     train_mode=False)[0], test_y)
    np.testing.assert_allclose(final["test_loss"][i],
                               expected["loss_sum"] / NUM_TEST, rtol=1e-5)
    np.testing.assert_allclose(final["test_accuracy"][i],
                               expected["correct"] / NUM_TEST, rtol=1e-6)
    chunks = [np_metrics(np_forward(state, test_x[j:j + 64], placement,
                                    train_mode=True)[0], test_y[j:j + 64])
              for j in range(0, 192, 64)]
    np.testing.assert_allclose(final["test_accuracy_batch_stats"][i],
                               sum(c["correct"] for c in chunks) / 192,
                               rtol=1e-6)


def test_spec_passes_bn_options_and_hparams_to_the_model(arrays):
  """`TrainSpec.make_model`: the run's momentum and epsilon and the spec's
  unbiased running variance reach every BN (one training-mode call)."""
  spec = spec_for("after_activation", bn=(("unbiased_running_var", True),))
  bn_hparams = {"momentum": 0.8, "epsilon": 0.5}
  model = spec.make_model(bn_hparams)
  x = arrays[0][:64]
  variables = model.init(jax.random.key(0), x, train=False)
  state = train.TrainState(step=0, params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=None, bn_hparams=bn_hparams,
                           data_key=None)
  logits, updates = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])
  expected, _ = np_forward(state, x, "after_activation", train_mode=True)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  assert_momentum_update(state, state._replace(
      batch_stats=updates["batch_stats"]), x, "after_activation", 0.8,
                         unbiased=True)


# ----------------------------------------------------------------------------
# Per-run hyperparameters: the learning rate in the optimizer state.


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("schedule", train.SCHEDULES)
def test_optimizer_with_injected_learning_rate_matches_optax(optimizer,
                                                             schedule):
  """make_optimizer (learning rate in the state, schedule as a factor)
  gives the updates of optax's own optimizer built with a schedule."""
  spec = dataclasses.replace(SPEC, optimizer=optimizer, schedule=schedule,
                             warmup_steps=2, weight_decay=0.1,
                             steps_per_epoch=3, num_epochs=2)
  lr = 0.05
  schedules = {
      "constant": lr,
      "cosine": optax.cosine_decay_schedule(lr, spec.total_steps),
      "warmup_cosine": optax.warmup_cosine_decay_schedule(
          0.0, lr, 2, spec.total_steps)}
  lr_or_schedule = schedules[schedule]
  reference = {
      "adam": optax.adam(lr_or_schedule),
      "adamw": optax.adamw(lr_or_schedule, weight_decay=0.1),
      "sgd": optax.sgd(lr_or_schedule),
      "momentum": optax.sgd(lr_or_schedule, momentum=0.9, nesterov=True),
  }[optimizer]
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  ours_state = train.make_optimizer(spec, lr).init(params)
  reference_state = reference.init(params)
  ours_params = reference_params = params
  for step in range(spec.total_steps):
    grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 1)), ours_params)
    updates, ours_state = train.make_optimizer(spec).update(
        grads, ours_state, ours_params)
    ours_params = optax.apply_updates(ours_params, updates)
    updates, reference_state = reference.update(grads, reference_state,
                                                reference_params)
    reference_params = optax.apply_updates(reference_params, updates)
    # To float rounding: the injected rate is a float32 array, optax's a
    # Python float folded into the program.
    assert_trees_close(ours_params, reference_params, rtol=1e-5, atol=1e-6)


def test_momentum_none_keeps_the_exact_average_of_the_batches(data):
  """bn.momentum=None: after an epoch the input BN's running mean is the
  mean of that epoch's batch means (NumPy, from the epoch's batches), and
  its count is the number of steps."""
  spec = spec_for("input", num_epochs=1, bn=(("momentum", None),))
  state = train.create_train_state(spec, 0, {"learning_rate": 1e-3})
  batches = np.asarray(train.epoch_batches(state.data_key, 0, NUM_TRAIN,
                                           spec))
  trained, _ = train.jit_train_epoch(state, data, spec=spec)
  stats = trained.batch_stats["input_bn"]
  assert int(stats["count"]) == spec.steps_per_epoch
  images = np.asarray(data.train_images, np.float64)
  expected = np.mean([images[b].mean(0) for b in batches], 0)
  np.testing.assert_allclose(stats["mean"], expected, rtol=1e-5, atol=1e-6)


def _agc_numpy(grad, param, clip, eps=1e-3):
  """Brock et al. (2021)'s AGC, unit-wise over every axis but the last
  (the output units): G_i * min(1, clip * max(|W_i|, eps) / |G_i|)."""
  grad, param = np.asarray(grad, np.float64), np.asarray(param, np.float64)
  if grad.ndim <= 1:  # biases and scales: the whole vector is one unit
    axes, keep = None, False
  else:
    axes, keep = tuple(range(grad.ndim - 1)), True
  g_norm = np.sqrt(np.sum(grad**2, axis=axes, keepdims=keep))
  w_norm = np.maximum(np.sqrt(np.sum(param**2, axis=axes, keepdims=keep)),
                      eps)
  return grad * np.minimum(1.0, clip * w_norm / np.maximum(g_norm, 1e-6))


def test_agc_clips_every_layer_but_the_readout_as_the_paper():
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(
      np.float32), "bias": rng.normal(size=4).astype(np.float32)},
            "readout": {"kernel": rng.normal(size=(4, 10)).astype(
                np.float32)}}
  # Some units' gradients far above 0.05 x their weights' norm, some below.
  grads = jax.tree.map(lambda p: (p * rng.choice([0.01, 10.0], p.shape[-1:])
                                  ).astype(np.float32), params)
  spec = spec_for("before_activation", optimizer="sgd", agc_clip=0.05)
  tx = train.make_optimizer(spec, learning_rate=1.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        -np.asarray(updates["conv"][name]),
        _agc_numpy(grads["conv"][name], params["conv"][name], 0.05),
        rtol=1e-5)
  np.testing.assert_allclose(-np.asarray(updates["readout"]["kernel"]),
                             grads["readout"]["kernel"], rtol=1e-6)
  clipped = _agc_numpy(grads["conv"]["kernel"], params["conv"]["kernel"],
                       0.05)
  assert not np.allclose(clipped, grads["conv"]["kernel"])  # it did clip
