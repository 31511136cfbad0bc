"""Santurkar et al.'s measurements wired into the trainer (studies/why_bn/config.py):
ICS and the loss landscape every k steps, noisy BN as a norm, and the
studies page's section.

The measures themselves (studies.why_bn.landscape) are checked in
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

from bn_lab import classifier
from bn_lab import checkpoints
from bn_lab import models
from bn_lab import page as studies_page
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from studies import ioffe2015
import studies.why_bn
from studies.ioffe2015 import config as ioffe_config
from studies.why_bn import config as why_bn
from studies.why_bn import landscape
from studies.why_bn import measurements
from studies.why_bn import page as why_bn_page

STUDY = studies.why_bn.STUDY


def _measured(ics_every=0, landscape_every=0):
  """The study's measurements at these intervals (0: off)."""
  config = why_bn.get_config("ics_mlp")
  config.ics.every_steps, config.landscape.every_steps = (ics_every,
                                                          landscape_every)
  return measurements.measurements(config)

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
  measured = dataclasses.replace(spec, measurements=_measured(2, 4))
  (plain, plain_metrics), (state, metrics) = helpers.one_epoch_each(
      (spec, measured), data)
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
  """With ics and landscape every 0 steps the measurement functions are
  never called while tracing the epoch; with them on, each is traced."""
  calls = []
  for name in ("measure_ics", "measure_landscape"):
    original = getattr(measurements, name)
    monkeypatch.setattr(measurements, name, functools.partial(
        lambda f, n, *a, **k: calls.append(n) or f(*a, **k), original, name))
  data = _data()
  state = jax.eval_shape(functools.partial(
      train.create_train_state, _spec(), 0, {"learning_rate": 0.5}))
  jax.eval_shape(functools.partial(train.train_epoch, spec=_spec()), state,
                 data)
  assert calls == []
  jax.eval_shape(functools.partial(train.train_epoch, spec=_spec(
      measurements=_measured(4, 2))), state, data)
  assert sorted(set(calls)) == ["measure_ics", "measure_landscape"]


def _one_line_error(config, match, data_size=False, study=STUDY):
  with pytest.raises(sweep.ConfigError, match=match) as error:
    if data_size:
      sweep.validate_data_size(config, 600, 100,
                               measurements.measurements(config))
    else:
      study.validate(config)
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
  config = why_bn.get_config("ics_mlp")
  section, name = field.split(".")
  config[section][name] = value
  _one_line_error(config, match)


def test_measurements_that_do_not_fit_are_one_line_errors():
  config = why_bn.get_config("ics")
  config.ics.every_steps = 7  # 600 // 60 = 10 steps per epoch
  _one_line_error(config, r"every 7 steps does not divide the 10",
                  data_size=True)
  config = why_bn.get_config("ics_mlp")
  config.norms = ()
  config.model, config.placement = "lstm", "before_activation"
  config.ics.every_steps, config.landscape.every_steps = 0, 2
  _one_line_error(config, r"landscape.every_steps does not fit "
                  r"model='lstm'")
  config = why_bn.get_config("ics")
  config.mesh_devices = 2
  _one_line_error(config, r"measures one device's training")
  config = why_bn.get_config("ics")
  config.precise_bn.num_batches = 2
  _one_line_error(config, r"precise_bn does not fit norm='noisy_batch'")
  config = why_bn.get_config("ics")
  ioffe_config.add_probe_fields(config)  # the ioffe2015 study's probe
  config.probe.every_steps = 10
  _one_line_error(config, r"probe.every_steps does not fit "
                  r"norm='noisy_batch'", study=ioffe2015.STUDY)
  with pytest.raises(ValueError, match="choose one of"):
    why_bn.get_config("vgg")


