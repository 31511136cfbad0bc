"""A small pre-norm Transformer encoder for text classification, with the
normalization as a choice: LayerNorm, RMSNorm, masked BN or PowerNorm.

Tokens (B, T) and their mask (B, T), True on real characters, go through a
character embedding plus a learned position embedding, `num_layers` blocks

    h = h + Attention(Norm(h))     (padded keys masked out)
    h = h + MLP(Norm(h))           (Dense, GELU, Dense)

a final Norm, a mean over the real tokens and a Dense to the classes. BN
and PowerNorm take their statistics over the real tokens of the batch
(`mask`); padded positions are computed but reach neither a statistic nor
the pooled features. LayerNorm and RMSNorm normalize each token alone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bn_jax import nn as bn_nn

NORMS = ("layer", "rms", "batch", "power")
# The collection a measuring pass makes mutable: each Norm's input moments
# over the real tokens (`masked_moments`).
MOMENTS = "norm_input_moments"


def masked_moments(x, mask) -> dict[str, Any]:
  """Per feature, over the real tokens of (B, T, C) x: mean, biased
  variance and quadratic mean (PowerNorm's psi_B^2), float32."""
  x = x.astype(jnp.float32)
  weight = mask[..., None].astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  mean = jnp.sum(x * weight, axis=(0, 1)) / count
  var = jnp.sum(jnp.square(x - mean[None, None]) * weight,
                axis=(0, 1)) / count
  square = jnp.sum(jnp.square(x) * weight, axis=(0, 1)) / count
  return {"mean": mean, "var": var, "square": square}


class Norm(nn.Module):
  kind: str
  momentum: float = 0.9
  epsilon: float = 1e-5
  power_warmup_steps: int = 0

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    if self.is_mutable_collection(MOMENTS):
      self.sow(MOMENTS, "x", masked_moments(x, mask))
    if self.kind == "layer":
      return bn_nn.LayerNorm(epsilon=self.epsilon)(x)
    if self.kind == "rms":
      return bn_nn.RMSNorm(epsilon=self.epsilon)(x)
    if self.kind == "batch":
      return bn_nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon)(
          x, use_running_average=not train, mask=mask[..., None])
    if self.kind == "power":
      return bn_nn.PowerNorm(momentum=self.momentum, epsilon=self.epsilon,
                             warmup_steps=self.power_warmup_steps)(
                                 x, use_running_average=not train,
                                 mask=mask[..., None])
    raise ValueError(f"norm={self.kind!r}; choose one of {NORMS}.")


class Block(nn.Module):
  norm: dict[str, Any]
  num_heads: int
  mlp_width: int

  @nn.compact
  def __call__(self, h, mask, *, train: bool):
    attention_mask = nn.make_attention_mask(mask, mask)
    y = Norm(**self.norm, name="attention_norm")(h, mask, train=train)
    h = h + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name="attention")(
            y, y, mask=attention_mask)
    y = Norm(**self.norm, name="mlp_norm")(h, mask, train=train)
    y = nn.Dense(self.mlp_width, name="mlp_in")(y)
    return h + nn.Dense(h.shape[-1], name="mlp_out")(nn.gelu(y))


class Classifier(nn.Module):
  """The encoder and its readout; `norm` holds Norm's fields."""
  norm: dict[str, Any]
  vocab_size: int
  max_length: int
  num_layers: int = 2
  width: int = 128
  num_heads: int = 4
  mlp_width: int = 256
  num_classes: int = 2

  @nn.compact
  def __call__(self, tokens, mask, *, train: bool):
    positions = jnp.arange(tokens.shape[1])
    h = (nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
         + nn.Embed(self.max_length, self.width, name="position")(
             positions)[None])
    for i in range(self.num_layers):
      h = Block(self.norm, self.num_heads, self.mlp_width,
                name=f"block{i}")(h, mask, train=train)
    h = Norm(**self.norm, name="final_norm")(h, mask, train=train)
    weight = mask[..., None].astype(h.dtype)
    pooled = jnp.sum(h * weight, axis=1) / jnp.maximum(
        jnp.sum(weight, axis=1), 1.0)
    return nn.Dense(self.num_classes, name="readout")(pooled)
