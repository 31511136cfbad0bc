"""Statistics that survive a bad step, and statistics recomputed after
averaging weights.

`skip_nonfinite_updates` (core.apply, bn_jax.nn and bn_jax.nnx BatchNorm):
a batch with an Inf or NaN (bfloat16 and float16 inputs, an overflowing
float16 activation) leaves the running statistics as they were and counts
the event; without it they turn non-finite, as in PyTorch
(pytorch/pytorch#88474). `precise.average_and_recompute`: SWA and EMA
weight averages with recomputed statistics, against
`torch.optim.swa_utils.AveragedModel` + `update_bn` (skipped where
$BN_JAX_TORCH_PYTHON is unset) and a NumPy forward pass.

The references are float64 NumPy formulas and PyTorch, never bn_jax.
"""

import functools

import flax
import flax.linen as nn
from flax import nnx as flax_nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bn_jax
from bn_jax import core
from bn_jax import precise
import helpers

FEATURES = 3
MOMENTUM = 0.9
EPSILON = 1e-5
# float32 statistics against float64 references (a few ulps per update).
RTOL, ATOL = 1e-5, 1e-6
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
BAD = {"inf": np.inf, "nan": np.nan}


def _batch(seed, dtype, shape=(8, FEATURES), bad=None, at=(3, 1)):
  """A batch of mean 1.5 and spread 2 in `dtype`, with `bad` at `at`."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(1.5 + 2.0 * rng.standard_normal(shape), dtype)
  return x if bad is None else x.at[at].set(bad)


def _batches(dtype, bad):
  """Good, bad, good, bad: two events to count, a good batch after each."""
  return [_batch(0, dtype), _batch(1, dtype, bad=bad), _batch(2, dtype),
          _batch(3, dtype, bad=bad)]


def _finite(x) -> bool:
  return bool(np.isfinite(np.asarray(x, np.float64)).all())


def _numpy_update(mean, var, x, momentum=MOMENTUM, *, chunks=1,
                  unbiased=False, count=0):
  """(mean, var) after one update from x (N, C), float64: the mean over
  ghost batches of each one's update of (mean, var); momentum None is the
  cumulative average, update number count + 1."""
  x = np.asarray(x, np.float64).reshape(chunks, -1, x.shape[-1])
  size = x.shape[1]
  batch_mean, batch_var = x.mean(1), x.var(1)
  if unbiased:
    batch_var = batch_var * size / (size - 1)
  weight = 1.0 / (count + 1) if momentum is None else 1.0 - momentum
  return ((mean + weight * (batch_mean - mean)).mean(0),
          (var + weight * (batch_var - var)).mean(0))


def _as_numpy(stats) -> dict[str, np.ndarray]:
  return {name: np.asarray(value) for name, value in stats.items()
          if name in ("mean", "var", "nonfinite_skips") and value is not None}


# One runner per front end: the statistics after each batch of `xs`, in
# training mode, with momentum MOMENTUM.


def _run_apply(xs, skip):
  params, state = core.init(FEATURES, skip_nonfinite_updates=skip)
  step = jax.jit(lambda state, x: core.apply(
      params, state, x, training=True, momentum=MOMENTUM,
      skip_nonfinite_updates=skip)[1])
  out = []
  for x in xs:
    state = step(state, x)
    out.append(_as_numpy(state._asdict()))
  return out


def _run_linen(xs, skip):
  layer = bn_jax.nn.BatchNorm(use_running_average=False, momentum=MOMENTUM,
                              skip_nonfinite_updates=skip)
  variables = layer.init(jax.random.key(0), xs[0])
  step = jax.jit(lambda variables, x: layer.apply(
      variables, x, mutable=["batch_stats"])[1])
  out = []
  for x in xs:
    variables = {**variables, **step(variables, x)}
    out.append(_as_numpy(variables["batch_stats"]))
  return out


def _run_nnx(xs, skip):
  layer = bn_jax.nnx.BatchNorm(FEATURES, momentum=MOMENTUM,
                               skip_nonfinite_updates=skip,
                               rngs=flax_nnx.Rngs(0))
  out = []
  for x in xs:
    layer(x)
    out.append(_as_numpy({name: getattr(layer, name)[...]
                          for name in ("mean", "var", "nonfinite_skips")
                          if hasattr(layer, name)}))
  return out


RUNNERS = {"apply": _run_apply, "linen": _run_linen, "nnx": _run_nnx}
CASES = [(f, d, b) for f in RUNNERS for d in DTYPES for b in BAD]


@pytest.mark.parametrize("front_end,dtype,bad", CASES)
def test_a_nonfinite_batch_is_skipped_and_counted(front_end, dtype, bad):
  """Each bad batch leaves the statistics exactly as they were and adds 1
  to the counter; each good batch is the NumPy EMA of the last good
  state."""
  xs = _batches(DTYPES[dtype], BAD[bad])
  got = RUNNERS[front_end](xs, skip=True)
  mean, var, skips = np.zeros(FEATURES), np.ones(FEATURES), 0
  for i, (x, stats) in enumerate(zip(xs, got)):
    if _finite(x):
      mean, var = _numpy_update(mean, var, x)
    else:
      skips += 1
      for name in ("mean", "var"):
        np.testing.assert_array_equal(stats[name], got[i - 1][name])
    np.testing.assert_allclose(stats["mean"], mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["var"], var, rtol=RTOL, atol=ATOL)
    assert stats["nonfinite_skips"] == skips
    assert stats["nonfinite_skips"].dtype == np.int32
  assert skips == 2


@pytest.mark.parametrize("front_end,dtype,bad", CASES)
def test_without_the_option_a_nonfinite_batch_poisons_the_statistics(
    front_end, dtype, bad):
  """Today's behaviour, and PyTorch's: no counter, and from the bad batch
  on the statistics are not finite, good batches or not."""
  xs = _batches(DTYPES[dtype], BAD[bad])
  got = RUNNERS[front_end](xs, skip=False)
  assert all(set(stats) == {"mean", "var"} for stats in got)
  mean, var = _numpy_update(np.zeros(FEATURES), np.ones(FEATURES), xs[0])
  np.testing.assert_allclose(got[0]["mean"], mean, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got[0]["var"], var, rtol=RTOL, atol=ATOL)
  for stats in got[1:]:
    assert not np.isfinite(stats["var"]).all()


def test_the_state_without_the_option_is_as_before():
  params, state = core.init(FEATURES)
  assert state.nonfinite_skips is None
  assert core.BNState(state.mean, state.var, state.count) == state
  _, new_state = core.apply(params, state, _batch(0, jnp.float32),
                            training=True)
  assert new_state.nonfinite_skips is None
  _, counted = core.init(FEATURES, skip_nonfinite_updates=True)
  assert counted.nonfinite_skips.shape == ()
  assert counted.nonfinite_skips.dtype == jnp.int32


def test_the_option_needs_the_counter():
  params, state = core.init(FEATURES)
  with pytest.raises(ValueError, match="needs state.nonfinite_skips; create"):
    core.apply(params, state, _batch(0, jnp.float32), training=True,
               skip_nonfinite_updates=True)
  with pytest.raises(ValueError, match="needs state.nonfinite_skips; create"):
    core.update_running_stats(state, state.mean, state.var, 8.0,
                              momentum=MOMENTUM, unbiased=False,
                              skip_nonfinite=True)


def test_evaluation_ignores_the_option():
  params, state = core.init(FEATURES, skip_nonfinite_updates=True)
  _, same = core.apply(params, state, _batch(0, jnp.float16, bad=np.inf),
                       training=False, skip_nonfinite_updates=True)
  assert same is state


def test_update_running_stats_skips_per_layer():
  """One non-finite feature skips the whole layer (as a skipped optimizer
  step); a finite update is the EMA with the unbiased variance."""
  _, state = core.init(FEATURES, skip_nonfinite_updates=True)
  update = jax.jit(functools.partial(
      core.update_running_stats, count=8.0, momentum=MOMENTUM, unbiased=True,
      skip_nonfinite=True))
  mean = np.array([0.5, -1.0, 2.0], np.float32)
  var = np.array([1.5, 0.25, 4.0], np.float32)
  for field, index, bad in (("mean", 1, np.nan), ("var", 2, np.inf)):
    batch = {"batch_mean": mean.copy(), "batch_var": var.copy()}
    batch[f"batch_{field}"][index] = bad
    skipped = update(state, **batch)
    np.testing.assert_array_equal(skipped.mean, state.mean)
    np.testing.assert_array_equal(skipped.var, state.var)
    assert skipped.count == 0 and skipped.nonfinite_skips == 1
  updated = update(state, batch_mean=mean, batch_var=var)
  np.testing.assert_allclose(updated.mean, (1 - MOMENTUM) * mean, rtol=RTOL)
  np.testing.assert_allclose(
      updated.var, MOMENTUM + (1 - MOMENTUM) * var * 8 / 7, rtol=RTOL)
  assert updated.count == 1 and updated.nonfinite_skips == 0


def test_ghost_batches_skip_together():
  """A NaN in one ghost batch of two skips the update of both, counted
  once; a good batch is the mean of the two ghost batches' updates."""
  params, state = core.init(FEATURES, skip_nonfinite_updates=True)
  step = jax.jit(lambda state, x: core.apply(
      params, state, x, training=True, momentum=MOMENTUM,
      virtual_batch_size=4, skip_nonfinite_updates=True)[1])
  xs = [_batch(0, jnp.float16), _batch(1, jnp.float16, bad=np.nan, at=(5, 0)),
        _batch(2, jnp.float16)]
  mean, var = np.zeros(FEATURES), np.ones(FEATURES)
  for x, skips, count in zip(xs, (0, 1, 1), (1, 1, 2)):
    previous, state = state, step(state, x)
    if _finite(x):
      mean, var = _numpy_update(mean, var, x, chunks=2)
    else:
      np.testing.assert_array_equal(state.mean, previous.mean)
      np.testing.assert_array_equal(state.var, previous.var)
    np.testing.assert_allclose(state.mean, mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.var, var, rtol=RTOL, atol=ATOL)
    assert state.nonfinite_skips == skips and state.count == count
    assert state.nonfinite_skips.dtype == jnp.int32