def test_noisy_bn_reads_config_and_draws_new_noise_every_step():
  """norm="noisy_batch" builds landscape.NoisyBN with config.noisy_bn's
  constants; the trainer's noise key gives each step its own draw (the
  same step: the same one), so the per-feature mean of a layer's output,
  mu_j + U(-r_mu, r_mu) noise (BN's output has mean 0), moves from step to
  step over U(-n_mu, n_mu)'s spread, and its per-feature std over the
  batch, about sigma_j in [1, n_sigma], is not 1."""
  config = why_bn.get_config("ics_mlp")
  config.norms, config.ics.every_steps = (), 0
  config.norm = "noisy_batch"
  config.noisy_bn.n_mu, config.noisy_bn.n_sigma = 2.0, 1.5
  STUDY.validate(config)
  spec = sweep.make_spec(config, 600)
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
# The page's verdicts on made-up numbers, judged as the section judges them:
# Welch's t test, Holm's correction over the comparisons (here those of the
# one verdict under test: `studies_page.in_one_family`), significant at 5%.
#
# Two seeds a side at m - 0.01 and m + 0.01: a sample variance of
# 2 * 0.01^2 = 0.0002 each, so a difference of means has the standard error
# sqrt(0.0002 / 2 + 0.0002 / 2) = 0.01414 with Welch's df
# (0.0001 + 0.0001)^2 / (0.0001^2 / 1 + 0.0001^2 / 1) = 2. A difference of
# 0.5 is t = 35.4, two-sided p = 1 - t / sqrt(2 + t^2) = 0.0008 (df = 2);
# Holm multiplies the smallest of m p values by m, so even 9 such
# comparisons stay below 5% (9 x 0.0008 = 0.0072). A difference of 0: t = 0,
# p = 1.


def _two_seeds(mean, spread=0.01):
  return [mean - spread, mean + spread]


def _in_one_family(render):
  """render(family) as the section calls it: its comparisons one family."""
  return studies_page.in_one_family(render)


def _welch_p(a, b):
  from scipy import stats as sps
  return sps.ttest_ind(a, b, equal_var=False).pvalue


def test_two_seeds_arithmetic():
  """The numbers the tests below rely on, against scipy."""
  p = _welch_p(_two_seeds(0.5), _two_seeds(1.0))
  t = 0.5 / np.sqrt(0.0002)
  np.testing.assert_allclose(p, 1 - t / np.sqrt(2 + t * t), rtol=1e-6)
  assert 0.0007 < p < 0.0009 and 9 * p < 0.05


def _ics_network(per_layer):
  """ICS numbers of a network whose layer "in" has ICS 0 and layer j >= 1
  the per-seed l2 `per_layer[j - 1]` at each of two measurements; the
  relative l2 equals the l2, the cosine is 1 - l2 / 10 (less shift, higher
  cosine; its difference is -1/10 of l2's, with the same t and p)."""
  per_seed = np.array([[0.0] * len(per_layer[0]), *per_layer]).T
  l2 = np.repeat(per_seed[:, None, :], 2, axis=1)  # (runs, 2, layers)
  layers = ["in"] + [f"h{j}" for j in range(1, len(per_layer) + 1)]
  return {"layers": layers, "l2": l2, "relative": l2, "cosine": 1 - l2 / 10}


REDUCED, SAME, RAISED = _two_seeds(0.5), _two_seeds(1.0), _two_seeds(1.5)


def _ics_verdict(plain, bn):
  def render(family):
    tally = []
    return why_bn_page.ics_reduction_verdict(plain, bn, tally, family), tally
  return _in_one_family(render)


@pytest.mark.parametrize("bn_layers, answer, outcome, claim", [
    # -0.5 in every layer: 9 comparisons (3 layers x l2, relative, cosine)
    # at p = 0.0008, Holm 0.0072: all beyond noise.
    ([REDUCED, REDUCED, REDUCED], "yes", False, "**does not hold**"),
    ([SAME, SAME, SAME], "no", True, "**holds** here"),  # p = 1 each
    # Raised beyond noise in h2 and h3 (6 x 0.0008), h1 within: none
    # reduced.
    ([SAME, RAISED, RAISED], "no", True, "**holds** here"),
    # One reduced layer of three is not "no" (a majority would say so):
    # 3 comparisons at p = 0.0008, Holm 9 x 0.0008 = 0.0072.
    ([REDUCED, SAME, SAME], "mixed", "in h2, h3 only", "**holds in part**"),
    ([RAISED, REDUCED, SAME], "mixed", "in h1, h3 only", "**holds in part**"),
    # BN with one seed: no seed noise to judge by.
    ([[0.5], [0.5], [0.5]], "undetermined", None, "**undetermined**"),
])
def test_ics_verdict(bn_layers, answer, outcome, claim):
  plain = _ics_network([SAME, SAME, SAME])
  text, tally = _ics_verdict(plain, _ics_network(bn_layers))
  assert f"Did BN reduce ICS here? {answer}." in text, text
  assert tally == [("BN does not reduce ICS", outcome)]
  assert claim in text.split("Santurkar et al.'s claim")[1], text
  assert "nan" not in text, text
  if answer == "undetermined":
    assert "undetermined (n < 2)" in text, text
  else:
    assert "(Holm " in text, text


