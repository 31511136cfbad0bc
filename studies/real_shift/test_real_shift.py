"""The real-shift study (studies.real_shift: real_shift, page, config): its
evaluations against hand computations (AdaBN's statistics against NumPy,
test-batch statistics at B = 1 and B = N against the model applied by
hand, TENT without a step against test-batch statistics), its one-line
config errors, and the short run end to end through bn_lab.runner (the
results' fields and ranges, a rerun that resumes to the same numbers, the
section)."""

import json
import shlex

import flax
from flax import traverse_util
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import data
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from studies import registry
from studies.domain_shift import domain_shift
from studies.real_shift import config as real_shift_config
from studies.real_shift import page as real_shift_page
from studies.real_shift import real_shift


@pytest.fixture(scope="module")
def tiny():
  """Two stacked, freshly initialized BN ResNets (stage widths 4, 8) as the
  study builds them, and 32 MNIST test images: identities hold for any
  weights."""
  config = real_shift_config.short_config()
  config.train.channels = (4, 8)
  combo = sweep.combinations(real_shift.train_config(config, "mnist"))[0]
  spec = sweep.make_spec(combo.config, 512)
  states = train.create_sweep_states(spec, [0, 1],
                                     {"learning_rate": [1e-3, 1e-3]})
  mnist = data.load_dataset("mnist")
  images = jnp.asarray(data.flatten_pixels(mnist.test_images[:32]))
  labels = jnp.asarray(mnist.test_labels[:32], jnp.int32)
  return spec, states, images, labels


def _run(states, k):
  return jax.tree.map(lambda x: x[k], states)


def _train_mode_logits(spec, state, inputs):
  model = spec.make_model({})
  logits, _ = model.apply({"params": state.params,
                           "batch_stats": state.batch_stats}, inputs,
                          train=True, mutable=["batch_stats"])
  return np.asarray(logits)


def test_adabn_statistics_are_the_target_features_mean_and_variance(tiny):
  """AdaBN's statistics (pooled over chunks of 16) are, for every BN layer,
  the NumPy mean and biased variance (float64) of the features that reach
  it, captured from the net applied in training mode chunk by chunk (as
  the statistics are gathered)."""
  spec, states, images, _ = tiny
  state = _run(states, 0)
  model = spec.make_model({})
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  inputs = train.model_inputs(images, spec)
  adapted = traverse_util.flatten_dict(flax.core.unfreeze(
      domain_shift.adapted_statistics(model, variables, inputs, 16)))
  captured = []
  for chunk in (inputs[:16], inputs[16:]):
    _, out = model.apply(variables, chunk, train=True,
                         mutable=["batch_stats", "intermediates"],
                         capture_intermediates=True)
    captured.append(traverse_util.flatten_dict(out["intermediates"]))
  layers = {k[:-1] for k in adapted}
  assert len(layers) == 6  # stem; 2 convs; 2 convs and a shortcut
  for layer in layers:
    conv = (*layer[:-1], layer[-1].replace("norm_", "conv_"), "__call__")
    features = np.concatenate([np.asarray(c[conv][0], np.float64)
                               for c in captured])
    mean = features.mean(axis=(0, 1, 2))
    var = features.var(axis=(0, 1, 2))
    np.testing.assert_allclose(adapted[(*layer, "mean")], mean, rtol=1e-4,
                               atol=1e-5, err_msg=str(layer))
    np.testing.assert_allclose(adapted[(*layer, "var")], var, rtol=1e-3,
                               atol=1e-5, err_msg=str(layer))


def test_test_batch_accuracy_against_the_model_by_hand(tiny):
  """Test-batch statistics at B = N: the accuracy of the whole set
  normalized as one training batch, computed by hand; and the same as AdaBN
  recomputed over those very images in one chunk. At B = 1: each image
  alone."""
  spec, states, images, labels = tiny
  inputs = train.model_inputs(images, spec)
  n = images.shape[0]
  whole = real_shift.test_batch_accuracies(states, images, labels, spec=spec,
                                           batch_size=n)
  single = real_shift.test_batch_accuracies(states, images, labels,
                                            spec=spec, batch_size=1)
  adabn = real_shift.adabn_accuracies(states, images, images, labels,
                                      spec=spec, chunk=n)
  y = np.asarray(labels)
  for k in range(2):
    state = _run(states, k)
    by_hand = np.mean(_train_mode_logits(spec, state, inputs).argmax(-1)
                      == y)
    assert float(whole[k]) == pytest.approx(by_hand, abs=1e-7)
    assert float(adabn[k]) == pytest.approx(by_hand, abs=1e-7)
    one_by_one = np.mean([
        _train_mode_logits(spec, state, inputs[i:i + 1]).argmax(-1)[0]
        == y[i] for i in range(n)])
    assert float(single[k]) == pytest.approx(one_by_one, abs=1e-7)


