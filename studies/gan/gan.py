"""A small DCGAN-style GAN for 28x28 MNIST, with BN (or not) in each net.

    G: z (latent_dim) -> Dense -> 7x7xC1 -> norm -> ReLU
       -> 2x nearest upsample -> Conv 3x3 (C2) -> norm -> ReLU   (14x14)
       -> 2x nearest upsample -> Conv 3x3 (1) -> tanh | sigmoid  (28x28)
    D: x (28x28x1) -> Conv 4x4 stride 2 (C1) -> LeakyReLU(0.2)   (14x14)
       -> Conv 4x4 stride 2 (C2) -> norm -> LeakyReLU(0.2)       (7x7)
       -> Dense -> one logit

As in DCGAN (Radford et al. 2016) there is no normalization on G's output
or D's input layer. Variants (`GENERATOR_NORMS`, `DISCRIMINATOR_NORMS`):

  generator_norm      batch (bn_jax.nn.BatchNorm, statistics per channel
                      over batch and pixels) | layer (bn_jax.nn.LayerNorm
                      over each example's pixels and channels, a scale and
                      bias per channel) | none.
  discriminator_norm  none | batch_separate (the real and the fake batch go
                      through D in two calls, each normalized with its own
                      statistics, as DCGAN's code does) | batch_joint (one
                      call on real and fake concatenated: one set of
                      statistics over both).

Training is the project's pure-function style: a `GANState` (both nets'
params, BN statistics and Adam states, the step, the keys) threaded
explicitly; one `train_step` is a D step then a G step (non-saturating
loss, Adam(2e-4, b1=0.5) as DCGAN); an epoch of `steps_per_epoch` steps is
one `lax.scan`, vmapped over seeds (`bn_lab.train.over_runs`).

Evaluation uses an MNIST classifier trained by the project
(`bn_lab.train`, cached in the workdir): class coverage (the entropy of the
predicted-label histogram of generated samples and the number of classes
with at least 5% of them) and the Frechet distance between real test
images and generated ones in the classifier's penultimate features.

The study (`studies.gan.STUDY`) runs through bn_lab.runner: `validate_config`,
`load_data`, then `run` trains and evaluates the variants of a config from
studies/gan/config.py (`python -m experiments.main
--config=studies/gan/config.py --workdir=...`, which then writes the report,
studies.gan.report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_lab import classifier
from bn_lab import checkpoints
from bn_lab import data as data_lib
from bn_lab import models
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib

GENERATOR_NORMS = ("batch", "layer", "none")
DISCRIMINATOR_NORMS = ("none", "batch_separate", "batch_joint")
OUTPUTS = ("tanh", "sigmoid")
# Per-epoch training metrics (means over the epoch's steps): the losses
# and D's mean probability that a real / a generated image is real.
TRAIN_METRICS = ("d_loss", "g_loss", "d_real", "d_fake")
# Evaluation metrics of a set of generated samples (`sample_metrics`).
SAMPLE_METRICS = ("coverage_entropy", "classes_5pct", "frechet_distance")
COVERAGE_MIN_SHARE = 0.05  # "a class is covered": at least 5% of samples
IMAGE_SIZE = 28

ModuleDef = Callable[..., nn.Module]


# ----------------------------------------------------------------------------
# The networks.


# The convolutions of each net by config.conv ("auto": im2col on a CPU, xla
# on GPU/TPU): G's stride-1 3x3 ones, D's 4x4 stride-2 ones. On a 2-core
# CPU the whole training step is several times faster with im2col, even
# where a lone XLA convolution is faster (docs/gan.md).
GENERATOR_CONVS: dict[str, ModuleDef] = models.CONVS
DISCRIMINATOR_CONVS: dict[str, ModuleDef] = {"im2col": models.Conv,
                                             "xla": nn.Conv}


def upsample(x):
  """Nearest-neighbour 2x upsampling of (N, H, W, C) features. With the
  3x3 convolution after it, G's "transposed convolution" (resize-conv:
  no checkerboard artefacts, Odena et al. 2016)."""
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return x.reshape(n, 2 * h, 2 * w, c)


def _normalize(norm: ModuleDef | None, x, train: bool, name: str):
  if norm is None:
    return x
  return norm(name=name)(x, use_running_average=not train)


class Generator(nn.Module):
  """z (N, latent_dim) -> images (N, 28, 28, out_channels) in [-1, 1]
  (tanh) or [0, 1] (sigmoid). `norm`: None or a layer to be named and placed
  (built by `GANSpec.generator`); the layers before it have no bias.
  out_channels: 1 for MNIST, 3 for Stacked-MNIST (studies.mode_collapse);
  only the last convolution's width depends on it."""
  channels: tuple[int, int] = (32, 16)
  norm: ModuleDef | None = None
  conv: ModuleDef = models.Conv
  output: str = "tanh"
  out_channels: int = 1

  @nn.compact
  def __call__(self, z, *, train: bool):
    c7, c14 = self.channels
    use_bias = self.norm is None
    x = nn.Dense(7 * 7 * c7, use_bias=use_bias, name="project")(z)
    x = x.reshape(z.shape[0], 7, 7, c7)
    x = nn.relu(_normalize(self.norm, x, train, "norm_0"))
    x = self.conv(c14, (3, 3), use_bias=use_bias, name="conv_0")(upsample(x))
    x = nn.relu(_normalize(self.norm, x, train, "norm_1"))
    x = self.conv(self.out_channels, (3, 3), use_bias=True,
                  name="conv_1")(upsample(x))
    return jnp.tanh(x) if self.output == "tanh" else nn.sigmoid(x)


