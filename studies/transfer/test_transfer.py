"""The transfer-learning study (studies.transfer: transfer, probe, page,
report): class subsets, the labeled budget and the validation part against
NumPy, what each variant may change, recomputed statistics and the probe's
features against a NumPy forward pass, the convex probe against a known
optimum and an independent scipy fit, the feature measures against known
matrices, config errors, the page's claims on hand-built results against
scipy and Holm's correction, and (slow) the study end to end
through the one command line (experiments.main), the runner's resume check
on its workdir, and the page's section on its run."""

import functools
import json
import re
import shutil

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from bn_lab import page as studies_page
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from studies import registry
import studies.transfer as transfer_study
from studies.transfer import config as transfer_config
from studies.transfer import page as transfer_page
from studies.transfer import probe
from studies.transfer import transfer


def tiny_config():
  config = transfer_config.get_config("short")
  config.widths = (8, 6)
  return config


def tiny_spec(norm="batch", batch_size=5, steps_per_epoch=2, num_epochs=2):
  return transfer.make_spec(tiny_config(), norm=norm, batch_size=batch_size,
                            steps_per_epoch=steps_per_epoch,
                            num_epochs=num_epochs)


def init_variables(spec, seed=0):
  """The network's initial variables, compiled (faster than op by op)."""
  model = spec.make_model({})
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, 784)),
                                        train=False))(jax.random.key(seed))


def pretrained_variables(spec, seed=0):
  """A network's variables as pretraining might leave them: random
  kernels, gammas, betas and running statistics away from their init."""
  variables = init_variables(spec, seed)
  rng = np.random.default_rng(seed)
  perturb = lambda x, lo, hi: rng.uniform(lo, hi, x.shape).astype(x.dtype)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: perturb(x, 0.5, 2.0) if path[-1].key == "scale"
      else perturb(x, -0.5, 0.5) if path[-1].key == "bias"
      else np.asarray(x), variables["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: perturb(x, 0.2, 3.0) if path[-1].key == "var"
      else perturb(x, -1.0, 1.0), variables["batch_stats"])
  return {"params": params, "batch_stats": stats}


def pixels(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 784), np.uint8)


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# ----------------------------------------------------------------------------
# Data.


def test_class_subset_keeps_the_classes_in_order_and_relabels_them():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 500)
  images = rng.integers(0, 256, (500, 3))
  classes = (5, 6, 7, 8, 9)
  got_images, got_labels = transfer.class_subset(images, labels, classes)
  expected = [(image, classes.index(label))
              for image, label in zip(images, labels) if label in classes]
  np.testing.assert_array_equal(got_images, [e[0] for e in expected])
  np.testing.assert_array_equal(got_labels, [e[1] for e in expected])
  # An order other than sorted: the label is the position in `classes`.
  _, shuffled = transfer.class_subset(images, labels, (9, 2))
  np.testing.assert_array_equal(
      shuffled, [0 if l == 9 else 1 for l in labels if l in (9, 2)])


def test_labeled_budget_is_stratified_distinct_and_seeded():
  labels = np.random.default_rng(1).integers(0, 5, 400)
  picked = transfer.labeled_budget(labels, 100, seed=3)
  assert len(set(picked.tolist())) == 100
  np.testing.assert_array_equal(np.bincount(labels[picked], minlength=5),
                                [20] * 5)
  np.testing.assert_array_equal(picked,
                                transfer.labeled_budget(labels, 100, seed=3))
  assert not np.array_equal(picked,
                            transfer.labeled_budget(labels, 100, seed=4))
  with pytest.raises(ValueError, match="not a multiple of the 5 classes"):
    transfer.labeled_budget(labels, 12, seed=0)


# ----------------------------------------------------------------------------
# What each variant changes.