def test_ics_verdict_is_corrected_over_its_comparisons():
  """Seeds at m -+ 0.035: a sample variance of 2 * 0.035^2 = 0.00245 a
  side, SE sqrt(0.00245) = 0.0495, so -0.5 in every layer is t = -10.1 at
  df = 2, p = 0.0096: beyond noise alone, but Holm over the 9 comparisons
  gives 9 x 0.0096 = 0.087, within noise: the answer is "no", not "yes"."""
  spread = 0.035
  p = _welch_p(_two_seeds(0.5, spread), _two_seeds(1.0, spread))
  assert p < 0.05 < 9 * p
  plain = _ics_network([_two_seeds(1.0, spread)] * 3)
  text, tally = _ics_verdict(plain, _ics_network([_two_seeds(0.5, spread)]
                                                 * 3))
  assert "Did BN reduce ICS here? no." in text, text
  assert tally == [("BN does not reduce ICS", True)]
  assert text.count("within noise") == 9, text
  assert f"Holm {9 * p:.2g}" in text, text


# Per-seed means 1.0 and 1.02 over every checkpoint: seeds at m -+ 0.01, as
# above; the halves verdict makes 2 comparisons (Holm: 2 x 0.0008).
_PLAIN_CHECKPOINTS = np.array([[1.0] * 4, [1.02] * 4])  # (runs, checkpoints)


@pytest.mark.parametrize("bn, verdict", [
    ([[0.5] * 4, [0.52] * 4], "holds"),  # -0.5 in each half: p = 0.0008
    ([[0.5, 0.5, 1.0, 1.0], [0.52, 0.52, 1.02, 1.02]],
     "holds in the first half of training only"),
    ([[1.0, 1.0, 0.5, 0.5], [1.02, 1.02, 0.52, 0.52]],
     "holds in the second half of training only"),
    ([[1.0] * 4, [1.02] * 4], "does not hold"),  # equal
    ([[1.5] * 4, [1.52] * 4], "does not hold"),  # higher
    ([[0.5] * 4], "undetermined (one seed"),
])
def test_halves_verdict(bn, verdict):
  got, halves = _in_one_family(lambda family: why_bn_page.halves_verdict(
      np.array(bn), _PLAIN_CHECKPOINTS, family))
  assert got.startswith(verdict), got
  assert len(halves) == 2
  assert all(c.p_holm is not None for c in halves)


def test_halves_verdict_with_an_empty_half_is_undetermined():
  """One checkpoint per run: the first half is empty, and its mean (nan)
  must not read as "within noise"."""
  got, halves = _in_one_family(lambda family: why_bn_page.halves_verdict(
      np.array([[0.5], [0.7]]), np.array([[1.0], [1.2]]), family))
  assert got.startswith("undetermined (too few measurements: 1 per run"), got
  assert halves == []


def _accuracy_rows(accuracies):
  return {"rows": [{"run": run, "epoch": 1, "test_accuracy": a,
                    "train_loss": 0.1} for run, a in enumerate(accuracies)]}


_NOISY = [0.900, 0.902]