class Discriminator(nn.Module):
  """Image batches -> one logit per image, for each batch.

  `joint` decides how several batches meet D's normalization: False, each
  batch goes through the layers in its own call and a BatchNorm normalizes
  it with its own statistics (the running statistics updated once per
  call, in order); True, the batches are concatenated, go through once and
  share one set of statistics. Without a norm both compute the same; True
  is one wider matmul.
  """
  channels: tuple[int, int] = (16, 32)
  norm: ModuleDef | None = None
  conv: ModuleDef = models.Conv
  joint: bool = True

  @nn.compact
  def __call__(self, batches: Sequence[jax.Array], *, train: bool):
    c1, c2 = self.channels
    conv_0 = self.conv(c1, (4, 4), strides=(2, 2), name="conv_0")
    conv_1 = self.conv(c2, (4, 4), strides=(2, 2),
                       use_bias=self.norm is None, name="conv_1")
    norm = self.norm(name="norm") if self.norm is not None else None
    readout = nn.Dense(1, name="readout")

    def logits(x):
      x = nn.leaky_relu(conv_0(x), 0.2)
      x = conv_1(x)
      if norm is not None:
        x = norm(x, use_running_average=not train)
      x = nn.leaky_relu(x, 0.2)
      return readout(x.reshape(x.shape[0], -1))[:, 0]

    if not self.joint:
      return tuple(logits(x) for x in batches)
    sizes = list(itertools.accumulate(x.shape[0] for x in batches))
    joined = logits(jnp.concatenate(batches, axis=0))
    return tuple(jnp.split(joined, sizes[:-1]))


# ----------------------------------------------------------------------------
# The static part of a run, and its state.


@dataclasses.dataclass(frozen=True)
class GANSpec:
  """Everything that shapes one variant's compiled program (hashable)."""
  generator_norm: str = "batch"
  discriminator_norm: str = "none"
  latent_dim: int = 64
  generator_channels: tuple[int, int] = (32, 16)
  discriminator_channels: tuple[int, int] = (16, 32)
  output: str = "tanh"
  conv: str = "auto"  # "im2col" | "xla" | "auto" (by backend)
  # (name, value) pairs of normalization options (config.bn: momentum,
  # epsilon, impl for BatchNorm; epsilon for LayerNorm).
  bn: tuple[tuple[str, Any], ...] = (("epsilon", 1e-5), ("momentum", 0.9))
  learning_rate: float = 2e-4
  b1: float = 0.5
  b2: float = 0.999
  batch_size: int = 64
  steps_per_epoch: int = 200
  num_epochs: int = 5
  data_seed: int | None = None  # as train.TrainSpec (train.over_runs)
  # Channels of an image: 1 (MNIST, this study) or 3 (Stacked-MNIST,
  # studies.mode_collapse). G's last convolution and D's first read it.
  image_channels: int = 1

  def generator(self) -> Generator:
    norm = None
    if self.generator_norm == "batch":
      norm = models.make_norm(dict(self.bn), norm="batch")
    elif self.generator_norm == "layer":
      # Over each example's pixels and channels, as layer norm in a conv
      # net; a scale and bias per channel.
      norm = functools.partial(models.make_norm(dict(self.bn), norm="layer"),
                               reduction_axes=(1, 2, 3), feature_axes=-1)
    conv = models.resolve_backend_choice(self.conv, "im2col", "xla")
    return Generator(channels=tuple(self.generator_channels), norm=norm,
                     conv=GENERATOR_CONVS[conv], output=self.output,
                     out_channels=self.image_channels)

  def discriminator(self) -> Discriminator:
    batch = self.discriminator_norm != "none"
    conv = models.resolve_backend_choice(self.conv, "im2col", "xla")
    return Discriminator(
        channels=tuple(self.discriminator_channels),
        norm=models.make_norm(dict(self.bn), norm="batch") if batch else None,
        conv=DISCRIMINATOR_CONVS[conv],
        joint=self.discriminator_norm != "batch_separate")

  def optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2)

  def images(self, pixels) -> jax.Array:
    """uint8 (N, 784 * C) pixels (each image's (28, 28, C) flattened) ->
    G's output range, (N, 28, 28, C)."""
    x = data_lib.scale_pixels(pixels, "unit")
    if self.output == "tanh":
      x = 2.0 * x - 1.0
    return x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, self.image_channels)

  def to_unit(self, images) -> jax.Array:
    """G's output -> [0, 1] pixels (the classifier's "unit" inputs)."""
    return (images + 1.0) / 2.0 if self.output == "tanh" else images


class GANState(NamedTuple):
  """One run's training state (stacked over seeds in a study)."""
  step: jax.Array  # int32: D-and-G steps taken
  g_params: Any
  g_stats: Any  # G's batch_stats ({} without BatchNorm)
  g_opt: Any
  d_params: Any
  d_stats: Any
  d_opt: Any
  noise_key: jax.Array  # uint32 key data; step t draws z from fold_in(., t)
  data_key: jax.Array  # uint32 key data; as train.TrainState's