def _two_steps(spec, variables, *, readout_only):
  """Two training steps of a transfer run from `variables`: the readout
  step (frozen) or bn_lab.train's step (trained), compiled."""
  state = jax.jit(functools.partial(
      transfer.transfer_state, spec, readout_only=readout_only))(
          variables, 7, 1e-2)
  step = jax.jit(functools.partial(
      transfer.readout_step if readout_only else train.train_step,
      spec=spec))
  labels = jnp.arange(5, dtype=jnp.int32)
  for seed in (0, 1):
    state, metrics = step(state, jnp.asarray(pixels(5, seed)), labels)
  assert int(state.step) == 2 and int(metrics["count"]) == 5
  return state


def test_frozen_changes_only_the_readout_bitwise():
  spec = tiny_spec()
  variables = pretrained_variables(spec)
  state = _two_steps(spec, variables, readout_only=True)
  before, after = flat(variables["params"]), flat(state.params)
  assert before.keys() == after.keys()
  # One output per target class (the spec's 5, not bn_lab.models' 10).
  assert after[(transfer.READOUT, "kernel")].shape == (6, 5)
  for key in before:
    same = np.asarray(before[key]).tobytes() == np.asarray(after[key]).tobytes()
    assert same == (key[0] != transfer.READOUT), key
  for key, value in flat(variables["batch_stats"]).items():
    assert np.asarray(value).tobytes() == np.asarray(
        flat(state.batch_stats)[key]).tobytes(), key


def test_trained_changes_every_layer_and_the_statistics():
  spec = tiny_spec()
  variables = pretrained_variables(spec)
  state = _two_steps(spec, variables, readout_only=False)
  for key, value in flat(variables["params"]).items():
    assert not np.array_equal(value, flat(state.params)[key]), key
  for key, value in flat(variables["batch_stats"]).items():
    assert not np.array_equal(value, flat(state.batch_stats)[key]), key


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_recomputed_statistics_are_numpy_mean_and_var_of_each_layer():
  """Layer by layer in float64 NumPy: each BN layer's inputs on all the new
  images (three batches pooled), the layers below normalizing with their
  recomputed statistics."""
  config = tiny_config()
  placement = config.placement
  assert placement == "before_activation"
  spec = transfer.make_spec(config, norm="batch", batch_size=5,
                            steps_per_epoch=1, num_epochs=1)
  variables = pretrained_variables(spec, seed=1)
  images = pixels(24, seed=2)
  got = transfer.recompute_statistics(spec, variables,
                                      jnp.asarray(images.reshape(3, 8, 784)))
  params = jax.tree.map(lambda x: np.asarray(x, np.float64),
                        variables["params"])
  epsilon = config.bn.epsilon
  x = images.astype(np.float64) / 255
  for i in range(len(config.widths)):
    layer = params[f"hidden_{i}"]
    h = x @ layer["Dense_0"]["kernel"]  # no bias: BN's beta replaces it
    mean, var = h.mean(0), h.var(0)
    np.testing.assert_allclose(got[f"hidden_{i}"]["BatchNorm_0"]["mean"],
                               mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[f"hidden_{i}"]["BatchNorm_0"]["var"],
                               var, rtol=1e-3, atol=1e-6)
    bn = layer["BatchNorm_0"]
    h = (h - mean) / np.sqrt(var + epsilon) * bn["scale"] + bn["bias"]
    x = _sigmoid(h)
  # Not the pretraining's statistics any more.
  assert not np.allclose(got["hidden_0"]["BatchNorm_0"]["mean"],
                         variables["batch_stats"]["hidden_0"]["BatchNorm_0"][
                             "mean"])


def test_network_without_bn_has_no_statistics_to_recompute():
  spec = tiny_spec(norm="layer")
  assert transfer.recompute_statistics(
      spec, {"params": {}, "batch_stats": {}},
      jnp.asarray(pixels(8).reshape(2, 4, 784))) == {}


def test_cells_give_the_statistics_variants_to_bn_only():
  config = tiny_config()
  config.norms = ("batch", "layer")
  config.transfer.variants = ("frozen", "recomputed")
  assert transfer.cells(config) == [("batch", "frozen", 100),
                                    ("batch", "recomputed", 100),
                                    ("layer", "frozen", 100)]