@pytest.mark.parametrize("bn, answer, words", [
    # Seeds at m -+ 0.001 a side: a sample variance of 2e-6 each, SE of
    # noisy - BN sqrt(2e-6) = 0.001414 (0.14 points) at df = 2.
    ([0.930, 0.932], "no", "beyond noise"),  # -3.0 points: t = -21, p 0.002
    ([0.9015, 0.9035], "yes", "within noise"),  # -0.15 points: t = -1.06
    ([0.870, 0.872], "yes", "beyond noise"),  # +3.0 points: better
    ([0.94], "undetermined", "undetermined (n < 2)"),
])
def test_noisy_trains_as_well_as_bn_verdict(bn, answer, words):
  """The verdict, and the difference noisy - BN in points with its 95%
  interval and p as scipy's Welch test gives them (one comparison, so
  Holm's p is p)."""
  numbers = {"BN": _accuracy_rows(bn), "noisy BN": _accuracy_rows(_NOISY)}

  def render(family):
    tally = []
    return why_bn_page.noisy_trains_verdict(numbers, tally, family), tally
  text, tally = _in_one_family(render)
  assert f"Does noisy BN train as well as BN? {answer}." in text, text
  assert words in text and "nan" not in text, text
  assert tally == [("noisy BN trains as well as BN",
                    {"yes": True, "no": False}.get(answer))]
  diff = 100 * (np.mean(_NOISY) - np.mean(bn))
  if answer == "undetermined":
    assert f"noisy - BN {diff:+.2f} points, undetermined (n < 2)." in text
    return
  from scipy import stats as sps
  res = sps.ttest_ind(_NOISY, bn, equal_var=False)
  ci = res.confidence_interval(0.95)
  got = re.search(r"noisy - BN (\S+) \[(\S+), (\S+)\] points, p = (\S+) "
                  r"\(Holm (\S+)\), (beyond|within) noise", text)
  assert got, text
  np.testing.assert_allclose([float(v) for v in got.groups()[:3]],
                             [diff, 100 * ci.low, 100 * ci.high], atol=0.006)
  p, p_holm = float(got.group(4)), float(got.group(5))
  assert p == p_holm and p == pytest.approx(res.pvalue, rel=0.05)
  assert (got.group(6) == "beyond") == (res.pvalue < 0.05)


def test_section_comparisons_are_one_family():
  """noisy BN against BN and against standard in one verdict: both in one
  family of 2. noisy - standard: -3.0 points at p 0.002, Holm 2 x p."""
  numbers = {"BN": _accuracy_rows([0.9015, 0.9035]),
             "noisy BN": _accuracy_rows(_NOISY),
             "standard": _accuracy_rows([0.930, 0.932])}
  family = []

  def render(f):
    family.append(f)
    return why_bn_page.noisy_trains_verdict(numbers, [], f)
  text = _in_one_family(render)
  p = _welch_p(_NOISY, [0.930, 0.932])
  assert family[0].comparisons[1].p_holm == pytest.approx(2 * p, rel=1e-9)
  assert f"(Holm {2 * p:.2g}), beyond noise" in text, text
  assert 'the "better than standard" part **does not hold**' in text


# ----------------------------------------------------------------------------
# A tiny real run of studies/why_bn/config.py: rows, checkpoint, the section.


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
  results = runner.run(
      STUDY, config, workdir, command="python -m experiments.main "
      f"--config=studies/why_bn/config.py:ics --workdir={workdir}")
  assert results["study_id"] == "why_bn" and results["schema"] == 2
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
  combo = sweep.combinations(config)[2]  # noisy BN: the noise key too
  spec = sweep.make_spec(combo.config, N_TRAIN,
                         measurements.measurements(combo.config))
  mine = [r for r in rows if r["combo"] == combo.name]
  assert [r["ics_steps"] for r in mine if r["run"] == 0] == [[0, 2], [4, 6]]
  assert [r["landscape_steps"] for r in mine if r["run"] == 0] == [[0], [4]]
  assert mine[0]["ics_layers"] == ["hidden_0", "readout"]
  data, _ = classifier.load_data(combo.config)
  runs = sweep.run_grid(combo.config)
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
  text = why_bn_page.section([loaded], tmp_path)
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


@pytest.mark.slow
def test_the_run_report_has_the_study_section(tiny_run):
  """The run's own summary.md holds its ICS table (the study's section of
  this run), beside the accuracy table."""
  _, workdir = tiny_run
  text = STUDY.report(workdir)
  summary = (workdir / "summary.md").read_text()
  assert "| norm | seeds |" in summary  # the run's table
  assert "ICS: l2 norm of G - G'" in summary and "ICS: l2 norm" in text
  assert (workdir / f"{workdir.name}_ics.png").stat().st_size > 0