def test_renorm_statistics_are_kept_too():
  """Keras's renorm updates (the variance averaged as a standard deviation)
  on good batches; on a bad one all four statistics stay."""
  renorm_momentum = 0.8
  params, state = core.init(FEATURES, renorm=True,
                            skip_nonfinite_updates=True)
  step = jax.jit(lambda state, x: core.apply(
      params, state, x, training=True, momentum=MOMENTUM, renorm=True,
      renorm_clipping={"rmax": 3.0, "dmax": 5.0},
      renorm_momentum=renorm_momentum, skip_nonfinite_updates=True)[1])
  ref = dict(mean=np.zeros(FEATURES), var=np.ones(FEATURES),
             renorm_mean=np.zeros(FEATURES), renorm_stddev=np.ones(FEATURES))
  for x, skips in zip(_batches(jnp.bfloat16, np.inf), (0, 1, 1, 2)):
    previous, state = state, step(state, x)
    if _finite(x):
      x = np.asarray(x, np.float64)
      mu, sigma = x.mean(0), np.sqrt(x.var(0) + EPSILON)
      stddev = np.sqrt(ref["var"] + EPSILON)
      stddev += (1 - MOMENTUM) * (sigma - stddev)
      ref = dict(mean=ref["mean"] + (1 - MOMENTUM) * (mu - ref["mean"]),
                 var=np.maximum(stddev**2 - EPSILON, 0.0),
                 renorm_mean=ref["renorm_mean"] + (1 - renorm_momentum) * (
                     mu - ref["renorm_mean"]),
                 renorm_stddev=ref["renorm_stddev"] + (
                     1 - renorm_momentum) * (sigma - ref["renorm_stddev"]))
    else:
      for name in ref:
        np.testing.assert_array_equal(getattr(state, name),
                                      getattr(previous, name))
    for name, value in ref.items():
      np.testing.assert_allclose(getattr(state, name), value, rtol=RTOL,
                                 atol=ATOL, err_msg=name)
    assert state.nonfinite_skips == skips