# ----------------------------------------------------------------------------
# The config.


def test_config_variants_are_valid():
  for arg in ("", "short"):
    transfer.validate_config(transfer_config.get_config(arg))
  with pytest.raises(ValueError, match="the variants are"):
    transfer_config.get_config("long")


@pytest.mark.parametrize("field, value, message", [
    ("norms", ("batch", "group"), "config.norms=('batch', 'group') has "
     "'group'; choose among ('batch', 'layer', 'none')."),
    ("transfer.variants", ("frozen", "adabn"), "has 'adabn'"),
    ("transfer.budgets", (100, 12), "has 12, not a multiple of the 5 "
     "target classes"),
    ("target_classes", (4, 5), "shares classes with source_classes"),
    ("transfer.batch_size", 1, "config.transfer.batch_size=1 must be at "
     "least 2"),
    ("transfer.readout_learning_rate", -1.0, "config.transfer."
     "readout_learning_rate=-1.0 must be a number > 0."),
    ("placement", "input", "config.placement='input' is not valid"),
    ("transfer.probe_folds", 1, "config.transfer.probe_folds=1 must be an "
     "integer >= 2"),
    ("transfer.budgets", (5,), "has 5: fewer than 2 per class"),
    ("bn.momentum", 1.0, "config.bn.momentum=1.0 must be a number in "
     "[0, 1)."),
])
def test_bad_config_is_one_line_naming_the_field(field, value, message):
  config = transfer_config.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(sweep.ConfigError, match=re.escape(message)) as error:
    transfer.validate_config(config)
  assert "\n" not in str(error.value)



def test_budget_larger_than_a_class_is_refused():
  config = transfer_config.get_config()
  with pytest.raises(sweep.ConfigError, match=re.escape(
      "has 1000: 200 per class, more than the 150 training images")):
    transfer.validate_data_size(config, 30000, 29000, [150, 6000, 6000,
                                                      6000, 6000])


# ----------------------------------------------------------------------------
# The convex probe and the feature measures, against independent
# computations.


def test_probe_solves_a_symmetric_problem_to_its_known_optimum():
  """Two classes at x = -1 and x = +1 (one example each), penalty l2: by
  symmetry the optimum has equal biases and weights +w, -w, with w the
  root of d/dw [log(1 + exp(-2w)) + l2 w^2] = 0, which brentq finds."""
  from scipy import optimize
  l2 = 0.1
  w = optimize.brentq(lambda w: -2 / (1 + np.exp(2 * w)) + 2 * l2 * w,
                      0.0, 50.0, xtol=1e-14)
  fitted = probe.fit(np.array([[-1.0], [1.0]]), np.array([0, 1]), l2)
  assert fitted.converged and fitted.gradient_norm < 1e-6
  np.testing.assert_allclose(fitted.weights, [[-w, w]], atol=1e-6)
  assert fitted.bias[0] == pytest.approx(fitted.bias[1], abs=1e-6)
  assert fitted.accuracy(np.array([[-2.0], [0.5]]), [0, 1]) == 1.0


