"""Santurkar et al.'s measurements wired into the trainer (configs/why_bn.py):
ICS and the loss landscape every k steps, noisy BN as a norm, and the
studies page's section.

The measures themselves (bn_jax.landscape) are checked in
tests/test_landscape.py: ICS against gradients written out by hand for a
two-layer network and against finite differences, the landscape against
direct loss evaluations, the noise against Algorithm 1's distribution.
Here: that the trainer measures what it says (the rows equal Definition 2.1
and direct loss evaluations, redone from a restored checkpoint and the
step's batch), that measuring changes no training and costs nothing when
off, the config checks, the noise the trainer threads through, and the
studies page's verdicts on made-up numbers whose answers are worked out by
hand.
"""

import dataclasses
import functools
import json
import re

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import checkpoints
from bn_jax import experiment
from bn_jax import landscape
from bn_jax import models
from bn_jax import study
from bn_jax import train
from configs import base
from configs import why_bn
from experiments import studies_page
from experiments import why_bn_page

N_TRAIN, N_TEST = 200, 100


def _data(seed=2, n=160):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 784)).astype(np.uint8)
  labels = rng.integers(0, 10, n)
  return train.to_device(images, labels, images[:20], labels[:20])


def _spec(**changes):
  return train.TrainSpec(**{
      "placement": "before_activation", "activation": "sigmoid",
      "widths": (6, 5), "batch_size": 20, "steps_per_epoch": 4,
      "num_epochs": 1, "optimizer": "sgd", **changes})


@functools.partial(jax.jit, static_argnames="spec")
def _loss_and_grad(params, state, images, labels, noise_step, *, spec):
  """The training loss of `state`'s model on the batch at `params`, with
  its statistics held and the noise of step `noise_step`, and its
  gradient: one compiled function for every direct evaluation below."""
  rngs = train.noise_rngs(state._replace(step=noise_step), spec)
  loss = landscape.training_loss(
      spec.make_model(state.bn_hparams), state.batch_stats,
      train.model_inputs(images, spec), labels, rngs=rngs)
  return jax.value_and_grad(loss)(params)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _direct_ics(spec, state, images, labels):
  """Definition 2.1 by direct gradient evaluations: for layer i, the
  gradient of its parameters at w and at w with the layers below moved by
  this step's optax update; l2 and cosine in NumPy."""
  gradient = lambda params: _loss_and_grad(params, state, images, labels,
                                           state.step, spec=spec)[1]
  grads = gradient(state.params)
  updates, _ = train.make_optimizer(spec).update(grads, state.opt_state,
                                                 state.params)
  moved = optax.apply_updates(state.params, updates)
  layers = landscape.classifier_layers(spec.make_model(state.bn_hparams))
  l2, cosine = [], []
  for i, layer in enumerate(layers):
    point = {name: moved[name] if name in layers[:i] else state.params[name]
             for name in state.params}
    g, g_moved = _flat(grads[layer]), _flat(gradient(point)[layer])
    l2.append(np.linalg.norm(g - g_moved))
    cosine.append(g @ g_moved / np.linalg.norm(g) / np.linalg.norm(g_moved))
  return np.array(l2), np.array(cosine)


def _direct_landscape(spec, state, images, labels, etas):
  """The loss at w - eta g for each eta, and the gradient's l2 change, by
  one direct evaluation per step size."""
  at = lambda params: _loss_and_grad(params, state, images, labels,
                                     state.step, spec=spec)
  _, g = at(state.params)
  losses, changes = [], []
  for eta in etas:
    value, g_at = at(jax.tree.map(lambda p, d: p - eta * d, state.params, g))
    losses.append(float(value))
    changes.append(np.linalg.norm(_flat(g) - _flat(g_at)))
  return np.array(losses), np.array(changes), np.linalg.norm(_flat(g))