def test_a_named_axis_decides_for_all_its_members():
  """An Inf on one member of a vmapped axis: the pooled statistics are
  not finite, so every member skips; a good batch is pooled over both."""
  params, state = core.init(FEATURES, skip_nonfinite_updates=True)
  states = jax.tree.map(lambda v: jnp.stack([v, v]), state)
  step = jax.jit(jax.vmap(lambda state, x: core.apply(
      params, state, x, training=True, momentum=MOMENTUM, axis_name="i",
      skip_nonfinite_updates=True)[1], axis_name="i"))
  xs = [_batch(0, jnp.float16, shape=(2, 8, FEATURES)),
        _batch(1, jnp.float16, shape=(2, 8, FEATURES), bad=np.inf,
               at=(0, 2, 1)),
        _batch(2, jnp.float16, shape=(2, 8, FEATURES))]
  mean, var = np.zeros(FEATURES), np.ones(FEATURES)
  for x, skips in zip(xs, (0, 1, 1)):
    states = step(states, x)
    if _finite(x):
      mean, var = _numpy_update(mean, var, x.reshape(16, FEATURES))
    for member in range(2):
      np.testing.assert_allclose(states.mean[member], mean, rtol=RTOL,
                                 atol=ATOL)
      np.testing.assert_allclose(states.var[member], var, rtol=RTOL,
                                 atol=ATOL)
    np.testing.assert_array_equal(states.nonfinite_skips, [skips, skips])