def test_probe_matches_an_independent_fit_on_a_small_problem():
  """3 classes, 40 examples, 4 features: the probe's optimum against
  scipy's BFGS on the objective written with scipy.special.logsumexp and
  finite-difference gradients; the probe's gradient vanishes there."""
  from scipy import optimize, special
  rng = np.random.default_rng(0)
  labels = np.arange(40) % 3
  features = rng.normal(size=(40, 4)) + labels[:, None] * 0.7
  l2 = 0.05

  def objective(theta):
    weights, bias = theta[:12].reshape(4, 3), theta[12:]
    logits = features @ weights + bias
    nll = special.logsumexp(logits, axis=1) - logits[np.arange(40), labels]
    return nll.mean() + 0.5 * l2 * np.sum(weights ** 2)

  reference = optimize.minimize(objective, np.zeros(15), method="BFGS",
                                options={"gtol": 1e-9}).x
  fitted = probe.fit(features, labels, l2)
  assert fitted.converged
  # The softmax is unchanged by one shift of all biases: compare logits.
  got = features @ fitted.weights + fitted.bias
  want = features @ reference[:12].reshape(4, 3) + reference[12:]
  np.testing.assert_allclose(got - got.mean(1, keepdims=True),
                             want - want.mean(1, keepdims=True), atol=1e-4)
  theta = np.concatenate([fitted.weights.ravel(), fitted.bias])
  assert objective(theta) == pytest.approx(objective(reference), abs=1e-10)
  assert fitted.mean_log_loss(features, labels) == pytest.approx(
      objective(theta) - 0.5 * l2 * np.sum(fitted.weights ** 2), rel=1e-12)


def test_cross_validation_folds_are_stratified_and_the_best_penalty_wins():
  labels = np.repeat(np.arange(5), 20)
  fold = probe.stratified_folds(labels, 5, seed=3)
  for k in range(5):
    np.testing.assert_array_equal(np.bincount(labels[fold == k]), [4] * 5)
  rng = np.random.default_rng(1)
  features = rng.normal(size=(100, 6)) + labels[:, None] * 0.3
  fitted, scores = probe.select_and_fit(features, labels, seed=3,
                                        grid=(1e-3, 1.0))
  # Each penalty's score by hand: fit on four folds, held-out mean NLL.
  for l2, score in scores.items():
    losses = [probe.fit(features[fold != k], labels[fold != k], l2)
              .mean_log_loss(features[fold == k], labels[fold == k])
              for k in range(5)]
    assert score == pytest.approx(np.mean(losses), rel=1e-6)
  assert fitted.l2 == min(scores, key=scores.get)


def test_feature_ranks_and_saturation_against_known_matrices():
  """Features with known centred singular values (4, 2, 1, 1): effective
  rank exp(H(p)) for p = s / 8, numerical rank 4, or 2 once two values are
  below 1e-3 of the largest; a fixed offset changes nothing."""
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(50, 5)))
  # Orthonormal columns orthogonal to the ones vector: centred already.
  ones = np.ones((50, 1)) / np.sqrt(50)
  basis, _ = np.linalg.qr(np.hstack([ones, basis]))
  u = basis[:, 1:5]
  v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  s = np.array([4.0, 2.0, 1.0, 1.0])
  features = u @ np.diag(s) @ v.T + 0.3
  p = s / s.sum()
  assert probe.effective_rank(features) == pytest.approx(
      np.exp(-np.sum(p * np.log(p))), rel=1e-9)
  assert probe.numerical_rank(features) == 4
  small = u @ np.diag([4.0, 2.0, 1e-4, 1e-5]) @ v.T
  assert probe.numerical_rank(small) == 2
  assert probe.saturated_fraction(np.array([[0.01, 0.5], [0.96, 0.94]])) \
      == 0.5


def test_validation_part_is_held_out_of_the_budgets():
  rng = np.random.default_rng(0)
  split = {"train_images": np.arange(300)[:, None],
           "train_labels": rng.integers(0, 5, 300),
           "test_images": np.zeros((7, 1)), "test_labels": np.zeros(7)}
  held = transfer.hold_out_validation(split, 60, seed=2)
  kept_ids = held["train_images"][:, 0]
  validation_ids = held["validation_images"][:, 0]
  assert len(validation_ids) == 60 and len(kept_ids) == 240
  assert not set(kept_ids) & set(validation_ids)
  np.testing.assert_array_equal(np.sort(np.r_[kept_ids, validation_ids]),
                                np.arange(300))
  np.testing.assert_array_equal(held["validation_labels"],
                                split["train_labels"][validation_ids])
  np.testing.assert_array_equal(held["train_labels"],
                                split["train_labels"][kept_ids])
  assert held["test_images"] is split["test_images"]