@pytest.mark.slow
def test_measurements_equal_direct_ones_and_change_no_training():
  """BN, ICS every 2 steps and the landscape every 4 (a cond on the chunk
  index): the epoch's state and metrics are bitwise those of the
  unmeasured epoch; the ICS at step 2 equals Definition 2.1 evaluated
  directly at the state after two steps, on the third step's batch, the
  landscape at step 0 direct loss evaluations. (Noisy BN's measurements:
  `test_rows_equal_measurements_from_the_restored_checkpoint`.)"""
  data = _data()
  spec = _spec()
  measured = dataclasses.replace(spec, ics_every=2, landscape_every=4)
  runs = []
  for s in (spec, measured):
    state = train.create_train_state(s, 0, {"learning_rate": 0.5})
    runs.append(jax.jit(functools.partial(train.train_epoch, spec=s))(
        state, data))
  (plain, plain_metrics), (state, metrics) = runs
  ics, land = metrics.pop("ics"), metrics.pop("landscape")
  chex.assert_trees_all_equal(state, plain)
  chex.assert_trees_all_equal(metrics, plain_metrics)
  np.testing.assert_array_equal(ics["step"], [0, 2])
  np.testing.assert_array_equal(land["step"], [0])

  start = train.create_train_state(spec, 0, {"learning_rate": 0.5})
  batches = train.epoch_batches(start.data_key, 0, 160, spec)
  step = jax.jit(functools.partial(train.train_step, spec=spec))
  at = start
  for i in range(2):
    at, _ = step(at, data.train_images[batches[i]],
                 data.train_labels[batches[i]])
  images, labels = data.train_images[batches[2]], data.train_labels[
      batches[2]]
  l2, cosine = _direct_ics(spec, at, images, labels)
  np.testing.assert_allclose(ics["l2"][1], l2, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(ics["cosine"][1], cosine, rtol=1e-5)
  assert l2[0] == 0 and np.all(l2[1:] > 0)

  etas = 0.5 * np.linspace(0.5, 4.0, 8)
  np.testing.assert_allclose(land["step_sizes"][0], etas, rtol=1e-6)
  losses, changes, grad_norm = _direct_landscape(
      spec, start, data.train_images[batches[0]],
      data.train_labels[batches[0]], etas)
  np.testing.assert_allclose(land["losses"][0], losses, rtol=1e-5)
  np.testing.assert_allclose(land["grad_changes"][0], changes, rtol=2e-4)
  np.testing.assert_allclose(land["beta_smoothness"][0],
                             np.max(changes / (etas * grad_norm)), rtol=2e-4)


def test_measurements_off_are_not_traced(monkeypatch):
  """With ics_every = landscape_every = 0 the measurement functions are
  never called while tracing the epoch; with them on, each is traced."""
  calls = []
  for name in ("measure_ics", "measure_landscape"):
    original = getattr(train, name)
    monkeypatch.setattr(train, name, functools.partial(
        lambda f, n, *a, **k: calls.append(n) or f(*a, **k), original, name))
  data = _data()
  state = jax.eval_shape(functools.partial(
      train.create_train_state, _spec(), 0, {"learning_rate": 0.5}))
  jax.eval_shape(functools.partial(train.train_epoch, spec=_spec()), state,
                 data)
  assert calls == []
  jax.eval_shape(functools.partial(train.train_epoch, spec=_spec(
      ics_every=4, landscape_every=2)), state, data)
  assert sorted(set(calls)) == ["measure_ics", "measure_landscape"]


def _one_line_error(config, match, data_size=False):
  with pytest.raises(study.ConfigError, match=match) as error:
    if data_size:
      study.validate_data_size(config, 600, 100)
    else:
      study.validate_config(config)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("field, value, match", [
    ("ics.every_steps", -1, r"config.ics.every_steps=-1 must be"),
    ("landscape.every_steps", -2, r"config.landscape.every_steps=-2"),
    ("landscape.step_factors", (2.0, 1.0), r"0 < low <= high"),
    ("landscape.num_step_sizes", 0, r"num_step_sizes=0 must be a positive"),
    ("noisy_bn.n_sigma", 0.5, r"config.noisy_bn.n_sigma=0.5 must be a "
     r"number >= 1"),
    ("noisy_bn.r_mu", -0.1, r"config.noisy_bn.r_mu=-0.1 must be a number "
     r">= 0"),
])
def test_bad_fields_are_one_line_errors(field, value, match):
  config = base.get_config()
  section, name = field.split(".")
  config[section][name] = value
  _one_line_error(config, match)


def test_measurements_that_do_not_fit_are_one_line_errors():
  config = why_bn.get_config("ics")
  config.ics.every_steps = 7  # 600 // 60 = 10 steps per epoch
  _one_line_error(config, r"ics.every_steps=7 does not divide the 10",
                  data_size=True)
  config = base.get_config()
  config.model, config.placement = "lstm", "before_activation"
  config.landscape.every_steps = 2
  _one_line_error(config, r"landscape.every_steps does not fit "
                  r"model='lstm'")
  config = why_bn.get_config("ics")
  config.mesh_devices = 2
  _one_line_error(config, r"measures one device's training")
  config = why_bn.get_config("ics")
  config.precise_bn.num_batches = 2
  _one_line_error(config, r"precise_bn does not fit norm='noisy_batch'")
  config = why_bn.get_config("ics")
  config.probe.every_steps = 10
  _one_line_error(config, r"probe.every_steps does not fit "
                  r"norm='noisy_batch'")
  with pytest.raises(ValueError, match="choose one of"):
    why_bn.get_config("vgg")


def test_noisy_bn_reads_config_and_draws_new_noise_every_step():
  """norm="noisy_batch" builds landscape.NoisyBN with config.noisy_bn's
  constants; the trainer's noise key gives each step its own draw (the
  same step: the same one), so the per-feature mean of a layer's output,
  mu_j + U(-r_mu, r_mu) noise (BN's output has mean 0), moves from step to
  step over U(-n_mu, n_mu)'s spread, and its per-feature std over the
  batch, about sigma_j in [1, n_sigma], is not 1."""
  config = base.get_config()
  config.norm = "noisy_batch"
  config.noisy_bn.n_mu, config.noisy_bn.n_sigma = 2.0, 1.5
  study.validate_config(config)
  spec = study.make_spec(config, 600)
  norm = models.make_norm(dict(spec.bn), norm=spec.norm)()
  assert isinstance(norm, landscape.NoisyBN)
  assert (norm.n_mu, norm.n_sigma, norm.r_mu, norm.r_sigma) == (
      2.0, 1.5, 0.1, 0.1)
  # What noise_rngs reads of a state: its noise key and step.
  key = jax.random.key_data(jax.random.key(0))
  state = train.TrainState(step=None, params=None, batch_stats=None,
                           opt_state=None, bn_hparams={}, data_key=key,
                           noise_key=key)
  x = jax.random.normal(jax.random.key(0), (512, 64)) * 3.0 + 1.0
  variables = norm.init(jax.random.key(1), x, use_running_average=True)

  @jax.jit
  def output(step):
    rngs = train.noise_rngs(state._replace(step=step), spec)
    return norm.apply(variables, x, use_running_average=False, rngs=rngs,
                      mutable=["batch_stats"])[0]

  outputs = np.stack([output(jnp.asarray(t)) for t in range(40)])
  np.testing.assert_array_equal(output(jnp.asarray(3)), outputs[3])
  means, stds = outputs.mean(1), outputs.std(1)  # (steps, 64) each
  # Uniform over [-2, 2] (+ the small shift noise): std 2 / sqrt(3).
  assert 1.0 < means.std() < 1.35 and abs(means.mean()) < 0.15
  assert np.all(np.abs(means) < 2.0 + 0.1 + 0.02)
  assert np.all(stds > 0.97) and np.all(stds < 1.5 + 0.05)
  assert 1.15 < stds.mean() < 1.35  # sigma_j ~ U(1, 1.5): mean 1.25


def test_noise_key_only_for_noisy_norms():
  """Other norms' states keep their layout (no noise key), so their
  checkpoints load as before; noisy BN's runs get keys of their own."""
  shapes = lambda spec, seed: jax.eval_shape(functools.partial(
      train.create_train_state, spec, seed, {"learning_rate": 0.1}))
  assert shapes(_spec(), 0).noise_key is None
  assert shapes(_spec(norm="noisy_batch"), 0).noise_key.shape == (2,)
  keys = [train.create_train_state(_spec(norm="noisy_batch", widths=()),
                                   seed, {"learning_rate": 0.1}).noise_key
          for seed in (0, 1)]
  assert not np.array_equal(keys[0], keys[1])


# ----------------------------------------------------------------------------
# The page's verdicts on made-up numbers. Two seeds a side at m - 0.1 and
# m + 0.1: a sample variance of 0.02 each, so a difference of means has the
# standard error sqrt(0.02 / 2 + 0.02 / 2) = 0.141, and 2 SE = 0.283.


def _two_seeds(mean):
  return [mean - 0.1, mean + 0.1]


def _ics_network(per_layer):
  """ICS numbers of a network whose layer "in" has ICS 0 and layer j >= 1
  the per-seed l2 `per_layer[j - 1]` at each of two measurements; the
  relative l2 equals the l2, the cosine is 1 - l2 / 10 (less shift, higher
  cosine)."""
  per_seed = np.array([[0.0] * len(per_layer[0]), *per_layer]).T
  l2 = np.repeat(per_seed[:, None, :], 2, axis=1)  # (runs, 2, layers)
  layers = ["in"] + [f"h{j}" for j in range(1, len(per_layer) + 1)]
  return {"layers": layers, "l2": l2, "relative": l2, "cosine": 1 - l2 / 10}


REDUCED, SAME, RAISED = _two_seeds(0.5), _two_seeds(1.0), _two_seeds(1.5)


@pytest.mark.parametrize("bn_layers, answer, outcome, claim", [
    # -0.5 in every layer: 3.5 SE each.
    ([REDUCED, REDUCED, REDUCED], "yes", False, "**does not hold**"),
    ([SAME, SAME, SAME], "no", True, "**holds** here"),
    ([SAME, RAISED, RAISED], "no", True, "**holds** here"),
    # One reduced layer of three is not "no" (a majority would say so).
    ([REDUCED, SAME, SAME], "mixed", "in h2, h3 only", "**holds in part**"),
    ([RAISED, REDUCED, SAME], "mixed", "in h1, h3 only", "**holds in part**"),
    # BN with one seed: no seed noise to judge by.
    ([[0.5], [0.5], [0.5]], "undetermined", None, "**undetermined**"),
])
def test_ics_verdict(bn_layers, answer, outcome, claim):
  plain = _ics_network([SAME, SAME, SAME])
  tally = []
  text = why_bn_page.ics_reduction_verdict(plain, _ics_network(bn_layers),
                                           tally)
  assert f"Did BN reduce ICS here? {answer}." in text, text
  assert tally == [("BN does not reduce ICS", outcome)]
  assert claim in text.split("Santurkar et al.'s claim")[1], text
  assert "nan" not in text, text
  if answer == "undetermined":
    assert "(one seed, undetermined)" in text, text


_PLAIN_CHECKPOINTS = np.array([[1.0] * 4, [1.2] * 4])  # (runs, checkpoints)


@pytest.mark.parametrize("bn, verdict", [
    ([[0.5] * 4, [0.7] * 4], "holds"),  # -0.5 in each half: 3.5 SE
    ([[0.5, 0.5, 1.0, 1.0], [0.7, 0.7, 1.2, 1.2]],
     "holds in the first half of training only"),
    ([[1.0, 1.0, 0.5, 0.5], [1.2, 1.2, 0.7, 0.7]],
     "holds in the second half of training only"),
    ([[1.0] * 4, [1.2] * 4], "does not hold"),  # equal
    ([[1.5] * 4, [1.7] * 4], "does not hold"),  # higher
    ([[0.5] * 4], "undetermined (one seed"),
])
def test_halves_verdict(bn, verdict):
  got, halves = why_bn_page.halves_verdict(np.array(bn), _PLAIN_CHECKPOINTS)
  assert got.startswith(verdict), got
  assert len(halves) == 2


def test_halves_verdict_with_an_empty_half_is_undetermined():
  """One checkpoint per run: the first half is empty, and its mean (nan)
  must not read as "within noise"."""
  got, halves = why_bn_page.halves_verdict(np.array([[0.5], [0.7]]),
                                           np.array([[1.0], [1.2]]))
  assert got.startswith("undetermined (too few measurements: 1 per run"), got
  assert halves == []


def _accuracy_rows(accuracies):
  return {"rows": [{"run": run, "epoch": 1, "test_accuracy": a,
                    "train_loss": 0.1} for run, a in enumerate(accuracies)]}


@pytest.mark.parametrize("bn, answer, se_text", [
    # noisy BN at 0.90 and 0.92: the SE of noisy - BN is sqrt(0.0002) =
    # 0.01414, so 2 SE = 0.0283 (2.83 points).
    ([0.93, 0.95], "no", "(2.1 SE)"),  # -3.0 points: beyond noise
    ([0.926, 0.946], "yes", "(1.8 SE)"),  # -2.6 points: within noise
    ([0.87, 0.89], "yes", "(2.1 SE)"),  # +3.0 points: better, beyond noise
    ([0.94], "undetermined", "(one seed)"),
])
def test_noisy_trains_as_well_as_bn_verdict(bn, answer, se_text):
  numbers = {"BN": _accuracy_rows(bn),
             "noisy BN": _accuracy_rows([0.90, 0.92])}
  tally = []
  text = why_bn_page.noisy_trains_verdict(numbers, tally)
  assert f"Does noisy BN train as well as BN? {answer}." in text, text
  assert se_text in text and "nan" not in text, text
  assert tally == [("noisy BN trains as well as BN",
                    {"yes": True, "no": False}.get(answer))]


# ----------------------------------------------------------------------------
# A tiny real run of configs/why_bn.py: rows, checkpoint, the section.


def _tiny_config(idx_dir):
  config = why_bn.get_config("ics")
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "progress_seconds": 0.0, "num_epochs": 2,
                       "batch_size": 50, "seeds": (0, 1),
                       "widths": (4,)}.items():
    config[field] = value
  config.ics.every_steps = 2  # 4 steps per epoch
  config.landscape.every_steps = 4
  return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  idx_dir = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), N_TRAIN,
                                   N_TEST)
  workdir = tmp_path_factory.mktemp("why_bn")
  config = _tiny_config(idx_dir)
  experiment.train_and_evaluate(
      config, workdir, command="python -m experiments.main "
      f"--config=configs/why_bn.py:ics --workdir={workdir}")
  return config, workdir


