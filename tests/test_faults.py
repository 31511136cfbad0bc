"""Faults a user can fix, through the real entry points in a subprocess:
each ends with the exit code, one line saying what is wrong and how to fix
it (no traceback), and nothing already written changed. One class of fault
per section: config, data, workdir, resume, report, interruption,
multi-process. (The numerics' faults: tests/test_reliability.py.)"""

import hashlib
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import helpers
import pytest

from bn_lab import workdir as workdir_lib

pytestmark = pytest.mark.slow

MAIN_JOB = "--config=studies/placements/main_job.py"
COMBO = "placement=before_activation"


def tiny_args(idx_dir, workdir, *extra):
  return [MAIN_JOB, f"--workdir={workdir}", f"--config.data_dir={idx_dir}",
          "--config.dataset=tiny", "--config.num_epochs=3",
          "--config.seeds=(0,1)", "--config.widths=(8,)",
          "--config.batch_size=50", "--config.progress_seconds=0",
          "--config.placements=('before_activation',)", *extra]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 400, 100)


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
  """A finished 3-epoch run, made once."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  helpers.run_cli(tiny_args(idx_dir, workdir))
  return workdir


def snapshot(workdir: Path) -> dict[str, str]:
  """Every file under `workdir` (but log.txt, which each run appends to)
  and its md5: what a refused run must leave as it was."""
  return {str(p.relative_to(workdir)): hashlib.md5(p.read_bytes()).hexdigest()
          for p in sorted(Path(workdir).rglob("*"))
          if p.is_file() and p.name != "log.txt"}


def rows_without_times(workdir):
  return [{k: v for k, v in r.items() if k != "wall_time"}
          for r in workdir_lib.read_jsonl(Path(workdir) / "metrics.jsonl")]


def assert_one_line(result, *fragments, code=1):
  """A failed command: exit `code`, and stderr one line holding each of
  `fragments`."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == code, result.stderr[-3000:]
  assert len(lines) == 1 and "Traceback" not in result.stderr, (
      result.stderr[-3000:])
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("source, fragments", [
    ("def get_config(:\n", ["line 1, is not valid Python: invalid syntax"]),
    ("import no_such_module\n", ["ModuleNotFoundError: No module named "
                                 "'no_such_module'"]),
    ("def get_config():\n  return {'a': 1}\n",
     ["get_config() returned a dict, not an ml_collections.ConfigDict"]),
], ids=["syntax", "import", "not_a_configdict"])
def test_a_broken_config_file(tmp_path, source, fragments):
  config = tmp_path / "config.py"
  config.write_text(source)
  result = helpers.run_cli([f"--config={config}",
                            f"--workdir={tmp_path / 'w'}"], check=False)
  assert_one_line(result, *fragments)
  assert not (tmp_path / "w").exists()


def test_an_unknown_variant_and_a_misspelt_field(tmp_path):
  result = helpers.run_cli(["--config=studies/gan/config.py:nonsense",
                            f"--workdir={tmp_path / 'w'}"], check=False)
  assert_one_line(result, "the variants are '' (the study) and 'short'")
  result = helpers.run_cli([MAIN_JOB, f"--workdir={tmp_path / 'w'}",
                            "--config.batchsize=3"], check=False)
  assert_one_line(result, "no field 'batchsize' (Did you mean "
                  '"batch_size" instead of "batchsize"?)')
  assert "\\" not in result.stderr  # not a repr of a repr
  assert not (tmp_path / "w").exists()


def test_more_devices_than_there_are_is_said_first(idx_dir, tmp_path):
  result = helpers.run_cli(tiny_args(idx_dir, tmp_path / "w",
                                     "--config.mesh_devices=3"), check=False)
  assert_one_line(result, "config.mesh_devices=3 but only 1 device(s)")


# ----------------------------------------------------------------------------
# Data.