def test_hidden_activations_are_each_layers_sigmoid_outputs_in_eval_mode():
  """The features the probe reads, against a float64 NumPy forward pass
  with the running statistics."""
  config = tiny_config()
  spec = tiny_spec()
  variables = pretrained_variables(spec, seed=3)
  images = pixels(6, seed=4)
  got = jax.jit(functools.partial(transfer.hidden_activations, spec))(
      variables, jnp.asarray(images))
  params = jax.tree.map(lambda x: np.asarray(x, np.float64),
                        variables["params"])
  x = images.astype(np.float64) / 255
  assert len(got) == len(config.widths)
  for i in range(len(config.widths)):
    stats = variables["batch_stats"][f"hidden_{i}"]["BatchNorm_0"]
    bn = params[f"hidden_{i}"]["BatchNorm_0"]
    h = x @ params[f"hidden_{i}"]["Dense_0"]["kernel"]
    h = ((h - np.asarray(stats["mean"])) / np.sqrt(
        np.asarray(stats["var"], np.float64) + config.bn.epsilon)
         * bn["scale"] + bn["bias"])
    x = _sigmoid(h)
    np.testing.assert_allclose(got[i], x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The page's claims, tables and figure on hand-built results.


def cell(norm, variant, test, validation=None, probe_test=None,
         probe_validation=None):
  """A hand-built cell of 5 seeds; a readout-only variant also has its
  probe (its score) and features."""
  out = {"norm": norm, "variant": variant, "budget": 100,
         "test_accuracy": test,
         "validation_accuracy": validation or test,
         "train_accuracy": [0.75] * len(test)}
  if variant in transfer_page.READOUT_ONLY:
    out["probe"] = {"test_accuracy": probe_test,
                    "validation_accuracy": probe_validation or probe_test,
                    "train_accuracy": [1.0] * 5, "l2": [1e-3] * 5,
                    "iterations": [10, 20, 30, 40, 50],
                    "gradient_norm": [1e-7] * 5, "converged": [True] * 5,
                    "least_penalty_train_accuracy": [0.9] * 5,
                    "least_penalty_converged": [True] * 4 + [False]}
    out["features"] = {"effective_rank": [50.0, 52.0, 54.0, 56.0, 58.0],
                       "numerical_rank": [90] * 5,
                       "saturated": [[0.1, 0.2, 0.3]] * 5}
  return out


FROZEN = [0.80, 0.81, 0.82, 0.83, 0.84]
ADAM_READOUT = [0.60, 0.61, 0.62, 0.63, 0.64]
shifted = lambda values, by: [v + d for v, d in zip(values, by)]
# The probe's frozen BN baseline FROZEN; the other cells placed against it
# seed by seed (every comparison is paired: one budget).
HAND_BUILT = {
    "budgets": [100], "norms": ["batch", "layer", "none"],
    "network": {"widths": [8, 7, 6]},
    "transfer": {"target_train_images": 24404, "recompute_chunk": 1000,
                 "target_validation_images": 5000,
                 "probe": {"l2_grid": [1e-3, 1e-5, 1e-1]}},
    "variants": [
        cell("batch", "frozen", ADAM_READOUT, probe_test=FROZEN),
        # +10 points each seed, +-1: supported.
        cell("batch", "recomputed", ADAM_READOUT,
             probe_test=shifted(FROZEN, [0.10, 0.11, 0.09, 0.10, 0.10])),
        # Within noise: not resolved.
        cell("batch", "recomputed_unlabeled", ADAM_READOUT,
             probe_test=shifted(FROZEN, [0.02, -0.01, 0.02, -0.02, 0.01])),
        # -10 points: contradicted. Best on validation, not on test.
        cell("batch", "trained", shifted(FROZEN, [-0.10, -0.09, -0.11,
                                                  -0.10, -0.10]),
             validation=[0.99] * 5),
        cell("batch", "scratch", [0.60, 0.63, 0.61, 0.62, 0.64]),
        cell("layer", "frozen", ADAM_READOUT,
             probe_test=shifted(FROZEN, [-0.05, -0.03, -0.06, -0.05, -0.04])),
        cell("none", "frozen", ADAM_READOUT,
             probe_test=shifted(FROZEN, [-0.20, -0.21, -0.19, -0.20, -0.22])),
        cell("none", "trained", [0.70, 0.69, 0.71, 0.72, 0.70])]}


def _holm(p):
  """Holm's adjusted p values, written out (the stats module's own is
  tested in tests/)."""
  order = np.argsort(p)
  adjusted, running = np.empty(len(p)), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(p) - rank) * p[i]))
    adjusted[i] = running
  return adjusted


