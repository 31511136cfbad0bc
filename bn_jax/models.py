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

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bn_jax import nn as bn_nn

PLACEMENTS = ("none", "before_activation", "after_activation", "input")
ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}
MODELS = ("mlp", "cnn")


class _BNBlock(nn.Module):
  """One hidden layer: a linear map, the activation and BN where placed."""
  make_linear: Callable[..., nn.Module]
  activation: str
  placement: str
  norm: Callable[..., nn.Module]

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
  """Shared frame: optional input BN, hidden blocks, linear readout."""
  placement: str = "after_activation"
  activation: str = "relu"
  num_classes: int = 10
  bn_momentum: Any = 0.99
  bn_epsilon: Any = 1e-5
  bn_options: dict = None  # extra keyword arguments for bn_jax.nn.BatchNorm
  axis_name: Any = None  # synchronizes BN statistics over this named axis

  def norm(self) -> Callable[..., nn.Module]:
    """BN with this model's options, still to be named and placed. A partial
    of the class rather than a method, so a block that calls it owns the BN
    (flax scopes a module by where it is constructed)."""
    return functools.partial(
        bn_nn.BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
        axis_name=self.axis_name, **(self.bn_options or {}))

  def check(self):
    if self.placement not in PLACEMENTS:
      raise ValueError(f"placement={self.placement!r}; choose one of "
                       f"{PLACEMENTS}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; choose one of "
                       f"{tuple(ACTIVATIONS)}.")

  def block(self, make_linear, name):
    return _BNBlock(make_linear=make_linear, activation=self.activation,
                    placement=self.placement, norm=self.norm(), name=name)


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
      x = self.norm()(name="input_bn")(x, use_running_average=not train)
    for i, width in enumerate(self.widths):
      x = self.block(lambda use_bias, w=width: nn.Dense(w, use_bias=use_bias),
                     name=f"hidden_{i}")(x, train=train)
    return nn.Dense(self.num_classes, name="readout")(x)


class CNN(_Classifier):
  """Conv(3x3) blocks with 2x2 max-pooling, then one dense hidden layer."""
  channels: Sequence[int] = (32, 64)
  widths: Sequence[int] = (128,)

  @nn.compact
  def __call__(self, images, *, train: bool):
    self.check()
    x = images.reshape(images.shape[0], 28, 28, 1)
    if self.placement == "input":
      x = self.norm()(name="input_bn")(x, use_running_average=not train)
    for i, channels in enumerate(self.channels):
      conv = lambda use_bias, c=channels: Conv(c, (3, 3), use_bias=use_bias)
      x = self.block(conv, name=f"conv_{i}")(x, train=train)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.widths):
      x = self.block(lambda use_bias, w=width: nn.Dense(w, use_bias=use_bias),
                     name=f"hidden_{i}")(x, train=train)
    return nn.Dense(self.num_classes, name="readout")(x)


def make_model(model: str, *, placement: str, activation: str,
               widths: Sequence[int], channels: Sequence[int] = (32, 64),
               bn_momentum: Any = 0.99, bn_epsilon: Any = 1e-5,
               bn_options: dict | None = None, axis_name: Any = None,
               num_classes: int = 10) -> nn.Module:
  """Builds the named model. BN momentum/epsilon may be traced scalars, so a
  vmapped sweep can give every run its own value."""
  common = dict(placement=placement, activation=activation,
                num_classes=num_classes, bn_momentum=bn_momentum,
                bn_epsilon=bn_epsilon, bn_options=bn_options,
                axis_name=axis_name, widths=tuple(widths))
  if model == "mlp":
    return MLP(**common)
  if model == "cnn":
    return CNN(channels=tuple(channels), **common)
  raise ValueError(f"model={model!r}; choose one of {MODELS}.")
