"""The flax drop-ins accept every argument of flax's BatchNorm, in flax's
order, with flax's defaults and meaning; a new flax argument fails here.
The two that bn_jax computes another way are checked against flax itself,
and `impl` defaults to the backend's choice."""

import dataclasses
import inspect

import flax.linen as flax_nn
from flax import nnx as flax_nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax import core

_LINEN_SKIP = ("parent", "name")


def _linen_fields(module):
  return {f.name: f.default for f in dataclasses.fields(module)
          if f.name not in _LINEN_SKIP}


def test_linen_takes_flax_arguments_in_order_with_flax_defaults():
  theirs, ours = (_linen_fields(flax_nn.BatchNorm),
                  _linen_fields(bn_jax.nn.BatchNorm))
  missing = [name for name in theirs if name not in ours]
  assert missing == []
  # The same positions (flax's arguments first), the same defaults.
  assert list(ours)[:len(theirs)] == list(theirs)
  assert {n: ours[n] for n in theirs} == theirs


def test_nnx_takes_flax_arguments_in_order_with_flax_defaults():
  theirs = inspect.signature(flax_nnx.BatchNorm.__init__).parameters
  ours = inspect.signature(bn_jax.nnx.BatchNorm.__init__).parameters
  assert [n for n in theirs if n not in ours] == []
  assert list(ours)[:len(theirs)] == list(theirs)
  for name, parameter in theirs.items():
    mine = ours[name]
    assert mine.kind == parameter.kind, name
    if name.endswith("_init"):  # flax makes a new initializer per call
      assert (mine.default(jax.random.key(0), (3,), jnp.float32).tolist()
              == parameter.default(jax.random.key(0), (3,),
                                   jnp.float32).tolist()), name
    elif name.endswith("_metadata"):
      assert dict(mine.default) == dict(parameter.default), name
    else:
      assert mine.default == parameter.default, name


def _offset_batch():
  """Features with a mean of 3 and a spread of 0.5: E[x^2] - E[x]^2 and the
  mean of squared deviations differ by float32 rounding, as flax's two do."""
  rng = np.random.default_rng(0)
  return jnp.asarray(3.0 + 0.5 * rng.standard_normal((64, 8)), jnp.float32)


@pytest.mark.parametrize("use_fast_variance", [True, False])
def test_use_fast_variance_agrees_with_flax(use_fast_variance):
  """Training output and new statistics of both layers, linen and nnx,
  against flax's with the same use_fast_variance."""
  x = _offset_batch()
  layers = {name: module(use_running_average=False,
                         use_fast_variance=use_fast_variance)
            for name, module in (("ours", bn_jax.nn.BatchNorm),
                                 ("flax", flax_nn.BatchNorm))}
  out = {}
  for name, layer in layers.items():
    variables = layer.init(jax.random.key(0), x)
    out[name] = layer.apply(variables, x, mutable=["batch_stats"])
  (y, stats), (y_flax, stats_flax) = out["ours"], out["flax"]
  np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["batch_stats"]["var"],
                             stats_flax["batch_stats"]["var"], rtol=1e-5)
  nnx_ours = bn_jax.nnx.BatchNorm(8, use_fast_variance=use_fast_variance,
                                  rngs=flax_nnx.Rngs(0))
  nnx_flax = flax_nnx.BatchNorm(8, use_fast_variance=use_fast_variance,
                                rngs=flax_nnx.Rngs(0))
  np.testing.assert_allclose(nnx_ours(x), nnx_flax(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nnx_ours.var[...], nnx_flax.var[...],
                             rtol=1e-5)


def test_use_fast_variance_picks_the_variance_formula():
  assert core.flax_stats_method("shifted", True) == "shifted"
  assert core.flax_stats_method("shifted", False) == "two_pass"
  assert core.flax_stats_method("one_pass", False) == "one_pass"


def test_force_float32_reductions_false_is_refused():
  bn_jax.nn.BatchNorm(force_float32_reductions=True)
  with pytest.raises(ValueError, match="always computes the statistics in "
                     "float32"):
    bn_jax.nn.BatchNorm(force_float32_reductions=False)


def test_impl_defaults_to_the_backend(monkeypatch):
  assert bn_jax.nn.BatchNorm().impl == "auto"
  assert bn_jax.nnx.BatchNorm(4, rngs=flax_nnx.Rngs(0)).impl == "auto"
  assert inspect.signature(core.apply).parameters["impl"].default == "auto"
  assert core.resolve_impl("auto") == "xla_cpu"  # the tests run on a CPU
  assert core.resolve_impl("plain") == "plain"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert core.resolve_impl("auto") == "plain"
  with pytest.raises(ValueError, match="impl='fast'; choose one of"):
    core.apply(*bn_jax.init(4), jnp.ones((8, 4)), training=True, impl="fast")


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "RMSNorm",
                                  "GroupNorm", "InstanceNorm"])
def test_nnx_layers_show_their_arguments(name):
  """help() shows the constructor's arguments, not `(*args, **kwargs)`."""
  cls = getattr(bn_jax.nnx, name)
  shown = inspect.signature(cls)
  assert list(shown.parameters) == list(
      inspect.signature(cls.__init__).parameters)[1:]
  assert "num_features" in shown.parameters