def test_scores_are_the_probes_where_only_the_readout_trains():
  scores = transfer_page.scores(HAND_BUILT)
  np.testing.assert_array_equal(scores[("batch", "frozen", 100)], FROZEN)
  np.testing.assert_array_equal(scores[("batch", "scratch", 100)],
                                [0.60, 0.63, 0.61, 0.62, 0.64])


def test_best_variant_is_picked_on_validation_not_test():
  """BN's trained variant is worst on test but best on validation: the
  pick is trained."""
  best = transfer_page.best_variants(HAND_BUILT)
  assert best[("batch", 100)] == "trained"
  # No norm: the probe on frozen features (61.4%) below fine-tuning
  # (70.4%).
  assert best[("none", 100)] == "trained"
  assert best[("layer", 100)] == "frozen"


def test_claims_on_hand_built_results_against_scipy_and_holm():
  """Each claim's verdict from scipy's paired t test and Holm's correction
  written out over the 8 distinct pairs (BN's best against no norm's best
  is BN fine-tuned against no norm fine-tuned: one comparison for two
  claims); the first row's interval from scipy."""
  from scipy import stats as sps
  rows, size = studies_page.in_one_family(
      lambda family: transfer_page.claim_rows(family, HAND_BUILT))
  claims = transfer_page.claims(HAND_BUILT)
  assert len(rows) == len(claims) == 9 and size == 8
  scores = transfer_page.scores(HAND_BUILT)
  pairs = list(dict.fromkeys((c.a, c.b) for c in claims))
  p = np.array([sps.ttest_rel(scores[a], scores[b]).pvalue
                for a, b in pairs])
  holm = dict(zip(pairs, _holm(p)))
  expected = []
  for claim in claims:
    diff = scores[claim.a].mean() - scores[claim.b].mean()
    expected.append("**supported**" if holm[(claim.a, claim.b)] < 0.05
                    and diff > 0 else "**contradicted**"
                    if holm[(claim.a, claim.b)] < 0.05
                    else "**not resolved at this power**")
  assert [row[3] for row in rows] == expected
  # Each kind of verdict occurs: the test can tell them apart.
  assert expected[:4] == ["**supported**", "**not resolved at this power**",
                          "**contradicted**", "**supported**"]
  res = sps.ttest_rel(scores[claims[0].a], scores[claims[0].b])
  ci = res.confidence_interval(0.95)
  assert f"[+{100 * ci.low:.2f}, +{100 * ci.high:.2f}] points" in rows[0][2]
  assert rows[0][2].endswith("; paired t, 5 seeds")
  assert "label shift" in rows[0][1] and "label shift" in rows[1][1]
  assert "recomputed on 24,000 unlabeled images" in rows[1][1]
  # The best-variant claims name the validation pick.
  assert "BN fine-tuned (every layer), no norm fine-tuned" in rows[-1][1]
  assert "validation images" in rows[-1][1]