def test_a_skipped_update_does_not_advance_the_cumulative_average():
  """momentum=None: the skipped batch is not counted, so the next good
  batch weighs 1/2; with the unbiased running variance."""
  params, state = core.init(FEATURES, skip_nonfinite_updates=True)
  step = jax.jit(lambda state, x: core.apply(
      params, state, x, training=True, momentum=None,
      unbiased_running_var=True, skip_nonfinite_updates=True)[1])
  mean, var = np.zeros(FEATURES), np.ones(FEATURES)
  for x, count in zip(_batches(jnp.float16, np.nan), (1, 1, 2, 2)):
    state = step(state, x)
    if _finite(x):
      mean, var = _numpy_update(mean, var, x, None, unbiased=True,
                                count=count - 1)
    np.testing.assert_allclose(state.mean, mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.var, var, rtol=RTOL, atol=ATOL)
    assert state.count == count


class _HalfDenseThenBN(nn.Module):
  """A float16 Dense (mixed precision) whose activation feeds a BN."""
  skip: bool

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(FEATURES, dtype=jnp.float16, name="dense")(x)
    return bn_jax.nn.BatchNorm(use_running_average=not train,
                               momentum=MOMENTUM,
                               skip_nonfinite_updates=self.skip,
                               name="bn")(h)


@pytest.mark.parametrize("skip", [True, False])
def test_a_float16_activation_that_overflows(skip):
  """The realistic case: one example's float16 Dense output exceeds 65504
  (finite in float32, Inf in float16), and only that batch is skipped."""
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((4, FEATURES)).astype(np.float32)
  inputs = [rng.standard_normal((8, 4)).astype(np.float32) for _ in range(3)]
  inputs[1][2] *= 5e4  # a spike, in float32
  activations = [x @ kernel for x in inputs]
  assert np.isfinite(activations[1]).all()
  with np.errstate(over="ignore"):
    assert not np.isfinite(activations[1].astype(np.float16)).all()
  model = _HalfDenseThenBN(skip)
  variables = model.init(jax.random.key(0), inputs[0], train=False)
  variables = flax.core.copy(variables, {"params": {
      "dense": {"kernel": jnp.asarray(kernel),
                "bias": jnp.zeros(FEATURES)}, "bn": variables["params"]["bn"]}})
  step = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                          mutable=["batch_stats"])[1])
  mean, var = np.zeros(FEATURES), np.ones(FEATURES)
  for i, x in enumerate(inputs):
    variables = flax.core.copy(variables, step(variables, x))
    stats = variables["batch_stats"]["bn"]
    assert ("nonfinite_skips" in stats) == skip
    if i == 1 and not skip:
      assert not np.isfinite(stats["var"]).all()
      return
    if i != 1:
      # flax's float16 Dense gives the BN's input (not bn_jax).
      h = nn.Dense(FEATURES, dtype=jnp.float16).apply(
          {"params": variables["params"]["dense"]}, x)
      mean, var = _numpy_update(mean, var, h)
    np.testing.assert_allclose(stats["mean"], mean, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["var"], var, rtol=RTOL, atol=ATOL)
    if skip:
      assert stats["nonfinite_skips"] == (i >= 1)


# ----------------------------------------------------------------------------
# Recompute after averaging: precise.average_and_recompute.

IN, WIDTH, OUT = 6, 8, 3
NUM_SNAPSHOTS, NUM_BATCHES, BATCH = 3, 4, 16
DECAY = 0.75


class _MLP(nn.Module):
  """Dense, BN, relu, Dense, BN, relu, Dense: torch's
  Sequential(Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d, ReLU, Linear)."""

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = nn.Dense(WIDTH)(x)
      x = bn_jax.nn.BatchNorm(use_running_average=not train,
                              momentum=0.9, epsilon=EPSILON)(x)
      x = nn.relu(x)
    return nn.Dense(OUT)(x)


