"""bn_jax.accumulate: micro-batches that give the whole batch's BN.

The reference is the whole batch in one piece, differentiated by
`jax.value_and_grad`: for the CNN a model of flax.linen.BatchNorm layers
only, so flax's own BN is the reference there. Naive accumulation must
differ from it (else the comparison could not fail).
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import accumulate
from bn_jax import nn as bn_nn
import helpers

sys.path.insert(0, str(helpers.REPO / "benchmarks"))
# The benchmark's loss and reference step; its steps are smoke-tested below.
import accumulate as benchmark  # noqa: E402  pylint: disable=g-import-not-at-top


class MLP(nn.Module):
  """Three bn_jax BN layers between Dense layers, as bn_lab's MLPs."""
  bn: dict = None

  @nn.compact
  def __call__(self, x, train: bool):
    for width in (16, 16, 8):
      x = nn.Dense(width, use_bias=False)(x)
      x = bn_nn.BatchNorm(use_running_average=not train,
                          **(self.bn or {}))(x)
      x = nn.tanh(x)
    return nn.Dense(3)(x)


class CNN(nn.Module):
  """Two conv BN layers and one dense BN layer, flax.linen.BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (4, 8):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(10)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


def _problem(model, shape, offset=0.0, size=64):
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(size, *shape)) * 2 + offset,
                            jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, size))}
  variables = model.init(jax.random.key(0), batch["x"][:2], train=False)
  return (benchmark.classifier_loss(model), variables["params"],
          variables["batch_stats"], batch)


_whole_batch = benchmark.whole_batch


def _max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _assert_trees_close(actual, expected, atol):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5,
                                                       atol=atol),
               actual, expected)


@pytest.mark.parametrize("micro_batches", [4, 16])
@pytest.mark.parametrize("model,shape", [(MLP(), (5,)), (CNN(), (4, 4, 2))],
                         ids=["mlp", "cnn"])
def test_micro_batches_give_the_whole_batch_s_gradient_and_statistics(
    model, shape, micro_batches):
  problem = _problem(model, shape)
  loss, grads, stats = _whole_batch(*problem)
  exact = jax.jit(lambda *a: accumulate.value_and_grad(
      problem[0], *a, micro_batches=micro_batches))(*problem[1:])
  np.testing.assert_allclose(exact[0], loss, rtol=1e-5)
  _assert_trees_close(exact[1], grads, atol=1e-6)
  _assert_trees_close(exact[2], stats, atol=1e-6)
  assert jax.tree.structure(exact[2]) == jax.tree.structure(stats)
  if micro_batches == 4:
    # Naive accumulation is not the whole batch's: the comparison can fail.
    naive = accumulate.naive_value_and_grad(
        problem[0], *problem[1:], micro_batches=micro_batches)
    assert _max_difference(naive[1], grads) > 1e-3
    assert _max_difference(naive[2], stats) > 1e-3


@pytest.mark.parametrize("bn", [
    # A cumulative average (the count advances once), m / (m - 1) with the
    # whole batch's m.
    {"momentum": None, "unbiased_running_var": True,
     "skip_nonfinite_updates": True},
    {"use_scale": False, "use_bias": False, "epsilon": 1e-3},
], ids=["cumulative_unbiased", "no_affine"])
def test_the_layers_options_are_kept(bn):
  problem = _problem(MLP(bn=bn), (5,))
  loss, grads, stats = _whole_batch(*problem)
  exact = accumulate.value_and_grad(problem[0], *problem[1:],
                                    micro_batches=8)
  np.testing.assert_allclose(exact[0], loss, rtol=1e-5)
  _assert_trees_close(exact[1], grads, atol=1e-6)
  _assert_trees_close(exact[2], stats, atol=1e-6)
  if bn.get("momentum", 0.99) is None:
    assert all(int(c) == 1 for c in jax.tree.leaves(
        {k: v["count"] for k, v in exact[2].items()}))


def test_a_large_mean_offset_against_float64():
  """Inputs at 300 +- 2 through a bias-free Dense: the activations' mean is
  ~100 times their spread. Against a float64 whole batch, the statistics
  and the gradient are as close as float32's whole batch is (measured:
  gradient 1.5e-5 of the largest, both)."""
  problem = _problem(MLP(bn={"momentum": 0.8}), (5,), offset=300.0)
  exact = accumulate.value_and_grad(problem[0], *problem[1:],
                                    micro_batches=8)
  whole = _whole_batch(*problem)
  with jax.enable_x64(True):
    wide = jax.tree.map(
        lambda v: v.astype(jnp.float64) if v.dtype == jnp.float32 else v,
        problem[1:])
    reference = _whole_batch(problem[0], *wide)
  np.testing.assert_allclose(exact[0], reference[0], rtol=1e-5)
  largest = max(float(np.max(np.abs(g))) for g in
                jax.tree.leaves(reference[1]))
  for part in (1, 2):  # the gradient, then the new statistics
    float32_error = _max_difference(whole[part], reference[part])
    assert _max_difference(exact[part], reference[part]) < 4 * max(
        float32_error, 1e-6 * largest)


def test_memory_grows_with_the_micro_batch_not_the_batch():
  """XLA's memory analysis of the compiled step: at 16 micro-batches the
  total (inputs, the whole batch included, outputs and scratch) is below
  the whole batch's, the scratch memory below a quarter of it, and the
  scratch memory stays flat when the batch grows at a fixed micro-batch
  size."""
  def analysis(size, micro_batches):
    loss_fn, params, batch_stats, batch = _problem(CNN(), (6, 6, 2),
                                                   size=size)
    if micro_batches == 1:
      step = lambda *a: _whole_batch(loss_fn, *a)
    else:
      step = lambda *a: accumulate.value_and_grad(
          loss_fn, *a, micro_batches=micro_batches)
    compiled = jax.jit(step).lower(params, batch_stats, batch).compile()
    memory = compiled.memory_analysis()
    if memory is None:
      pytest.skip("this backend gives no memory analysis")
    return memory

  whole = analysis(1024, 1)
  accumulated = analysis(1024, 16)
  assert benchmark.total_bytes(accumulated) < benchmark.total_bytes(whole)
  assert accumulated.temp_size_in_bytes < whole.temp_size_in_bytes / 4
  # 64 examples per micro-batch, 4 times the batch: at most a little more.
  assert analysis(4096, 64).temp_size_in_bytes < (
      2 * accumulated.temp_size_in_bytes)


def test_the_passes_are_those_counted():
  """Every pass over the micro-batches is one lax.scan of the step: as
  many as `passes` says, for 3 BN layers."""
  problem = _problem(MLP(), (5,))
  jaxpr = jax.make_jaxpr(lambda *a: accumulate.value_and_grad(
      problem[0], *a, micro_batches=4))(*problem[1:])
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert accumulate.passes(3) == {"forward": 4, "forward_and_backward": 4}
  assert len(scans) == sum(accumulate.passes(3).values())


def test_a_non_finite_batch_is_skipped_once():
  """skip_nonfinite_updates under accumulation: an Inf in one micro-batch
  makes the whole batch's statistics non-finite; the state is kept and the
  skip counted once."""
  loss_fn, params, stats, batch = _problem(
      MLP(bn={"skip_nonfinite_updates": True}), (5,))
  batch = {**batch, "x": batch["x"].at[3, 0].set(jnp.inf)}
  _, _, new = accumulate.value_and_grad(loss_fn, params, stats, batch,
                                        micro_batches=4)
  for name, layer in new.items():
    np.testing.assert_array_equal(layer["mean"], stats[name]["mean"])
    np.testing.assert_array_equal(layer["var"], stats[name]["var"])
    assert int(layer["nonfinite_skips"]) == 1


def test_bad_input_is_named_in_one_line():
  problem = _problem(MLP(), (5,))
  with pytest.raises(ValueError, match="micro_batches=5 must be .* divides "
                     "the batch of 64"):
    accumulate.value_and_grad(problem[0], *problem[1:], micro_batches=5)
  ghost = _problem(MLP(bn={"virtual_batch_size": 4}), (5,))
  with pytest.raises(ValueError, match="virtual_batch_size=4; .*build the "
                     "layer with virtual_batch_size=None"):
    accumulate.value_and_grad(ghost[0], *ghost[1:], micro_batches=4)

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      bn = bn_nn.BatchNorm(use_running_average=not train)
      return bn(bn(x))
  twice = _problem(Twice(), (3,))
  with pytest.raises(ValueError, match="called more than once"):
    accumulate.value_and_grad(twice[0], *twice[1:], micro_batches=4)

  evaluated = lambda params, stats, micro: (
      jnp.sum(MLP().apply({"params": params, "batch_stats": stats},
                          micro["x"], train=False)), stats)
  with pytest.raises(ValueError, match="no BatchNorm layer ran in training"):
    accumulate.value_and_grad(evaluated, *problem[1:], micro_batches=4)


def test_the_benchmark_s_candidates_compile_and_agree():
  """benchmarks/accumulate.py's steps on a small MLP batch: every
  candidate compiles with a memory figure, and the exact one's gradient is
  the whole batch's."""
  compiled = benchmark.candidates("mlp", 32, (4,))
  assert list(compiled) == ["whole batch", "naive, 4 micro-batches",
                            "exact, 4 micro-batches"]
  results = {label: call() for label, (call, _) in compiled.items()}
  assert all(benchmark.total_bytes(memory) > memory.temp_size_in_bytes > 0
             for _, memory in compiled.values())
  _assert_trees_close(results["exact, 4 micro-batches"][1],
                      results["whole batch"][1], atol=1e-5)
