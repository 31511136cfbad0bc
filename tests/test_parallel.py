"""Tests for bn_lab.parallel: data-parallel training on 8 forced CPU devices.

JAX fixes the device count when it starts, so the 8-device checks run in a
subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8
and the rest of the suite keeps its one device. This file is that
subprocess's script too: `python tests/test_parallel.py` runs every `check_*`
function below and prints one JSON line, {check name: "ok" or the
traceback}, which the tests read (one JAX start-up for all of them).

References are independent of the code under test: one device running the
whole global batch (synchronized BN), and a `jax.vmap` over ghost batches
(per-device BN).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bn_jax
import helpers
from bn_lab import models
from bn_lab import parallel
from bn_lab import sweep
from bn_lab import train
from bn_lab import config as base

REPO = Path(__file__).resolve().parents[1]
DEVICES = 8
PER_DEVICE = 16
GLOBAL_BATCH = DEVICES * PER_DEVICE


def assert_trees_close(actual, expected, atol=2e-5, rtol=2e-5):
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e),
                                              atol=atol, rtol=rtol),
      actual, expected)


# ----------------------------------------------------------------------------
# Checks that need 8 devices (run in the subprocess).


def _bn_vjp(params, state, x, dy, **bn_kwargs):
  """(y, new_state, dx, dparams) of BN in training mode for cotangent dy."""
  def forward(x, params):
    return bn_jax.apply(params, state, x, training=True, momentum=0.9,
                        **bn_kwargs)
  y, vjp, new_state = jax.vjp(forward, x, params, has_aux=True)
  dx, dparams = vjp(dy)
  return y, new_state, dx, dparams


def _bn_inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  features = shape[-1]
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape), jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  params = bn_jax.BNParams(
      scale=jnp.asarray(rng.uniform(0.5, 1.5, features), jnp.float32),
      bias=jnp.asarray(rng.standard_normal(features), jnp.float32))
  state = bn_jax.BNState(mean=jnp.full((features,), 0.5, jnp.float32),
                         var=jnp.full((features,), 2.0, jnp.float32),
                         count=jnp.zeros((), jnp.int32))
  return params, state, x, dy


def _split_rows(arrays, mesh):
  return jax.device_put(arrays, NamedSharding(mesh, P("data")))


def check_sync_bn_matches_one_device():
  """8 devices x 16 examples, synchronized == one device on 128 examples."""
  mesh = parallel.make_mesh(DEVICES)
  # The default gradient (the paper's, through custom JVPs) on a dense and
  # a conv-shaped activation; plain autodiff through the psums on the dense
  # one; the plain (non-XLA:CPU) path on the conv-shaped one.
  for shape, options in (((GLOBAL_BATCH, 5), {}),
                         ((GLOBAL_BATCH, 3, 3, 4), {}),
                         ((GLOBAL_BATCH, 5), {"grad": "autodiff"}),
                         ((GLOBAL_BATCH, 3, 3, 4), {"impl": "plain"})):
    params, state, x, dy = _bn_inputs(shape)
    expected = _bn_vjp(params, state, x, dy, **options)
    sharded = jax.jit(jax.shard_map(
        functools.partial(_bn_vjp, axis_name=parallel.DATA_AXIS, **options),
        mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
        # y, dx are split by rows; new state and (d gamma, d beta) are
        # replicated: shard_map checks that they agree on every device.
        out_specs=(P("data"), P(), P("data"), P())))
    y, new_state, dx, dparams = sharded(
        *parallel.replicate((params, state), mesh),
        *_split_rows((x, dy), mesh))
    assert_trees_close((y, dx), expected[0::2], atol=1e-5)
    assert_trees_close(new_state, expected[1], atol=1e-5)
    assert_trees_close(dparams, expected[3], atol=1e-4)


def check_per_device_bn_matches_ghost_batches():
  """BN without axis_name on 8 devices == BN on each ghost batch of 16."""
  mesh = parallel.make_mesh(DEVICES)
  params, state, x, dy = _bn_inputs((GLOBAL_BATCH, 5), seed=1)
  ghost = lambda v: v.reshape(DEVICES, PER_DEVICE, *v.shape[1:])
  y_ref, state_ref, dx_ref, dparams_ref = jax.vmap(
      _bn_vjp, in_axes=(None, None, 0, 0))(params, state, ghost(x), ghost(dy))

  def per_device(params, state, x, dy):
    y, new_state, dx, dparams = _bn_vjp(params, state, x, dy)
    return y, jax.tree.map(lambda v: v[None], new_state), dx, dparams
  y, new_state, dx, dparams = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
      # Each device's own running statistics, stacked; the gradients of the
      # replicated gamma and beta are summed over devices by shard_map.
      out_specs=(P("data"), P("data"), P("data"), P())))(
          *parallel.replicate((params, state), mesh),
          *_split_rows((x, dy), mesh))
  assert_trees_close((ghost(y), ghost(dx)), (y_ref, dx_ref), atol=1e-5)
  assert_trees_close(new_state, state_ref, atol=1e-5)
  assert_trees_close(dparams, jax.tree.map(lambda g: g.sum(0), dparams_ref),
                     atol=1e-4)


def _random_data(num_train=512, num_test=203, seed=0):
  # 203 test examples: not a multiple of 8, so the eval remainder is used.
  rng = np.random.default_rng(seed)
  return train.to_device(
      rng.random((num_train, 784), np.float32),
      rng.integers(0, 10, num_train),
      rng.random((num_test, 784), np.float32),
      rng.integers(0, 10, num_test))


def _small_spec(**overrides):
  fields = dict(placement="before_activation", widths=(32,), optimizer="sgd",
                batch_size=GLOBAL_BATCH, steps_per_epoch=512 // GLOBAL_BATCH,
                num_epochs=2, eval_chunk=64)
  return train.TrainSpec(**{**fields, **overrides})


SWEEP_HPARAMS = {"learning_rate": [0.5, 0.1], "bn_momentum": [0.9, 0.8],
                 "bn_epsilon": [1e-3, 1e-5]}


def check_training_matches_one_device():
  """Two runs (vmapped), two epochs: params, BN statistics, optimizer state
  and every metric equal the single-device sweep. SGD, so a gradient off by
  the device count could not hide behind Adam's scale invariance. Each run
  with its own data order, and both with one shared order (data_seed)."""
  for data_seed in (None, 5):
    _check_training_matches_one_device(_small_spec(data_seed=data_seed))


def check_norm_family_and_precise_bn_match_one_device():
  """The normalization variants and PreciseBN on the mesh compute what one
  device does: ghost batches are chunks of each device's examples (8 per
  chunk, 2 per device), and the population statistics are recomputed
  without pooling the devices' identical copies (whose count would enter
  Bessel's correction). And ghost batches of a device's share on one
  device train as bn_stats="per_device" on 8."""
  for norm, bn in (("ghost", (("virtual_batch_size", 8),)),
                   ("renorm", (("renorm_clipping", (("dmax", 1.0),
                                                    ("rmax", 1.5))),
                               ("renorm_schedule", (2, 6, 4)))),
                   ("layer", ())):
    _check_training_matches_one_device(_small_spec(
        norm=norm, bn=bn, num_epochs=1, precise_batches=2,
        precise_estimator="mean"))
  # Ghost batches of one device's share on one device are the per_device
  # mode on 8: the same training, metrics and statistics.
  data, mesh = _random_data(), parallel.make_mesh(DEVICES)
  plain = _small_spec(num_epochs=1)
  ghost = _small_spec(num_epochs=1, norm="ghost",
                      bn=(("virtual_batch_size", PER_DEVICE),))
  one = train.create_sweep_states(ghost, [0, 1], SWEEP_HPARAMS)
  many = train.create_sweep_states(plain, [0, 1], SWEEP_HPARAMS)
  one, metrics_one = train.sweep_epoch(one, data, spec=ghost)
  many, metrics_many = parallel.sweep_epoch_fn(plain, mesh, "per_device")(
      many, data)
  assert_trees_close(metrics_many, metrics_one, atol=1e-5)
  assert_trees_close(many, one, atol=1e-5)
  # The statistics themselves (an accuracy can hide a 7% variance error).
  spec = _small_spec(precise_batches=2, precise_estimator="mean")
  states = train.create_sweep_states(
      spec, [0], {k: v[:1] for k, v in SWEEP_HPARAMS.items()})
  state = jax.tree.map(lambda v: v[0], states)
  fixed = train.epoch_batches(state.data_key, 0, data.train_images.shape[0],
                              spec)[:2]

  def recompute(state, data, *, spec, batches=None):
    del batches  # over_runs' epoch order: the fixed batches instead
    return state, train.population_statistics(state, data, fixed, spec=spec)
  _, on_mesh = jax.jit(parallel.shard_sweep(
      recompute, parallel.data_parallel_spec(spec, "sync"), mesh))(
          parallel.replicate(states, mesh), parallel.replicate(data, mesh))
  assert_trees_close(jax.tree.map(lambda v: v[0], on_mesh),
                     train.population_statistics(state, data, fixed,
                                                 spec=spec), atol=1e-6)


def _check_training_matches_one_device(spec):
  data = _random_data()
  mesh = parallel.make_mesh(DEVICES)
  one = train.create_sweep_states(spec, [0, 1], SWEEP_HPARAMS)
  many = train.create_sweep_states(spec, [0, 1], SWEEP_HPARAMS)
  epoch_many = parallel.sweep_epoch_fn(spec, mesh, "sync")
  for epoch in range(spec.num_epochs):
    one, metrics_one = train.sweep_epoch(one, data, spec=spec)
    with helpers.count_compiles() as compiles:
      many, metrics_many = epoch_many(many, data)
    # Epoch 2 takes epoch 1's output as it is: no retrace, no recompile.
    assert epoch == 0 or not compiles, compiles
    assert set(metrics_many) == set(metrics_one)
    assert_trees_close(metrics_many, metrics_one, atol=1e-5)
  assert_trees_close(many, one, atol=1e-5)
  # Params and running statistics are the same on every device.
  for leaf in jax.tree.leaves((many.params, many.batch_stats)):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == DEVICES
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])


def check_per_device_training_matches_ghost_batches():
  """bn_stats="per_device": each step equals a vmap over 8 ghost batches
  (mean loss, mean gradient, running statistics averaged over ghosts)."""
  data = _random_data(seed=1)
  spec = _small_spec(placement="after_activation", num_epochs=1)
  hparams = {k: v[:1] for k, v in SWEEP_HPARAMS.items()}
  states = train.create_sweep_states(spec, [3], hparams)
  mesh = parallel.make_mesh(DEVICES)
  parallel_spec = parallel.data_parallel_spec(spec, "per_device")
  epoch = jax.jit(parallel.shard_sweep(train.train_epoch, parallel_spec,
                                      mesh))
  trained, sums = epoch(parallel.replicate(states, mesh),
                        parallel.replicate(data, mesh))

  state = jax.tree.map(lambda v: v[0], states)
  model = spec.make_model(state.bn_hparams)
  tx = train.make_optimizer(spec)
  ghost = lambda v: v.reshape(DEVICES, PER_DEVICE, *v.shape[1:])

  @jax.jit
  def reference_step(state, images, labels):
    def loss_fn(params):
      def one_ghost(x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x,
            train=True, mutable=["batch_stats"])
        return (optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean(), updates["batch_stats"])
      losses, stats = jax.vmap(one_ghost)(ghost(images), ghost(labels))
      return losses.mean(), jax.tree.map(lambda s: s.mean(0), stats)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state._replace(step=state.step + 1,
                          params=optax.apply_updates(state.params, updates),
                          batch_stats=stats, opt_state=opt_state), loss

  losses = []
  for indices in train.epoch_batches(state.data_key, 0,
                                     data.train_images.shape[0], spec):
    state, loss = reference_step(state, data.train_images[indices],
                                 data.train_labels[indices])
    losses.append(loss)
  expected = jax.tree.map(lambda v: v[None], state)
  assert_trees_close(trained, expected, atol=1e-5)
  np.testing.assert_allclose(sums["loss_sum"][0],
                             np.sum(losses) * GLOBAL_BATCH, rtol=1e-5)
  assert int(sums["count"][0]) == spec.steps_per_epoch * GLOBAL_BATCH


def check_uneven_batch_raises():
  config = base.get_config()
  config.batch_size, config.mesh_devices = 100, DEVICES
  for check in (parallel.check_config, parallel.setup):
    with pytest.raises(ValueError, match=r"config\.batch_size=100 .*8 devices"):
      check(config)
  config.mesh_devices = "auto"  # resolves to 8 here
  with pytest.raises(ValueError, match=r"config\.batch_size=100 .*8 devices"):
    parallel.setup(config)
  config.batch_size = 128  # every batch size of a batch_sizes axis counts
  with pytest.raises(ValueError, match=r"config\.batch_size=100 .*8 devices"):
    parallel.setup(config, [128, 100])
  config.batch_size, config.mesh_devices = 128, 16
  with pytest.raises(ValueError, match="only 8 device"):
    parallel.setup(config)
  config.mesh_devices = "auto"
  assert parallel.setup(config).shape == {"data": DEVICES}


def _run_checks() -> dict[str, str]:
  jax.config.update("jax_numpy_rank_promotion", "raise")
  assert jax.device_count() == DEVICES, jax.devices()
  report = {}
  for name, check in list(globals().items()):
    if name.startswith("check_"):
      try:
        started = time.perf_counter()
        check()
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        report[name] = "ok"
      except Exception:  # every failure goes into the report
        report[name] = traceback.format_exc()
  return report


# ----------------------------------------------------------------------------
# pytest side: two 8-device subprocesses, the checks above and the CLI.


class _Child:
  """A subprocess on 8 forced CPU devices, its output in files (a full pipe
  would stall it while the other child is being waited for)."""

  def __init__(self, args, directory: Path):
    env = dict(os.environ)
    # Unoptimized CPU code compiles about twice as fast; every comparison
    # runs both sides in the same child, so the flags cannot hide a mismatch.
    env["XLA_FLAGS"] = " ".join([
        env.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={DEVICES}",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true"]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    self.out, self.err = directory / "stdout", directory / "stderr"
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=out,
                                      stderr=err)

  def wait(self) -> tuple[str, str]:
    try:
      self.process.wait(timeout=300)
    finally:
      if self.process.poll() is None:
        self.process.kill()
    stdout, stderr = self.out.read_text(), self.err.read_text()
    assert self.process.returncode == 0, stdout + stderr[-5000:]
    return stdout, stderr


@pytest.fixture(scope="module")
def children(tmp_path_factory):
  """Both 8-device subprocesses, started together: XLA compiles on one core
  each, so on two cores the pair takes about as long as the longer one."""
  root = tmp_path_factory.mktemp("parallel")
  data_dir = helpers.write_tiny_idx(root / "idx", 256, 100)
  (root / "checks").mkdir()
  (root / "cli").mkdir()
  checks = _Child([sys.executable, __file__], root / "checks")
  cli = _Child(
      [sys.executable, "-m", "experiments.main",
       "--config=studies/placements/main_job.py", f"--workdir={root / 'work'}",
       f"--config.mesh_devices={DEVICES}", f"--config.data_dir={data_dir}",
       "--config.dataset=tiny_idx", "--config.data_source=idx",
       "--config.num_epochs=1", "--config.batch_size=64",
       "--config.progress_seconds=0"], root / "cli")
  yield {"checks": checks, "cli": cli, "workdir": root / "work"}
  for child in (checks, cli):
    if child.process.poll() is None:
      child.process.kill()


@pytest.fixture(scope="module")
def report(children):
  return json.loads(children["checks"].wait()[0].strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(
    name for name in dir(sys.modules[__name__]) if name.startswith("check_")))
def test_on_8_devices(report, check):
  assert report[check] == "ok", report[check]


@pytest.mark.slow
def test_cli_placements_on_8_devices(children):
  """The placement comparison through experiments.main, 8 CPU devices."""
  _, stderr = children["cli"].wait()
  assert "data parallel: 8 cpu device(s)" in stderr
  results = json.loads((children["workdir"] / "results.json").read_text())
  assert [c["placement"] for c in results["combos"]] == list(
      models.PLACEMENTS)
  rows = [json.loads(line) for line in (
      children["workdir"] / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == len(models.PLACEMENTS) * 3  # 3 seeds, 1 epoch
  for row in rows:
    assert np.isfinite(row["train_loss"]), row
    assert 0.0 <= row["test_accuracy"] <= 1.0


# ----------------------------------------------------------------------------
# One device (this process): config checks and the unchanged default path.


@pytest.mark.slow
def test_default_is_the_single_device_path():
  """The base config trains on one device with no collective: no mesh, a
  program without shard_map or psum, states that stay on one device."""
  config = base.get_config()
  assert config.mesh_devices == 1 and config.bn_stats == "sync"
  assert parallel.setup(config) is None
  spec = _small_spec(num_epochs=1)
  data = _random_data(seed=2)
  assert parallel.replicate(data, None) is data
  states = train.create_sweep_states(spec, [0, 1], SWEEP_HPARAMS)
  epoch = parallel.sweep_epoch_fn(spec, None)
  program = str(jax.make_jaxpr(epoch)(states, data))
  assert "shard_map" not in program and "psum" not in program
  trained, _ = epoch(states, data)
  assert {len(x.devices()) for x in jax.tree.leaves(trained)} == {1}


@pytest.mark.parametrize("field, value, message", [
    ("mesh_devices", 0, "must be a positive integer or 'auto'"),
    ("mesh_devices", "all", "must be a positive integer or 'auto'"),
    ("bn_stats", "ghost", "config.bn_stats='ghost' is not valid"),
])
def test_bad_parallel_config_rejected(field, value, message):
  config = base.get_config()
  config[field] = value
  with pytest.raises(sweep.ConfigError, match=message):
    sweep.validate_config(config)


def test_more_devices_than_there_are_is_said_before_the_batch_split():
  """Two devices more than there are, with a batch that does not split
  over them: the config checks leave the split alone, and the device count
  is what the user hears."""
  n = jax.device_count()
  config = base.get_config()
  config.mesh_devices, config.batch_size = n + 2, 10 * (n + 2) + 1
  sweep.validate_config(config)  # the config's own checks pass
  with pytest.raises(ValueError, match=rf"mesh_devices={n + 2} but only "
                     rf"{n} device"):
    parallel.check_devices(config)
  config.mesh_devices = n
  parallel.check_devices(config)


if __name__ == "__main__":
  print(json.dumps(_run_checks()))
