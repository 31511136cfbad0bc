"""MLP and small CNN with a choice of where normalization goes, and which.

Both take MNIST-family inputs: 784 pixels per example (28 x 28, one channel),
10 classes.

Placements (the comparison this project is about), shown for BN:
  none               no normalization.
  before_activation  Dense (no bias, BN's beta replaces it) -> BN -> act,
                     as in Ioffe & Szegedy (2015).
  after_activation   Dense -> act -> BN, as in much Keras example code.
  input              BN on the raw input as the only preprocessing: per pixel
                     (784 features) in the MLP, over the one channel in the
                     CNN, as a conv net normalizes channels.

The layer placed is the model's `norm`: BN or any of the normalization
family (`NORMS`), built from config.bn by `make_norm`.

Sequence models (`SEQUENCE_MODELS`, built by `make_sequence_model`) read
the 784 pixels as a sequence instead: "lstm" is an LSTM layer of
bn_jax.recurrent (BN-LSTM, LN-LSTM or plain) whose last hidden state feeds
a Dense readout. Its normalization sits where the cell puts it (the gates'
pre-activations and the cell state, before their nonlinearities), so of the
placements it takes "before_activation" (that place) and "none" (the plain
LSTM); `activation`, `widths`, `channels` and `conv` are not read.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import core
from bn_jax import free
from bn_jax import nn as bn_nn
from bn_jax import recurrent

from bn_lab import resnet

PLACEMENTS = ("none", "before_activation", "after_activation", "input")
# The classes of the MNIST family: every model's readout (and what the NaN
# guard's divergence threshold scales, train.divergence_threshold).
NUM_CLASSES = 10
ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}
MODELS = ("mlp", "cnn")  # feed-forward classifiers (`make_model`)
# Residual classifiers (`make_model`, bn_lab.resnet): a norm after every
# convolution (placement "before_activation") or none; their layers are
# not MODELS' hidden blocks.
RESIDUAL_MODELS = ("resnet",)
# Norms that are their own nonlinearity: no ReLU after them in a residual
# block; where BN has no ReLU after it, FRN stands without its TLU and the
# EvoNorms as they are (bn_lab.resnet's plain_norm).
NORMS_WITH_ACTIVATION = {"frn", "evonorm_b0", "evonorm_s0"}
# Classifiers of the image read as a sequence (`make_sequence_model`); kept
# apart from MODELS, whose models have hidden blocks (hidden_<i>) that
# probes, PreciseBN and the GAN's feature extractor read.
SEQUENCE_MODELS = ("lstm",)


ModuleDef = Callable[..., nn.Module]


class _NormBlock(nn.Module):
  """One hidden layer: a linear map, the activation and the normalization
  layer where placed."""
  make_linear: ModuleDef
  activation: str
  placement: str
  norm: ModuleDef
  norm_has_bias: bool = True  # before the norm, its beta replaces the bias

  @nn.compact
  def __call__(self, x, *, train: bool):
    act = ACTIVATIONS[self.activation]
    if self.placement == "before_activation":
      linear = self.make_linear(use_bias=not self.norm_has_bias)
      return act(self.norm()(linear(x), use_running_average=not train))
    x = act(self.make_linear(use_bias=True)(x))
    if self.placement == "after_activation":
      x = self.norm()(x, use_running_average=not train)
    return x


class _Classifier(nn.Module):
  """Shared frame: optional input BN, hidden blocks, linear readout.

  `norm` is the normalization layer with all its options bound (`make_norm`
  builds it from `config.bn`), still to be named and placed: the model only
  decides where it goes, as in flax's ImageNet example.
  """
  placement: str = "after_activation"
  activation: str = "relu"
  num_classes: int = NUM_CLASSES
  norm: ModuleDef = bn_nn.BatchNorm
  norm_has_bias: bool = True  # False: the layers before it keep their bias
  # The Dense layers' kernel initializer (`kernel_initializer`).
  dense_init: Callable[..., Any] = nn.linear.default_kernel_init

  def dense(self, features: int):
    """A function use_bias -> Dense: a plain closure, not a method, so that
    the block that calls it owns the layer (a Module method would)."""
    return functools.partial(nn.Dense, features, kernel_init=self.dense_init)

  def check(self):
    if self.placement not in PLACEMENTS:
      raise ValueError(f"placement={self.placement!r}; choose one of "
                       f"{PLACEMENTS}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; choose one of "
                       f"{tuple(ACTIVATIONS)}.")

  def block(self, make_linear, name):
    return _NormBlock(make_linear=make_linear, activation=self.activation,
                      placement=self.placement, norm=self.norm,
                      norm_has_bias=self.norm_has_bias, name=name)


class Conv(nn.Module):
  """flax.linen.Conv with "SAME" padding (and `strides`), computed as one
  matmul over the kh * kw shifted (strided) slices of the padded input
  (im2col). studies.gan.gan's discriminator uses it at stride 2.

  Why: XLA:CPU runs the weight gradient of a 3x3 convolution as a generic
  convolution, far below its matmul rate; as a matmul it takes the fast
  path (the CNN's step against flax.linen.Conv: benchmarks/cnn_conv.py,
  figures in benchmarks/README.md). The shifted copies take kh * kw times
  the input's memory: 29 MB for the second conv of a training batch of 128,
  226 MB per run for an evaluation chunk of 1000 (TrainSpec.eval_chunk;
  times K in a vmapped sweep). Named `Conv` so that its parameters
  sit where flax.linen.Conv's do (same names, shapes and initializers, hence
  the same initial values); tests/test_models.py checks outputs and
  gradients (to float rounding) and init (exactly) against flax.linen.Conv.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  use_bias: bool = True
  # The kernel as used: "none" (as stored), "ws" (Weight Standardization)
  # or "scaled" (Scaled WS with a learned gain and ReLU's gamma, the
  # NF-ResNets'): bn_jax.free.weight_standardize, timm's epsilon 1e-6.
  standardize: str = "none"

  @nn.compact
  def __call__(self, x):
    (kh, kw), (sh, sw) = self.kernel_size, self.strides
    if (sh, sw) == (1, 1) and (kh % 2 == 0 or kw % 2 == 0):
      raise ValueError(f"kernel_size={tuple(self.kernel_size)}: odd sizes "
                       "only at stride 1 (SAME padding, centred).")
    if self.standardize not in STANDARDIZATIONS:
      raise ValueError(f"standardize={self.standardize!r}; choose one of "
                       f"{STANDARDIZATIONS}.")
    _, height, width, channels = x.shape
    kernel = self.param("kernel", nn.linear.default_kernel_init,
                        (kh, kw, channels, self.features))
    if self.standardize != "none":
      scaled = self.standardize == "scaled"
      gain = (self.param("gain", nn.initializers.ones_init(),
                         (self.features,)) if scaled else None)
      kernel = free.weight_standardize(kernel, eps=1e-6, scaled=scaled,
                                       gain=gain,
                                       gamma=RELU_GAMMA if scaled else 1.0)
    out_h, out_w = -(-height // sh), -(-width // sw)
    # lax's "SAME": the total padding split with the smaller half first
    # (at stride 1 and an odd kernel, k // 2 on each side).
    pad_h = max((out_h - 1) * sh + kh - height, 0)
    pad_w = max((out_w - 1) * sw + kw - width, 0)
    padded = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                         (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    # patches[..., (i * kw + j) * channels + c] =
    #   padded[:, h * sh + i, w * sw + j, c], kernel.reshape's row order.
    patches = jnp.concatenate(
        [padded[:, i:i + (out_h - 1) * sh + 1:sh,
                j:j + (out_w - 1) * sw + 1:sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    y = patches_matmul(patches, kernel.reshape(kh * kw * channels,
                                               self.features))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(),
                        (self.features,))
      y = y + bias.reshape(1, 1, 1, self.features)
    return y


# Weight standardizations of the conv kernels (Conv.standardize).
STANDARDIZATIONS = ("none", "ws", "scaled")
# Scaled WS's gamma for ReLU (Brock et al., 2021): ReLU(x) of x ~ N(0, 1)
# has standard deviation sqrt((1 - 1/pi) / 2), which gamma undoes (timm's
# value, measured by sampling, is 1.7140).
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


def patches_matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """patches (..., k) @ kernel (k, f), as one 2-D matmul.

  Why 2-D: on the 4-D patches, XLA:CPU computed the weight gradient from a
  transposed copy of the output gradient, with a slower dot; flattened, it
  is one (k, m) @ (m, f) product of the patches and the output gradient as
  they lie (benchmarks/cnn_step.py --ab, where the trained parameters come
  out bit for bit the same either way).
  """
  leading = patches.shape[:-1]
  flat = patches.reshape(-1, patches.shape[-1]) @ kernel
  return flat.reshape(*leading, kernel.shape[-1])


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """flax.linen.max_pool(x, (2, 2), strides=(2, 2)) on NHWC with even H and
  W, as a reshape and a max over the two window axes.

  Why: XLA:CPU runs max_pool as reduce-window and its gradient as
  select-and-scatter, both slow generic loops; a reduction's gradient is
  elementwise (benchmarks/cnn_step.py --ab). The gradient differs from
  max_pool's where a window has tied maxima: max_pool sends it all to one
  of them, a reduction splits it evenly (jax's rule for max); both are
  subgradients. Ties are common here: after ReLU -> BN, a window of zeros
  has four equal values.
  """
  n, height, width, c = x.shape
  if height % 2 or width % 2:
    raise ValueError(f"x.shape={x.shape}: 2x2 pooling needs an even height "
                     "and width.")
  return x.reshape(n, height // 2, 2, width // 2, 2, c).max(axis=(2, 4))


class MLP(_Classifier):
  """784 -> hidden widths -> num_classes, on flattened images."""
  widths: Sequence[int] = (50,)

  @nn.compact
  def __call__(self, images, *, train: bool):
    self.check()
    x = images.reshape(images.shape[0], -1)
    if self.placement == "input":
      x = self.norm(name="input_bn")(x, use_running_average=not train)
    for i, width in enumerate(self.widths):
      x = self.block(self.dense(width),
                     name=f"hidden_{i}")(x, train=train)
    return self.dense(self.num_classes)(name="readout")(x)


class CNN(_Classifier):
  """Conv(3x3) blocks with 2x2 max-pooling, then one dense hidden layer.

  `conv` is the convolution module: `Conv` (im2col) or `flax.linen.Conv`,
  which share parameter names and initial values (`CONVS`).
  """
  channels: Sequence[int] = (32, 64)
  widths: Sequence[int] = (128,)
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, images, *, train: bool):
    self.check()
    x = images.reshape(images.shape[0], 28, 28, 1)
    if self.placement == "input":
      x = self.norm(name="input_bn")(x, use_running_average=not train)
    for i, channels in enumerate(self.channels):
      conv = lambda use_bias, c=channels: self.conv(c, (3, 3),
                                                    use_bias=use_bias)
      x = self.block(conv, name=f"conv_{i}")(x, train=train)
      x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.widths):
      x = self.block(self.dense(width),
                     name=f"hidden_{i}")(x, train=train)
    return self.dense(self.num_classes)(name="readout")(x)


# The convolutions a CNN can use (config.conv; "auto" picks by backend).
CONVS: dict[str, ModuleDef] = {"im2col": Conv, "xla": nn.Conv}


def resolve_backend_choice(value: str, on_cpu: str, elsewhere: str,
                           backend: str | None = None) -> str:
  """"auto" -> `on_cpu` on a CPU backend, else `elsewhere`; other values
  pass through. For XLA:CPU work-arounds that only help there."""
  if value != "auto":
    return value
  backend = backend or jax.default_backend()
  return on_cpu if backend == "cpu" else elsewhere


# The normalization layers a model can use (config.norm, config.norms), the
# bn_jax.nn module of each with the arguments that make it that variant, and
# the config.bn fields (arguments of the same name) each reads.
_BN_FIELDS = ("momentum", "epsilon", "unbiased_running_var", "stats_method",
              "grad", "impl")
NORM_MODULES: dict[str, ModuleDef] = {
    "batch": bn_nn.BatchNorm,
    "renorm": functools.partial(bn_nn.BatchNorm, renorm=True),
    "ghost": bn_nn.BatchNorm,
    "sampled": bn_nn.BatchNorm,
    "layer": bn_nn.LayerNorm,
    "group": bn_nn.GroupNorm,
    "instance": bn_nn.InstanceNorm,
    "rms": bn_nn.RMSNorm,
    # The BN-free family (bn_jax.free): per-example, except EvoNorm-B0's
    # batch variance; FRN and EvoNorm-B0 need spatial axes (the CNN's).
    "frn": bn_nn.FRN,
    "evonorm_b0": bn_nn.EvoNormB0,
    "evonorm_s0": bn_nn.EvoNormS0,
}
NORM_FIELDS: dict[str, tuple[str, ...]] = {
    "batch": _BN_FIELDS,
    "renorm": _BN_FIELDS + ("renorm_clipping", "renorm_momentum",
                            "renorm_schedule"),
    "ghost": _BN_FIELDS + ("virtual_batch_size",),
    "sampled": _BN_FIELDS + ("stats_fraction", "stats_examples",
                             "stats_sampling"),
    "layer": ("epsilon",),
    "group": ("epsilon", "num_groups"),
    "instance": ("epsilon",),
    "rms": ("epsilon",),
    "frn": ("epsilon",),
    "evonorm_b0": ("momentum", "epsilon"),
    "evonorm_s0": ("epsilon", "num_groups"),
}
# "none": no normalization layer anywhere (the model's placement "none").
# A list, so that `register_norm` adds to what every check reads.
NORMS = [*NORM_MODULES, "none"]
# Variants whose batch statistics are synchronized over the data axis.
# Ghost batches are chunks of each device's own examples, so that N devices
# compute what one does; the trainer averages their running statistics
# over the devices (train.train_step), as the chunks' are averaged.
SYNCED_NORMS = {"batch", "renorm", "sampled", "evonorm_b0"}
# Variants that draw from the "noise" rng stream in training mode: the
# trainer passes it (train.noise_rngs).
NOISY_NORMS: set[str] = set()
# Layers without a bias (beta): the linear layer before them keeps its own.
NORMS_WITHOUT_BIAS = {"rms"}
# norm -> a config group whose fields it reads besides config.bn's
# (sweep.make_spec merges them into its options).
NORM_CONFIG_GROUPS: dict[str, str] = {}


def register_norm(name: str, module: ModuleDef, fields: Sequence[str], *,
                  synced: bool = False, draws_noise: bool = False,
                  has_bias: bool = True,
                  config_group: str | None = None) -> None:
  """Adds a normalization layer that `config.norm` / `config.norms` can
  name, from a study's own code (e.g. noisy BN, studies/why_bn).

  Args:
    name: its config name.
    module: a flax module taking `fields` as arguments, called as the
      built-in norms are (`use_running_average`, `name`).
    fields: the option fields it reads (config.bn's, and its
      `config_group`'s).
    synced: its batch statistics are synchronized over the data axis.
    draws_noise: it draws from the "noise" rng stream in training mode.
    has_bias: False: the linear layer before it keeps its own bias.
    config_group: a config group (e.g. "noisy_bn") whose fields it reads.
  """
  if name in NORM_MODULES and NORM_MODULES[name] is not module:
    raise ValueError(f"a norm named {name!r} is already registered.")
  NORM_MODULES[name] = module
  NORM_FIELDS[name] = tuple(fields)
  if name not in NORMS:
    NORMS.insert(NORMS.index("none"), name)
  for names, yes in ((SYNCED_NORMS, synced), (NOISY_NORMS, draws_noise),
                     (NORMS_WITHOUT_BIAS, not has_bias)):
    if yes:
      names.add(name)
  if config_group:
    NORM_CONFIG_GROUPS[name] = config_group


# config.bn fields with a fixed set of values, checked by `check_norm_options`.
NORM_CHOICES = {
    "stats_method": core.STATS_METHODS,
    "grad": core.GRAD_MODES,
    "impl": core.IMPL_CHOICES,
    "stats_sampling": core.STATS_SAMPLINGS,
    "renorm_schedule_unit": ("fraction", "steps"),
}


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_norm_options(options: Mapping[str, Any]) -> None:
  """Rejects a bad config.bn value with a message naming the field; an
  absent field (the layer's default) is not checked."""
  for name, valid in NORM_CHOICES.items():
    if name in options and options[name] not in valid:
      raise ValueError(f"config.bn.{name}={options[name]!r} is not valid; "
                       f"choose one of {tuple(valid)}.")
  for name in ("momentum", "renorm_momentum"):
    value = options.get(name)
    if value is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
      raise ValueError(
          f"config.bn.{name}={value!r} must be a number in [0, 1] (flax "
          "convention; PyTorch's momentum is 1 - this)"
          + (" or None (exact cumulative average)." if name == "momentum"
             else "."))
  epsilon = options.get("epsilon", 1.0)
  if not _is_number(epsilon):
    raise ValueError(f"config.bn.epsilon={epsilon!r} must be a number > 0.")
  problem = core.epsilon_problem(epsilon)  # the layers' own rule
  if problem is not None:
    raise ValueError(f"config.bn.epsilon={epsilon!r} {problem}.")
  if not isinstance(options.get("unbiased_running_var", False), bool):
    raise ValueError("config.bn.unbiased_running_var="
                     f"{options['unbiased_running_var']!r} must be True or "
                     "False.")
  for name in ("virtual_batch_size", "num_groups"):
    value = options.get(name, 1)
    if not (isinstance(value, numbers.Integral) and not isinstance(
        value, bool) and value > 0):
      raise ValueError(f"config.bn.{name}={value!r} must be a positive "
                       "integer.")
  fraction = options.get("stats_fraction", 1.0)
  if not (_is_number(fraction) and 0.0 < fraction <= 1.0):
    raise ValueError(f"config.bn.stats_fraction={fraction!r} must be a "
                     "number in (0, 1].")
  _check_renorm(options)
  unknown = set(options) - {f for fields in NORM_FIELDS.values()
                            for f in fields} - {"renorm_schedule_unit"}
  unknown -= {f for n, fields in NORM_FIELDS.items()
              if n in NORM_CONFIG_GROUPS for f in fields}
  if unknown:
    raise ValueError(f"config.bn has fields no normalization layer takes: "
                     f"{sorted(unknown)}; see bn_lab.models.NORM_FIELDS.")


def _check_renorm(options: Mapping[str, Any]) -> None:
  """renorm_clipping and renorm_schedule, checked by the core's own rules
  once the schedule's form (and, in fractions, range) is known."""
  schedule = options.get("renorm_schedule")
  unit = options.get("renorm_schedule_unit", "steps")
  limit = 1.0 if unit == "fraction" else math.inf
  if schedule is not None and not (
      isinstance(schedule, (tuple, list)) and len(schedule) == 3
      and all(_is_number(v) and 0 <= v <= limit for v in schedule)
      and schedule[0] <= min(schedule[1:])):
    raise ValueError(
        f"config.bn.renorm_schedule={schedule!r} must be (hold, rmax_at, "
        f"dmax_at), {unit} of training with hold <= rmax_at, dmax_at"
        + (", each in [0, 1]" if unit == "fraction" else "")
        + ", e.g. the paper's (5000, 40000, 25000) steps.")
  try:
    core.renorm_limits(0, options.get("renorm_clipping"),
                       renorm_schedule_steps(schedule, unit, 10**6))
  except ValueError as e:
    raise ValueError(f"config.bn.{e}") from None


def renorm_schedule_steps(schedule, unit: str, total_steps: int,
                          ) -> tuple[int, int, int] | None:
  """config.bn.renorm_schedule in steps: fractions of `total_steps` are
  rounded to whole steps, so that a short run still relaxes its limits."""
  if schedule is None:
    return None
  if unit == "steps":
    return tuple(int(v) for v in schedule)
  return tuple(int(round(v * total_steps)) for v in schedule)


def norm_options(norm: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The module arguments of `norm` among `options` (config.bn's fields):
  only the ones it reads, `renorm_clipping` as hashable sorted pairs."""
  if norm not in NORM_MODULES:
    raise ValueError(f"norm={norm!r}; choose one of {tuple(NORMS)}.")
  chosen = {k: v for k, v in options.items() if k in NORM_FIELDS[norm]}
  if "renorm_clipping" in chosen:
    chosen["renorm_clipping"] = core.renorm_clipping_pairs(
        chosen["renorm_clipping"])
  if chosen.get("renorm_schedule") is not None:
    chosen["renorm_schedule"] = tuple(chosen["renorm_schedule"])
  # A number of examples, if given, instead of the fraction.
  if chosen.get("stats_examples") is not None:
    del chosen["stats_fraction"]
  else:
    chosen.pop("stats_examples", None)
  return chosen


def make_norm(options: Mapping[str, Any], *, norm: str = "batch",
              axis_name: Any = None, backend: str | None = None) -> ModuleDef:
  """The normalization layer of a model, built once from `config.bn`.

  `norm` picks the layer (NORMS); it takes the fields of `options` that
  are its arguments (NORM_FIELDS: a new option is a new config field of
  the argument's name, plus its entry in `NORM_CHOICES` if it has a fixed
  set of values), and an absent one keeps the layer's default. Swept
  values (momentum, epsilon per run of a vmapped sweep) are passed in
  `options` as traced scalars. `impl="auto"` resolves by backend;
  `axis_name` synchronizes the statistics of `SYNCED_NORMS`. Returns
  `functools.partial(module, ...)`, to be called with a name where the
  model places it.
  """
  options = norm_options(norm, options)
  if "impl" in options:
    options["impl"] = resolve_backend_choice(options["impl"], "xla_cpu",
                                             "plain", backend)
  if norm in SYNCED_NORMS:
    options["axis_name"] = axis_name
  return functools.partial(NORM_MODULES[norm], **options)


def normalized_layers(model: str, placement: str, widths: Sequence[int],
                      channels: Sequence[int] = (32, 64),
                      blocks_per_stage: int = 1,
                      ) -> list[tuple[str, int, bool]]:
  """(layer, features, has spatial axes) for each normalization layer the
  model places: what a layer-wise check (groups, instance norm) needs
  before anything is traced."""
  if placement == "none":
    return []
  if model in RESIDUAL_MODELS:
    return resnet_norm_layers(channels, blocks_per_stage)
  if placement == "input":
    return [("input_bn", 784 if model == "mlp" else 1, model == "cnn")]
  convs = [(f"conv_{i}", c, True) for i, c in enumerate(channels)]
  return ((convs if model == "cnn" else [])
          + [(f"hidden_{i}", w, False) for i, w in enumerate(widths)])


def resnet_norm_layers(widths: Sequence[int], blocks_per_stage: int
                       ) -> list[tuple[str, int, bool]]:
  """(layer, features, True) of each norm of bn_lab.resnet.ResNet."""
  layers = [("norm_stem", widths[0], True)]
  previous = widths[0]
  for stage, features in enumerate(widths):
    for block in range(blocks_per_stage):
      name = f"stage{stage}_block{block}"
      strides = 2 if stage > 0 and block == 0 else 1
      layers += [(f"{name}/norm_1", features, True),
                 (f"{name}/norm_2", features, True)]
      if strides != 1 or previous != features:
        layers.append((f"{name}/norm_shortcut", features, True))
      previous = features
  return layers


def variable_shapes(model: nn.Module) -> dict[tuple[str, ...], tuple]:
  """{(collection, *path): shape} of every variable `model` creates,
  initialized on one MNIST image in eval mode as the trainer does
  (train.create_train_state), traced by `jax.eval_shape`: nothing is
  computed or compiled. Two models with the same shapes hold the same
  layers (sweep's check that a placement puts a normalization layer)."""
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 784), jnp.float32), train=False))
  return {path: tuple(leaf.shape) for path, leaf in
          traverse_util.flatten_dict(flax.core.unfreeze(variables)).items()}


# Initializations of the Dense kernels (config.init): flax's default,
# LeCun normal (variance 1 / fan_in, truncated), or Ioffe & Szegedy's
# (2015) "small random Gaussian values", N(0, init_std^2) whatever the fan-in.
INITS = ("default", "gaussian")


def kernel_initializer(init: str = "default", std: float = 0.01):
  """The Dense kernels' initializer named by `init` (INITS)."""
  if init == "default":
    return nn.linear.default_kernel_init
  if init == "gaussian":
    return nn.initializers.normal(stddev=std)
  raise ValueError(f"init={init!r}; choose one of {INITS}.")


def make_model(model: str, *, placement: str, activation: str,
               widths: Sequence[int], channels: Sequence[int] = (32, 64),
               norm: ModuleDef = bn_nn.BatchNorm, norm_has_bias: bool = True,
               conv: str = "auto", num_classes: int = NUM_CLASSES,
               dense_init: Callable[..., Any] = nn.linear.default_kernel_init,
               norm_name: str = "batch", blocks_per_stage: int = 1,
               skip_init: bool = False, standardize: str = "none",
               stem_stride: int = 1) -> nn.Module:
  """Builds the named model with `norm` (see `make_norm`; `norm_has_bias`
  False for a norm without beta, `NORMS_WITHOUT_BIAS`) and, for the CNN,
  the convolution `CONVS[conv]` ("auto": im2col on a CPU, else xla). The
  residual CNN (`RESIDUAL_MODELS`, `make_resnet`) also reads `norm_name`
  (the config's name of `norm`), `blocks_per_stage`, `skip_init`,
  `standardize` and `stem_stride`; the others ignore them."""
  common = dict(placement=placement, activation=activation,
                num_classes=num_classes, norm=norm,
                norm_has_bias=norm_has_bias, widths=tuple(widths),
                dense_init=dense_init)
  if model == "mlp":
    return MLP(**common)
  if model == "cnn":
    conv = CONVS[resolve_backend_choice(conv, "im2col", "xla")]
    return CNN(channels=tuple(channels), conv=conv, **common)
  if model in RESIDUAL_MODELS:
    return make_resnet(channels=channels, norm=norm, conv=conv,
                       norm_name=norm_name, norm_has_bias=norm_has_bias,
                       placement=placement, num_classes=num_classes,
                       blocks_per_stage=blocks_per_stage,
                       skip_init=skip_init, standardize=standardize,
                       stem_stride=stem_stride)
  if model in SEQUENCE_MODELS:
    raise ValueError(f"model={model!r} reads the image as a sequence; build "
                     "it with make_sequence_model.")
  raise ValueError(f"model={model!r}; choose one of "
                   f"{MODELS + RESIDUAL_MODELS}.")


def make_resnet(*, channels: Sequence[int], norm: ModuleDef, conv: str,
                norm_name: str,
                norm_has_bias: bool, placement: str, num_classes: int,
                blocks_per_stage: int, skip_init: bool,
                standardize: str, stem_stride: int = 1) -> nn.Module:
  """bn_lab.resnet.ResNet with the stage widths `channels`: `norm` after
  every convolution (placement "before_activation", BN -> ReLU as in He et
  al.) or none (placement "none"); convolutions `CONVS[conv]` ("auto" by
  backend), weight-standardized as `standardize` says (Conv.standardize;
  flax's convolution: bn_jax.nn.WSConv)."""
  if placement not in ("before_activation", "none"):
    raise ValueError(
        f"placement={placement!r} does not fit the residual CNN: it puts "
        "its norm after every convolution (before_activation) or has none "
        "(none).")
  if placement == "none":
    norm = plain_norm = None
  else:
    plain_norm = (functools.partial(norm, use_tau=False)
                  if norm_name == "frn" else norm)
  if standardize not in STANDARDIZATIONS:
    raise ValueError(f"standardize={standardize!r}; choose one of "
                     f"{STANDARDIZATIONS}.")
  if resolve_backend_choice(conv, "im2col", "xla") == "im2col":
    conv_module = functools.partial(Conv, standardize=standardize)
  elif standardize == "none":
    conv_module = nn.Conv
  else:
    scaled = standardize == "scaled"
    conv_module = functools.partial(bn_nn.WSConv, scaled=scaled,
                                    gamma=RELU_GAMMA if scaled else 1.0)
  return resnet.ResNet(
      norm=norm, plain_norm=plain_norm, conv=conv_module,
      widths=tuple(channels), blocks_per_stage=blocks_per_stage,
      num_classes=num_classes, norm_has_bias=norm_has_bias,
      norm_is_activation=norm_name in NORMS_WITH_ACTIVATION,
      skip_init=skip_init, stem_stride=stem_stride)


# ----------------------------------------------------------------------------
# Sequence models: MNIST read as a sequence by an LSTM.

# How the 784 pixels become a sequence (config.sequence): 28 steps of a
# 28-pixel row, 784 steps of one pixel in raster order, or 784 steps of one
# pixel in a fixed random order (Le et al., 2015; Cooijmans et al., 2016).
SEQUENCES = ("rows", "pixels", "permuted")
# The LSTM's normalizations (bn_jax.recurrent.NORMS) and the config.bn
# fields each reads; every other BN option is core.apply's default there
# (`LSTM_FIXED_BN`).
LSTM_NORM_FIELDS: dict[str, tuple[str, ...]] = {
    "batch": ("momentum", "epsilon", "impl"), "layer": ("epsilon",),
    "none": ()}
LSTM_FIXED_BN = {
    name: inspect.signature(core.apply).parameters[name].default
    for name in ("unbiased_running_var", "stats_method", "grad")}


def sequence_length(sequence: str) -> int:
  """The number of time steps of `sequence` (SEQUENCES): 28 or 784."""
  if sequence not in SEQUENCES:
    raise ValueError(f"sequence={sequence!r}; choose one of {SEQUENCES}.")
  return 28 if sequence == "rows" else 784


def pixel_permutation(seed: int) -> np.ndarray:
  """The fixed order of the 784 pixels for sequence="permuted": the same
  for a seed on every call and machine (NumPy's PCG64)."""
  return np.random.default_rng(seed).permutation(784)


def image_sequence(images, sequence: str, permutation_seed: int = 0):
  """(batch, 784) images -> (batch, T, features) sequences: rows (step t is
  row t, (batch, 28, 28)), pixels (step t is pixel t, (batch, 784, 1)),
  permuted (step t is pixel `pixel_permutation(permutation_seed)[t]`)."""
  length = sequence_length(sequence)
  images = images.reshape(images.shape[0], 784)
  if sequence == "permuted":
    images = images[:, pixel_permutation(permutation_seed)]
  return images.reshape(images.shape[0], length, 784 // length)


class SequenceClassifier(nn.Module):
  """The image read as a sequence by `cell` (bn_jax.recurrent.LSTM with its
  options bound, `make_sequence_model`), its last hidden state -> Dense.

  The cell's per-step statistics (norm="batch") cover every step of the
  sequence: T_max is the sequence length.
  """
  cell: ModuleDef
  sequence: str = "rows"
  permutation_seed: int = 0
  num_classes: int = NUM_CLASSES
  dense_init: Callable[..., Any] = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = image_sequence(images, self.sequence, self.permutation_seed)
    hs = self.cell(t_max=x.shape[1], name="lstm")(x, train=train)
    return nn.Dense(self.num_classes, kernel_init=self.dense_init,
                    name="readout")(hs[:, -1])


def make_sequence_model(model: str, options: Mapping[str, Any], *,
                        norm: str, sequence: str, hidden_size: int,
                        permutation_seed: int = 0,
                        num_classes: int = NUM_CLASSES,
                        dense_init: Callable[..., Any] = (
                            nn.linear.default_kernel_init),
                        backend: str | None = None) -> nn.Module:
  """Builds a sequence model (SEQUENCE_MODELS) whose cell normalizes with
  `norm` (recurrent.NORMS: BN-LSTM, LN-LSTM, plain LSTM).

  The cell takes the fields of `options` (config.bn, with a run's swept
  values) that `norm` reads there (`LSTM_NORM_FIELDS`); `impl="auto"`
  resolves by backend. Its gammas start at recurrent.DEFAULT_SCALE_INIT
  (0.1 for BN, Cooijmans et al.). `dense_init` initializes the readout.
  """
  if model not in SEQUENCE_MODELS:
    raise ValueError(f"model={model!r}; choose one of {SEQUENCE_MODELS}.")
  if norm not in LSTM_NORM_FIELDS:
    raise ValueError(f"norm={norm!r}; an LSTM takes one of "
                     f"{tuple(LSTM_NORM_FIELDS)}.")
  sequence_length(sequence)  # checks the name
  chosen = {k: options[k] for k in LSTM_NORM_FIELDS[norm] if k in options}
  if "impl" in chosen:
    chosen["impl"] = resolve_backend_choice(chosen["impl"], "xla_cpu",
                                            "plain", backend)
  cell = functools.partial(recurrent.LSTM, hidden_size=hidden_size,
                           norm=norm, **chosen)
  return SequenceClassifier(cell=cell, sequence=sequence,
                            permutation_seed=permutation_seed,
                            num_classes=num_classes, dense_init=dense_init)
