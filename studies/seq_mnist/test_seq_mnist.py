"""model=lstm: MNIST read as a sequence by bn_jax.recurrent's cells, trained
through the trainer (bn_lab.train, bn_lab.runner) from studies/seq_mnist/config.py.

The cells themselves are tested against NumPy in tests/test_recurrent.py;
here: the sequence orders, the classifier around the cell, the config's
checks, tiny training runs (with a resume) for each cell, and that eval
mode through the trainer reads each time step's running statistics.
"""

from __future__ import annotations

import json
import shutil

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import core
from bn_lab import runner
from bn_lab import classifier
from bn_lab import models
from bn_jax import recurrent
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from bn_lab import config as base
import studies.seq_mnist as seq_mnist_study
from studies.seq_mnist import config as seq_mnist

NORMS = ("batch", "layer", "none")
HIDDEN = 6
BATCH = 50
NUM_TRAIN, NUM_TEST = 200, 100
OPTIONS = {"momentum": 0.9, "epsilon": 1e-3, "impl": "auto"}


def images(n, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n, 784)).astype(
      np.float32)


def tiny_config(idx_dir, **changes):
  """studies/seq_mnist/config.py shrunk to the tiny IDX data set (whose rows all
  hold noise: recurrent.py's epsilon), a constant learning rate that
  trains it in a few steps."""
  config = seq_mnist.get_config(changes.pop("sequence", "rows"))
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "num_epochs": 2, "seeds": (0, 1),
                       "batch_size": BATCH, "progress_seconds": 0.0,
                       "learning_rate": 1e-2, "schedule": "constant",
                       **changes}.items():
    config[field] = value
  config.lstm.hidden_size = HIDDEN
  config.bn.epsilon = 1e-5
  return config


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), NUM_TRAIN,
                                NUM_TEST)