def test_a_named_data_set_pointed_at_another_s_files(tmp_path):
  mnist = Path(helpers.REPO) / "lab" / "bn_lab" / "bundled" / "mnist"
  result = helpers.run_cli([MAIN_JOB, f"--workdir={tmp_path / 'w'}",
                            "--config.dataset=kmnist",
                            f"--config.data_dir={mnist}"], check=False)
  assert_one_line(result, "is mnist's train-images-idx3-ubyte, not "
                  "kmnist's", "--config.dataset=mnist")
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------
# Workdir.


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "results.json"])
def test_a_directory_where_the_run_writes_a_file(idx_dir, tmp_path, name):
  workdir = tmp_path / "w"
  (workdir / name).mkdir(parents=True)
  result = helpers.run_cli(tiny_args(idx_dir, workdir), check=False)
  assert_one_line(result, f"WorkdirError: {workdir / name} is a directory")
  assert sorted(p.name for p in workdir.iterdir()) == [name]


def test_a_workdir_without_its_config_is_not_resumed(idx_dir, reference,
                                                     tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  (workdir / "config.json").unlink()
  before = snapshot(workdir)
  result = helpers.run_cli(tiny_args(idx_dir, workdir,
                                     "--config.learning_rate=0.05"),
                           check=False)
  assert_one_line(result, "ConfigMismatch:", "metrics.jsonl, checkpoints "
                  "but no config.json", "use a new --workdir")
  assert snapshot(workdir) == before


def test_a_read_only_workdir_is_one_line(idx_dir, tmp_path, monkeypatch):
  """In process (a read-only file system cannot be made without root):
  the lock's open fails as there."""
  import errno  # pylint: disable=g-import-not-at-top

  from bn_lab import classifier  # pylint: disable=g-import-not-at-top
  from bn_lab import config as base  # pylint: disable=g-import-not-at-top

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
  monkeypatch.setattr(workdir_lib, "open", read_only, raising=False)
  config = base.get_config()
  config.dataset, config.data_dir = "tiny", str(idx_dir)
  (tmp_path / "w").mkdir()
  with pytest.raises(workdir_lib.WorkdirError) as refused:
    classifier.train_and_evaluate(config, tmp_path / "w")
  assert str(refused.value) == (
      f"cannot write in {tmp_path / 'w'} (Read-only file system); give a "
      "--workdir this user can write.")


def test_a_failing_cleanup_does_not_hide_the_first_error(idx_dir, tmp_path,
                                                        monkeypatch):
  """A full disk fails the checkpoint save, then the TensorBoard writer's
  close on the way out: the user sees the save's one line, not the
  close's error (in process: the faults are patched in)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from bn_lab import classifier  # pylint: disable=g-import-not-at-top
  from bn_lab import config as base  # pylint: disable=g-import-not-at-top

  def full_disk(*args, **kwargs):
    raise ValueError("Error writing: [Errno 28] No space left on device")

  def close_fails(self):
    raise OSError(28, "No space left on device (closing event files)")
  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  monkeypatch.setattr(workdir_lib.MetricsWriter, "close", close_fails)
  config = base.get_config()
  config.dataset, config.data_dir = "tiny", str(idx_dir)
  config.batch_size, config.widths, config.seeds = 50, (8,), (0,)
  config.num_epochs, config.progress_seconds = 1, 0.0
  with pytest.raises(workdir_lib.WriteError) as first:
    classifier.train_and_evaluate(config, tmp_path / "w")
  assert str(first.value).startswith(
      f"could not write {tmp_path / 'w' / 'checkpoints'}")
  assert "closing event files" not in str(first.value)


# ----------------------------------------------------------------------------
# Resume: metrics rows and checkpoints must agree.


def test_damaged_last_rows_are_trained_again_never_reported_stale(
    idx_dir, reference, tmp_path):
  """The last epoch's rows cut off while its checkpoint is there: the rerun
  trains that epoch again from the checkpoint before, to the same rows."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  lines = (workdir / "metrics.jsonl").read_text().splitlines(True)
  (workdir / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:25])
  assert (workdir / "checkpoints" / COMBO / "3").is_dir()
  result = helpers.run_cli(tiny_args(idx_dir, workdir))
  assert "training again from epoch 2" in result.stderr
  assert rows_without_times(workdir) == rows_without_times(reference)
  assert "| before_activation |" in (workdir / "summary.md").read_text()


