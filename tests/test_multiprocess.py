"""Two processes on one machine: the CLI over jax.distributed, on loopback.

Each process is `python -m experiments.main` with 2 forced CPU devices,
joined through a coordinator on 127.0.0.1 (Gloo collectives over TCP), so
the mesh has 4 devices, as one process with 4 forced devices has. The
reference placements (studies/placements/main_job.py) train for two epochs on tiny
IDX data; the pair is killed after its first checkpoint and the same
commands resume it. Compared with one process on 4 devices:

  same collectives (one process that also joins a coordinator, so that its
  all-reduce is Gloo's too): bitwise, Adam as configured;
  XLA's in-process collectives (the plain one-process run): the all-reduce
  adds the devices' sums in another order; under SGD the metrics agree
  within the bound of test_parallel's one-device comparisons. (Under Adam
  they do not: a gradient that is zero in exact arithmetic, such as the
  bias of a unit active on the whole batch before BN, is rounding noise,
  and Adam's first steps move it by about +-learning_rate whatever its
  size.)

The fast tests check the one-line errors for bad config.distributed
settings, raised before `jax.distributed.initialize` could wait for
processes that never come.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import helpers
import jax
import numpy as np
import pytest

from bn_lab import classifier
from bn_lab import models
from bn_lab import parallel
from bn_lab import sweep
from bn_lab import config as base

REPO = helpers.REPO
DEVICES_PER_PROCESS = 2
NUM_PROCESSES = 2
NUM_EPOCHS = 2
SEEDS = 3  # studies/placements/main_job.py's
TIMEOUT_S = 240  # per group of processes; a healthy pair takes ~30 s
# Fields set on top of studies/placements/main_job.py (4 steps of 64 per epoch).
FLAGS = ("--config=studies/placements/main_job.py", "--config.dataset=tiny_idx",
         "--config.data_source=idx", "--config.batch_size=64",
         f"--config.num_epochs={NUM_EPOCHS}", "--config.mesh_devices=auto",
         "--config.progress_seconds=0")
SGD = ("--config.optimizer=sgd", "--config.learning_rate=0.1")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def distributed_flags(port: int, num_processes: int, process_id: int):
  return (f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={process_id}")


class Processes:
  """CLI processes started together, each with its own forced CPU devices
  and its output in files (a full pipe would stall it). `wait` kills them
  all if one fails or the time is up, and reports every one's stderr."""

  def __init__(self, directory: Path, commands, devices: int,
               compilation_cache: Path | None = None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if compilation_cache:  # only to save time: a rerun loads the programs
      env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    # Unoptimized CPU code compiles several times faster; every side of a
    # comparison runs with the same flags.
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")
    directory.mkdir(parents=True, exist_ok=True)
    self.logs, self.processes = [], []
    for i, args in enumerate(commands):
      out, err = directory / f"{i}.stdout", directory / f"{i}.stderr"
      with open(out, "w") as stdout, open(err, "w") as stderr:
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "experiments.main", *args], cwd=REPO,
            env=env, stdout=stdout, stderr=stderr))
      self.logs.append((out, err))

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
      process.wait()

  def report(self) -> str:
    return "\n".join(
        f"--- process {i} (exit {p.returncode}), stderr tail:\n"
        + err.read_text()[-3000:]
        for i, (p, (_, err)) in enumerate(zip(self.processes, self.logs)))

  def wait(self, check: bool = True) -> list[tuple[str, str]]:
    """(stdout, stderr) of each; with `check`, all must exit with 0."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
      while any(p.poll() is None for p in self.processes):
        failed = [p for p in self.processes if p.poll()]
        if (check and failed) or time.monotonic() > deadline:
          break  # a peer of a failed process may wait a long time for it
        time.sleep(0.1)
    finally:
      self.kill()
    assert not check or all(p.returncode == 0 for p in self.processes), (
        self.report())
    return [(out.read_text(), err.read_text()) for out, err in self.logs]


def two_processes(directory: Path, workdir: Path, data_dir: Path,
                  *extra: str, compilation_cache=None) -> Processes:
  port = free_port()
  return Processes(directory, [
      (*FLAGS, f"--workdir={workdir}", f"--config.data_dir={data_dir}",
       *distributed_flags(port, NUM_PROCESSES, k), *extra)
      for k in range(NUM_PROCESSES)], DEVICES_PER_PROCESS, compilation_cache)


def one_process(directory: Path, workdir: Path, data_dir: Path,
                *extra: str) -> Processes:
  return Processes(directory, [
      (*FLAGS, f"--workdir={workdir}", f"--config.data_dir={data_dir}",
       *extra)], NUM_PROCESSES * DEVICES_PER_PROCESS)


def metrics(workdir: Path) -> list[dict]:
  """metrics.jsonl without the timings (the only thing allowed to differ)."""
  rows = [json.loads(line)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for row in rows:
    del row["wall_time"]
  return rows


# ----------------------------------------------------------------------------
# Two processes against one (slow: several CLI runs, ~2 minutes on 2 cores).


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 256, 100)


@pytest.fixture(scope="module")
def one_process_gloo(tmp_path_factory, data_dir) -> Path:
  """One process on 4 devices whose collectives are Gloo's too: it joins a
  coordinator of its own (num_processes=1)."""
  root = tmp_path_factory.mktemp("one_gloo")
  one_process(root / "logs", root / "work", data_dir,
              *distributed_flags(free_port(), 1, 0)).wait()
  return root / "work"


@pytest.fixture(scope="module")
def resumed_pair(tmp_path_factory, data_dir) -> tuple[Path, list]:
  """Two processes killed once their first checkpoint is saved, then the
  same commands again; (workdir, (stdout, stderr) of the second pair)."""
  root = tmp_path_factory.mktemp("two")
  workdir, cache = root / "work", root / "cache"
  first = two_processes(root / "killed", workdir, data_dir,
                        compilation_cache=cache)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while not any(p.name.isdigit() for p in workdir.glob("checkpoints/*/*")):
      assert all(p.poll() is None for p in first.processes), first.report()
      assert time.monotonic() < deadline, "no checkpoint appeared\n" + (
          first.report())
      time.sleep(0.05)
  finally:
    first.kill()
  assert all(p.returncode == -signal.SIGKILL for p in first.processes)
  assert not (workdir / "results.json").exists()  # killed, not finished
  outputs = two_processes(root / "resumed", workdir, data_dir,
                          compilation_cache=cache).wait()
  return workdir, outputs


@pytest.mark.slow
def test_two_processes_resume_and_match_one_process_bitwise(
    resumed_pair, one_process_gloo):
  workdir, outputs = resumed_pair
  for k, (stdout, stderr) in enumerate(outputs):
    assert (f"data parallel: {NUM_PROCESSES * DEVICES_PER_PROCESS} cpu "
            f"device(s) in {NUM_PROCESSES} process(es)") in stderr
    assert "resumed from checkpoint at epoch 1" in stderr, (k, stderr[-3000:])
    # Process 0 alone writes the files and prints the report.
    assert ("| placement |" in stdout) == (k == 0)
  rows = metrics(workdir)
  assert len(rows) == len(models.PLACEMENTS) * SEEDS * NUM_EPOCHS
  assert [c["placement"] for c in json.loads(
      (workdir / "results.json").read_text())["combos"]] == list(
          models.PLACEMENTS)
  assert rows == metrics(one_process_gloo)


@pytest.mark.slow
def test_two_processes_match_in_process_collectives_within_rounding(
    tmp_path, data_dir):
  """SGD (Adam turns the rounding noise of zero gradients into steps of
  the learning rate; see the module docstring), on the placement whose
  Adam runs drift most."""
  flags = (*SGD, "--config.placements=('after_activation',)")
  two_processes(tmp_path / "two", tmp_path / "two_work", data_dir,
                *flags).wait()
  one_process(tmp_path / "one", tmp_path / "one_work", data_dir,
              *flags).wait()
  two, one = metrics(tmp_path / "two_work"), metrics(tmp_path / "one_work")
  assert len(two) == len(one) == SEEDS * NUM_EPOCHS
  for row_two, row_one in zip(two, one):
    assert row_two.keys() == row_one.keys()
    for key, value in row_one.items():
      if isinstance(value, float):  # test_parallel's bound
        np.testing.assert_allclose(row_two[key], value, atol=1e-5,
                                   rtol=2e-5, err_msg=f"{key} {row_one}")
      else:
        assert row_two[key] == value, key


@pytest.mark.slow
def test_process_0s_workdir_error_stops_the_other_process_too(
    resumed_pair, tmp_path, data_dir):
  """Only process 0 checks the workdir; process 1 stops with its error
  (not with a Gloo time-out at its first collective)."""
  workdir, _ = resumed_pair
  outputs = two_processes(tmp_path, workdir, data_dir,
                          "--config.learning_rate=0.123").wait(check=False)
  last = [stderr.strip().splitlines()[-1] for _, stderr in outputs]
  assert last[0].startswith("ConfigMismatch: "), last
  assert last[1] == f"WorkdirError: process 0 stopped: {last[0]}", last


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (distributed_flags(1234, 1, 1),
     "ConfigError: config.distributed.process_id=1 must be in [0, 1)"),
    # No Slurm, MPI or TPU here to give JAX the missing values.
    (("--config.distributed.coordinator_address=127.0.0.1:1234",),
     "ConfigError: jax.distributed.initialize: Number of processes must be "
     "defined. No cluster"),
])
def test_cli_rejects_bad_distributed_settings_in_one_line(tmp_path, flags,
                                                          message):
  started = time.monotonic()
  result = helpers.run_cli([*FLAGS, f"--workdir={tmp_path / 'work'}",
                            *flags], check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(message), (
      result.stderr[-3000:])
  assert time.monotonic() - started < 60  # no wait for other processes
  assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------
# Fast: the one-line errors, before jax.distributed.initialize.


@pytest.mark.parametrize("fields, message", [
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
      "process_id": 2},
     r"config.distributed.process_id=2 must be in \[0, 2\)"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 1,
      "process_id": 1},
     r"config.distributed.process_id=1 must be in \[0, 1\)"),
    ({"coordinator_address": "127.0.0.1:1234", "process_id": -1},
     r"config.distributed.process_id=-1 must be an integer >= 0"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 0},
     r"config.distributed.num_processes=0 must be an integer >= 1"),
    ({"num_processes": 2, "process_id": 1},
     r"config.distributed.num_processes=2 needs "
     r"config.distributed.coordinator_address"),
    ({"process_id": 0},
     r"config.distributed.process_id=0 needs "
     r"config.distributed.coordinator_address"),
    ({"coordinator_address": "10.0.0.1", "num_processes": 2,
      "process_id": 0},
     r"config.distributed.coordinator_address='10.0.0.1' must be "
     r"\"host:port\""),
    ({"coordinator_address": "10.0.0.1:port", "num_processes": 2,
      "process_id": 0},
     r"config.distributed.coordinator_address='10.0.0.1:port' must be"),
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
      "process_id": 0, "mesh_devices": 1},
     r"config.mesh_devices=1 cannot span "
     r"config.distributed.num_processes=2 processes"),
])
def test_bad_distributed_settings_fail_in_one_line_before_initializing(
    fields, message, tmp_path, monkeypatch):
  config = base.get_config()
  config.mesh_devices = fields.pop("mesh_devices", "auto")
  for field, value in fields.items():
    config.distributed[field] = value
  with pytest.raises(sweep.ConfigError, match=message) as error:
    sweep.validate_config(config)
  assert "\n" not in str(error.value)
  # The CLI's path stops there too, before any wait or any file.
  def initialize(**kwargs):
    raise AssertionError(f"jax.distributed.initialize({kwargs}) was called")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  with pytest.raises(sweep.ConfigError, match=message):
    classifier.train_and_evaluate(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_good_distributed_settings_pass_the_checks():
  for coordinator, num_processes, process_id in (
      ("", None, None),  # one process
      ("127.0.0.1:1234", 2, 1),
      ("[::1]:1234", None, None),  # the rest detected by JAX (Slurm, MPI)
      ("host-0.cluster:8476", 4, 0)):
    config = base.get_config()
    config.mesh_devices = "auto"
    config.distributed.coordinator_address = coordinator
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
    sweep.validate_config(config)
  assert parallel.message_from_process0("why") == "why"  # one process
