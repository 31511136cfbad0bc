"""studies.mode_collapse: mode counting and KL against hand-built sample
sets and NumPy, the channel-to-digit order, the 3-channel GAN, Fisher's
exact test against a textbook value and SciPy, the verdicts on made-up
results, the config checks, and (slow) the short study end to end
through experiments.main."""

import dataclasses
import json
import math
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from bn_lab import workdir as workdir_lib
from studies import registry
from studies.gan import gan
from studies.mode_collapse import config as mc_config
from studies.mode_collapse import mode_collapse as mc
from studies.mode_collapse import page as mc_page


# ----------------------------------------------------------------------------
# Mode counting.


def test_modes_covered_and_kl_of_a_hand_built_sample_set():
  # Modes 7 (x4), 123 (x2), 999 (x1), 0 (x1): 8 samples, 4 modes.
  modes = [7, 123, 7, 999, 7, 0, 123, 7]
  counts = mc.mode_counts(modes)
  assert counts.shape == (1000,) and counts.sum() == 8
  assert counts[7] == 4 and counts[123] == 2 and counts[999] == 1
  assert mc.modes_covered(counts) == 4
  p = np.array([4, 2, 1, 1]) / 8
  expected = float(np.sum(p * np.log(p / (1 / 1000))))
  assert mc.kl_to_uniform(counts) == pytest.approx(expected, rel=1e-12)
  # = log M - entropy
  assert expected == pytest.approx(math.log(1000) + np.sum(p * np.log(p)))
  assert mc.mode_metrics(modes) == {"modes_covered": 4,
                                    "kl_to_uniform": pytest.approx(expected)}


def test_kl_extremes_uniform_and_single_mode():
  assert mc.kl_to_uniform(mc.mode_counts(np.arange(1000))) == 0.0
  assert mc.kl_to_uniform(mc.mode_counts(np.repeat(np.arange(1000), 3))) \
      == pytest.approx(0.0, abs=1e-12)
  assert mc.kl_to_uniform(mc.mode_counts([42] * 50)) == pytest.approx(
      math.log(1000))
  assert mc.modes_covered(mc.mode_counts([42] * 50)) == 1


def test_mode_labels_out_of_range_are_refused():
  with pytest.raises(ValueError, match=r"\[0, 1000\)"):
    mc.mode_counts([0, 1000])


def test_count_below_counts_collapsed_runs():
  assert mc.count_below([3, 499, 500, 999], 500) == 2
  assert mc.count_below([], 500) == 0


def test_digits_are_read_in_channel_order():
  # Image n's channel k holds the constant 10 * n + k: channel_pixels must
  # put it at row 3 * n + k, flattened in the classifier's order.
  images = jnp.broadcast_to(
      (10 * jnp.arange(2)[:, None] + jnp.arange(3)[None, :])[:, None, None],
      (2, 28, 28, 3)).astype(jnp.float32)
  images = images.at[1, 0, 5, 2].set(-1.0)  # one marked pixel
  rows = np.asarray(mc.channel_pixels(images))
  assert rows.shape == (6, 784)
  np.testing.assert_array_equal(rows[:, 0], [0, 1, 2, 10, 11, 12])
  assert rows[5, 5] == -1.0 and np.sum(rows == -1.0) == 1
  np.testing.assert_array_equal(
      mc.modes_from_digits(jnp.array([[1, 2, 3], [9, 0, 7], [0, 0, 0]])),
      [123, 907, 0])