def test_tent_without_a_step_is_test_batch_statistics(tiny):
  """TENT predicts each batch before its step, in training mode: with a
  zero step size it is test-batch statistics exactly; with a large one it
  moves (the stream's later batches see adapted parameters)."""
  spec, states, images, labels = tiny
  kwargs = dict(spec=spec, batch_size=4, episodic=False)
  still = real_shift.tent_accuracies(states, images, labels,
                                     learning_rate=0.0, **kwargs)
  test_batch = real_shift.test_batch_accuracies(states, images, labels,
                                                spec=spec, batch_size=4)
  np.testing.assert_array_equal(still, test_batch)


def test_tent_learning_rate_and_eval_indices():
  config = real_shift_config.get_config()
  assert real_shift.tent_learning_rate(config, 128) == pytest.approx(1e-3)
  assert real_shift.tent_learning_rate(config, 1) == pytest.approx(1e-3
                                                                   / 128)
  config.adapt.tent_lr_scaling = "none"
  assert real_shift.tent_learning_rate(config, 1) == pytest.approx(1e-3)
  picked = real_shift.eval_indices(10000, 2048, 0)
  assert len(set(picked.tolist())) == 2048 and picked.max() < 10000
  np.testing.assert_array_equal(picked, real_shift.eval_indices(10000, 2048,
                                                                0))
  assert not np.array_equal(picked, real_shift.eval_indices(10000, 2048, 1))


@pytest.mark.parametrize("field, value, says", [
    ("directions", ("mnist_to_svhn",), "config.directions has 'mnist_to_svhn'"),
    ("norms", ("group", "layer"), "config.norms=('group', 'layer') has no "
     "'batch'"),
    ("adapt.eval_examples", 2000, "config.adapt.eval_examples=2000 is not a "
     "multiple of the batch size(s) [64, 256]"),
    ("train.num_groups", 3, "config.train.num_groups=3 does not divide"),
    ("adapt.tent_lr_scaling", "sqrt", "config.adapt.tent_lr_scaling='sqrt'"),
    ("adapt.batch_sizes", (4, 0), "config.adapt.batch_sizes=(4, 0) must "
     "hold positive integers"),
    ("seeds", (0, 0), "config.seeds=(0, 0) repeats a value"),
])
def test_bad_values_are_one_line_errors(field, value, says):
  config = real_shift_config.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(sweep.ConfigError) as error:
    real_shift.validate_config(config)
  assert says in str(error.value)
  assert "\n" not in str(error.value)


def test_short_run_end_to_end(tmp_path):
  """The short variant (config.py's short command) through the runner:
  results.json's fields and sane ranges; a rerun resumes from the
  checkpoints (no training) and evaluates to the same numbers; the
  section renders its table, figure and verdicts."""
  study = registry.get("real_shift")
  config = real_shift_config.short_config()
  workdir = tmp_path / "real_shift_short"
  first = runner.run(study, config, workdir)
  assert first["study_id"] == "real_shift"
  res = first["real_shift"]
  assert res["directions"] == {"printed_digits_to_mnist":
                               ["printed_digits", "mnist"]}
  assert res["adapt"]["tent_learning_rates"] == {"1": 1e-3 / 128,
                                                 "16": 1e-3 * 16 / 128}
  rows = res["rows"]
  # per seed: in_domain, source, adabn, source_precise, in_domain_precise,
  # then test_batch and tent at 2 B's
  assert len(rows) == 2 * (5 + 2 * 2)
  assert {(r["method"], r["batch_size"]) for r in rows} == {
      ("in_domain", None), ("source", None), ("adabn", None),
      ("source_precise", None), ("in_domain_precise", None),
      ("test_batch", 1), ("test_batch", 16), ("tent", 1), ("tent", 16)}
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
  # 64 evaluated images: every accuracy is a whole number of them
  assert all(abs(r["accuracy"] * 64 - round(r["accuracy"] * 64)) < 1e-4
             for r in rows if not r["method"].startswith("in_domain"))
  assert [t["epochs"] for t in res["training"]] == [1]
  assert (workdir / "source" / "printed_digits" / "metrics.jsonl").exists()

  second = runner.run(study, config, workdir)
  assert second["real_shift"]["training"][0]["compile_time"] is None
  assert second["real_shift"]["rows"] == rows

  text = real_shift_page.section(
      [{"results": json.loads((workdir / "results.json").read_text()),
        "label": "real_shift_short", "path": workdir, "benchmark": None}],
      tmp_path)
  assert "| method | any batch | B = 1 | B = 16 |" in text
  assert (tmp_path / "real_shift_short.png").stat().st_size > 1000
  assert "not resolved at this power" in text or "supported" in text