def test_tables_show_probe_adam_readout_and_features():
  table = transfer_page.results_table(HAND_BUILT)
  assert ("| BN | frozen features: convex probe | 82.00 +- 1.58 (100.0) |"
          in table)
  assert ("| BN | frozen features: Adam readout | 62.00 +- 1.58 (75.0) |"
          in table)
  assert ("| BN | fine-tuned (every layer; BN in training mode) | "
          in table)
  assert "| no norm | fine-tuned (every layer) |" in table
  probes = transfer_page.probe_table(HAND_BUILT)
  assert "| BN | frozen features | 100 | 0.001 | 50 | 1.0e-07 | 5/5 | "       "100.0 | 75.0 |" in probes
  readouts = transfer_page.readout_table(HAND_BUILT)
  assert "probe at L2 1e-05: train |" in readouts
  # The probe's test accuracy: FROZEN less 20.4 points on average.
  assert ("| no norm | 100 | 75.0 | 62.0 | 100.0 | 61.6 | 90.0 (not all "
          "converged) |" in readouts), readouts
  features = transfer_page.features_table(HAND_BUILT)
  assert "effective rank (of 6)" in features
  assert "saturated % (layer 1 / 2 / 3)" in features
  assert ("| BN | frozen features | 54.0 +- 3.2 | 90.0 +- 0.0 | "
          "10.0 +- 0.0 / 20.0 +- 0.0 / 30.0 +- 0.0 |") in features
  assert "on the budget (100 images)" in features


def test_figure_is_written(tmp_path):
  transfer_page.plot_transfer(HAND_BUILT, tmp_path / "transfer.png")
  assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------