def read_rows(workdir):
  return [json.loads(line)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------
# The image as a sequence.


def test_rows_step_t_is_row_t():
  x = images(3)
  sequence = models.image_sequence(x, "rows")
  assert sequence.shape == (3, 28, 28)
  for t in (0, 13, 27):
    np.testing.assert_array_equal(sequence[:, t], x[:, 28 * t:28 * (t + 1)])


def test_pixels_step_t_is_pixel_t():
  x = images(3)
  sequence = models.image_sequence(x, "pixels")
  assert sequence.shape == (3, 784, 1)
  np.testing.assert_array_equal(sequence[:, :, 0], x)


def test_permuted_is_one_fixed_permutation():
  order = models.pixel_permutation(0)
  np.testing.assert_array_equal(np.sort(order), np.arange(784))
  assert np.mean(order == np.arange(784)) < 0.01  # a real shuffle
  np.testing.assert_array_equal(models.pixel_permutation(0), order)
  # Pinned, so that the permuted task stays the same task across versions.
  np.testing.assert_array_equal(order[:5], [318, 2, 606, 446, 758])
  assert not np.array_equal(models.pixel_permutation(1), order)
  x = images(3)
  for _ in range(2):  # the same order on every call, jitted or not
    sequence = jax.jit(lambda x: models.image_sequence(x, "permuted"))(x)
    assert sequence.shape == (3, 784, 1)
    for t in (0, 100, 783):
      np.testing.assert_array_equal(sequence[:, t, 0], x[:, order[t]])


def test_sequence_lengths():
  assert [models.sequence_length(s) for s in models.SEQUENCES] == [28, 784,
                                                                   784]
  with pytest.raises(ValueError, match="sequence='columns'"):
    models.sequence_length("columns")


# ----------------------------------------------------------------------------
# The classifier around the cell.


def make(norm, sequence="rows", options=OPTIONS):
  return models.make_sequence_model("lstm", options, norm=norm,
                                    sequence=sequence, hidden_size=HIDDEN)


@pytest.mark.parametrize("norm", NORMS)
def test_output_and_variable_shapes(norm):
  model = make(norm)
  x = images(8)
  variables = model.init(jax.random.key(0), x, train=False)
  shapes = jax.tree.map(lambda v: tuple(v.shape), variables)
  lstm = shapes["params"]["lstm"]
  assert lstm["input_kernel"] == (28, 4 * HIDDEN)
  assert lstm["hidden_kernel"] == (HIDDEN, 4 * HIDDEN)
  assert shapes["params"]["readout"] == {"kernel": (HIDDEN, 10),
                                         "bias": (10,)}
  assert ("input_scale" in lstm) == (norm != "none")
  if norm == "batch":  # one slot per row
    assert shapes["batch_stats"]["lstm"] == {
        "input": {"mean": (28, 4 * HIDDEN), "var": (28, 4 * HIDDEN)},
        "hidden": {"mean": (28, 4 * HIDDEN), "var": (28, 4 * HIDDEN)},
        "cell": {"mean": (28, HIDDEN), "var": (28, HIDDEN)}}
  else:
    assert set(variables) == {"params"}
  logits = model.apply(variables, x, train=False)
  train_logits, updates = model.apply(variables, x, train=True,
                                      mutable=["batch_stats"])
  for out in (logits, train_logits):
    assert out.shape == (8, 10) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
  assert bool(updates) == (norm == "batch")


def test_pixel_sequences_keep_784_steps_of_statistics():
  variables = jax.eval_shape(
      lambda: make("batch", "permuted").init(jax.random.key(0), images(2),
                                             train=False))
  assert variables["params"]["lstm"]["input_kernel"].shape == (
      1, 4 * HIDDEN)
  assert variables["batch_stats"]["lstm"]["cell"]["mean"].shape == (
      784, HIDDEN)


def test_the_cell_reads_its_norms_options():
  """momentum, epsilon, impl for BN; epsilon alone for LN; and none of the
  feed-forward layers' options reach the cell."""
  options = {**OPTIONS, "stats_method": "two_pass", "num_groups": 5}
  assert make("batch", options=options).cell.keywords == {
      "hidden_size": HIDDEN, "norm": "batch", "momentum": 0.9,
      "epsilon": 1e-3, "impl": models.resolve_backend_choice(
          "auto", "xla_cpu", "plain")}
  assert make("layer", options=options).cell.keywords == {
      "hidden_size": HIDDEN, "norm": "layer", "epsilon": 1e-3}
  assert make("none", options=options).cell.keywords == {
      "hidden_size": HIDDEN, "norm": "none"}


def test_the_fixed_bn_options_are_the_cells():
  """The options the BN-LSTM does not take (study rejects other values)
  are the base config's defaults."""
  config = base.get_config()
  for field, value in models.LSTM_FIXED_BN.items():
    assert config.bn[field] == value


def test_make_model_points_to_the_sequence_builder():
  with pytest.raises(ValueError, match="make_sequence_model"):
    models.make_model("lstm", placement="before_activation",
                      activation="relu", widths=())


# ----------------------------------------------------------------------------
# The config and its checks.


@pytest.mark.parametrize("arg", ["rows", "pixels", "permuted"])
def test_config_variants(arg):
  config = seq_mnist.get_config(arg)
  sweep.validate_config(config)
  assert config.sequence == arg and config.model == "lstm"
  assert [c.values["norm"] for c in sweep.combinations(config)] == list(
      NORMS)
  spec = sweep.make_spec(sweep.combinations(config)[0].config, 60000)
  assert (spec.model, spec.sequence, spec.hidden_size, spec.batch_size,
          spec.grad_clip_norm) == ("lstm", arg, 100, 64, 1.0)
  assert spec.steps_per_epoch == 937


@pytest.mark.parametrize("changes, message", [
    ({"norm": "ghost", "norms": ()}, "config.norm='ghost' does not fit"),
    ({"norms": ("batch", "group")}, "config.norm='group' does not fit"),
    ({"placement": "after_activation"}, "placement='before_activation'"),
    ({"placements": ("none", "input")}, "config.placement='input'"),
    ({"precise_bn.num_batches": 10}, "config.precise_bn does not fit"),
    ({"bn.stats_method": "two_pass"},
     "config.bn.stats_method='two_pass' does not fit"),
    ({"mesh_devices": 2}, "config.mesh_devices=2 does not fit"),
    ({"lstm.hidden_size": 0}, "config.lstm.hidden_size=0"),
    ({"lstm.permutation_seed": -1}, "config.lstm.permutation_seed=-1"),
    ({"sequence": "columns"}, "config.sequence='columns' is not valid"),
    ({"grad_clip_norm": 0.0}, "config.grad_clip_norm=0.0 must be"),
])
def test_config_errors_are_one_line(changes, message):
  config = seq_mnist.get_config()
  for field, value in changes.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(sweep.ConfigError) as error:
    sweep.validate_config(config)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_placement_none_is_the_plain_lstm():
  """As in the feed-forward models, placement none places no norm: the
  BN-LSTM's config options are then not checked, and the model is the plain
  LSTM's."""
  config = seq_mnist.get_config()
  config.norms, config.norm, config.placement = (), "batch", "none"
  config.bn.stats_method = "two_pass"
  sweep.validate_config(config)
  model = sweep.make_spec(config, 60000).make_model({})
  assert model.cell.keywords["norm"] == "none"


def test_a_workdir_from_before_the_lstm_fields_resumes():
  current = base.get_config().to_dict()
  saved = json.loads(workdir_lib.config_json(current))
  for field in ("sequence", "lstm", "grad_clip_norm"):
    del saved[field]
  assert workdir_lib.result_fields_that_differ(saved, current) == []


def test_grad_clip_norm_scales_long_gradients_down():
  spec = train.TrainSpec(optimizer="sgd", grad_clip_norm=1.0)
  params = {"w": jnp.zeros(3)}
  tx = train.make_optimizer(spec, 1.0)
  for grad, expected in (([3.0, 4.0, 0.0], [-0.6, -0.8, 0.0]),
                         ([0.3, 0.4, 0.0], [-0.3, -0.4, 0.0])):
    updates, _ = tx.update({"w": jnp.asarray(grad)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  # Without it the optimizer state is what it always was (checkpoints).
  plain = train.make_optimizer(train.TrainSpec(optimizer="sgd"), 1.0)
  assert jax.tree.structure(plain.init(params)) == jax.tree.structure(
      optax.inject_hyperparams(optax.sgd)(learning_rate=1.0).init(params))


# ----------------------------------------------------------------------------
# Training through the trainer.


@pytest.mark.parametrize("norm", NORMS)
def test_each_cell_trains_and_resumes(norm, idx_dir, tmp_path):
  """Two seeds (vmapped), two epochs with eval_train; then the run as if
  killed in its last epoch (checkpoint and rows gone) is retrained from
  the first epoch's checkpoint to the same numbers."""
  config = tiny_config(idx_dir, norms=(norm,), eval_train=True)
  runner.run(seq_mnist_study.STUDY, config, tmp_path / "run")
  rows = read_rows(tmp_path / "run")
  assert [(r["combo"], r["epoch"], r["seed"]) for r in rows] == [
      (f"norm={norm}", e, s) for e in (1, 2) for s in (0, 1)]
  for row in rows:
    assert all(np.isfinite(row[k]) for k in classifier.metric_names(config))
  assert rows[0]["train_loss"] != rows[1]["train_loss"]  # two seeds
  # Learning: the last epoch's training loss is below the first's.
  assert (rows[2]["train_loss"] + rows[3]["train_loss"]
          < rows[0]["train_loss"] + rows[1]["train_loss"])
  if norm != "batch":  # no statistics: both evaluations are the same
    assert rows[2]["test_accuracy"] == rows[2]["test_accuracy_batch_stats"]

  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "run", resumed)
  shutil.rmtree(resumed / "checkpoints" / f"norm={norm}" / "2")
  (resumed / "results.json").unlink()
  (resumed / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows[:2]))
  runner.run(seq_mnist_study.STUDY, config, resumed)
  without_time = lambda rows: [{k: v for k, v in r.items()
                                if k != "wall_time"} for r in rows]
  assert without_time(read_rows(resumed)) == without_time(rows)


@pytest.mark.slow
def test_pixel_sequences_smoke(idx_dir, tmp_path):
  """The GPU-sized variants, 784 steps: one epoch of the tiny data set, the
  permuted pixels (the unpermuted ones are the same program on other
  inputs) with BN, the cell that keeps statistics for every step."""
  config = tiny_config(idx_dir, sequence="permuted", num_epochs=1,
                       seeds=(0,), norms=("batch",))
  runner.run(seq_mnist_study.STUDY, config, tmp_path)
  (row,) = read_rows(tmp_path)
  assert row["norm"] == "batch" and np.isfinite(row["test_loss"])


def test_eval_mode_reads_each_steps_running_statistics(idx_dir):
  """After a trained epoch, the trainer's eval-mode logits are those of
  recurrent.unroll with the saved per-step statistics (and train.evaluate
  counts their correct answers); the statistics differ from step to step,
  so that reading another step's would change the logits."""
  config = tiny_config(idx_dir, norm="batch", norms=())
  config.bn.momentum = 0.5  # far from the initial statistics in 4 steps
  data, _ = classifier.load_data(config)
  spec = sweep.make_spec(config, NUM_TRAIN)
  state = train.create_train_state(spec, 0, {"learning_rate": 1e-2})
  state, _ = train.jit_train_epoch(state, data, spec=spec)

  stats = state.batch_stats["lstm"]
  lstm_stats = recurrent.LSTMStats(**{
      name: core.BNState(mean=stats[name]["mean"], var=stats[name]["var"],
                         count=jnp.zeros(28, jnp.int32))
      for name in recurrent.LSTMStats._fields})
  x = np.asarray(train.model_inputs(data.test_images, spec))
  hs, _ = recurrent.unroll(
      recurrent.LSTMParams(**state.params["lstm"]), lstm_stats,
      x.reshape(-1, 28, 28), norm="batch", training=False,
      epsilon=config.bn.epsilon)
  readout = state.params["readout"]
  expected = hs[:, -1] @ readout["kernel"] + readout["bias"][None, :]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = spec.make_model({}).apply(variables, x, train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

  labels = np.asarray(data.test_labels)
  metrics = train.evaluate(state, data.test_images, data.test_labels,
                           spec=spec)
  assert int(metrics["correct"]) == int(np.sum(
      np.argmax(expected, -1) == labels))
  # Per-step statistics: the cell state's differ from row to row, and the
  # logits with each step reading its neighbour's are not these.
  assert np.std(np.asarray(stats["cell"]["mean"]), axis=0).max() > 1e-3
  shifted = jax.tree.map(lambda v: jnp.roll(v, 1, axis=0),
                         state.batch_stats)
  other = spec.make_model({}).apply(
      {"params": state.params, "batch_stats": shifted}, x, train=False)
  assert np.max(np.abs(np.asarray(other) - np.asarray(logits))) > 1e-3
