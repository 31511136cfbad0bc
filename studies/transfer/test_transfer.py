"""The transfer-learning study (studies.transfer: transfer, page, report):
class subsets and the labeled budget against NumPy, what each variant may
change, recomputed statistics against a NumPy forward pass, config errors,
the page's verdicts on hand-built results, and (slow) the study end to end
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
# The page's verdicts, table and figure on hand-built results.


def cell(norm, variant, test_accuracy):
  return {"norm": norm, "variant": variant, "budget": 100,
          "test_accuracy": test_accuracy,
          "train_accuracy": [1.0] * len(test_accuracy)}


# The frozen BN baseline is 81% +- 1 point over 3 seeds; each other cell is
# placed against it by hand. BN's variants that start from the pretrained
# networks pair with it seed by seed (the paired t test, df = 2: t(0.975, 2)
# = 4.303); the other norms and from scratch do not (Welch).
HAND_BUILT = {
    "budgets": [100], "norms": ["batch", "layer", "none"],
    "variants": [
        cell("batch", "frozen", [0.80, 0.81, 0.82]),
        # Paired differences +10, +11, +9 points: mean +10, sd 1, SE
        # 1 / sqrt(3) = 0.577, t = 17.3, p = 0.0033: beyond noise.
        cell("batch", "recomputed", [0.90, 0.92, 0.91]),
        # +2, -1, +2 points: mean +1, sd 1.73, SE 1.0, t = 1.0, p = 0.42:
        # within noise.
        cell("batch", "recomputed_unlabeled", [0.82, 0.80, 0.84]),
        # -10, -9, -11 points: t = -17.3, p = 0.0033: beyond noise, the
        # wrong way.
        cell("batch", "trained", [0.70, 0.72, 0.71]),
        # One seed: no spread, so no verdict either way (Welch against
        # trained, undetermined: not in the family).
        cell("batch", "scratch", [0.60]),
        # Against BN trained (Welch): the same three values, +0.00.
        cell("layer", "trained", [0.70, 0.71, 0.72]),
        # Against BN frozen (Welch): +30 points, SE 0.82, p = 3e-6.
        cell("none", "frozen", [0.50, 0.51, 0.52])]}


def test_verdicts_on_hand_built_results():
  """Every claim's verdict, and the first three lines' numbers, with the
  family's Holm correction worked out: 7 determined comparisons (the pair
  with one seed does not count), p values in order 1.0e-6 (best vs no
  norm), 3.3e-6 (BN vs no norm frozen), 1.6e-5 (best vs LayerNorm), 0.0033
  twice (recomputed, trained; paired), 0.42 (AdaBN, paired), 1.0 (BN vs
  LayerNorm trained); Holm multiplies them by 7, 6, 5, 4, 3, 2, 1 and keeps
  the running maximum: 0.0033 x 4 = 0.013 for both, 0.42 x 2 = 0.85."""
  from scipy import stats as sps
  lines = transfer_page.verdicts(HAND_BUILT)
  assert lines[0] == "\n**100 labeled examples of 5-9:**\n"
  expected = {
      "Recomputing BN's statistics on the budget's images beats frozen "
      "statistics": "holds",
      "Recomputing them on all unlabeled 5-9 images (AdaBN) beats frozen "
      "statistics": "not shown (within noise)",
      "Fine-tuning everything beats frozen BN statistics and layers":
          "does not hold (the opposite, beyond noise)",
      "Pretraining helps BN (fine-tuned beats from scratch)":
          "not shown (undetermined)",
      "BN beats no norm, both frozen": "holds",
      "BN beats LayerNorm, both trained": "not shown (within noise)",
      "BN's best variant (recomputed) beats no norm's best (frozen)":
          "holds",
      "BN's best variant (recomputed) beats LayerNorm's best (trained)":
          "holds"}
  verdicts = dict(re.fullmatch(r"\* (.*): \*\*(.*)\*\* \(.*\)\.", line)
                  .groups() for line in lines[1:])
  # No claim about cells the results lack (LayerNorm frozen, no norm
  # trained).
  assert verdicts == expected
  frozen = [0.80, 0.81, 0.82]
  recomputed, adabn = [0.90, 0.92, 0.91], [0.82, 0.80, 0.84]
  res = sps.ttest_rel(recomputed, frozen)
  ci = res.confidence_interval(0.95)
  assert (res.pvalue, 100 * ci.low, 100 * ci.high) == pytest.approx(
      (0.003317, 7.516, 12.484), rel=1e-3)
  assert lines[1] == (
      "* Recomputing BN's statistics on the budget's images beats frozen "
      "statistics: **holds** (91.00% vs 81.00%: +10.00 [+7.52, +12.48] "
      "points, p = 0.0033 (Holm 0.013), beyond noise, paired over seeds).")
  res = sps.ttest_rel(adabn, frozen)
  assert res.pvalue == pytest.approx(0.4226, rel=1e-3)
  assert lines[2].endswith(
      "(82.00% vs 81.00%: +1.00 [-3.30, +5.30] points, p = 0.42 (Holm "
      "0.85), within noise, paired over seeds).")
  assert lines[4].endswith("(71.00% vs 60.00%: +11.00 points, undetermined "
                           "(n < 2)).")
  # Across norms: Welch, as scipy computes it.
  res = sps.ttest_ind(frozen, [0.50, 0.51, 0.52], equal_var=False)
  family = transfer_page.comparisons(HAND_BUILT)
  c = family[(("batch", "frozen", 100), ("none", "frozen", 100))]
  assert not c.paired and c.p == pytest.approx(res.pvalue, rel=1e-9)
  assert c.p_holm == pytest.approx(6 * res.pvalue, rel=1e-9)
  assert not any("nan" in line for line in lines)


def test_variants_of_one_pretraining_are_paired():
  """Recomputed against frozen statistics on the same pretrained networks:
  seeds 5 points apart, each recomputed seed 1.0 to 1.2 points above its
  frozen one. Paired: t = 19.1 at df = 2, p = 0.0027, beyond noise; Welch's
  test (which the pairing makes wrong here) would see the seeds' spread,
  p = 0.80."""
  from scipy import stats as sps
  frozen = [0.80, 0.85, 0.90]
  recomputed = [0.810, 0.862, 0.911]
  results = {"budgets": [100], "norms": ["batch"], "variants": [
      cell("batch", "frozen", frozen),
      cell("batch", "recomputed", recomputed),
      cell("batch", "scratch", [0.5, 0.6, 0.7])]}
  assert sps.ttest_ind(recomputed, frozen, equal_var=False).pvalue > 0.5
  (line,) = [l for l in transfer_page.verdicts(results)
             if l.startswith("* Recomputing BN's")]
  assert "**holds**" in line and "paired over seeds" in line, line
  c = transfer_page.comparisons(results)[(("batch", "recomputed", 100),
                                          ("batch", "frozen", 100))]
  assert c.paired and c.p == pytest.approx(
      sps.ttest_rel(recomputed, frozen).pvalue, rel=1e-9)
  assert transfer_page.is_paired(("batch", "trained", 100),
                                 ("batch", "frozen", 100))
  assert not transfer_page.is_paired(("batch", "trained", 100),
                                     ("batch", "scratch", 100))
  assert not transfer_page.is_paired(("batch", "frozen", 100),
                                     ("layer", "frozen", 100))


def test_table_says_training_mode_only_for_bn():
  table = transfer_page.results_table(HAND_BUILT)
  assert ("| BN | fine-tuned (every layer; BN in training mode) | "
          "71.00 +- 1.00 (100.0) |") in table
  assert "| LayerNorm | fine-tuned (every layer) | 71.00 +- 1.00 (100.0) |" \
      in table
  assert table.count("training mode") == 1
  assert "| BN | from scratch (no pretraining) | 60.00 (100.0) |" in table


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
          "--config.transfer.recompute_chunk=50"]
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
  assert "| BN | frozen (readout only) |" in (workdir / "report.md"
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
  """The table's means, the figure, and a verdict for each claim the run's
  cells allow (the verdict rules: test_verdicts_on_hand_built_results)."""
  _, _, _, workdir = tiny_run
  study = studies_page.load_study(workdir)
  # The page finds the study by results.json's study_id.
  assert studies_page.study_of(study, registry.all_studies()) is (
      transfer_study.STUDY)
  text = transfer_page.section([study], tmp_path)
  accuracy = {(c["norm"], c["variant"]): np.asarray(c["test_accuracy"])
              for c in study["results"]["variants"]}
  assert len(accuracy) == 3
  for (norm, variant), acc in accuracy.items():
    row = next(line for line in text.splitlines()
               if line.startswith(
                   f"| {transfer_page.NORM_NAMES[norm]} | "
                   f"{transfer_page.variant_name(norm, variant)} |"))
    assert f"{100 * acc.mean():.2f} +- {100 * acc.std(ddof=1):.2f}" in row
  assert "| norm | variant | 10 labeled |" in text
  assert (tmp_path / f"{study['label']}.png").exists()
  claims = [line for line in text.splitlines() if line.startswith("* ")]
  assert [line.split(": **")[0] for line in claims] == [
      "* Recomputing BN's statistics on the budget's images beats frozen "
      "statistics",
      "* Fine-tuning everything beats frozen BN statistics and layers"]
  for line in claims:
    assert line.split("**")[1] in transfer_page.VERDICTS.values()
  # Only the cells of the run: no claim about norms it did not train.
  assert "no norm" not in text and "LayerNorm" not in text