# The one command line and the page's section on a tiny real run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny study through the one command line: (workdir, its arguments,
  the process, a copy of the workdir as the first run left it)."""
  tmp = tmp_path_factory.mktemp("transfer")
  data_dir = helpers.write_tiny_idx(tmp / "idx", 400, 200)
  workdir = tmp / "work"
  args = ["--config=studies/transfer/config.py:short", f"--workdir={workdir}",
          "--config.dataset=tiny_idx", "--config.data_source=idx",
          f"--config.data_dir={data_dir}", "--config.widths=(8, 8)",
          "--config.seeds=(0, 1, 2)", "--config.pretrain.batch_size=50",
          "--config.transfer.budgets=(10,)",
          "--config.norms=('batch',)",
          "--config.transfer.variants=('frozen', 'recomputed', 'trained')",
          "--config.transfer.steps=6", "--config.transfer.batch_size=5",
          "--config.transfer.recompute_chunk=50",
          "--config.transfer.validation_images=40"]
  first = helpers.run_cli(args)
  copy = tmp / "transfer_first"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("*.lock"))
  return workdir, args, first, copy


@pytest.mark.slow
def test_entry_point_end_to_end_and_rerun(tiny_run):
  workdir, args, first, _ = tiny_run
  # The study's report path, then where the files went.
  assert f"{workdir / 'report.md'}\nWrote to {workdir}: " in first.stdout
  assert "report.md" in helpers.files_written(first.stdout, workdir)
  assert "[batch] pretraining epoch 1/1" in first.stderr
  assert "[batch] trained, budget 10 (3/3)" in first.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["study_id"] == "transfer" and results["schema"] == 2
  assert [(c["norm"], c["variant"]) for c in results["variants"]] == [
      ("batch", "frozen"), ("batch", "recomputed"), ("batch", "trained")]
  for cell in results["variants"]:
    assert len(cell["test_accuracy"]) == 3
    assert all(0 <= a <= 1 for a in cell["test_accuracy"])
    assert cell["steps"] == 6 and cell["batch_size"] == 5
  assert results["command"].startswith(
      "python -m experiments.main --config=studies/transfer/config.py:short")
  assert results["machine"]["cpu_count"] > 0
  assert "| BN | frozen features: convex probe |" in (workdir / "report.md"
                                              ).read_text()

  # A rerun of the same pretraining loads the saved networks (no data
  # needed); another pretraining is refused in one line.
  config = ml_collections.ConfigDict(
      json.loads((workdir / "config.json").read_text()))
  variables, summary = transfer.pretrain(config, "batch", None,
                                         workdir / "pretrained")
  assert summary["test_accuracy"] == results["pretrain"]["batch"][
      "test_accuracy"]
  assert variables["params"]["readout"]["kernel"].shape == (3, 8, 5)
  config.pretrain.num_epochs = 2
  with pytest.raises(workdir_lib.ConfigMismatch, match=re.escape(
      "was pretrained with other pretrain; use a new --workdir")):
    transfer.pretrain(config, "batch", None, workdir / "pretrained")
  # The runner refuses that config in the workdir (its pretrained networks
  # are results) in one line, before loading any data; a config that
  # differs in no result field resumes there.
  with pytest.raises(workdir_lib.ConfigMismatch) as error:
    runner.run(transfer_study.STUDY, config, workdir)
  assert "pretrain.num_epochs differ" in str(error.value)
  assert "\n" not in str(error.value)
  config.pretrain.num_epochs = 1
  config.study = "renamed"  # not a result field
  workdir_lib.check_resumable(workdir, config.to_dict(), study="transfer",
                              result_dirs=transfer_study.STUDY.result_dirs)
  # A bad value: one line naming the field.
  bad = helpers.run_cli([*args, "--config.transfer.steps=0"], check=False)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == (
      "ConfigError: config.transfer.steps=0 must be a positive integer.")


@pytest.mark.slow
def test_page_section_on_the_tiny_run(tiny_run, tmp_path):
  """The table's means, the probe's and the features' tables, the figure,
  and a claim row for each claim the run's cells allow (the verdict rules:
  test_claims_on_hand_built_results_against_scipy_and_holm)."""
  _, _, _, workdir = tiny_run
  study = studies_page.load_study(workdir)
  # The page finds the study by results.json's study_id.
  assert studies_page.study_of(study, registry.all_studies()) is (
      transfer_study.STUDY)
  text = transfer_page.section([study], tmp_path)
  cells = {(c["norm"], c["variant"]): c for c in study["results"]["variants"]}
  assert len(cells) == 3
  for (norm, variant), c in cells.items():
    name = transfer_page.variant_name(norm, variant)
    if variant in transfer_page.READOUT_ONLY:
      name += ": convex probe"
      # Each probe's fit met the gradient tolerance, on a budget of 10.
      assert all(c["probe"]["converged"])
      assert max(c["probe"]["gradient_norm"]) < 1e-5
      assert len(c["features"]["saturated"][0]) == 2  # two hidden layers
      assert len(c["probe"]["least_penalty_train_accuracy"]) == 3
    acc = np.asarray((c["probe"] if variant in transfer_page.READOUT_ONLY
                      else c)["test_accuracy"])
    row = next(line for line in text.splitlines()
               if line.startswith(
                   f"| {transfer_page.NORM_NAMES[norm]} | {name} |"))
    assert f"{100 * acc.mean():.2f} +- {100 * acc.std(ddof=1):.2f}" in row
    assert len(c["validation_accuracy"]) == 3
  assert "| norm | variant | 10 labeled |" in text
  assert "| norm | features | budget | L2 chosen |" in text
  assert "effective rank (of 8)" in text
  assert (tmp_path / f"{study['label']}.png").exists()
  claims = [line for line in text.splitlines()
            if line.startswith("| AdaBN") or line.startswith("| Yosinski")]
  assert [line.split(" | ")[0] for line in claims] == [
      "| AdaBN (Li et al. 2016): BN's statistics recomputed on the target's "
      "images improve accuracy on the target",
      "| Yosinski et al. (2014): fine-tuning the transferred layers beats "
      "keeping them frozen"]
  for line in claims:
    assert line.split("**")[1] in studies_page.CLAIM_VERDICTS
  assert "2 comparisons in one Holm family" in text
  # Only the cells of the run: no claim about norms it did not train.
  assert "no norm" not in text and "LayerNorm" not in text