def test_lost_metrics_with_every_checkpoint_train_everything_again(
    idx_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  (workdir / "metrics.jsonl").unlink()
  helpers.run_cli(tiny_args(idx_dir, workdir))
  assert rows_without_times(workdir) == rows_without_times(reference)


# ----------------------------------------------------------------------------
# Report.


def test_the_page_with_no_finished_run(tmp_path):
  result = helpers.run_cli([f"--page={tmp_path / 'page.md'}",
                            f"--workdir={tmp_path / 'none'}"],
                           module="experiments.report", check=False)
  assert_one_line(result, "ReportError:", "does not exist")
  assert not (tmp_path / "page.md").exists()


# ----------------------------------------------------------------------------
# Interruption.


def _started(command, tmp_path, env=None):
  """`python -m experiments.main COMMAND` started in the background."""
  err = open(tmp_path / "stderr", "w")
  # Ctrl-C as in a terminal: a runner that started pytest in the
  # background passes SIGINT down ignored, and Python keeps it so.
  return subprocess.Popen([sys.executable, "-m", "experiments.main",
                           *command], cwd=helpers.REPO, env=helpers.cli_env(env),
                          text=True,
                          stdout=subprocess.DEVNULL, stderr=err,
                          preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                           signal.SIG_DFL))


def test_ctrl_c_is_one_line_and_the_rerun_resumes(idx_dir, reference,
                                                  tmp_path):
  workdir = tmp_path / "run"
  args = tiny_args(idx_dir, workdir, "--config.num_epochs=200")
  run = _started(args, tmp_path)
  deadline = time.monotonic() + helpers.CLI_TIMEOUT_S
  while not workdir_lib.read_jsonl(workdir / "metrics.jsonl"):
    assert run.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  run.send_signal(signal.SIGINT)
  assert run.wait(timeout=60) == 130
  stderr = (tmp_path / "stderr").read_text()
  assert "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1] == (
      f"Interrupted: every finished epoch in {workdir} is kept; rerun the "
      "same command to resume.")
  assert not (workdir / ".lock").exists()
  kept = rows_without_times(workdir)
  assert kept and len(kept) < 2 * 200
  helpers.run_cli(args)  # the same command resumes, to the end
  rows = rows_without_times(workdir)
  assert rows[:len(kept)] == kept
  assert [r["epoch"] for r in rows] == [e for e in range(1, 201)
                                        for _ in (0, 1)]


# ----------------------------------------------------------------------------
# Several processes.


def test_waiting_for_the_coordinator_says_for_what_and_how_long(
    idx_dir, tmp_path):
  """A coordinator that never answers (a non-routable address): the
  process says what it waits for, then repeats a line while it waits."""
  args = tiny_args(idx_dir, tmp_path / "w",
                   "--config.distributed.coordinator_address=10.255.255.1:1",
                   "--config.distributed.num_processes=2",
                   "--config.distributed.process_id=1",
                   "--config.mesh_devices=auto")
  run = _started(args, tmp_path)
  try:
    deadline = time.monotonic() + 60
    while "still waiting" not in (tmp_path / "stderr").read_text():
      assert run.poll() is None and time.monotonic() < deadline
      time.sleep(0.2)
  finally:
    run.kill()
    run.wait()
  lines = (tmp_path / "stderr").read_text().splitlines()
  assert lines[0] == ("waiting for the coordinator at 10.255.255.1:1 (this "
                      "process: id 1 of 2), for up to 300 s (JAX's time-out)")
  assert lines[1].startswith("still waiting for the coordinator at "
                             "10.255.255.1:1 (this process: id 1 of 2): ")
  assert lines[1].endswith(" of 300 s")