def create_state(spec: GANSpec, seed) -> GANState:
  """A fresh run (`seed` may be traced: vmapped over seeds)."""
  g_key, d_key, noise_key, data_key = jax.random.split(
      jax.random.key(seed), 4)
  if spec.data_seed is not None:
    data_key = jax.random.split(jax.random.key(spec.data_seed), 4)[3]
  g_vars = spec.generator().init(
      g_key, jnp.zeros((2, spec.latent_dim)), train=False)
  d_vars = spec.discriminator().init(
      d_key, (jnp.zeros((2, IMAGE_SIZE, IMAGE_SIZE, spec.image_channels)),),
      train=False)
  tx = spec.optimizer()
  return GANState(
      step=jnp.zeros((), jnp.int32),
      g_params=g_vars["params"], g_stats=g_vars.get("batch_stats", {}),
      g_opt=tx.init(g_vars["params"]),
      d_params=d_vars["params"], d_stats=d_vars.get("batch_stats", {}),
      d_opt=tx.init(d_vars["params"]),
      noise_key=jax.random.key_data(noise_key),
      data_key=jax.random.key_data(data_key))


@functools.partial(jax.jit, static_argnames="spec")
def create_states(seeds, *, spec: GANSpec) -> GANState:
  """Stacked fresh runs, one per seed."""
  return jax.vmap(functools.partial(create_state, spec))(
      jnp.asarray(seeds, jnp.int32))


# ----------------------------------------------------------------------------
# Training.


def latents(noise_key, step, batch: int, latent_dim: int) -> jax.Array:
  """The z of step `step`: a function of the run's key and the step only,
  so a resumed run draws what an uninterrupted one does."""
  key = jax.random.fold_in(jax.random.wrap_key_data(noise_key), step)
  return jax.random.normal(key, (batch, latent_dim))


def _mutated_stats(updates) -> Any:
  return updates.get("batch_stats", {})


def train_step(state: GANState, real, *, spec: GANSpec,
               ) -> tuple[GANState, dict[str, jax.Array]]:
  """One D step, then one G step through the updated D.

  `real`: a batch of images in G's output range, (B, 28, 28, 1). G runs
  once, in training mode (its BN statistics updated once per step); the
  same fake batch trains D and then, through D's new parameters, G (the
  vjp of that one forward pass: no second G pass). Both D passes run in
  training mode and update D's running statistics, as DCGAN's code does.
  In the G step D sees the fake batch alone, except with batch_joint,
  where it sees real and fake together as in its own step (the gradient
  flows through the fake half only).
  """
  generator, discriminator = spec.generator(), spec.discriminator()
  tx = spec.optimizer()
  z = latents(state.noise_key, state.step, real.shape[0], spec.latent_dim)

  def generate(g_params):
    fake, updates = generator.apply(
        {"params": g_params, "batch_stats": state.g_stats}, z, train=True,
        mutable=["batch_stats"])
    return fake, _mutated_stats(updates)

  fake, g_vjp, g_stats = jax.vjp(generate, state.g_params, has_aux=True)

  def d_loss_fn(d_params):
    (real_logits, fake_logits), updates = discriminator.apply(
        {"params": d_params, "batch_stats": state.d_stats},
        (real, jax.lax.stop_gradient(fake)), train=True,
        mutable=["batch_stats"])
    loss = (jnp.mean(jax.nn.softplus(-real_logits))
            + jnp.mean(jax.nn.softplus(fake_logits)))
    return loss, (_mutated_stats(updates), real_logits, fake_logits)

  (d_loss, (d_stats, real_logits, fake_logits)), d_grads = (
      jax.value_and_grad(d_loss_fn, has_aux=True)(state.d_params))
  d_updates, d_opt = tx.update(d_grads, state.d_opt, state.d_params)
  d_params = optax.apply_updates(state.d_params, d_updates)

  def g_loss_fn(fake):
    batches = ((real, fake) if spec.discriminator_norm == "batch_joint"
               else (fake,))
    logits, updates = discriminator.apply(
        {"params": d_params, "batch_stats": d_stats}, batches, train=True,
        mutable=["batch_stats"])
    # Non-saturating: G maximizes log D(G(z)).
    return jnp.mean(jax.nn.softplus(-logits[-1])), _mutated_stats(updates)

  (g_loss, d_stats), fake_grad = jax.value_and_grad(
      g_loss_fn, has_aux=True)(fake)
  g_grads, = g_vjp(fake_grad)
  g_updates, g_opt = tx.update(g_grads, state.g_opt, state.g_params)
  new_state = state._replace(
      step=state.step + 1,
      g_params=optax.apply_updates(state.g_params, g_updates),
      g_stats=g_stats, g_opt=g_opt, d_params=d_params, d_stats=d_stats,
      d_opt=d_opt)
  metrics = {"d_loss": d_loss, "g_loss": g_loss,
             "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
             "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits))}
  return new_state, metrics


def train_epoch(state: GANState, data: train.DeviceData, *, spec: GANSpec,
                batches=None) -> tuple[GANState, dict[str, jax.Array]]:
  """`spec.steps_per_epoch` steps as one `lax.scan`; the metrics are the
  means over those steps. The batches are the run's `train.epoch_batches`
  (a permutation per epoch of the run's data key) unless given."""
  if batches is None:
    batches = train.epoch_batches(
        state.data_key, state.step // spec.steps_per_epoch,
        data.train_images.shape[0], spec)

  def body(state, indices):
    return train_step(state, spec.images(data.train_images[indices]),
                      spec=spec)

  state, metrics = jax.lax.scan(body, state, batches)
  return state, jax.tree.map(jnp.mean, metrics)


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="states")
def sweep_epoch(states: GANState, data: train.DeviceData, *, spec: GANSpec):
  """One epoch of K stacked runs (seeds), vmapped: one compiled program."""
  return train.over_runs(train_epoch, spec)(states, data)


# ----------------------------------------------------------------------------
# Sampling and evaluation.

EVAL_NOISE_SEED = 20160101  # every variant and seed is evaluated on one z


