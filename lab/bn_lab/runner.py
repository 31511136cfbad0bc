"""The one runner: every study's run, in one order.

`run(study, config, workdir)` validates the config (`Study.validate`),
checks the --workdir path, takes the workdir's lock, refuses a workdir that
holds another study's or another config's results, loads the data
(`Study.load_data`), writes config.json, runs the study (`Study.run`) and
writes results.json: the study's part, with "study_id", "schema" and the
provenance (the command, the machine, the time). Files are written
atomically (bn_lab.workdir): none is ever half-written, and a full disk
stops the run with one line naming the file. One process at a time may
write a workdir; of several processes, process 0 alone writes.

What a study does inside its run (classifier sweeps: bn_lab.classifier)
is the study's: the runner knows no study by name.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import flax
import jax

from bn_lab import parallel
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import workdir as workdir_lib


def _check_workdir_path(workdir: str | os.PathLike) -> Path:
  if not str(workdir).strip():
    raise sweep.ConfigError("--workdir is empty; give the directory for the "
                            "run's files, e.g. --workdir=workdirs/NAME.")
  workdir = Path(workdir)
  for path in (workdir, *workdir.parents):
    if path.exists() and not path.is_dir():
      raise sweep.ConfigError(f"--workdir {workdir}: {path} is a file; give "
                              "a directory.")
  return workdir


def provenance(command: str | None = None) -> dict[str, Any]:
  """What a recorded result needs to be reproduced and compared: the
  command that made it (None: not known), the machine and the software,
  the time it finished (UTC). results.json and the benchmarks' JSON carry
  it; the studies page prints it under each figure."""
  cpu = platform.processor() or platform.machine()
  try:  # the model name, e.g. "AMD EPYC 7B13" (Linux)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  device = jax.devices()[0]
  return {
      "command": command,
      "machine": {
          "cpu": cpu, "cpu_count": os.cpu_count(),
          "platform": device.platform, "device": device.device_kind,
          "device_count": jax.device_count(),
          "process_count": jax.process_count(),
          "jax": jax.__version__, "flax": flax.__version__,
          "python": platform.python_version()},
      "finished": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC")}


def run(study: study_lib.Study, config, workdir: str | os.PathLike,
        command: str | None = None) -> dict[str, Any]:
  """Runs `study` under `config` in `workdir`: validate, lock, resume check,
  data, the study's run, results.json. Returns results.json's content:
  the study's own part with "study_id", "schema" and
  `provenance(command)` (pass the command line that started it).

  Raises sweep.ConfigError, data.DataError, NonFiniteError and
  workdir.WorkdirError (in use, another config, a failed write) with
  messages that say what to fix; nothing already written is lost by any.
  """
  study.validate(config)
  workdir = _check_workdir_path(workdir)
  # One process writes the files; orbax's checkpointing is collective.
  writes = jax.process_index() == 0
  if not writes:
    refused = parallel.message_from_process0()  # its checks of the workdir
    if refused:
      raise workdir_lib.WorkdirError(f"process 0 stopped: {refused}")
    return _run(study, config, workdir, writes, command)
  created = not workdir.exists()
  try:
    with contextlib.ExitStack() as lock:
      try:
        _claim_workdir(workdir, study, config.to_dict(), lock)
      except Exception as e:
        parallel.message_from_process0(f"{type(e).__name__}: {e}")
        raise
      parallel.message_from_process0("")  # the others may start
      return _run(study, config, workdir, writes, command)
  finally:
    if created and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()  # stopped before writing: leave nothing behind


def _run(study, config, workdir: Path, writes: bool, command: str | None):
  data, origin = study.load_data(config)
  with contextlib.ExitStack() as log:
    if writes:  # only now: a run stopped by its data or config writes nothing
      workdir_lib.write_atomic(workdir / "config.json",
                               workdir_lib.config_json(config.to_dict()))
      log.enter_context(workdir_lib.log_file(workdir / "log.txt"))
    results = study.run(study_lib.RunContext(config, workdir, data, origin,
                                             writes, command))
  results = {"study_id": study.name, "schema": study_lib.SCHEMA_VERSION,
             **results, **provenance(command)}
  if writes:
    workdir_lib.write_atomic(workdir / "results.json",
                             json.dumps(results, indent=2) + "\n")
  return results


def _create(workdir: Path) -> Path:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise sweep.ConfigError(f"--workdir {workdir} cannot be created "
                            f"({os.strerror(e.errno)}); give a directory "
                            "this user can write.") from e
  return workdir


def _claim_workdir(workdir: Path, study, config_dict,
                   lock: contextlib.ExitStack):
  """Creates the workdir, takes its lock (held until `lock` closes) and
  checks that it holds no other study's or config's run."""
  _create(workdir)
  workdir_lib.check_files_are_files(workdir)
  lock.enter_context(workdir_lib.Lock(workdir))
  workdir_lib.check_resumable(workdir, config_dict, study=study.name,
                              result_dirs=study.result_dirs,
                              extension_refusal=study.extension_refusal)