DENSE_SHAPES = ((IN, WIDTH), (WIDTH, WIDTH), (WIDTH, OUT))


def _snapshots() -> list[dict]:
  """Parameters at NUM_SNAPSHOTS points of a trajectory (a base plus
  drift), as NumPy trees of _MLP's params."""
  rng = np.random.default_rng(0)
  normal = lambda shape, s: (s * rng.standard_normal(shape)).astype(
      np.float32)
  base = {f"Dense_{i}": {"kernel": normal(shape, 0.5),
                         "bias": normal(shape[1:], 0.1)}
          for i, shape in enumerate(DENSE_SHAPES)}
  base.update({f"BatchNorm_{i}": {"scale": 1 + normal((WIDTH,), 0.2),
                                  "bias": normal((WIDTH,), 0.2)}
               for i in range(2)})
  return [jax.tree.map(lambda v: v + normal(v.shape, 0.2), base)
          for _ in range(NUM_SNAPSHOTS)]


def _data():
  rng = np.random.default_rng(1)
  batches = (1.0 + rng.standard_normal((NUM_BATCHES, BATCH, IN))).astype(
      np.float32)
  test = rng.standard_normal((5, IN)).astype(np.float32)
  return batches, test


def _numpy_average(snapshots, decay):
  if decay is None:
    return jax.tree.map(lambda *v: np.mean(np.stack(v), 0), *snapshots)
  average = snapshots[0]
  for snapshot in snapshots[1:]:
    average = jax.tree.map(lambda a, s: decay * a + (1 - decay) * s,
                           average, snapshot)
  return average


def _numpy_update_bn(params, batches):
  """update_bn in float64: every BN normalizes with its batch's statistics;
  running mean and var are the means over batches of the batch means and
  of the Bessel-corrected variances."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  moments = {i: [] for i in range(2)}
  for x in np.asarray(batches, np.float64):
    for i in range(2):
      x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      mean, var = x.mean(0), x.var(0)
      moments[i].append((mean, var * len(x) / (len(x) - 1)))
      x = (x - mean) / np.sqrt(var + EPSILON)
      x = np.maximum(x * p[f"BatchNorm_{i}"]["scale"]
                     + p[f"BatchNorm_{i}"]["bias"], 0.0)
  return {f"BatchNorm_{i}": {"mean": np.mean([m for m, _ in moments[i]], 0),
                             "var": np.mean([v for _, v in moments[i]], 0)}
          for i in range(2)}


def _variables(model):
  return model.init(jax.random.key(0), jnp.zeros((2, IN)), train=False)


@pytest.mark.parametrize("decay", [None, DECAY], ids=["swa", "ema"])
def test_average_and_recompute_matches_numpy(decay):
  model, snapshots = _MLP(), _snapshots()
  batches, _ = _data()
  averaged = precise.average_and_recompute(
      model, [jax.tree.map(jnp.asarray, s) for s in snapshots],
      _variables(model), jnp.asarray(batches), decay=decay)
  params = _numpy_average(snapshots, decay)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=RTOL,
                                 atol=ATOL), averaged["params"], params)
  for name, stats in _numpy_update_bn(params, batches).items():
    for key, value in stats.items():
      np.testing.assert_allclose(averaged["batch_stats"][name][key], value,
                                 rtol=RTOL, atol=ATOL, err_msg=name + key)


def test_average_params_continues_a_running_average():
  snapshots = _snapshots()
  for decay in (None, DECAY):
    start, n = precise.average_params(snapshots[:2], decay=decay)
    assert n == 2
    average, n = precise.average_params(snapshots[2:], decay=decay,
                                        average=start, num_averaged=n)
    assert n == NUM_SNAPSHOTS
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=RTOL,
                                   atol=ATOL),
                 average, _numpy_average(snapshots, decay))


def test_average_params_errors():
  snapshot = _snapshots()[0]
  with pytest.raises(ValueError, match=r"decay=1.5 must be in \[0, 1\]"):
    precise.average_params([snapshot], decay=1.5)
  with pytest.raises(ValueError, match="pass both"):
    precise.average_params([snapshot], average=snapshot)
  with pytest.raises(ValueError, match="pass both"):
    precise.average_params([snapshot], num_averaged=2)
  with pytest.raises(ValueError, match="no snapshots and no average"):
    precise.average_params([])


_TORCH_SWA = """
import torch.nn as tnn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.optim.swa_utils import update_bn