def eval_latents(num: int, latent_dim: int) -> jax.Array:
  """The fixed z of evaluation and of the sample grids: z_i from its own
  key, so that the first n of any `num` are the same (the grids show the
  first evaluation samples; chunked sampling rounds `num` up)."""
  key = jax.random.key(EVAL_NOISE_SEED)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                              (latent_dim,)))(
                                                  jnp.arange(num))


def generate(spec: GANSpec, g_params, g_stats, z, *,
             use_running_average: bool = True) -> jax.Array:
  """G's images for `z`, in [0, 1]: (N, 28, 28) for one channel, else
  (N, 28, 28, C). use_running_average=False
  normalizes with the statistics of `z`'s batch, as in training (G's BN
  only; nothing is updated)."""
  variables = {"params": g_params, "batch_stats": g_stats}
  generator = spec.generator()
  if use_running_average:
    images = generator.apply(variables, z, train=False)
  else:
    images, _ = generator.apply(variables, z, train=True,
                                mutable=["batch_stats"])
  images = spec.to_unit(images)
  return images[..., 0] if spec.image_channels == 1 else images


def to_uint8(images) -> jax.Array:
  return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("spec", "num"))
def sample_grid(states: GANState, *, spec: GANSpec, num: int) -> jax.Array:
  """(K, num, 28, 28) uint8 samples of K stacked runs, eval mode, on the
  first `num` evaluation latents (the same z for every run and epoch)."""
  z = eval_latents(num, spec.latent_dim)
  return jax.vmap(lambda s: to_uint8(generate(spec, s.g_params, s.g_stats,
                                              z)))(states)


def penultimate_layer(classifier: train.TrainSpec) -> str:
  """The classifier's last hidden block, whose outputs are the features."""
  return f"hidden_{len(classifier.widths) - 1}"


def classify(classifier: train.TrainSpec, variables, pixels,
             ) -> tuple[jax.Array, jax.Array]:
  """(penultimate features, predicted labels) of [0, 1] pixels (N, 784) by
  the classifier in eval mode."""
  layer = penultimate_layer(classifier)
  logits, captured = classifier.make_model({}).apply(
      variables, pixels, train=False, mutable=["intermediates"],
      capture_intermediates=lambda module, method: (
          module.name == layer and method == "__call__"))
  features = captured["intermediates"][layer]["__call__"][0]
  return features, jnp.argmax(logits, axis=-1)


def chunked(fn, inputs, chunk: int, num: int):
  """fn over `inputs`' leading axis in chunks of `chunk` (lax.map, so that
  the classifier's im2col copies stay small), the first `num` results."""
  pad = (-inputs.shape[0]) % chunk
  inputs = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1))
  out = jax.lax.map(fn, inputs.reshape(-1, chunk, *inputs.shape[1:]))
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:num], out)


@functools.partial(jax.jit, static_argnames=(
    "spec", "classifier", "num", "chunk", "batch"))
