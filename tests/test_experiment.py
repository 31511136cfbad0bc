"""End-to-end: the real command line on a tiny generated IDX data set.

Two subprocess runs of `python -m experiments.main` (imports and compiles
make each take seconds): one from scratch, checked file by file, and one
resumed from a copy of its workdir as a run killed part way would have left
it, which must end with the same numbers. Plus the configs' docstring
commands, parsed by the entry point's own flags.
"""

import ast
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from bn_jax import experiment
from bn_jax import models
import experiments.main as main_module

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 600, 200
PLACEMENTS = models.PLACEMENTS  # configs/placements.py trains all four
NUM_EPOCHS = 2
OVERRIDES = (
    "--config.dataset=synthetic",  # any name: no md5 to check for it
    f"--config.num_epochs={NUM_EPOCHS}",
    "--config.seeds=(0,1)",
    "--config.sweep.bn_momentum=(0.9,0.99)",  # 2 seeds x 2 momenta = 4 runs
    "--config.widths=(8,)",
    "--config.batch_size=50",
    "--config.heartbeat_seconds=0.0",
    "--config.target_accuracy=0.3",
)
NUM_RUNS = 4
METRIC_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "test_accuracy_batch_stats")
ROW_KEYS = {"placement", "run", "seed", "learning_rate", "bn_momentum",
            "bn_epsilon", "epoch", "wall_time", *METRIC_KEYS}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_idx(path: Path, array: np.ndarray) -> None:
  """The IDX format: magic (2 zero bytes, 0x08 = ubyte, ndim), big-endian
  uint32 dimensions, then the bytes."""
  header = struct.pack(">HBB", 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  path.write_bytes(header + np.asarray(array, np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  """600 train / 200 test 28x28 images: a faint binary pattern per class
  under uniform noise, so the labels are learnable but not trivially."""
  directory = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  prototypes = rng.integers(0, 2, (10, 28, 28))
  labels = rng.integers(0, 10, NUM_TRAIN + NUM_TEST)
  images = np.round(255 * (0.3 * prototypes[labels] + 0.7 * rng.uniform(
      0, 1, (len(labels), 28, 28)))).astype(np.uint8)
  write_idx(directory / "train-images-idx3-ubyte", images[:NUM_TRAIN])
  write_idx(directory / "train-labels-idx1-ubyte", labels[:NUM_TRAIN])
  write_idx(directory / "t10k-images-idx3-ubyte", images[NUM_TRAIN:])
  write_idx(directory / "t10k-labels-idx1-ubyte", labels[NUM_TRAIN:])
  assert (directory / "train-images-idx3-ubyte").read_bytes()[:4] == (
      b"\x00\x00\x08\x03")  # 2051
  return directory


def cli_args(idx_dir, workdir):
  return ["--config=configs/placements.py", f"--workdir={workdir}",
          f"--config.data_dir={idx_dir}", *OVERRIDES]


def run_cli(args):
  """`python -m experiments.main ARGS` from the repository root."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # Unoptimized XLA: compiles several times faster, and both runs
             # of the resume test use the same setting.
             XLA_FLAGS="--xla_backend_optimization_level=0")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.main", *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  return result.stdout


@pytest.fixture(scope="module")
def first_run(idx_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("runs") / "placements"
  stdout = run_cli(cli_args(idx_dir, workdir))
  return workdir, stdout


def read_rows(workdir):
  text = (workdir / "metrics.jsonl").read_text()
  assert text.endswith("\n")
  return [json.loads(line) for line in text.splitlines()]


def without_wall_time(rows):
  return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def resolved_config(args):
  """The config the entry point builds from ARGS, by its own flags, from
  the repository root (config paths are relative to it)."""
  argv = ["experiments.main", *args]
  with flagsaver.flagsaver(), pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.chdir(REPO)
    # config_flags finds the --config.FIELD overrides in sys.argv.
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS(argv)
    return main_module._CONFIG.value  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# One run, every file.


def test_config_json_is_the_resolved_config(first_run, idx_dir):
  workdir, _ = first_run
  saved = json.loads((workdir / "config.json").read_text())
  config = resolved_config(cli_args(idx_dir, workdir))
  expected = json.loads(json.dumps(config.to_dict(), default=list))
  assert saved == expected
  assert saved["num_epochs"] == NUM_EPOCHS
  assert saved["data_dir"] == str(idx_dir)
  assert tuple(saved["placements"]) == PLACEMENTS


def test_metrics_jsonl_has_every_placement_run_and_epoch(first_run):
  workdir, _ = first_run
  rows = read_rows(workdir)
  assert len(rows) == len(PLACEMENTS) * NUM_RUNS * NUM_EPOCHS
  assert {(r["placement"], r["run"], r["epoch"]) for r in rows} == {
      (p, run, e) for p in PLACEMENTS for run in range(NUM_RUNS)
      for e in range(1, NUM_EPOCHS + 1)}
  for row in rows:
    assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
    for key in METRIC_KEYS + ("wall_time",):
      assert math.isfinite(row[key]), (key, row)
    for key in METRIC_KEYS:
      if "accuracy" in key:
        assert 0.0 <= row[key] <= 1.0, (key, row)
      else:
        assert row[key] > 0.0, (key, row)
    assert row["wall_time"] >= 0.0
  # The runs are seeds x swept momenta, each row labelled with its own.
  runs = {(r["run"], r["seed"], r["bn_momentum"]) for r in rows}
  assert runs == {(0, 0, 0.9), (1, 0, 0.99), (2, 1, 0.9), (3, 1, 0.99)}
  assert {r["learning_rate"] for r in rows} == {1e-3}
  # The task is learnable: training loss falls from epoch 1 to 2 on average.
  for placement in PLACEMENTS:
    mean_loss = [np.mean([r["train_loss"] for r in rows
                          if r["placement"] == placement and r["epoch"] == e])
                 for e in (1, 2)]
    assert mean_loss[1] < mean_loss[0], (placement, mean_loss)


def test_results_json_and_summary(first_run, idx_dir):
  workdir, stdout = first_run
  rows = read_rows(workdir)
  results = json.loads((workdir / "results.json").read_text())
  assert str(idx_dir) in results["data_origin"]
  # Every run says where its data came from, checksums included.
  assert (f"data: synthetic from IDX files in {idx_dir} (checksums not "
          "verified") in stdout
  # One progress line per placement and epoch.
  for placement in PLACEMENTS:
    for epoch in range(1, NUM_EPOCHS + 1):
      assert f"[{placement}] epoch {epoch}/{NUM_EPOCHS}  train loss" in stdout
  assert results["runs"] == [
      {"seed": seed, "hparams": {"learning_rate": 1e-3, "bn_momentum": m,
                                 "bn_epsilon": 1e-3}}
      for seed in (0, 1) for m in (0.9, 0.99)]
  final = [r for r in rows if r["epoch"] == NUM_EPOCHS]
  assert results["final"] == final
  assert [s["placement"] for s in results["summary"]] == list(PLACEMENTS)
  for summary in results["summary"]:
    mine = [r for r in final if r["placement"] == summary["placement"]]
    accuracy = np.array([r["test_accuracy"] for r in mine])
    assert summary["runs"] == NUM_RUNS
    assert summary["epochs"] == NUM_EPOCHS
    np.testing.assert_allclose(summary["test_accuracy_mean"],
                               accuracy.mean(), rtol=1e-6)
    np.testing.assert_allclose(summary["test_accuracy_std"], accuracy.std(),
                               rtol=1e-6, atol=1e-9)

  table = (workdir / "summary.md").read_text()
  assert table.startswith("# synthetic: BN placements")
  for placement in PLACEMENTS:
    row, = [line for line in table.splitlines()
            if line.startswith(f"| {placement} |")]
    assert row.count("|") == 8  # 7 columns
    assert f"| {placement} |" in stdout  # the table is also printed


def png_size(path: Path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
  assert len(data) > 5000, (path, len(data))
  return struct.unpack(">II", data[16:24])


def test_plots_and_checkpoints(first_run):
  workdir, _ = first_run
  width, height = png_size(workdir / "learning_curves.png")
  assert width > 400 and height > 200
  for placement in PLACEMENTS:
    width, height = png_size(workdir / f"curves_{placement}.png")
    assert width > 200 and height > 200
    checkpoints = workdir / "checkpoints" / placement
    assert checkpoints.is_dir()
    steps = sorted(int(p.name) for p in checkpoints.iterdir()
                   if p.name.isdigit())
    assert steps == list(range(1, NUM_EPOCHS + 1))  # keep_checkpoints=2
  # Nothing half-written is left behind.
  assert not list(workdir.glob(".*tmp*"))


# ----------------------------------------------------------------------------
# Stopped and started again.


def test_rerun_resumes_from_the_last_checkpoints(first_run, idx_dir,
                                                 tmp_path):
  """Simulates a run killed during before_activation's last epoch (the
  placements train in order: none, before_activation, after_activation,
  input): a copy of the workdir as it was then. The same command must skip
  `none`, resume before_activation after epoch 1, train the other two from
  scratch, and reproduce the uninterrupted run exactly (data order depends
  only on seed and epoch)."""
  workdir, _ = first_run
  done, killed, *not_started = PLACEMENTS
  resumed = tmp_path / "placements"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / killed / str(NUM_EPOCHS))
  for placement in not_started:
    shutil.rmtree(resumed / "checkpoints" / placement)
  for name in ("results.json", "summary.md", "learning_curves.png",
               f"curves_{killed}.png",
               *(f"curves_{p}.png" for p in not_started)):
    (resumed / name).unlink()
  rows = read_rows(workdir)
  kept = [r for r in rows if r["placement"] == done or (
      r["placement"] == killed and r["epoch"] < NUM_EPOCHS)]
  (resumed / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in kept))

  stdout = run_cli(cli_args(idx_dir, resumed))

  assert f"[{done}] resumed from checkpoint at epoch {NUM_EPOCHS}" in stdout
  assert f"[{done}] epoch" not in stdout  # nothing left to train
  assert (f"[{killed}] resumed from checkpoint at epoch {NUM_EPOCHS - 1}"
          in stdout)
  assert f"[{killed}] epoch 1/{NUM_EPOCHS}" not in stdout  # not redone
  assert f"[{killed}] epoch {NUM_EPOCHS}/{NUM_EPOCHS}" in stdout
  for placement in not_started:
    assert f"[{placement}] resumed" not in stdout
    assert f"[{placement}] epoch 1/{NUM_EPOCHS}" in stdout
  # Bitwise the same numbers (wall times aside), in the same order.
  assert without_wall_time(read_rows(resumed)) == without_wall_time(rows)
  results = json.loads((resumed / "results.json").read_text())
  expected = json.loads((workdir / "results.json").read_text())
  assert without_wall_time(results["final"]) == without_wall_time(
      expected["final"])
  for name in ("summary.md", "learning_curves.png",
               *(f"curves_{p}.png" for p in PLACEMENTS)):
    assert (resumed / name).is_file()


# ----------------------------------------------------------------------------
# The configs' docstrings.


def docstring_command(path: Path) -> list[str]:
  """The command in the docstring: the first indented block after the
  one-line summary, with backslash continuations joined."""
  doc = ast.get_docstring(ast.parse(path.read_text()), clean=True)
  lines = doc.splitlines()
  assert lines[0] and not lines[0].startswith(" ") and lines[1] == "", (
      f"{path}: the docstring starts with a one-line summary, a blank line, "
      "then the command")
  command = []
  for line in lines[2:]:
    if not line.startswith("    "):
      break
    command.append(line.strip().rstrip("\\").strip())
  assert command, f"{path}: no indented command after the summary line"
  return shlex.split(" ".join(command))


@pytest.mark.parametrize("name", sorted(
    p.name for p in (REPO / "configs").glob("*.py")))
def test_config_docstring_starts_with_the_command_that_runs_it(name):
  path = REPO / "configs" / name
  argv = docstring_command(path)
  assert argv[:3] == ["python", "-m", "experiments.main"]
  args = argv[3:]
  assert args[0] == f"--config=configs/{name}"  # names the file itself
  assert any(a.startswith("--workdir=") for a in args)
  # The entry point's own flags accept the command as written.
  config = resolved_config(args)
  experiment.validate_config(config)
  for arg in args:
    if arg.startswith("--config."):
      field, value = arg[len("--config."):].split("=", 1)
      assert str(config[field]) == value


def test_placements_config_cnn_variant_is_valid():
  config = resolved_config(["--config=configs/placements.py:cnn",
                            "--workdir=unused"])
  experiment.validate_config(config)
  assert config.model == "cnn"
  assert tuple(config.placements) == PLACEMENTS


def test_data_seed_flag_reaches_the_train_spec():
  """--config.data_seed (an int placeholder, None by default) is parsed by
  the entry point's flags and handed to the TrainSpec the sweep runs."""
  args = ["--config=configs/placements.py", "--workdir=unused"]
  default = resolved_config(args)
  assert experiment.make_spec(default, "none", 600).data_seed is None
  config = resolved_config(args + ["--config.data_seed=4"])
  experiment.validate_config(config)
  assert experiment.make_spec(config, "none", 600).data_seed == 4


def test_heartbeat_prints_while_a_long_epoch_runs(capsys):
  with experiment._Heartbeat(0.05, "mlp epoch 3"):
    time.sleep(0.3)
  printed = capsys.readouterr().out
  assert "... mlp epoch 3: still running" in printed
  with experiment._Heartbeat(0.0, "off"):  # 0 turns it off
    time.sleep(0.1)
  assert capsys.readouterr().out == ""
