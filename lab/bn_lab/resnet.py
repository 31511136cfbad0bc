"""A small residual CNN (He et al. 2016's CIFAR ResNets, 6n + 2 layers) that
takes any normalization layer, or none, and SkipInit.

    model = ResNet(norm=functools.partial(bn_nn.BatchNorm, momentum=0.9),
                   conv=models.Conv, blocks_per_stage=1)   # 8 layers
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])

Images (N, H, W, C), or (N, 784) MNIST rows (read as 28 x 28 x 1). A
3x3 stem convolution of `widths[0]` channels, then one stage per width,
each `blocks_per_stage` basic blocks (the first of a stage after the first
at stride 2), global average pooling and a Dense readout:

    y = act(norm(conv3x3(x, stride)))
    y = norm(conv3x3(y))                    (a layer of its own: norm_2)
    y = skip_gain * y                       (SkipInit, if on)
    out = act(y + shortcut(x))              (shortcut: x, or norm(conv1x1(x,
                                             stride)) where the shape changes)

So depth = 6 * blocks_per_stage + 2 with three widths: 8, 14 or 20 layers
at 1, 2 or 3 blocks per stage, as He et al.'s ResNet-8/14/20 on CIFAR-10
(widths 16, 32, 64).

`norm` is a normalization module with its options bound (the lab's
`models.make_norm`), or None for none; a convolution before a norm with a
bias (beta) has none of its own. A norm that applies its own nonlinearity
(FRN + TLU, EvoNorm: `norm_is_activation`) takes `apply_activation`:
True where BN would be followed by a ReLU, False before the residual sum,
as timm's norm-act layers (`apply_act`). SkipInit (De
& Smith 2020): a scalar gain on each residual branch, initialized at 0, so
that every block starts as its shortcut (the stem and downsampling
shortcuts still compute).

`conv` is the convolution module (flax.linen.Conv's interface and
parameter names): the lab's im2col `models.Conv` (which can standardize
its kernel), flax.linen.Conv or bn_jax.nn.WSConv. tests/test_resnet.py
checks the parameter count and the outputs against a PyTorch twin.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bn_jax import nn as bn_nn

ModuleDef = Any


def conv_norm(x, features: int, kernel: int, strides: int, name: str, *,
              conv: ModuleDef, norm: ModuleDef | None,
              plain_norm: ModuleDef | None, norm_has_bias: bool,
              norm_is_activation: bool, train: bool, activate: bool):
  """conv -> norm -> ReLU (activate) or conv -> plain_norm, called inside a
  compact method: its layers are that module's conv_<name>, norm_<name>.
  A norm_is_activation norm is the nonlinearity itself: no ReLU follows."""
  y = conv(features, (kernel, kernel), strides=(strides, strides),
           use_bias=norm is None or not norm_has_bias, name=f"conv_{name}")(x)
  if norm is None:
    return nn.relu(y) if activate else y
  layer = norm if activate else (plain_norm or norm)
  y = layer(name=f"norm_{name}")(y, use_running_average=not train)
  return nn.relu(y) if activate and not norm_is_activation else y


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with their norms, and the shortcut."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef | None
  plain_norm: ModuleDef | None
  norm_has_bias: bool
  norm_is_activation: bool
  skip_init: bool

  @nn.compact
  def __call__(self, x, *, train: bool):
    common = dict(conv=self.conv, norm=self.norm, plain_norm=self.plain_norm,
                  norm_has_bias=self.norm_has_bias,
                  norm_is_activation=self.norm_is_activation, train=train)
    y = conv_norm(x, self.features, 3, self.strides, "1", activate=True,
                  **common)
    y = conv_norm(y, self.features, 3, 1, "2", activate=False, **common)
    if self.skip_init:
      y = bn_nn.SkipInit(name="skip_init")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv_norm(x, self.features, 1, self.strides, "shortcut",
                           activate=False, **common)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """The residual CNN: stem, stages of basic blocks, pooling, readout."""
  norm: ModuleDef | None
  conv: ModuleDef  # e.g. the lab's im2col models.Conv, or flax.linen.Conv
  plain_norm: ModuleDef | None = None  # None: `norm`
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 1
  num_classes: int = 10
  norm_has_bias: bool = True
  norm_is_activation: bool = False
  skip_init: bool = False
  stem_stride: int = 1  # 2 halves the stem's output (28x28 -> 14x14)
  image_shape: Sequence[int] = (28, 28, 1)

  def check(self):
    if self.blocks_per_stage < 1:
      raise ValueError(f"blocks_per_stage={self.blocks_per_stage}: at least "
                       "1 (depth = 6 * blocks_per_stage + 2).")
    if self.stem_stride not in (1, 2):
      raise ValueError(f"stem_stride={self.stem_stride}: 1 or 2.")
    if not self.widths or min(self.widths) < 1:
      raise ValueError(f"widths={tuple(self.widths)}: one positive width "
                       "per stage.")

  @nn.compact
  def __call__(self, images, *, train: bool):
    self.check()
    conv = self.conv
    x = images
    if x.ndim == 2:  # rows of pixels, as the lab's loaders give them
      x = x.reshape(x.shape[0], *self.image_shape)
    common = dict(conv=conv, norm=self.norm, plain_norm=self.plain_norm,
                  norm_has_bias=self.norm_has_bias,
                  norm_is_activation=self.norm_is_activation)
    x = conv_norm(x, self.widths[0], 3, self.stem_stride, "stem", train=train,
                  activate=True, **common)
    for stage, features in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, skip_init=self.skip_init, **common,
                       name=f"stage{stage}_block{block}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="readout")(x)