def _synthetic_results(seeds=5):
  """results.json's study part with known effects, both directions (noise
  of 1 point sd on each): AdaBN 10 points above the source statistics,
  TENT equal to test-batch statistics, test-batch statistics at B = 1 30
  points below B = 16."""
  rng = np.random.default_rng(0)
  rows = []
  directions = {"printed_digits_to_mnist": ["printed_digits", "mnist"],
                "mnist_to_printed_digits": ["mnist", "printed_digits"]}
  for direction in directions:
    for seed in range(seeds):
      base = 0.6 + 0.01 * seed
      noise = lambda: rng.normal(0, 0.01)
      values = {("in_domain", None): 0.97, ("in_domain_precise", None): 0.98,
                ("source", None): base,
                ("source_precise", None): base + 0.05 + noise(),
                ("adabn", None): base + 0.1 + noise(),
                ("test_batch", 1): base - 0.2 + noise(),
                ("test_batch", 16): base + 0.1 + noise(),
                ("tent", 1): base - 0.2 + rng.normal(0, 0.01),
                ("tent", 16): base + 0.1 + rng.normal(0, 0.01)}
      rows += [{"direction": direction, "norm": "batch", "seed": seed,
                "method": m, "batch_size": b, "accuracy": v}
               for (m, b), v in values.items()]
      rows += [{"direction": direction, "norm": "group", "seed": seed,
                "method": m, "batch_size": None, "accuracy": 0.7 + 0.01 * seed}
               for m in ("in_domain", "source")]
  config = real_shift_config.get_config()
  config.adapt.batch_sizes = (1, 16)
  return {"study_id": "real_shift", "real_shift": {
      "directions": directions, "norms": ["batch", "group"],
      "seeds": list(range(seeds)), "train": config.train.to_dict(),
      "adapt": {**config.adapt.to_dict(), "tent_learning_rates": {
          "1": 1e-3 / 128, "16": 1e-3 / 8}},
      "test_examples": {"mnist": 10000, "printed_digits": 10000},
      "rows": rows}}


def test_section_judges_known_effects(tmp_path):
  """The section's verdicts on synthetic rows with known effects: a
  +10-point AdaBN gain is supported, a 30-point loss at B = 1 is
  "test-batch statistics degrade: supported", TENT within noise of
  test-batch statistics is not resolved; the ceiling of one direction is
  the other's in-domain accuracy; one Holm family over both directions."""
  study = {"results": _synthetic_results(), "label": "rs", "path": tmp_path,
           "benchmark": None}
  text = real_shift_page.section([study], tmp_path)
  lines = text.splitlines()
  claim = lambda start, where: next(
      l for l in lines if l.startswith(f"| {start}") and where in l)
  for where in ("printed digits → MNIST", "MNIST → printed digits"):
    assert claim("AdaBN (Li", where).endswith("| **supported** |")
    assert "**supported** at B = 1 |" in claim("At small batches", where)
    assert "**not resolved at this power** at B = 1, 16" in claim(
        "TENT beats test-batch", where)
    # TENT against AdaBN: -30 points at B = 1, equal at B = 16
    verdict = claim("TENT beats BN adaptation", where)
    assert "**contradicted** at B = 1" in verdict
  assert "| BN net trained on the target (ceiling; all of its test set) | " \
         "97.0 [97.0, 97.0] |" in text
  # per direction: 2 AdaBN + 3 x 2 TENT + 1 small-batch + 2 GN references
  assert "Verdicts (22 comparisons in one Holm family" in text
  assert (tmp_path / "rs.png").stat().st_size > 1000


def test_documented_short_command_is_short_config():
  """config.py's short command, parsed by experiments.main's own flags, is
  exactly `short_config` (the test above trains `short_config`, and
  tests/test_config_commands.py leaves the command to it)."""
  doc = real_shift_config.__doc__
  line = next(l for l in doc.splitlines() if "workdirs/real_shift_short" in l)
  config = helpers.resolved_config(shlex.split(line.strip())[3:])
  assert config.to_dict() == real_shift_config.short_config().to_dict()