def test_real_stacked_images_are_read_by_a_perfect_classifier(monkeypatch):
  """read_modes with a classifier stub that answers the digit hidden in
  each channel's first pixel: the modes are the labels."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 1000, 20)
  digits = np.stack([labels // 100, labels // 10 % 10, labels % 10], -1)
  images = np.zeros((20, 28, 28, 3), np.float32)
  images[:, 0, 0, :] = digits / 10.0

  class Stub:
    def make_model(self, _):
      class Model:
        def apply(self, variables, pixels, train):
          assert not train and pixels.shape == (60, 784)
          digit = jnp.round(pixels[:, 0] * 10).astype(jnp.int32)
          return jax.nn.one_hot(digit, 10)
      return Model()

  np.testing.assert_array_equal(
      mc.read_modes(Stub(), {}, jnp.asarray(images)), labels)


def test_three_channel_gan_shapes_and_one_channel_unchanged():
  spec = gan.GANSpec(latent_dim=8, generator_channels=(6, 4),
                     discriminator_channels=(4, 6), batch_size=8,
                     steps_per_epoch=2, num_epochs=1, conv="im2col",
                     generator_norm="batch",
                     discriminator_norm="batch_separate")
  spec3 = dataclasses.replace(spec, image_channels=mc.CHANNELS)
  state1, state3 = gan.create_state(spec, 0), gan.create_state(spec3, 0)
  assert state3.g_params["conv_1"]["kernel"].shape == (3, 3, 4, 3)
  # D's first convolution reads 3 channels: 3x the 1-channel kernel.
  assert (state3.d_params["conv_0"]["kernel"].size
          == 3 * state1.d_params["conv_0"]["kernel"].size)
  z = jnp.zeros((5, 8))
  assert gan.generate(spec, state1.g_params, state1.g_stats, z).shape == (
      5, 28, 28)
  assert gan.generate(spec3, state3.g_params, state3.g_stats, z).shape == (
      5, 28, 28, 3)
  pixels = jnp.zeros((8, 28 * 28 * 3), jnp.uint8)
  assert spec3.images(pixels).shape == (8, 28, 28, 3)
  data = gan_tiny_data(3)
  new, metrics = gan.train_epoch(state3, data, spec=spec3)
  assert int(new.step) == 2 and np.isfinite(float(metrics["d_loss"]))


def gan_tiny_data(channels: int):
  from bn_lab import train  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pixels = lambda n: rng.integers(0, 256, (n, 784 * channels), np.uint8)
  return train.to_device(pixels(32), rng.integers(0, 1000, 32), pixels(8),
                         rng.integers(0, 1000, 8))


# ----------------------------------------------------------------------------
# Fisher's exact test and the verdicts.


def test_fisher_exact_tea_tasting():
  # Fisher's lady tasting tea: 3 of 4 right cups; two-sided p = 34/70.
  assert mc.fisher_exact([[3, 1], [1, 3]]) == pytest.approx(34 / 70)
  assert mc.fisher_exact([[4, 0], [0, 4]]) == pytest.approx(2 / 70)
  assert mc.fisher_exact([[0, 10], [0, 10]]) == 1.0


@pytest.mark.parametrize("table", [[[8, 2], [1, 9]], [[0, 10], [6, 4]],
                                   [[10, 0], [3, 7]], [[5, 5], [5, 5]],
                                   [[2, 8], [7, 3]], [[1, 9], [0, 10]]])
def test_fisher_exact_matches_scipy(table):
  stats = pytest.importorskip("scipy.stats")
  assert mc.fisher_exact(table) == pytest.approx(
      stats.fisher_exact(table).pvalue, rel=1e-9)


def _results(a_modes, b_modes, threshold=500):
  """Made-up results: BN in G and D (a) against neither (b)."""
  variant = lambda g, d, modes: {
      "variant": f"G-{g}_D-{d}", "generator_norm": g,
      "discriminator_norm": d, "seeds": list(range(len(modes))),
      "modes_covered": list(modes),
      "kl_to_uniform": [math.log(1000 / max(m, 1)) for m in modes],
      "collapsed": mc.count_below(modes, threshold)}
  return {"collapse_modes": threshold, "variants": [
      variant("batch", "batch_separate", a_modes),
      variant("none", "none", b_modes)]}


def test_verdicts_supported_contradicted_and_unresolved():
  many = [900, 910, 920, 905, 915, 930, 899, 925, 911, 908]
  few = [10, 40, 3, 25, 60, 1, 15, 30, 8, 20]
  claim, = mc_page.claim_tests(_results(many, few))
  assert claim["label"].startswith("BN in G and D")
  assert claim["collapsed"] == (0, 10, 10, 10)
  assert claim["fisher_p"] == pytest.approx(2 / math.comb(20, 10))
  assert claim["modes"].diff == pytest.approx(np.mean(many) - np.mean(few))
  assert claim["verdict"] == "supported"
  assert mc_page.claim_tests(_results(few, many))[0]["verdict"] == (
      "contradicted")
  same = mc_page.claim_tests(_results(many, many[::-1]))[0]
  assert same["verdict"] == "not resolved at this power"
  assert same["modes"].p_holm == pytest.approx(1.0)


def test_plateau_is_last_epoch_minus_three_quarters_paired():
  rows = [{"combo": "v", "run": r, "epoch": e, "modes_covered": 10 * e + r}
          for e in range(1, 9) for r in range(3)]
  change = mc_page.plateau(rows, "v")
  assert change.diff == pytest.approx(20.0)  # epoch 8 - epoch 6
  assert "epoch 8 - epoch 6" in change.label
  assert mc_page.plateau(rows[:3], "v") is None


# ----------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("field,value", [
    ("collapse_modes", 2000), ("collapse_modes", 0),
    ("stacked.num_train", 0), ("stacked.num_test", -5),
    ("dataset", "fashion_mnist"), ("eval.curve_samples", 5000),
    ("generator_norms", ("batch", "group"))])
def test_bad_config_is_one_line_naming_the_field(field, value):
  config = mc_config.get_config("short")
  *parents, name = field.split(".")
  target = config
  for parent in parents:
    target = target[parent]
  target[name] = value
  with pytest.raises(mc.ConfigError) as error:
    mc.validate_config(config)
  message = str(error.value)
  assert message.startswith(f"config.{field}=") and "\n" not in message


def test_configs_are_valid_and_registered():
  for arg in ("", "short"):
    mc.validate_config(mc_config.get_config(arg))
  config = mc_config.get_config()
  assert len(config.seeds) >= 10
  assert set(config.generator_norms) >= {"batch", "none"}
  assert set(config.discriminator_norms) >= {"none", "batch_separate"}
  assert registry.get("mode_collapse").name == "mode_collapse"
  with pytest.raises(ValueError, match="mode_collapse/config.py:long"):
    mc_config.get_config("long")


# ----------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_short_study_end_to_end(tmp_path):
  """config.py's short command exactly as documented (only its workdir
  moved; tests/test_config_commands.py leaves it to this test)."""
  workdir = tmp_path / "work"
  line = next(l for l in mc_config.__doc__.splitlines()
              if "workdirs/mode_collapse_short" in l)
  argv = shlex.split(line.strip())
  assert argv[:3] == [".venv/bin/python", "-m", "experiments.main"]
  args = [f"--workdir={workdir}" if a.startswith("--workdir=") else a
          for a in argv[3:]]
  run = helpers.run_cli(args)
  assert "[G-none_D-batch_separate] epoch 2/2" in run.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["study_id"] == "mode_collapse"
  assert [v["variant"] for v in results["variants"]] == [
      "G-batch_D-batch_separate", "G-none_D-batch_separate"]
  short = mc_config.get_config("short")
  samples = short.eval.num_samples
  for v in results["variants"]:
    assert len(v["modes_covered"]) == len(v["kl_to_uniform"]) == 2
    assert all(1 <= m <= samples for m in v["modes_covered"])
    assert all(0 <= k <= math.log(1000) + 1e-9 for k in v["kl_to_uniform"])
    counts = np.load(workdir / "samples" / v["variant"] / "mode_counts.npy")
    assert counts.shape == (2, 1000) and np.all(counts.sum(1) == samples)
    covered = (counts > 0).sum(1)
    assert list(covered) == v["modes_covered"]
    assert v["collapsed"] == int(np.sum(covered < results["collapse_modes"]))
    p = counts / samples  # KL(mode histogram || uniform), recomputed
    kl = np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) * 1000), 0),
                1)
    np.testing.assert_allclose(v["kl_to_uniform"], kl, rtol=1e-6)
  ref = results["reference"]
  assert ref["images"] == short.stacked.num_test
  assert 0 <= ref["three_digit_accuracy"] <= 1
  assert max(ref["modes_covered"], ref["true_modes_covered"]) <= min(
      1000, short.stacked.num_test)
  assert 0.5 < results["classifier"]["test_accuracy"] <= 1
  rows = workdir_lib.read_jsonl(workdir / "metrics.jsonl")
  assert len(rows) == 2 * 2 * 2  # variants x seeds x epochs
  assert all(r["eval_samples"] == short.eval.curve_samples
             and r["modes_covered"] <= short.eval.curve_samples
             for r in rows)
  report = (workdir / "report.md").read_text()
  assert "| batch | batch_separate |" in report and "Verdict:" in report
  assert (workdir / "figures" / "mode_collapse_curves.png").stat().st_size