def build():
  return tnn.Sequential(
      tnn.Linear(6, 8), tnn.BatchNorm1d(8), tnn.ReLU(), tnn.Linear(8, 8),
      tnn.BatchNorm1d(8), tnn.ReLU(), tnn.Linear(8, 3))

DENSE, BN = (0, 3, 6), (1, 4)

def load(model, k):
  given = lambda name: torch.from_numpy(inputs[f"s{k}_{name}"])
  with torch.no_grad():
    for i, m in enumerate(DENSE):
      model[m].weight.copy_(given(f"Dense_{i}_kernel").T)
      model[m].bias.copy_(given(f"Dense_{i}_bias"))
    for i, m in enumerate(BN):
      model[m].weight.copy_(given(f"BatchNorm_{i}_scale"))
      model[m].bias.copy_(given(f"BatchNorm_{i}_bias"))

batches = torch.from_numpy(inputs["batches"])
for name, options in (
    ("swa", {}),
    ("ema", {"multi_avg_fn": get_ema_multi_avg_fn(float(inputs["decay"]))})):
  model = build()
  averaged = AveragedModel(model, **options)
  for k in range(int(inputs["num_snapshots"])):
    load(model, k)
    model.train()
    model(batches[k])  # a training step's forward moves the buffers
    averaged.update_parameters(model)
  update_bn(batches, averaged)  # iterates the N batches
  averaged.eval()
  m = averaged.module
  for i, j in enumerate(DENSE):
    outputs[f"{name}_Dense_{i}_kernel"] = m[j].weight.detach().numpy().T
    outputs[f"{name}_Dense_{i}_bias"] = m[j].bias.detach().numpy()
  for i, j in enumerate(BN):
    outputs[f"{name}_BatchNorm_{i}_scale"] = m[j].weight.detach().numpy()
    outputs[f"{name}_BatchNorm_{i}_bias"] = m[j].bias.detach().numpy()
    outputs[f"{name}_BatchNorm_{i}_mean"] = m[j].running_mean.numpy()
    outputs[f"{name}_BatchNorm_{i}_var"] = m[j].running_var.numpy()
  with torch.no_grad():
    outputs[f"{name}_eval"] = averaged(torch.from_numpy(inputs["test"])).numpy()
"""


@pytest.fixture(scope="module")
def torch_swa():
  """PyTorch's AveragedModel + update_bn, SWA and EMA, on _MLP's twin."""
  batches, test = _data()
  arrays = {"batches": batches, "test": test, "decay": np.array(DECAY),
            "num_snapshots": np.array(NUM_SNAPSHOTS)}
  for k, snapshot in enumerate(_snapshots()):
    for (layer, name), value in flax.traverse_util.flatten_dict(
        snapshot).items():
      arrays[f"s{k}_{layer}_{name}"] = value
  return helpers.run_torch(_TORCH_SWA, arrays)


@pytest.mark.parametrize("decay,streamed", [(None, False), (DECAY, False),
                                            (None, True)],
                         ids=["swa", "ema", "swa-continued"])
def test_average_and_recompute_matches_torch_update_bn(torch_swa, decay,
                                                       streamed):
  """Same averaged params, BN statistics and eval outputs as PyTorch, from
  the snapshots at once (jitted) or from a running average of the first
  two plus the last."""
  name = "swa" if decay is None else "ema"
  model, snapshots = _MLP(), _snapshots()
  batches, test = _data()
  variables = _variables(model)
  if streamed:
    start, n = precise.average_params(snapshots[:2])
    averaged = precise.average_and_recompute(
        model, snapshots[2:], variables, jnp.asarray(batches),
        average=start, num_averaged=n)
  else:
    recompute = jax.jit(functools.partial(precise.average_and_recompute,
                                          model, decay=decay))
    averaged = recompute(snapshots, variables, jnp.asarray(batches))
  flat = flax.traverse_util.flatten_dict({
      "params": averaged["params"], "batch_stats": averaged["batch_stats"]})
  for (_, layer, key), value in flat.items():
    np.testing.assert_allclose(value, torch_swa[f"{name}_{layer}_{key}"],
                               rtol=RTOL, atol=ATOL, err_msg=layer + key)
  y = model.apply(averaged, jnp.asarray(test), train=False)
  np.testing.assert_allclose(y, torch_swa[f"{name}_eval"], rtol=1e-5,
                             atol=1e-5)
