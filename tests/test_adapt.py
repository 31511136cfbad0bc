"""bn_lab.adapt.tent against the reference code's logic (DequanWang/tent:
configure_model, softmax_entropy, forward_and_adapt) written in PyTorch, and
its invariants checked without torch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from bn_jax import nn as bn_nn
from bn_lab import adapt
from bn_lab import models


def _model_and_variables():
  model = models.make_model(
      "mlp", placement="before_activation", activation="relu", widths=(16,),
      norm=functools.partial(bn_nn.BatchNorm, epsilon=1e-5))
  variables = model.init(jax.random.key(0), jnp.zeros((2, 784)), train=False)
  # Running statistics far from any batch's: TENT must not read them.
  variables["batch_stats"] = jax.tree.map(lambda v: v + 3.0,
                                          variables["batch_stats"])
  return model, variables


def _batches(num=3, size=32, seed=1):
  return jax.random.uniform(jax.random.key(seed), (num, size, 784))


TORCH_TENT = r"""
from torch import nn
w = inputs
model = nn.Sequential(nn.Linear(784, 16, bias=False), nn.BatchNorm1d(16),
                      nn.ReLU(), nn.Linear(16, 10))
with torch.no_grad():
  model[0].weight.copy_(torch.from_numpy(w["kernel"].T))
  model[1].weight.copy_(torch.from_numpy(w["scale"]))
  model[1].bias.copy_(torch.from_numpy(w["bias"]))
  model[3].weight.copy_(torch.from_numpy(w["readout_kernel"].T))
  model[3].bias.copy_(torch.from_numpy(w["readout_bias"]))
# tent.configure_model: train mode, batch statistics only, BN's affine only.
model.train()
model.requires_grad_(False)
for m in model.modules():
  if isinstance(m, nn.BatchNorm1d):
    m.requires_grad_(True)
    m.track_running_stats = False
    m.running_mean = None
    m.running_var = None
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
logits = []
for x in torch.from_numpy(w["batches"]):
  # tent.forward_and_adapt
  out = model(x)  # the reference's `outputs`; that name is taken here
  loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
  loss.backward()
  optimizer.step()
  optimizer.zero_grad()
  logits.append(out.detach().numpy())
outputs["logits"] = np.stack(logits)
outputs["scale"] = model[1].weight.detach().numpy()
outputs["bias"] = model[1].bias.detach().numpy()
"""


def test_tent_matches_the_reference_code_in_pytorch():
  helpers.require_torch()
  model, variables = _model_and_variables()
  batches = _batches()
  logits, adapted = adapt.tent(model, variables, batches)
  p = variables["params"]
  torch = helpers.run_torch(TORCH_TENT, {
      "kernel": np.asarray(p["hidden_0"]["Dense_0"]["kernel"]),
      "scale": np.asarray(p["hidden_0"]["BatchNorm_0"]["scale"]),
      "bias": np.asarray(p["hidden_0"]["BatchNorm_0"]["bias"]),
      "readout_kernel": np.asarray(p["readout"]["kernel"]),
      "readout_bias": np.asarray(p["readout"]["bias"]),
      "batches": np.asarray(batches)})
  np.testing.assert_allclose(logits, torch["logits"], rtol=1e-4, atol=1e-5)
  bn = adapted["params"]["hidden_0"]["BatchNorm_0"]
  np.testing.assert_allclose(bn["scale"], torch["scale"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(bn["bias"], torch["bias"], rtol=1e-5,
                             atol=1e-6)


def test_only_bn_scale_and_bias_move_and_entropy_falls():
  """The Dense layers and the running statistics stay as given; BN's scale
  and bias move; on one batch seen again and again, the mean entropy of
  the predictions falls (what TENT minimizes)."""
  model, variables = _model_and_variables()
  batch = _batches(num=1)
  repeated = jnp.repeat(batch, 20, axis=0)
  logits, adapted = adapt.tent(model, variables, repeated,
                               tx=optax.sgd(0.5))
  entropy = np.asarray(jnp.mean(adapt.softmax_entropy(logits), axis=1))
  assert entropy[-1] < entropy[0] - 0.05, entropy
  before, after = variables["params"], adapted["params"]
  for layer in ("Dense_0",):
    np.testing.assert_array_equal(before["hidden_0"][layer]["kernel"],
                                  after["hidden_0"][layer]["kernel"])
  np.testing.assert_array_equal(before["readout"]["kernel"],
                                after["readout"]["kernel"])
  assert not np.allclose(before["hidden_0"]["BatchNorm_0"]["scale"],
                         after["hidden_0"]["BatchNorm_0"]["scale"])
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"],
               adapted["batch_stats"])


def test_the_first_batch_is_predicted_with_batch_statistics_unadapted():
  """Batch 1's logits: the model in training mode (its own statistics),
  before any step; episodic mode predicts every batch that way."""
  model, variables = _model_and_variables()
  batches = _batches()
  untouched = jnp.stack([model.apply(variables, x, train=True,
                                     mutable=["batch_stats"])[0]
                         for x in batches])
  online, _ = adapt.tent(model, variables, batches, tx=optax.sgd(0.5))
  episodic, adapted = adapt.tent(model, variables, batches,
                                 tx=optax.sgd(0.5), episodic=True)
  np.testing.assert_allclose(online[0], untouched[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(online[1:], untouched[1:], atol=1e-3)
  np.testing.assert_allclose(episodic, untouched, rtol=1e-5, atol=1e-6)
  assert not np.allclose(  # the last episode's step is kept
      adapted["params"]["hidden_0"]["BatchNorm_0"]["scale"],
      variables["params"]["hidden_0"]["BatchNorm_0"]["scale"])


def test_a_model_without_bn_is_a_one_line_error():
  model = models.make_model("mlp", placement="none", activation="relu",
                            widths=(16,))
  variables = model.init(jax.random.key(0), jnp.zeros((2, 784)), train=False)
  with pytest.raises(ValueError, match="no batch_stats, so no BN layer"):
    adapt.tent(model, variables, _batches())
