"""BN against mode collapse on Stacked-MNIST: training, mode counting, tests.

Stacked-MNIST (bn_lab.synthetic.load_stacked_mnist) puts three MNIST
digits into the three channels of one 28x28 image: 10^3 = 1,000 modes,
the benchmark of the mode-collapse papers (Metz et al. 2017, Unrolled GAN;
Srivastava et al. 2017, VEEGAN; Lin et al. 2018, PacGAN). The GAN is
studies.gan.gan's, unchanged except that G's last convolution writes 3
channels and D reads 3 (`GANSpec.image_channels`); so are its training
loop, vmapped over seeds, and its evaluation classifier, trained here on
1-channel MNIST and cached in the workdir.

A generated image's mode is read digit by digit: the classifier labels
each channel, mode = 100 * d1 + 10 * d2 + d3 (`read_modes`). Per run, on
`eval.num_samples` samples (26,000 as VEEGAN and PacGAN): the number of
modes with at least one sample (`modes_covered`) and KL(generated mode
histogram || uniform over 1,000) (`kl_to_uniform`). A run "collapses"
when it covers fewer than `collapse_modes` modes; variants are compared
by these counts with Fisher's exact test (`fisher_exact`), as the
distribution of modes covered over seeds is often far from normal.

The study (`studies.mode_collapse.STUDY`) runs through bn_lab.runner:
`validate_config`, `load_data`, then `run`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from bn_lab import data as data_lib
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import synthetic
from bn_lab import train
from studies.gan import gan

NUM_MODES = synthetic.STACKED_MODES  # 1,000
CHANNELS = 3
DIGIT_WEIGHTS = (100, 10, 1)  # mode = 100 * d1 + 10 * d2 + d3
# The variants' norms: the GAN study's (studies.gan.gan).
GENERATOR_NORMS = gan.GENERATOR_NORMS
DISCRIMINATOR_NORMS = gan.DISCRIMINATOR_NORMS
# Per-run metrics of a set of samples (`mode_metrics`).
MODE_METRICS = ("modes_covered", "kl_to_uniform")
TRAIN_METRICS = gan.TRAIN_METRICS
ConfigError = sweep.ConfigError


class StudyData(NamedTuple):
  """The study's data on the device: 1-channel MNIST (the classifier's)
  and Stacked-MNIST, (N, 28 * 28 * 3) uint8 (the GAN's; each image's
  (28, 28, 3) flattened), with labels 0..999."""
  mnist: train.DeviceData
  stacked: train.DeviceData


# ----------------------------------------------------------------------------
# Mode counting: pure functions of mode labels.


def mode_counts(modes, num_modes: int = NUM_MODES) -> np.ndarray:
  """The histogram (num_modes,) of integer mode labels in [0, num_modes)."""
  modes = np.asarray(modes).ravel()
  if modes.size and (modes.min() < 0 or modes.max() >= num_modes):
    raise ValueError(f"mode labels must lie in [0, {num_modes}), got "
                     f"[{modes.min()}, {modes.max()}].")
  return np.bincount(modes, minlength=num_modes)


def modes_covered(counts) -> int:
  """Modes with at least one sample (the papers' "modes captured")."""
  return int(np.count_nonzero(np.asarray(counts)))


def kl_to_uniform(counts) -> float:
  """KL(p || uniform) in nats of the histogram `counts`: sum_m p_m log(p_m
  M) over the M modes, = log M - H(p). 0 for a uniform histogram, log M
  (6.91 for 1,000) when every sample is one mode. The direction is the
  papers' (VEEGAN, PacGAN: the generated distribution first), finite
  however many modes are missing."""
  counts = np.asarray(counts, np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(np.sum(p * np.log(p * counts.size))) + 0.0  # not -0.0


def mode_metrics(modes, num_modes: int = NUM_MODES) -> dict[str, Any]:
  """MODE_METRICS of one run's sample modes."""
  counts = mode_counts(modes, num_modes)
  return {"modes_covered": modes_covered(counts),
          "kl_to_uniform": kl_to_uniform(counts)}


def count_below(values, threshold) -> int:
  """How many runs have a value below `threshold` (collapsed runs)."""
  return int(np.sum(np.asarray(values) < threshold))


def fisher_exact(table) -> float:
  """Two-sided p of Fisher's exact test on a 2x2 table [[a, b], [c, d]]
  (rows: the two variants; columns: collapsed, not collapsed).

  Conditional on the margins, a is hypergeometric; p sums the
  probabilities of every table with the margins that is no more likely
  than the observed one (within a relative 1e-7, as R and SciPy do). By
  hand, as the lab does not depend on SciPy; checked against Fisher's
  tea-tasting table and against scipy.stats in the tests.
  """
  (a, b), (c, d) = np.asarray(table, dtype=np.int64)
  if min(a, b, c, d) < 0:
    raise ValueError(f"a 2x2 table of counts, got {table}.")
  row1, col1, n = a + b, a + c, a + b + c + d
  log_choose = lambda n, k: (math.lgamma(n + 1) - math.lgamma(k + 1)
                             - math.lgamma(n - k + 1))

  def log_p(x):
    return (log_choose(col1, x) + log_choose(n - col1, row1 - x)
            - log_choose(n, row1))

  support = range(max(0, row1 + col1 - n), min(row1, col1) + 1)
  observed = log_p(a)
  p = sum(math.exp(log_p(x)) for x in support
          if log_p(x) <= observed + math.log1p(1e-7))
  return min(1.0, p)


# ----------------------------------------------------------------------------
# Reading modes with the classifier (jitted).


def channel_pixels(images) -> jax.Array:
  """(N, H, W, C) -> (N * C, H * W): row n * C + k is channel k of image
  n, flattened as the classifier's 1-channel inputs."""
  n, h, w, c = images.shape
  return jnp.moveaxis(images, -1, 1).reshape(n * c, h * w)


def modes_from_digits(digits) -> jax.Array:
  """(N, C) digits, channel order -> (N,) modes: 100 * d1 + 10 * d2 + d3
  for C = 3 (DIGIT_WEIGHTS' last C)."""
  digits = jnp.asarray(digits)
  return digits @ jnp.asarray(DIGIT_WEIGHTS[-digits.shape[1]:], digits.dtype)


def read_modes(classifier: train.TrainSpec, variables, images) -> jax.Array:
  """(N, 28, 28, C) images in [0, 1] -> (N,) modes: each channel labelled
  by the MNIST classifier in eval mode."""
  logits = classifier.make_model({}).apply(
      variables, channel_pixels(images), train=False)
  return modes_from_digits(
      jnp.argmax(logits, axis=-1).reshape(images.shape[0], images.shape[-1]))


@functools.partial(jax.jit, static_argnames=(
    "spec", "classifier", "num", "chunk"))
def sample_modes(states: gan.GANState, classifier_variables, *,
                 spec: gan.GANSpec, classifier: train.TrainSpec, num: int,
                 chunk: int) -> jax.Array:
  """(K, num) modes of K stacked runs' samples: G in eval mode (running
  statistics) on the first `num` evaluation latents (the same z for every
  run), `chunk` samples per call. The runs go one after another
  (lax.map): a vmap over them would hold K chunks' im2col copies."""
  z = gan.eval_latents(-(-num // chunk) * chunk, spec.latent_dim)

  def one_run(state):
    def one_chunk(z):
      images = gan.generate(spec, state.g_params, state.g_stats, z)
      return read_modes(classifier, classifier_variables, images)
    return gan.chunked(one_chunk, z, chunk, num)

  return jax.lax.map(one_run, states)


@functools.partial(jax.jit, static_argnames=("classifier", "chunk"))
def real_modes(classifier_variables, pixels, *, classifier: train.TrainSpec,
               chunk: int) -> jax.Array:
  """The modes the classifier reads in uint8 Stacked-MNIST images
  (N, 28 * 28 * 3)."""
  def one_chunk(x):
    images = data_lib.scale_pixels(x, "unit").reshape(
        -1, gan.IMAGE_SIZE, gan.IMAGE_SIZE, CHANNELS)
    return read_modes(classifier, classifier_variables, images)
  return gan.chunked(one_chunk, pixels, chunk, pixels.shape[0])


# ----------------------------------------------------------------------------
# Config and data.


def validate_config(config) -> None:
  """The GAN study's checks (same fields), then this study's: one-line
  ConfigError naming the field."""
  gan.validate_config(config)
  sweep.check(config.dataset == "mnist", "dataset", config.dataset,
              "is not supported: Stacked-MNIST is built from MNIST; use "
              "'mnist' (or leave the field out)")
  for field in ("stacked.num_train", "stacked.num_test", "collapse_modes"):
    value = sweep.get_dotted(config, field)
    sweep.check(sweep.is_int(value) and value > 0, field, value,
                "must be a positive integer")
  sweep.check(sweep.is_int(config.stacked.seed), "stacked.seed",
              config.stacked.seed, "must be an integer")
  sweep.check(config.collapse_modes <= NUM_MODES, "collapse_modes",
              config.collapse_modes, f"must be at most {NUM_MODES} (the "
              "modes of Stacked-MNIST)")
  sweep.check(config.eval.curve_samples == 0 or config.eval.curve_samples
              <= config.eval.num_samples, "eval.curve_samples",
              config.eval.curve_samples, f"must be at most eval.num_samples "
              f"({config.eval.num_samples})")


def load_data(config) -> tuple[StudyData, str]:
  """The study's `load_data`: MNIST (data_dir / data_source as the GAN
  study), Stacked-MNIST drawn from it (config.stacked), both on the
  device; the data-size checks."""
  mnist = data_lib.load_dataset("mnist", data_dir=config.data_dir or None,
                                source=config.data_source)
  stacked = synthetic.load_stacked_mnist(
      config.stacked.num_train, config.stacked.num_test, config.stacked.seed,
      mnist=mnist)
  flat = lambda x: np.asarray(x).reshape(len(x), -1)
  data = StudyData(
      mnist=train.to_device(
          data_lib.flatten_pixels(mnist.train_images), mnist.train_labels,
          data_lib.flatten_pixels(mnist.test_images), mnist.test_labels),
      stacked=train.to_device(
          flat(stacked.train_images), stacked.train_labels,
          flat(stacked.test_images), stacked.test_labels))
  gan.validate_data_size(config, config.stacked.num_train)
  logging.info("data: %s; Stacked-MNIST %d train / %d test images",
               mnist.origin, config.stacked.num_train,
               config.stacked.num_test)
  return data, stacked.origin


def variants(config) -> list[tuple[str, str]]:
  return gan.variants(config)


def make_spec(config, generator_norm: str, discriminator_norm: str,
              ) -> gan.GANSpec:
  """The GAN study's spec of the variant, with 3-channel images."""
  return dataclasses.replace(
      gan.make_spec(config, generator_norm, discriminator_norm),
      image_channels=CHANNELS)


# ----------------------------------------------------------------------------
# The study.


def _evaluate(states, spec, config, classifier, variables, num: int):
  """(K, num) modes (numpy) and MODE_METRICS of each run."""
  modes = np.asarray(jax.device_get(sample_modes(
      states, variables, spec=spec, classifier=classifier, num=num,
      chunk=min(config.eval.chunk, num))))
  return modes, [mode_metrics(m) for m in modes]


def _median_range(values) -> str:
  return (f"median {np.median(values):.4g} [{np.min(values):.4g}, "
          f"{np.max(values):.4g}]")


def train_variant(config, generator_norm: str, discriminator_norm: str,
                  data: StudyData, workdir: Path, writer, classifier,
                  classifier_variables) -> dict[str, Any]:
  """Trains one variant's seeds (vmapped), resuming from its checkpoints;
  one metrics row per seed and epoch (training metrics, and the mode
  metrics of `eval.curve_samples` samples: the plateau curve); then the
  final evaluation on `eval.num_samples` samples. Returns the variant's
  entry of results.json."""
  name = gan.variant_name(generator_norm, discriminator_norm)
  spec = make_spec(config, generator_norm, discriminator_norm)
  seeds = list(config.seeds)
  samples_dir = workdir / "samples" / name
  curve_num = config.eval.curve_samples

  def after_epoch(states, epoch):
    del epoch
    curve = ([{} for _ in seeds] if not curve_num else
             _evaluate(states, spec, config, classifier,
                       classifier_variables, curve_num)[1])
    shown = ("" if not curve_num else "  modes covered (%d samples) %s" % (
        curve_num, _median_range([c["modes_covered"] for c in curve])))
    return curve, shown

  states, wall, compile_time = gan.train_epochs(
      config, spec, name, (generator_norm, discriminator_norm),
      data.stacked, workdir, writer, after_epoch)
  started = time.perf_counter()
  modes, final = _evaluate(states, spec, config, classifier,
                           classifier_variables, config.eval.num_samples)
  gan.save_npy(samples_dir / "mode_counts.npy",
                np.stack([mode_counts(m) for m in modes]))
  gan.save_npy(samples_dir / "final.npy", gan.sample_grid(
      states, spec=spec, num=config.eval.grid_samples))
  result = {
      **gan.result_header(name, generator_norm, discriminator_norm, seeds,
                          spec, wall, compile_time,
                          time.perf_counter() - started),
      **{k: [run[k] for run in final] for k in MODE_METRICS},
      "collapsed": count_below([r["modes_covered"] for r in final],
                               config.collapse_modes)}
  logging.info("[%s] %d samples per run: modes covered %s; KL %s; %d of %d "
               "seeds cover fewer than %d modes (evaluated in %.1f s)", name,
               config.eval.num_samples, _median_range(result["modes_covered"]),
               _median_range(result["kl_to_uniform"]), result["collapsed"],
               len(seeds), config.collapse_modes, result["eval_time"])
  return result


def real_reference(config, data: StudyData, classifier, variables,
                   ) -> dict[str, Any]:
  """The ceiling: the mode metrics of `eval.num_samples` real
  Stacked-MNIST test images as the classifier reads them (capped at the
  test split's size), and how often it reads all three digits right."""
  num = min(config.eval.num_samples, config.stacked.num_test)
  pixels = data.stacked.test_images[:num]
  modes = np.asarray(jax.device_get(real_modes(
      variables, pixels, classifier=classifier,
      chunk=min(config.eval.chunk, num))))
  truth = np.asarray(jax.device_get(data.stacked.test_labels[:num]))
  return {"images": num, **mode_metrics(modes),
          "true_modes_covered": modes_covered(mode_counts(truth)),
          "true_kl_to_uniform": kl_to_uniform(mode_counts(truth)),
          "three_digit_accuracy": float(np.mean(modes == truth))}


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run` (bn_lab.runner checked the config and workdir,
  holds the lock and loaded the data). Written here:

    classifier/             the MNIST classifier (gan.train_classifier)
    metrics.jsonl           one row per variant, seed and epoch
    checkpoints/<variant>/  the runs' last states
    samples/<variant>/      final.npy (K, n, 28, 28, 3) uint8 samples on
                            the fixed latents; mode_counts.npy (K, 1000)
    variants/<variant>.json a finished variant's evaluation

  A rerun skips finished variants and resumes the others.
  """
  assert context.writes, "the mode-collapse study runs in one process"
  config, workdir, data = context.config, context.workdir, context.data
  started = time.perf_counter()
  all_variants = variants(config)
  logging.info("%d variant(s) x %d seed(s) x %d step(s) on Stacked-MNIST, "
               "%s", len(all_variants), len(config.seeds),
               config.steps_per_epoch * config.num_epochs,
               jax.devices()[0].platform)
  classifier, classifier_variables, classifier_summary = (
      gan.train_classifier(config, data.mnist, workdir / "classifier"))
  reference = real_reference(config, data, classifier, classifier_variables)
  logging.info("classifier: MNIST test accuracy %.4f; %d real Stacked-MNIST "
               "test images: three digits right %.4f, modes covered %d, KL "
               "%.4f", classifier_summary["test_accuracy"],
               reference["images"], reference["three_digit_accuracy"],
               reference["modes_covered"], reference["kl_to_uniform"])
  results = gan.train_variants(
      all_variants, workdir, started,
      lambda g_norm, d_norm, writer: train_variant(
          config, g_norm, d_norm, data, workdir, writer, classifier,
          classifier_variables))
  return {
      "study": config.study, "dataset": "stacked_mnist",
      "data_origin": context.origin, "seeds": list(config.seeds),
      "steps": config.steps_per_epoch * config.num_epochs,
      "steps_per_epoch": config.steps_per_epoch,
      "batch_size": config.batch_size,
      "eval_samples": config.eval.num_samples,
      "curve_samples": config.eval.curve_samples,
      "collapse_modes": config.collapse_modes, "num_modes": NUM_MODES,
      "classifier": classifier_summary, "reference": reference,
      "variants": results,
      "wall_time": time.perf_counter() - started}
