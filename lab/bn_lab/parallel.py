"""Data-parallel training over a 1-D device mesh, BN synchronized or not.

    python -m experiments.main --config=studies/placements/main_job.py \
        --workdir=workdirs/placements_dp --config.mesh_devices=auto

The global batch of every step (config.batch_size, the same indices as on
one device: `train.epoch_batches`) is split over the mesh axis `data`: device
i takes columns [i * b, (i + 1) * b) of each step's index array, b =
batch_size / devices. MNIST is small, so the whole data set is replicated on
every device and each device gathers its own rows; nothing is resharded
between steps. The epoch runs under `jax.shard_map` (with its replication
checks on), the K runs of a sweep vmapped inside it.

BN statistics (config.bn_stats):
  sync        (default) bn_jax's `axis_name="data"`: mean and variance are
              those of the global batch, so N devices compute exactly what
              one device computes on the whole batch (up to float rounding).
              The running statistics are then identical on every device.
  per_device  "ghost batch" statistics: every device normalizes with the
              statistics of its own b examples. Gradients are still averaged.
              Each device would update the running statistics with its own
              batch; the kept state is their mean over devices, taken after
              every step (so it stays identical everywhere). As the update is
              linear, this is the exponential average of the devices' mean
              ghost-batch mean and mean ghost-batch variance; the latter
              misses the spread of the ghost-batch means, so it is a little
              smaller than the global batch variance.

The step and the epoch are `train.train_step` and `train.train_epoch` with
`spec.axis_name="data"` (see `data_parallel_spec`): the loss is averaged over
devices inside the differentiated function, which makes the gradient the
global-batch mean under shard_map; metrics (sums) are summed over devices.

Evaluation is sharded too: in eval mode each device scores a contiguous
slice of the test set (a remainder of fewer than N examples is scored once,
replicated); the batch-statistics evaluation splits each test batch over the
devices exactly as training splits a training batch.

Several processes (hosts): set config.distributed.coordinator_address
("host:port" of process 0), .num_processes and .process_id on every process
(num_processes and process_id may stay None where JAX detects them: Slurm,
Open MPI, TPU), and run the same command on every host (docs/multiprocess.md
has the commands). `initialize_distributed` checks those fields
(`check_distributed`: one line naming the field, before any wait) and calls
`jax.distributed.initialize` before any other JAX call; the mesh spans every
process's devices (mesh_devices must be "auto" or the global device count).
On CPUs the processes' collectives go through Gloo over TCP (JAX's default
jax_cpu_collectives_implementation). Data: every host loads the whole data
set into its memory, as on one host, and copies it only onto its own devices
(`replicate` builds the global array from each process's local copy); every
device then gathers its own rows of each global batch, so a host touches
only the rows of its addressable devices and no data cross hosts. Outputs:
every process runs the same loop; process 0 alone writes metrics,
TensorBoard files and results, and checks the workdir (its lock, the resume
check) for all (`message_from_process0`); Orbax checkpointing is collective
and wants a --workdir on a file system all hosts share. Tested with two
processes of two forced CPU devices each on one machine
(tests/test_multiprocess.py): the CLI trains, is killed, resumes, and
matches one process on four devices (bitwise with the same Gloo
collectives; with XLA's in-process ones the all-reduce adds in another
order, so within float rounding under SGD).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time

from absl import logging
import jax
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bn_lab import train

DATA_AXIS = "data"
BN_STATS = ("sync", "per_device")


# ----------------------------------------------------------------------------
# Config and mesh.


def check_config(config) -> None:
  """Rejects bad parallel fields before anything touches a device."""
  if config.bn_stats not in BN_STATS:
    raise ValueError(f"config.bn_stats={config.bn_stats!r} is not valid; "
                     f"choose one of {BN_STATS}.")
  devices = config.mesh_devices
  if devices != "auto" and (isinstance(devices, bool)
                            or not isinstance(devices, int) or devices < 1):
    raise ValueError(f"config.mesh_devices={devices!r} must be a positive "
                     "integer or 'auto' (all devices).")
  if isinstance(devices, int) and not (_devices_known(config.distributed)
                                      and devices > jax.device_count()):
    # Too many devices is said last, by check_devices: the config's own
    # faults first, then the machine's.
    check_batch_split(config.batch_size, devices)
  check_distributed(config.distributed, devices)


def _devices_known(distributed) -> bool:
  """Whether asking JAX for the devices is safe now: one process, or
  `jax.distributed.initialize` done (asking first would start a backend
  that initialize can no longer join)."""
  return (not distributed.coordinator_address
          or jax.distributed.is_initialized())


def check_devices(config) -> None:
  """After the config's own checks: config.mesh_devices against the
  devices there are (before the batch split, which would otherwise be the
  complaint), where they are known yet."""
  if _devices_known(config.distributed):
    resolve_num_devices(config.mesh_devices)


def check_distributed(distributed, mesh_devices="auto") -> None:
  """Rejects config.distributed fields that cannot start several processes
  together: checked before `jax.distributed.initialize`, which would
  otherwise wait (5 minutes) for processes that never come."""
  address = distributed.coordinator_address
  num_processes, process_id = (distributed.num_processes,
                               distributed.process_id)
  for field, value, least in (("num_processes", num_processes, 1),
                              ("process_id", process_id, 0)):
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, int) or value < least):
      raise ValueError(
          f"config.distributed.{field}={value!r} must be an integer >= "
          f"{least}, or None (detected by JAX).")
  if not isinstance(address, str):
    raise ValueError(f"config.distributed.coordinator_address={address!r} "
                     "must be a string, \"host:port\" of process 0.")
  if not address:
    for field, value in (("num_processes", num_processes),
                         ("process_id", process_id)):
      if value is not None:
        raise ValueError(
            f"config.distributed.{field}={value} needs "
            "config.distributed.coordinator_address, the \"host:port\" of "
            "process 0 (e.g. --config.distributed.coordinator_address="
            "10.0.0.1:1234); leave num_processes and process_id unset for "
            "one process.")
    return
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"config.distributed.coordinator_address={address!r} "
                     "must be \"host:port\" of process 0, e.g. "
                     "10.0.0.1:1234 (127.0.0.1:1234 on one machine).")
  if num_processes is not None and process_id is not None and not (
      process_id < num_processes):
    raise ValueError(
        f"config.distributed.process_id={process_id} must be in [0, "
        f"{num_processes}): the processes are numbered 0 to "
        f"config.distributed.num_processes - 1 = {num_processes - 1}.")
  if (num_processes or 0) > 1 and isinstance(mesh_devices, int) and (
      mesh_devices < num_processes):
    raise ValueError(
        f"config.mesh_devices={mesh_devices} cannot span "
        f"config.distributed.num_processes={num_processes} processes; use "
        "--config.mesh_devices=auto (every device of every process).")


def check_batch_split(batch_size: int, num_devices: int) -> None:
  if batch_size % num_devices:
    raise ValueError(
        f"config.batch_size={batch_size} does not divide evenly across "
        f"{num_devices} devices (config.mesh_devices); use a global batch "
        f"that is a multiple of {num_devices}, e.g. "
        f"{max(1, batch_size // num_devices) * num_devices}.")


def initialize_distributed(distributed, mesh_devices="auto") -> bool:
  """Calls `jax.distributed.initialize` if a coordinator is configured.

  Must run before any other JAX call of the process. Returns True if it did.
  Raises ValueError, naming the field, for fields `check_distributed`
  rejects, or that JAX cannot complete from the cluster's environment.
  """
  check_distributed(distributed, mesh_devices)
  if not distributed.coordinator_address or jax.distributed.is_initialized():
    return False
  waiting = (f"the coordinator at {distributed.coordinator_address} (this "
             f"process: id {_or_detected(distributed.process_id)} of "
             f"{_or_detected(distributed.num_processes)})")
  logging.info("waiting for %s, for up to %d s (JAX's time-out)", waiting,
               INIT_TIMEOUT_S)
  try:
    with _repeating(f"still waiting for {waiting}", INIT_TIMEOUT_S):
      jax.distributed.initialize(
          coordinator_address=distributed.coordinator_address,
          num_processes=distributed.num_processes,
          process_id=distributed.process_id,
          initialization_timeout=INIT_TIMEOUT_S)
  except ValueError as e:  # e.g. "Number of processes must be defined."
    raise ValueError(
        f"jax.distributed.initialize: {e} No cluster (Slurm, Open MPI, TPU) "
        "was detected to give the missing value: set both "
        "config.distributed.num_processes and config.distributed.process_id."
        ) from e
  if distributed.num_processes not in (None, jax.process_count()):
    # The coordinator counts processes by process 0's num_processes.
    raise ValueError(
        f"config.distributed.num_processes={distributed.num_processes}, but "
        f"{jax.process_count()} processes joined (the count process 0 was "
        "given): give every process the same num_processes.")
  return True


# How long a process waits for the coordinator and the others to join.
INIT_TIMEOUT_S = 300
WAIT_REPORT_S = 10.0  # a "still waiting" line this often


def _or_detected(value) -> str:
  return "detected from the cluster" if value is None else str(value)


@contextlib.contextmanager
def _repeating(line: str, timeout_s: float):
  """While the block runs (a wait on other processes), logs `line` with
  the time waited every WAIT_REPORT_S seconds."""
  stop, start = threading.Event(), time.monotonic()

  def report():
    while not stop.wait(WAIT_REPORT_S):
      logging.info("%s: %.0f s of %d s", line, time.monotonic() - start,
                   timeout_s)

  thread = threading.Thread(target=report, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


_MESSAGE_BYTES = 4096  # longer messages are cut


def message_from_process0(message: str = "") -> str:
  """Process 0's `message` on every process (the others' is ignored).

  A collective: every process calls it at the same point. Process 0 checks
  the shared workdir alone; this tells the others whether it may be used
  (`message` "") or why not, so that they stop with process 0's error
  instead of timing out at their first collective. One process: `message`.
  """
  if jax.process_count() == 1:
    return message
  encoded = np.frombuffer(message.encode()[:_MESSAGE_BYTES], np.uint8)
  buffer = np.zeros(_MESSAGE_BYTES, np.uint8)
  buffer[:encoded.size] = encoded
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return bytes(received).rstrip(b"\0").decode(errors="replace")


def resolve_num_devices(mesh_devices) -> int:
  available = jax.device_count()
  n = available if mesh_devices == "auto" else mesh_devices
  if n > available:
    raise ValueError(
        f"config.mesh_devices={mesh_devices} but only {available} device(s) "
        f"are available ({jax.devices()[0].platform}). On a CPU, force more "
        "with XLA_FLAGS=--xla_force_host_platform_device_count=N, set before "
        "JAX is imported.")
  if jax.process_count() > 1 and n != available:
    raise ValueError(
        f"config.mesh_devices={mesh_devices}: with {jax.process_count()} "
        f"processes the mesh must span all {available} devices; use 'auto'.")
  return n


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
  """A 1-D mesh named `data` over the first `num_devices` devices."""
  return jax.make_mesh((num_devices,), (DATA_AXIS,),
                       devices=jax.devices()[:num_devices])


def setup(config, batch_sizes=None) -> jax.sharding.Mesh | None:
  """Multi-host initialization if configured, then the data mesh.

  `batch_sizes` (default: config.batch_size) must each split evenly over
  the mesh. Returns None when training uses one device (the default
  mesh_devices=1, or "auto" on a machine with one device): the
  single-device code path runs unchanged.
  """
  initialize_distributed(config.distributed, config.mesh_devices)
  n = resolve_num_devices(config.mesh_devices)
  for batch_size in batch_sizes or (config.batch_size,):
    check_batch_split(batch_size, n)
  if n == 1:
    return None
  logging.info("data parallel: %d %s device(s) in %d process(es), BN "
               "statistics %s", n, jax.devices()[0].platform,
               jax.process_count(), config.bn_stats)
  return make_mesh(n)


def replicate(tree, mesh: jax.sharding.Mesh | None):
  """Puts every leaf on every device of `mesh` (no-op for None, or for
  leaves already replicated there)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P())

  def put(x):
    # Only a NamedSharding over this mesh counts: a single-device array is
    # "equivalent" on a 1-device mesh, but would retrace the jitted epoch.
    if (isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)
        and x.sharding.mesh == mesh
        and x.sharding.is_equivalent_to(sharding, x.ndim)):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    # Several hosts: each process fills only its own devices, from its own
    # (identical) host copy.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])
  return jax.tree.map(put, tree)