def sample_features(states: GANState, classifier_variables, *,
                    spec: GANSpec, classifier: train.TrainSpec, num: int,
                    chunk: int, batch: int | None = None):
  """For K stacked runs: the classifier's features (K, num, F) and labels
  (K, num) of `num` samples on the evaluation latents, in chunks of
  `chunk`.

  batch=None: G in eval mode (running statistics). An int: G normalizes
  each `batch` consecutive latents with their own statistics, as in
  training (a vmap over the chunk's batches: an unnamed axis keeps
  separate statistics); `chunk` must be a multiple of it. The latents fill
  whole chunks, so that no padding enters a batch's statistics; the
  samples past `num` are dropped.
  """
  if batch is not None and chunk % batch:
    raise ValueError(f"chunk={chunk} is not a multiple of batch={batch}.")
  z = eval_latents(-(-num // chunk) * chunk, spec.latent_dim)

  def one_run(state):
    def one_chunk(z):
      if batch is None:
        images = generate(spec, state.g_params, state.g_stats, z)
      else:
        images = jax.vmap(lambda z: generate(
            spec, state.g_params, state.g_stats, z,
            use_running_average=False))(z.reshape(-1, batch, z.shape[-1]))
      return classify(classifier, classifier_variables,
                      images.reshape(z.shape[0], -1))
    return chunked(one_chunk, z, chunk, num)

  return jax.vmap(one_run)(states)


@functools.partial(jax.jit, static_argnames=("classifier", "chunk"))
def real_features(classifier_variables, pixels, *,
                  classifier: train.TrainSpec, chunk: int):
  """The classifier's (features, labels) of uint8 images (N, 784)."""
  return chunked(
      lambda x: classify(classifier, classifier_variables,
                         data_lib.scale_pixels(x, "unit")),
      pixels, chunk, pixels.shape[0])


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (unbiased) of (N, F) features, float64."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
  """The Frechet distance between N(mean1, cov1) and N(mean2, cov2):
  |mean1 - mean2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

  The matrix square root is scipy.linalg.sqrtm's (scipy comes with jax).
  As in the FID's reference code, a product that is singular to working
  precision is regularized with 1e-6 on the diagonals, and the imaginary
  part that rounding leaves is dropped.
  """
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
  cov1 = np.atleast_2d(np.asarray(cov1, np.float64))
  cov2 = np.atleast_2d(np.asarray(cov2, np.float64))
  with warnings.catch_warnings():
    # Features that are always 0 (dead ReLU units) make both covariances
    # singular; sqrtm warns, and its result is checked here instead.
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    root = linalg.sqrtm(cov1 @ cov2)
    if not np.all(np.isfinite(root)):
      offset = 1e-6 * np.eye(cov1.shape[0])
      root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
  diff = mean1 - mean2
  distance = (diff @ diff + np.trace(cov1) + np.trace(cov2)
              - 2.0 * np.trace(np.real(root)))
  return max(float(distance), 0.0)  # not -1e-15 for equal distributions


def coverage(labels, num_classes: int = data_lib.NUM_CLASSES,
             ) -> tuple[float, int]:
  """(entropy in nats of the predicted-label histogram, the number of
  classes with at least COVERAGE_MIN_SHARE of the labels). Ten equally
  used classes give ln 10 = 2.303 and 10; a collapse onto one, 0 and 1."""
  counts = np.bincount(np.asarray(labels).ravel(), minlength=num_classes)
  share = counts / counts.sum()
  used = share[share > 0]
  return (float(-np.sum(used * np.log(used))) + 0.0,  # 0.0, not -0.0
          int(np.sum(share >= COVERAGE_MIN_SHARE)))


def sample_metrics(features, labels, real_statistics) -> dict[str, Any]:
  """SAMPLE_METRICS of one run's samples against the real images'
  (mean, covariance); None where the samples are not finite."""
  entropy, classes = coverage(labels)
  features = np.asarray(features)
  distance = (frechet_distance(*feature_statistics(features),
                               *real_statistics)
              if np.all(np.isfinite(features)) else None)
  return {"coverage_entropy": entropy, "classes_5pct": classes,
          "frechet_distance": distance}


# ----------------------------------------------------------------------------
# The study's config: checks before anything is loaded or compiled.

ConfigError = sweep.ConfigError


def _check_ints(field: str, values, length: int | None = None,
                minimum: int = 1) -> None:
  ok = (isinstance(values, (tuple, list)) and len(values) > 0
        and (length is None or len(values) == length)
        and all(sweep.is_int(v) and v >= minimum for v in values))
  sweep.check(ok, field, values,
              f"must be a tuple of {length or 'one or more'} integers >= "
              f"{minimum}")


def validate_config(config) -> None:
  """Raises ConfigError (a ValueError), one line naming the field, for a
  config that cannot run; the data-dependent checks come after loading
  (`validate_data_size`)."""
  sweep.check_choices("generator_norms", config.generator_norms,
                      GENERATOR_NORMS)
  sweep.check_choices("discriminator_norms", config.discriminator_norms,
                      DISCRIMINATOR_NORMS)
  sweep.check(config.output in OUTPUTS, "output", config.output,
              f"is not valid; choose one of {OUTPUTS}")
  convs = ("auto", *models.CONVS)
  sweep.check(config.conv in convs, "conv", config.conv,
              f"is not valid; choose one of {convs}")
  sweep.check(config.data_source in data_lib.SOURCES, "data_source",
              config.data_source, f"is not valid; choose one of "
              f"{data_lib.SOURCES}")
  for field in ("latent_dim", "batch_size", "steps_per_epoch", "num_epochs",
                "keep_checkpoints", "eval.num_samples", "eval.grid_samples",
                "eval.epoch_grid_samples", "eval.chunk",
                "classifier.batch_size", "classifier.num_epochs"):
    value = sweep.get_dotted(config, field)
    sweep.check(sweep.is_int(value) and value > 0, field, value,
           "must be a positive integer")
  sweep.check(config.batch_size >= 2, "batch_size", config.batch_size,
              "must be at least 2 (batch statistics of one example are 0)")
  curve = config.eval.curve_samples
  sweep.check(sweep.is_int(curve) and curve >= 0, "eval.curve_samples", curve,
         "must be an integer >= 0 (0: no evaluation per epoch)")
  for field in ("eval.num_samples", "eval.curve_samples"):
    value = sweep.get_dotted(config, field)
    sweep.check(value == 0 or value >= 2, field, value,
                "must be at least 2 (a covariance needs two samples)")
  grid = config.eval.grid_samples
  sweep.check(math.isqrt(grid) ** 2 == grid, "eval.grid_samples", grid,
              "must be a square (an n x n grid)")
  steps = config.classifier.steps_per_epoch
  sweep.check(steps is None or (sweep.is_int(steps) and steps > 0),
         "classifier.steps_per_epoch", steps,
         "must be None (whole epochs) or a positive integer")
  _check_ints("generator_channels", config.generator_channels, 2)
  _check_ints("discriminator_channels", config.discriminator_channels, 2)
  _check_ints("classifier.widths", config.classifier.widths)
  _check_ints("classifier.channels", config.classifier.channels)
  sweep.check(config.classifier.model in models.MODELS, "classifier.model",
              config.classifier.model, f"is not valid; choose one of "
              f"{models.MODELS}")
  sweep.check(config.classifier.placement in models.PLACEMENTS,
              "classifier.placement", config.classifier.placement,
              f"is not valid; choose one of {models.PLACEMENTS}")
  momentum = config.classifier.bn_momentum
  sweep.check(sweep.is_number(momentum) and 0 <= momentum <= 1,
         "classifier.bn_momentum", momentum, "must be a number in [0, 1]")
  for field in ("learning_rate", "classifier.learning_rate"):
    value = sweep.get_dotted(config, field)
    sweep.check(sweep.is_number(value) and value > 0, field, value,
           "must be a number > 0")
  for field in ("b1", "b2"):
    value = config[field]
    sweep.check(sweep.is_number(value) and 0 <= value < 1, field, value,
           "must be a number in [0, 1)")
  seeds = config.seeds
  sweep.check(isinstance(seeds, (tuple, list)) and len(seeds) > 0
              and all(sweep.is_int(s) for s in seeds)
              and len(set(seeds)) == len(seeds),
              "seeds", seeds, "must be a non-empty tuple of distinct integers")
  for field in ("data_seed", "classifier.seed"):
    value = sweep.get_dotted(config, field)
    sweep.check(value is None or sweep.is_int(value), field, value,
           "must be an integer" + (" or None" if field == "data_seed" else ""))
  try:
    models.check_norm_options(dict(config.bn))
    unread = set(config.bn) - set(models.NORM_FIELDS["batch"])
    if unread:
      raise ValueError(f"config.bn has fields neither BatchNorm nor "
                       f"LayerNorm reads: {sorted(unread)}.")
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate_data_size(config, num_train: int) -> None:
  """The checks that need the training set's size."""
  used = config.steps_per_epoch * config.batch_size
  sweep.check(used <= num_train, "steps_per_epoch", config.steps_per_epoch,
              f"x batch_size {config.batch_size} = {used} examples per "
              f"epoch; the training set has {num_train} (each epoch draws "
              "without replacement)")
  sweep.check(config.classifier.batch_size <= num_train,
              "classifier.batch_size", config.classifier.batch_size,
              f"is more than the {num_train} training examples")


def variants(config) -> list[tuple[str, str]]:
  """(generator_norm, discriminator_norm) of every variant, in order."""
  return list(itertools.product(config.generator_norms,
                                config.discriminator_norms))


def variant_name(generator_norm: str, discriminator_norm: str) -> str:
  return f"G-{generator_norm}_D-{discriminator_norm}"


def make_spec(config, generator_norm: str, discriminator_norm: str,
              ) -> GANSpec:
  """The static part of one variant's program."""
  return GANSpec(
      generator_norm=generator_norm, discriminator_norm=discriminator_norm,
      latent_dim=config.latent_dim,
      generator_channels=tuple(config.generator_channels),
      discriminator_channels=tuple(config.discriminator_channels),
      output=config.output, conv=config.conv,
      bn=tuple(sorted(dict(config.bn).items())),
      learning_rate=config.learning_rate, b1=config.b1, b2=config.b2,
      batch_size=config.batch_size, steps_per_epoch=config.steps_per_epoch,
      num_epochs=config.num_epochs, data_seed=config.data_seed)


def classifier_spec(config, num_train: int) -> train.TrainSpec:
  """The evaluation classifier's training spec: BN, Adam, relu."""
  c = config.classifier
  steps = num_train // c.batch_size
  if c.steps_per_epoch is not None:
    steps = min(steps, c.steps_per_epoch)
  return train.TrainSpec(
      model=c.model, placement=c.placement, widths=tuple(c.widths),
      channels=tuple(c.channels), conv=config.conv, norm="batch",
      bn=(("momentum", c.bn_momentum),), batch_size=c.batch_size,
      steps_per_epoch=steps, num_epochs=c.num_epochs)


# ----------------------------------------------------------------------------
# The study: classifier, variants, workdir.


def train_classifier(config, data: train.DeviceData, directory: Path,
                     ) -> tuple[train.TrainSpec, Any, dict[str, Any]]:
  """(spec, variables, summary) of the evaluation classifier: loaded from
  `directory` when a previous run saved it there, else trained (bn_jax.
  train) and saved (variables.msgpack, then classifier.json, both atomic:
  the json marks a complete save)."""
  spec = classifier_spec(config, data.train_images.shape[0])
  summary_path = directory / "classifier.json"
  variables_path = directory / "variables.msgpack"
  if summary_path.exists():
    variables = flax.serialization.msgpack_restore(
        variables_path.read_bytes())
    summary = json.loads(summary_path.read_text())
    logging.info("classifier: loaded from %s (test accuracy %.4f)",
                 directory, summary["test_accuracy"])
    return spec, variables, summary
  started = time.perf_counter()
  states = train.create_sweep_states(
      spec, [config.classifier.seed],
      {"learning_rate": [config.classifier.learning_rate]})
  for epoch in range(1, spec.num_epochs + 1):
    states, metrics = train.sweep_epoch(states, data, spec=spec)
    metrics = jax.device_get(metrics)
    logging.info("classifier: epoch %d/%d  train loss %.4f  test accuracy "
                 "%.4f", epoch, spec.num_epochs, metrics["train_loss"][0],
                 metrics["test_accuracy"][0])
  variables = jax.device_get({"params": states.params,
                              "batch_stats": states.batch_stats})
  variables = jax.tree.map(lambda x: np.asarray(x[0]), variables)
  summary = {
      "model": spec.model, "channels": list(spec.channels),
      "widths": list(spec.widths), "placement": spec.placement,
      "steps": spec.total_steps, "batch_size": spec.batch_size,
      "test_accuracy": float(metrics["test_accuracy"][0]),
      "features": spec.widths[-1],
      "train_time": time.perf_counter() - started}
  directory.mkdir(parents=True, exist_ok=True)
  with workdir_lib.atomic_file(variables_path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(variables))
  workdir_lib.write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
  return spec, variables, summary


def _real_reference(config, data, classifier, variables):
  """The real test images' feature statistics (what samples are compared
  with) and, as a floor for the metrics, the same metrics of as many real
  training images as each run's samples."""
  test_features, test_labels = jax.device_get(real_features(
      variables, data.test_images, classifier=classifier,
      chunk=config.eval.chunk))
  statistics = feature_statistics(test_features)
  num = min(config.eval.num_samples, data.train_images.shape[0])
  train_features, train_labels = jax.device_get(real_features(
      variables, data.train_images[:num], classifier=classifier,
      chunk=config.eval.chunk))
  entropy, classes = coverage(test_labels)
  reference = {
      "test_images": int(test_features.shape[0]),
      "test_coverage_entropy": entropy, "test_classes_5pct": classes,
      "train_images": num,
      **{f"train_{k}": v for k, v in sample_metrics(
          train_features, train_labels, statistics).items()}}
  return statistics, reference


def finite(value):
  value = float(value)
  return value if math.isfinite(value) else None


def save_npy(path: Path, array) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with workdir_lib.atomic_file(path, "wb") as f:
    np.save(f, np.asarray(array))


def _evaluate(states, spec, config, classifier, classifier_variables,
              real_statistics, num: int, batch: int | None = None,
              ) -> list[dict[str, Any]]:
  """SAMPLE_METRICS of each run's `num` samples (`sample_features`)."""
  chunk = config.eval.chunk
  if batch is not None:  # whole batches per chunk
    chunk = max(1, chunk // batch) * batch
  features, labels = jax.device_get(sample_features(
      states, classifier_variables, spec=spec, classifier=classifier,
      num=num, chunk=chunk, batch=batch))
  return [sample_metrics(f, l, real_statistics)
          for f, l in zip(features, labels)]


def initial_states(spec: GANSpec, seeds, manager, recorded: int):
  """(epoch, states) from the newest checkpoint that loads, up to the
  `recorded` epochs of metrics rows, else (0, fresh states), as the
  classifier studies do (`checkpoints.restore_or_create`)."""
  return checkpoints.restore_or_create(manager, functools.partial(
      create_states, jnp.asarray(seeds, jnp.int32), spec=spec), recorded)


def result_header(name, generator_norm, discriminator_norm, seeds, spec,
                  train_time, compile_time, eval_time) -> dict[str, Any]:
  """The fields every GAN study's per-variant result starts with."""
  return {"variant": name, "generator_norm": generator_norm,
          "discriminator_norm": discriminator_norm, "seeds": seeds,
          "steps": spec.steps_per_epoch * spec.num_epochs,
          "train_time": train_time, "compile_time": compile_time,
          "eval_time": eval_time}


def train_variant(config, generator_norm: str, discriminator_norm: str,
                  data: train.DeviceData, workdir: Path, writer,
                  classifier, classifier_variables, real_statistics,
                  ) -> dict[str, Any]:
  """Trains one variant's runs (seeds, vmapped), resuming from its
  checkpoints; writes its metrics rows and sample grids, evaluates the
  final states and returns the variant's entry of results.json (which
  `run` saves as variants/<name>.json)."""
  name = variant_name(generator_norm, discriminator_norm)
  spec = make_spec(config, generator_norm, discriminator_norm)
  seeds = list(config.seeds)
  samples_dir = workdir / "samples" / name

  def after_epoch(states, epoch):
    curve = ([{} for _ in seeds] if not config.eval.curve_samples else
             _evaluate(states, spec, config, classifier,
                       classifier_variables, real_statistics,
                       config.eval.curve_samples))
    save_npy(samples_dir / f"epoch_{epoch:03d}.npy", sample_grid(
        states, spec=spec, num=config.eval.epoch_grid_samples))
    distances = [c.get("frechet_distance") for c in curve]
    shown = ("" if not config.eval.curve_samples else
             "  FD %s  classes %s" % (
                 _mean_std([d for d in distances if d is not None]),
                 _mean_std([c["classes_5pct"] for c in curve])))
    return curve, shown

  states, wall, compile_time = train_epochs(
      config, spec, name, (generator_norm, discriminator_norm), data,
      workdir, writer, after_epoch)
  started = time.perf_counter()
  final = {"eval_mode": _evaluate(states, spec, config, classifier,
                                  classifier_variables, real_statistics,
                                  config.eval.num_samples)}
  if generator_norm == "batch":  # the other layers keep no statistics
    final["batch_stats_mode"] = _evaluate(
        states, spec, config, classifier, classifier_variables,
        real_statistics, config.eval.num_samples, batch=spec.batch_size)
  save_npy(samples_dir / "final.npy", sample_grid(
      states, spec=spec, num=config.eval.grid_samples))
  result = {
      **result_header(name, generator_norm, discriminator_norm, seeds, spec,
                      wall, compile_time, time.perf_counter() - started),
      **{mode: {k: [run[k] for run in runs] for k in SAMPLE_METRICS}
         for mode, runs in final.items()}}
  logging.info("[%s] %d samples per run: entropy %s  classes >= 5%% %s  "
               "FD %s  (evaluated in %.1f s)", name, config.eval.num_samples,
               _mean_std(result["eval_mode"]["coverage_entropy"]),
               _mean_std(result["eval_mode"]["classes_5pct"]),
               _mean_std([d for d in result["eval_mode"]["frechet_distance"]
                          if d is not None]), result["eval_time"])
  return result


def train_epochs(config, spec: GANSpec, name: str, norms: tuple[str, str],
                 data, workdir: Path, writer, after_epoch):
  """One variant's seeds (vmapped) epoch by epoch, resuming from its
  checkpoints: after each epoch, after_epoch(states, epoch) -> (a dict of
  curve metrics per seed, a text for the log line); one metrics row per
  seed and epoch, then a checkpoint. Returns (states, training wall time,
  compile time: that of the first epoch this process trained)."""
  seeds = list(config.seeds)
  with contextlib.closing(checkpoints.manager(
      workdir / "checkpoints" / name, config.keep_checkpoints)) as manager:
    recorded = workdir_lib.recorded_epochs(writer.rows(), name, len(seeds))
    start_epoch, states = initial_states(spec, seeds, manager, recorded)
    kept = writer.forget_after(name, start_epoch, spec.steps_per_epoch)
    wall = kept[-1]["wall_time"] if kept else 0.0
    if start_epoch:
      logging.info("[%s] resumed from the checkpoint of epoch %d", name,
                   start_epoch)
    compile_time = None
    for epoch in range(start_epoch + 1, spec.num_epochs + 1):
      started = time.perf_counter()
      states, metrics = sweep_epoch(states, data, spec=spec)
      metrics = jax.device_get(metrics)
      epoch_time = time.perf_counter() - started
      if compile_time is None:
        compile_time = epoch_time  # compile + one epoch
      curve, shown = after_epoch(states, epoch)
      wall += time.perf_counter() - started
      writer.write([{
          "combo": name, "generator_norm": norms[0],
          "discriminator_norm": norms[1], "run": i, "seed": seed,
          "epoch": epoch, "step": epoch * spec.steps_per_epoch,
          "wall_time": wall,
          **{k: finite(metrics[k][i]) for k in TRAIN_METRICS},
          **({"eval_samples": config.eval.curve_samples, **curve[i]}
             if curve[i] else {})} for i, seed in enumerate(seeds)])
      checkpoints.save(manager, epoch, states)
      logging.info("[%s] epoch %d/%d  d_loss %.3f  g_loss %.3f  D(x) %.2f  "
                   "D(G(z)) %.2f%s  %.1f s", name, epoch, spec.num_epochs,
                   np.mean(metrics["d_loss"]), np.mean(metrics["g_loss"]),
                   np.mean(metrics["d_real"]), np.mean(metrics["d_fake"]),
                   shown, epoch_time)
    writer.close()
  return states, wall, compile_time


def _mean_std(values) -> str:
  if not values:
    return "n/a"
  return f"{np.mean(values):.3g} +- {np.std(values):.2g}"


def train_variants(variants, workdir: Path, started: float, train_one
                   ) -> list[dict[str, Any]]:
  """Each (generator norm, discriminator norm) of `variants` in order:
  train_one(g_norm, d_norm, metrics writer) -> its result, kept in
  <workdir>/variants/<name>.json, so that a rerun skips the finished
  ones. Returns the results, in order."""
  writer = workdir_lib.MetricsWriter(workdir, TRAIN_METRICS)
  results = []
  for i, (g_norm, d_norm) in enumerate(variants, 1):
    name = variant_name(g_norm, d_norm)
    done = workdir / "variants" / f"{name}.json"
    if done.exists():
      logging.info("[%s] finished before; skipped (%d/%d)", name, i,
                   len(variants))
      results.append(json.loads(done.read_text()))
      continue
    logging.info("[%s] variant %d/%d, %.0f s into the study", name, i,
                 len(variants), time.perf_counter() - started)
    result = train_one(g_norm, d_norm, writer)
    done.parent.mkdir(exist_ok=True)
    workdir_lib.write_atomic(done, json.dumps(result, indent=2) + "\n")
    results.append(result)
  return results


def load_data(config) -> tuple[train.DeviceData, str]:
  """The study's `load_data`: the data set on the device, checked against
  the config's batch sizes."""
  data, origin = classifier.load_data(config)
  num_train = data.train_images.shape[0]
  validate_data_size(config, num_train)
  logging.info("data: %s from %s; %d train / %d test images", config.dataset,
               origin, num_train, data.test_images.shape[0])
  return data, origin


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`: the GAN study of `context.config` in
  `context.workdir` (bn_lab.runner.run has checked the config and the
  workdir, holds its lock, loaded the data and written config.json; it
  writes results.json from what this returns). Written here:

    classifier/         the evaluation classifier's variables and summary
    metrics.jsonl       one row per variant, seed and epoch (+ tensorboard/)
    checkpoints/<variant>/  the runs' states after the last epoch(s)
    samples/<variant>/  epoch_NNN.npy (K, 16, 28, 28) and final.npy
                        (K, 64, 28, 28): uint8 samples on fixed latents
    variants/<variant>.json  a finished variant's evaluation

  A rerun of the same command skips finished variants and resumes the
  others from their last checkpoint. Returns results.json's study part:
  every variant's evaluation, with the real-data reference.
  """
  # One process: the study neither shards nor splits its writes.
  assert context.writes, "the GAN study runs in one process"
  config, workdir, data = context.config, context.workdir, context.data
  started = time.perf_counter()
  all_variants = variants(config)
  logging.info("%d variant(s) x %d seed(s) x %d step(s) on %s",
               len(all_variants), len(config.seeds),
               config.steps_per_epoch * config.num_epochs,
               jax.devices()[0].platform)
  classifier, classifier_variables, classifier_summary = train_classifier(
      config, data, workdir / "classifier")
  real_statistics, reference = _real_reference(
      config, data, classifier, classifier_variables)
  logging.info("real data: test coverage entropy %.3f; train vs test FD "
               "%.3f", reference["test_coverage_entropy"],
               reference["train_frechet_distance"])
  results = train_variants(
      all_variants, workdir, started,
      lambda g_norm, d_norm, writer: train_variant(
          config, g_norm, d_norm, data, workdir, writer, classifier,
          classifier_variables, real_statistics))
  return {
      "study": config.study, "dataset": config.dataset,
      "data_origin": context.origin, "seeds": list(config.seeds),
      "steps": config.steps_per_epoch * config.num_epochs,
      "batch_size": config.batch_size,
      "eval_samples": config.eval.num_samples,
      "classifier": classifier_summary, "reference": reference,
      "variants": results,
      # This process's time; a resumed study's earlier processes are in
      # the variants' train_time.
      "wall_time": time.perf_counter() - started}
