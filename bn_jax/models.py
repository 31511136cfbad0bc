"""MLP and small CNN with a choice of where batch normalization goes.

Both take MNIST-family inputs: 784 pixels per example (28 x 28, one channel),
10 classes.

Placements (the comparison this project is about):
  none               no normalization.
  before_activation  Dense (no bias, BN's beta replaces it) -> BN -> act,
                     as in Ioffe & Szegedy (2015).
  after_activation   Dense -> act -> BN, as in much Keras example code.
  input              BN on the raw input as the only preprocessing: per pixel
                     (784 features) in the MLP, over the one channel in the
                     CNN, as a conv net normalizes channels.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bn_jax import core
from bn_jax import nn as bn_nn

PLACEMENTS = ("none", "before_activation", "after_activation", "input")
ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}
MODELS = ("mlp", "cnn")


ModuleDef = Callable[..., nn.Module]


class _BNBlock(nn.Module):
  """One hidden layer: a linear map, the activation and BN where placed."""
  make_linear: ModuleDef
  activation: str
  placement: str
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, *, train: bool):
    act = ACTIVATIONS[self.activation]
    if self.placement == "before_activation":
      return act(self.norm()(self.make_linear(use_bias=False)(x),
                             use_running_average=not train))
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
  num_classes: int = 10
  norm: ModuleDef = bn_nn.BatchNorm

  def check(self):
    if self.placement not in PLACEMENTS:
      raise ValueError(f"placement={self.placement!r}; choose one of "
                       f"{PLACEMENTS}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; choose one of "
                       f"{tuple(ACTIVATIONS)}.")

  def block(self, make_linear, name):
    return _BNBlock(make_linear=make_linear, activation=self.activation,
                    placement=self.placement, norm=self.norm, name=name)


class Conv(nn.Module):
  """flax.linen.Conv for stride 1 and "SAME" padding, computed as one matmul
  over the kh * kw shifted copies of the padded input (im2col).

  Why: XLA:CPU runs the weight gradient of a 3x3 convolution as a generic
  convolution at ~1.5 GFLOP/s; as a matmul it takes the fast path, and the
  CNN's training step runs 9.9x faster on a 2-core CPU (931.7 -> 94.6 ms at
  batch 128; benchmarks/cnn_conv.py). The shifted copies take kh * kw times
  the input's memory: 29 MB for the second conv of a training batch of 128,
  226 MB per run for an evaluation chunk of 1000 (TrainSpec.eval_chunk;
  times K in a vmapped sweep). Named `Conv` so that its parameters
  sit where flax.linen.Conv's do (same names, shapes and initializers, hence
  the same initial values); tests/test_models.py checks outputs and
  gradients (to float rounding) and init (exactly) against flax.linen.Conv.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
      raise ValueError(f"kernel_size={tuple(self.kernel_size)}: odd sizes "
                       "only (SAME padding, centred).")
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", nn.linear.default_kernel_init,
                        (kh, kw, channels, self.features))
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2),
                         (0, 0)))
    # patches[..., (i * kw + j) * channels + c] = padded[:, h + i, w + j, c],
    # the order of kernel.reshape(-1, features)'s rows.
    patches = jnp.concatenate(
        [padded[:, i:i + height, j:j + width, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    y = patches @ kernel.reshape(kh * kw * channels, self.features)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(),
                        (self.features,))
      y = y + bias.reshape(1, 1, 1, self.features)
    return y


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
      x = self.block(lambda use_bias, w=width: nn.Dense(w, use_bias=use_bias),
                     name=f"hidden_{i}")(x, train=train)
    return nn.Dense(self.num_classes, name="readout")(x)


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
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.widths):
      x = self.block(lambda use_bias, w=width: nn.Dense(w, use_bias=use_bias),
                     name=f"hidden_{i}")(x, train=train)
    return nn.Dense(self.num_classes, name="readout")(x)


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


# config.bn fields with a fixed set of values, checked by `make_norm`.
NORM_CHOICES = {
    "stats_method": core.STATS_METHODS,
    "grad": core.GRAD_MODES,
    "impl": ("auto", *core.IMPLS),
}


def check_norm_options(options: Mapping[str, Any]) -> None:
  """Rejects a bad config.bn value with a message naming the field; an
  absent field (BatchNorm's default) is not checked."""
  for name, valid in NORM_CHOICES.items():
    if name in options and options[name] not in valid:
      raise ValueError(f"config.bn.{name}={options[name]!r} is not valid; "
                       f"choose one of {tuple(valid)}.")
  momentum = options.get("momentum")
  if momentum is not None and (isinstance(momentum, bool) or not isinstance(
      momentum, numbers.Real) or not 0.0 <= momentum <= 1.0):
    raise ValueError(f"config.bn.momentum={momentum!r} must be a number in "
                     "[0, 1] (flax convention; PyTorch's momentum is 1 - "
                     "this) or None (exact cumulative average).")
  epsilon = options.get("epsilon", 1.0)
  if isinstance(epsilon, bool) or not isinstance(
      epsilon, numbers.Real) or not epsilon > 0:
    raise ValueError(f"config.bn.epsilon={epsilon!r} must be a number > 0.")
  if not isinstance(options.get("unbiased_running_var", False), bool):
    raise ValueError("config.bn.unbiased_running_var="
                     f"{options['unbiased_running_var']!r} must be True or "
                     "False.")
  unknown = set(options) - {f.name for f in dataclasses.fields(
      bn_nn.BatchNorm)}
  if unknown:
    raise ValueError(f"config.bn has fields bn_jax.nn.BatchNorm does not "
                     f"take: {sorted(unknown)}.")


def make_norm(options: Mapping[str, Any], *, axis_name: Any = None,
              backend: str | None = None) -> ModuleDef:
  """The normalization layer of a model, built once from `config.bn`.

  Every field of `options` is an argument of `bn_jax.nn.BatchNorm` (so a new
  BN option is a new config field, plus its entry in `NORM_CHOICES` if it
  has a fixed set of values); an absent one keeps BatchNorm's default.
  Swept values (momentum, epsilon per run of a vmapped sweep) are passed in
  `options` as traced scalars. `impl="auto"` resolves
  by backend. Returns `functools.partial(BatchNorm, ...)`, to be called with
  a name where the model places it.
  """
  options = dict(options)
  if "impl" in options:
    options["impl"] = resolve_backend_choice(options["impl"], "xla_cpu",
                                             "plain", backend)
  return functools.partial(bn_nn.BatchNorm, axis_name=axis_name, **options)


def make_model(model: str, *, placement: str, activation: str,
               widths: Sequence[int], channels: Sequence[int] = (32, 64),
               norm: ModuleDef = bn_nn.BatchNorm, conv: str = "auto",
               num_classes: int = 10) -> nn.Module:
  """Builds the named model with `norm` (see `make_norm`) and, for the CNN,
  the convolution `CONVS[conv]` ("auto": im2col on a CPU, else xla)."""
  common = dict(placement=placement, activation=activation,
                num_classes=num_classes, norm=norm, widths=tuple(widths))
  if model == "mlp":
    return MLP(**common)
  if model == "cnn":
    conv = CONVS[resolve_backend_choice(conv, "im2col", "xla")]
    return CNN(channels=tuple(channels), conv=conv, **common)
  raise ValueError(f"model={model!r}; choose one of {MODELS}.")
