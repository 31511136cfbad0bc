"""Test-time adaptation of a trained model's BN layers to a shifted domain.

    logits, adapted = adapt.tent(model, variables, batches)   # TENT, online

AdaBN (Li et al. 2016: the statistics recomputed on target data) is
`bn_jax.precise.recompute_statistics` on target batches. TENT (Wang et al.
2021, "Tent: Fully Test-Time Adaptation by Entropy Minimization") goes
further: on each target batch, in training mode (BN normalizes with the
batch's own statistics; running averages are neither read nor updated),
it predicts, then takes one optimizer step on the mean entropy of those
predictions with respect to BN's scale and bias only; every other weight
stays frozen. The predictions of a batch are the ones made before its own
step, as the reference code's `forward_and_adapt` returns them; the
adaptation carries over from batch to batch (online), unless `episodic`
resets it before each batch.

The reference code (github.com/DequanWang/tent, PyTorch): `configure_model`
(train mode, `track_running_stats=False`, gradients for BatchNorm2d's
weight and bias only), `softmax_entropy`, Adam (lr 1e-3, betas 0.9, 0.999,
the CIFAR setting) or SGD with momentum 0.9 (ImageNet). tests/test_adapt.py
checks this function against that logic written in PyTorch.
"""

from __future__ import annotations

from typing import Any

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax


def bn_affine_labels(variables) -> Any:
  """A tree like variables["params"]: "adapt" for the scale and bias of
  every layer that keeps batch statistics (a BN layer: its path is also in
  batch_stats), "freeze" for every other parameter."""
  stats_layers = {path[:-1] for path in traverse_util.flatten_dict(
      flax.core.unfreeze(variables.get("batch_stats", {})))}
  if not stats_layers:
    raise ValueError(
        "tent: the model has no batch_stats, so no BN layer to adapt; TENT "
        "adapts BN's scale and bias on target batches.")
  flat = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  labels = {path: ("adapt" if path[:-1] in stats_layers
                   and path[-1] in ("scale", "bias") else "freeze")
            for path in flat}
  if "adapt" not in labels.values():
    raise ValueError("tent: the BN layers have no scale or bias "
                     "(use_scale=use_bias=False); nothing to adapt.")
  return traverse_util.unflatten_dict(labels)


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """Per example, -sum p log p of softmax(logits), in float32."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def tent(model, variables, batches, *, tx=None, episodic: bool = False):
  """TENT over `batches` (num_batches, batch, ...) in order.

  Args:
    model: a flax Module whose __call__ takes `train=` (bn_lab.models), its
      BN layers keeping running statistics in batch_stats.
    variables: its trained {"params", "batch_stats"}.
    batches: the target inputs, one batch per leading index.
    tx: the optimizer of BN's scale and bias (default: Adam 1e-3, the
      reference code's CIFAR setting).
    episodic: reset the parameters and the optimizer before every batch
      (the reference code's `episodic`).

  Returns:
    (logits (num_batches, batch, classes), the adapted variables: params
    with BN's scale and bias moved, batch_stats as given).
  """
  tx = tx or optax.adam(1e-3)
  labels = bn_affine_labels(variables)
  optimizer = optax.multi_transform({"adapt": tx,
                                     "freeze": optax.set_to_zero()}, labels)
  params = variables["params"]
  frozen = {k: v for k, v in variables.items() if k != "params"}

  def entropy_and_logits(p, x):
    logits, _ = model.apply({**frozen, "params": p}, x, train=True,
                            mutable=["batch_stats"])
    return jnp.mean(softmax_entropy(logits)), logits

  def step(carry, x):
    p, opt_state = carry
    if episodic:
      p, opt_state = params, optimizer.init(params)
    (_, logits), grads = jax.value_and_grad(entropy_and_logits,
                                            has_aux=True)(p, x)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), logits

  (adapted, _), logits = jax.lax.scan(
      step, (params, optimizer.init(params)), batches)
  return logits, {**variables, "params": adapted}