@pytest.mark.slow
def test_rows_equal_measurements_from_the_restored_checkpoint(tiny_run):
  """Noisy BN's rows: epoch 2's first measurement (step 4) equals
  Definition 2.1 and direct loss evaluations at the epoch-1 checkpoint, on
  epoch 2's first batch, with step 4's noise, per run; and the train step
  draws that noise too."""
  config, workdir = tiny_run
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {r["combo"] for r in rows} == {"norm=none", "norm=batch",
                                        "norm=noisy_batch"}
  combo = study.combinations(config)[2]  # noisy BN: the noise key too
  spec = study.make_spec(combo.config, N_TRAIN)
  mine = [r for r in rows if r["combo"] == combo.name]
  assert [r["ics_steps"] for r in mine if r["run"] == 0] == [[0, 2], [4, 6]]
  assert [r["landscape_steps"] for r in mine if r["run"] == 0] == [[0], [4]]
  assert mine[0]["ics_layers"] == ["hidden_0", "readout"]
  data, _ = experiment.load_data(combo.config)
  runs = study.run_grid(combo.config)
  create = functools.partial(
      train.create_sweep_states, spec, [r["seed"] for r in runs],
      {name: [r["hparams"][name] for r in runs] for name in train.SWEEPABLE})
  import orbax.checkpoint as ocp
  manager = checkpoints.manager(workdir / "checkpoints" / combo.name, 2)
  states = manager.restore(1, args=ocp.args.StandardRestore(
      jax.eval_shape(create)))
  manager.close()
  for i, row in enumerate(r for r in mine if r["epoch"] == 2):
    state = jax.tree.map(lambda x, i=i: x[i], states)
    batch = train.epoch_batches(state.data_key, 1, N_TRAIN, spec)[0]
    images, labels = data.train_images[batch], data.train_labels[batch]
    l2, cosine = _direct_ics(spec, state, images, labels)
    np.testing.assert_allclose(row["ics_l2"][0], l2, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(row["ics_cosine"][0], cosine, rtol=1e-5)
    etas = row["landscape_step_sizes"]
    np.testing.assert_allclose(etas, 0.5 * np.linspace(0.5, 4.0, 8),
                               rtol=1e-6)
    losses, changes, _ = _direct_landscape(spec, state, images, labels,
                                           etas)
    np.testing.assert_allclose(row["landscape_losses"][0], losses,
                               rtol=1e-5)
    np.testing.assert_allclose(row["landscape_grad_changes"][0], changes,
                               rtol=2e-4)
  # Training draws the noise of its own step: epoch 2's first step's loss
  # is the loss with step 4's noise (`noise_rngs`), not with step 5's.
  state = jax.tree.map(lambda x: x[0], states)
  batch = train.epoch_batches(state.data_key, 1, N_TRAIN, spec)[0]
  images, labels = data.train_images[batch], data.train_labels[batch]
  _, step_metrics = jax.jit(functools.partial(train.train_step, spec=spec))(
      state, images, labels)
  loss_at = lambda noise_step: float(_loss_and_grad(
      state.params, state, images, labels, jnp.asarray(noise_step),
      spec=spec)[0])
  np.testing.assert_allclose(step_metrics["loss_sum"] / 50, loss_at(4),
                             rtol=1e-6)
  assert abs(loss_at(5) - step_metrics["loss_sum"] / 50) > 1e-4



@pytest.mark.slow
def test_section_from_a_tiny_run(tiny_run, tmp_path):
  """The section renders from the run, its table's cells are the rows'
  per-seed means over training, and each verdict is stated."""
  _, workdir = tiny_run
  loaded = studies_page.load_study(workdir)
  assert loaded["config_name"] == "why_bn"
  text = why_bn_page.why_bn_section([loaded], tmp_path)
  for figure in ("ics", "landscape"):
    assert (tmp_path / f"{workdir.name}_{figure}.png").stat().st_size > 0
  for verdict in (r"Did BN reduce ICS here\? (yes|no|mixed)",
                  r"Does noisy BN train as well as BN\? (yes|no)",
                  r"BN gives smaller loss variation: (holds|does not hold)",
                  r"more predictive gradients .*: (holds|does not hold)",
                  r"a smaller effective beta: (holds|does not hold)"):
    assert re.search(verdict, text), verdict
  rows = [r for r in loaded["rows"] if r["norm"] == "batch"]
  per_seed = [np.mean([v[1] for r in rows if r["run"] == run
                       for v in r["ics_l2"]]) for run in (0, 1)]
  cell = f"{np.mean(per_seed):.4g} +- {np.std(per_seed, ddof=1):.4g}"
  assert f"| BN | readout | {cell} |" in text, text
  last = max(r["epoch"] for r in loaded["rows"])
  noisy = [100 * r["test_accuracy"] for r in loaded["rows"]
           if r["norm"] == "noisy_batch" and r["epoch"] == last]
  assert (f"Final test accuracy noisy BN {np.mean(noisy):.2f} +- "
          f"{np.std(noisy, ddof=1):.2f} against BN") in text, text