def data_parallel_spec(spec: train.TrainSpec, bn_stats: str = "sync",
                       ) -> train.TrainSpec:
  if bn_stats not in BN_STATS:
    raise ValueError(f"bn_stats={bn_stats!r}; choose one of {BN_STATS}.")
  return dataclasses.replace(spec, axis_name=DATA_AXIS,
                             sync_bn=bn_stats == "sync")


# ----------------------------------------------------------------------------
# Evaluation (the training step and epoch are train's own, which split each
# global batch over `spec.axis_name` and sum metrics over it).


def evaluate(state: train.TrainState, images, labels, *,
             spec: train.TrainSpec, use_batch_stats: bool = False):
  """`train.evaluate` with the test set split over the devices of
  `spec.axis_name`; returns the same sums, identical on every device."""
  axis = spec.axis_name
  n = lax.axis_size(axis)
  if use_batch_stats:
    # Split every test batch as training splits a batch, so synchronized BN
    # normalizes with the same global-batch statistics as one device would.
    usable = images.shape[0] // spec.batch_size * spec.batch_size
    def columns(x):
      x = x[:usable].reshape(-1, spec.batch_size, *x.shape[1:])
      return train.device_share(x, axis, axis=1).reshape(-1, *x.shape[2:])
    local_spec = dataclasses.replace(spec, batch_size=spec.batch_size // n)
    return lax.psum(train.evaluate(state, columns(images), columns(labels),
                                   spec=local_spec, use_batch_stats=True),
                    axis)
  split = images.shape[0] // n * n
  totals = []
  if split:
    rows = lambda x: train.device_share(x[:split], axis)
    totals.append(lax.psum(train.evaluate(state, rows(images), rows(labels),
                                          spec=spec), axis))
  if split < images.shape[0]:  # fewer than n left: scored once, replicated
    totals.append(train.evaluate(state, images[split:], labels[split:],
                                 spec=spec))
  return jax.tree.map(lambda *v: sum(v), *totals)


# ----------------------------------------------------------------------------
# Compiled entry points.


def shard_sweep(per_device_fn, spec: train.TrainSpec,
                mesh: jax.sharding.Mesh):
  """(stacked states, data) -> (states, outputs): `per_device_fn` (called
  with spec=spec) over the runs (`train.over_runs`), under shard_map over
  `mesh`. States and data go in replicated and come out replicated;
  shard_map's replication check (check_vma) proves the params and BN
  statistics agree on every device."""
  return jax.shard_map(train.over_runs(per_device_fn, spec), mesh=mesh,
                       in_specs=(P(), P()), out_specs=P())


@functools.partial(jax.jit, static_argnames=("spec", "mesh"),
                   donate_argnames="states")
def sweep_epoch(states: train.TrainState, data: train.DeviceData, *,
                spec: train.TrainSpec, mesh: jax.sharding.Mesh):
  """`train.sweep_epoch` over the mesh: K runs, one epoch and evaluation.

  `states` and `data` must be replicated on `mesh` (see `replicate`).
  """
  return shard_sweep(functools.partial(train.epoch_and_eval,
                                       evaluate_fn=evaluate), spec, mesh)(
      states, data)


def sweep_epoch_fn(spec: train.TrainSpec, mesh: jax.sharding.Mesh | None,
                   bn_stats: str = "sync"):
  """The epoch function an experiment calls: (states, data) -> (states,
  metrics). Without a mesh it is exactly `train.sweep_epoch`."""
  if mesh is None:
    return functools.partial(train.sweep_epoch, spec=spec)
  parallel_spec = data_parallel_spec(spec, bn_stats)

  def run(states, data):
    return sweep_epoch(replicate(states, mesh), replicate(data, mesh),
                       spec=parallel_spec, mesh=mesh)
  return run
