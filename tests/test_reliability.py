"""Reliability: config checks, the NaN guard, resuming after SIGKILL, corrupt
checkpoints, determinism, and errors through the CLI.

Everything runs on tiny generated IDX files (data set name "tiny", for which
no md5 is known) and 8-unit MLPs. One reference run, in this process, is
compared bitwise with a second run, with runs resumed from corrupt
checkpoints or after a NaN stop, and with a real CLI run killed by SIGKILL
and restarted with the same command. Most of the time goes to compiling and
to the CLI's start-up.
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import models
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from bn_lab import config as base
from studies import placements as placements_study
from studies.placements import main_job as placements

REPO = helpers.REPO
N_TRAIN, N_TEST, BATCH = 128, 48, 32  # 4 steps per epoch
STEPS_PER_EPOCH = N_TRAIN // BATCH
# Fields set on top of studies/placements/main_job.py, here and on the CLI.
OVERRIDES = {"dataset": "tiny", "placements": ("before_activation",),
             "widths": (8,), "seeds": (0, 1), "batch_size": BATCH,
             "num_epochs": 3, "keep_checkpoints": 3,
             "progress_seconds": 0.0}
COMBO = "placement=before_activation"  # its checkpoints/ and rows' name
CLI_TIMEOUT_S = helpers.CLI_TIMEOUT_S


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), N_TRAIN,
                                N_TEST)


def tiny_config(idx_dir: Path, **changes):
  """studies/placements/main_job.py with OVERRIDES: the config the CLI builds."""
  config = placements.get_config()
  for field, value in {**OVERRIDES, "data_dir": str(idx_dir),
                       **changes}.items():
    set_field(config, field, value)
  return config


def train_placements(config, workdir, **kwargs):
  """The placements study's run, as the CLI runs its config file."""
  return runner.run(placements_study.STUDY, config, workdir, **kwargs)


def set_field(config, path: str, value) -> None:
  *parents, name = path.split(".")
  for parent in parents:
    config = config[parent]
  config[name] = value


def cli_command(idx_dir: Path, workdir: Path, *extra: str) -> list[str]:
  flags = [f"--config.{k}={v!r}" if isinstance(v, tuple) else
           f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [sys.executable, "-m", "experiments.main",
          "--config=studies/placements/main_job.py", f"--workdir={workdir}",
          f"--config.data_dir={idx_dir}", *flags, *extra]


def run_cli(command, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=CLI_TIMEOUT_S, **kwargs)


def training_metrics(workdir: Path) -> list[dict]:
  """metrics.jsonl without the timings (the only thing allowed to differ)."""
  rows = [json.loads(line)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def results_without_times(workdir: Path) -> dict:
  """results.json without the timings and the provenance: when it finished
  and the command (the CLI's, or none for a run started in-process)."""
  results = json.loads((workdir / "results.json").read_text())
  del results["finished"], results["command"]
  for combo in results["combos"]:
    del combo["wall_time"], combo["compile_time"]
  return results


def assert_same_run(workdir: Path, reference: Path) -> None:
  """Bitwise: json floats round-trip exactly, and == compares them so."""
  assert ((workdir / "config.json").read_text()
          == (reference / "config.json").read_text())
  assert training_metrics(workdir) == training_metrics(reference)
  assert results_without_times(workdir) == results_without_times(reference)


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory) -> Path:
  """An uninterrupted run: the workdir."""
  workdir = tmp_path_factory.mktemp("reference")
  runner.run(placements_study.STUDY, tiny_config(idx_dir), workdir)
  return workdir


# ----------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("field, value, fragments", [
    ("placements", ("after_bn",), ["config.placements", "'after_bn'",
                                   "before_activation"]),
    ("placements", ("(none,input)",), ["config.placements", "quote"]),
    ("batch_sizes", (32, 0), ["config.batch_sizes", "positive"]),
    ("placement", "after_bn", ["config.placement='after_bn'"]),
    ("conv", "fft", ["config.conv='fft'", "'im2col'", "'xla'"]),
    ("bn.grad", "analytic", ["config.bn.grad", "'paper_jvp'", "'autodiff'"]),
    ("bn.impl", "cuda", ["config.bn.impl", "'plain'"]),
    ("bn.stats_method", "welford", ["config.bn.stats_method", "'two_pass'"]),
    ("bn.momentum", "fast", ["config.bn.momentum='fast'", "None"]),
    ("seeds", ("a",), ["config.seeds", "integers"]),
    ("seeds", (), ["config.seeds", "non-empty"]),
    ("sweep.learning_rate", ("x",), ["config.sweep.learning_rate",
                                     "numbers"]),
    ("progress_seconds", -1.0, ["config.progress_seconds", ">= 0"]),
    ("mesh_devices", 0, ["config.mesh_devices=0", "'auto'"]),
    ("bn_stats", "ghost", ["config.bn_stats='ghost'", "'per_device'"]),
    ("activation", "swish2", ["config.activation", "'relu'"]),
    ("optimizer", "adagrad", ["config.optimizer", "'sgd'"]),
    ("model", "vgg", ["config.model", "'cnn'"]),
    ("data_source", "ftp", ["config.data_source", "'idx'"]),
    ("batch_size", 0, ["config.batch_size=0", "positive"]),
    ("batch_size", -32, ["config.batch_size=-32", "positive"]),
    ("num_epochs", 0, ["config.num_epochs=0", "positive"]),
    ("warmup_steps", -1, ["config.warmup_steps=-1"]),
    ("keep_checkpoints", 0, ["config.keep_checkpoints=0"]),
    ("widths", (8, 0), ["config.widths"]),
    ("bn.momentum", 1.5, ["config.bn.momentum", "[0, 1]"]),
    ("bn.momentum", -0.1, ["config.bn.momentum", "[0, 1]"]),
    ("sweep.bn_momentum", (0.9, 2.0), ["config.sweep.bn_momentum",
                                       "[0, 1]"]),
    ("bn.epsilon", 0.0, ["config.bn.epsilon", "> 0"]),
    ("bn.epsilon", -1e-3, ["config.bn.epsilon", "> 0"]),
    ("learning_rate", 0.0, ["config.learning_rate", "> 0"]),
    ("data_seed", -1, ["config.data_seed=-1", "[0, 2**31)"]),
    ("data_seed", 2**31, ["config.data_seed=2147483648"]),
    # Issue 24: what fails only once compiled, or trains something else.
    ("widths", (), ["config.placement='after_activation'",
                    "puts no normalization layer", "widths=()",
                    "config.widths", "'input' or 'none'"]),
    ("learning_rate", float("inf"), ["config.learning_rate=inf", "finite"]),
    ("learning_rate", float("nan"), ["config.learning_rate=nan", "> 0"]),
    ("learning_rate", 1e39, ["config.learning_rate=1e+39", "float32"]),
    ("sweep.learning_rate", (1e-3, float("inf")),
     ["config.sweep.learning_rate=(0.001, inf) has inf", "finite"]),
    ("bn.epsilon", 1e-45, ["config.bn.epsilon=1e-45", "smallest normal",
                           "1.1754944e-38"]),
    ("bn.epsilon", float("inf"), ["config.bn.epsilon=inf", "finite"]),
    ("sweep.bn_epsilon", (1e-3, 1e-40),
     ["config.bn.epsilon=1e-40", "smallest normal",
      "config.sweep.bn_epsilon"]),
    ("divergence_factor", 1.0, ["config.divergence_factor=1.0", "> 1",
                                "None or 0 (off)"]),
    ("divergence_factor", float("inf"), ["config.divergence_factor=inf"]),
    ("divergence_factor", "big", ["config.divergence_factor='big'"]),
    ("divergence_factor", False, ["config.divergence_factor=False"]),
])
def test_validate_config_names_the_field(field, value, fragments):
  config = base.get_config()
  with config.unlocked():  # a flag may give any type; the check names it
    set_field(config, field, value)
  with pytest.raises(sweep.ConfigError) as info:
    sweep.validate_config(config)
  message = str(info.value)
  assert "\n" not in message
  for fragment in fragments:
    assert fragment in message, message


def test_base_config_is_valid():
  sweep.validate_config(base.get_config())


@pytest.mark.parametrize("changes", [
    {"widths": (), "placement": "input"},
    {"widths": (), "placement": "none"},
    {"widths": (), "norm": "none"},  # no norm: the row says so
    {"model": "cnn", "widths": ()},  # the conv blocks are normalized
    {"model": "cnn", "widths": (), "channels": (), "placement": "input"},
    {"model": "lstm", "placement": "before_activation", "norm": "layer"},
    {"bn.epsilon": float(np.finfo(np.float32).tiny)},  # the smallest normal
    {"learning_rate": float(np.finfo(np.float32).max)},
    {"divergence_factor": None}, {"divergence_factor": 0},
    {"divergence_factor": 1e6},
])
def test_valid_edges_of_the_model_and_number_checks(changes):
  config = base.get_config()
  with config.unlocked():
    for field, value in changes.items():
      set_field(config, field, value)
  sweep.validate_config(config)


def test_a_placement_without_a_normalization_layer_is_found_in_the_model(
    monkeypatch):
  """The check reads the model the trainer builds (its variables, traced:
  nothing compiled), per combination of the axes, and names the one."""
  config = base.get_config()
  config.model, config.widths, config.channels = "cnn", (), ()
  config.placements = ("none", "input", "before_activation")
  with pytest.raises(sweep.ConfigError) as info:
    sweep.validate_config(config)
  message = str(info.value)
  assert "\n" not in message
  for fragment in ["config.placement='before_activation'",
                   "model='cnn', channels=(), widths=()",
                   "(combination placement=before_activation)",
                   "config.channels or config.widths"]:
    assert fragment in message, message
  # Derived from the model code, not a copy of the placement rules: a model
  # that places its norm even without hidden layers passes.
  real_make_model = models.make_model

  def always_normalized(*args, placement, **kwargs):
    model = real_make_model(*args, placement=placement, **kwargs)
    return model.clone(placement="input") if placement != "none" else model
  monkeypatch.setattr(models, "make_model", always_normalized)
  sweep.validate_config(config)


def test_divergence_factor_defaults_on_and_zero_turns_it_off():
  config = base.get_config()
  assert config.divergence_factor == 1e3
  assert sweep.make_spec(config, 60000).divergence_factor == 1e3
  config.divergence_factor = 0
  assert sweep.make_spec(config, 60000).divergence_factor is None
  assert train.divergence_threshold(1e3) == pytest.approx(1e3 * np.log(10))


def test_momentum_none_is_valid_and_a_sweep_replaces_it():
  """None (the exact cumulative average) is a valid bn.momentum; a sweep
  of momenta still replaces it per run."""
  config = base.get_config()
  config.bn.momentum = None
  sweep.validate_config(config)
  assert {r["hparams"]["bn_momentum"] for r in sweep.run_grid(config)} == {
      None}
  config.sweep.bn_momentum = (0.9,)
  sweep.validate_config(config)
  assert {r["hparams"]["bn_momentum"] for r in sweep.run_grid(config)} == {
      0.9}


def test_config_is_checked_before_data_and_workdir(tmp_path):
  config = base.get_config()
  config.data_dir = str(tmp_path / "no-such-dir")  # would be a DataError
  config.bn.epsilon = 0.0
  with pytest.raises(sweep.ConfigError, match="config.bn.epsilon"):
    train_placements(config, tmp_path / "workdir")
  assert not (tmp_path / "workdir").exists()


@pytest.mark.parametrize("where", ["workdir", "parent"])
def test_workdir_that_is_a_file(idx_dir, tmp_path, where):
  file = tmp_path / "a_file"
  file.write_text("not a directory")
  workdir = file if where == "workdir" else file / "run"
  with pytest.raises(sweep.ConfigError,
                     match=re.escape(f"{file} is a file")):
    train_placements(tiny_config(idx_dir), workdir)


@pytest.mark.parametrize("batch_size, fragment", [
    (N_TRAIN + 1, f"larger than the training set ({N_TRAIN} examples)"),
    (N_TEST + 1, f"larger than the test set ({N_TEST} examples)"),
])
def test_batch_larger_than_data_stops_before_compiling(
    idx_dir, tmp_path, monkeypatch, batch_size, fragment):
  def must_not_run(*args, **kwargs):
    raise AssertionError("compiled despite an invalid batch size")
  monkeypatch.setattr(train, "create_sweep_states", must_not_run)
  monkeypatch.setattr(train, "sweep_epoch", must_not_run)
  with pytest.raises(sweep.ConfigError) as info:
    train_placements(
        tiny_config(idx_dir, batch_size=batch_size), tmp_path)
  assert f"batch size {batch_size} (config.batch_size" in str(info.value)
  assert fragment in str(info.value)
  # No config.json: the corrected command must not meet "different config".
  assert not (tmp_path / "config.json").exists()


@pytest.mark.slow
def test_cli_rejects_unknown_config_field(tmp_path):
  result = run_cli([sys.executable, "-m", "experiments.main",
                    "--config=studies/placements/main_job.py",
                    f"--workdir={tmp_path / 'run'}", "--config.foo=1"])
  assert result.returncode != 0
  assert "has no field 'foo'" in result.stderr.strip().splitlines()[-1], (
      result.stderr)
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag, fragment", [
    ("--config.learning_rate=abc", "--config.learning_rate=abc"),
    ("--config.bn.momentum=fast", "config.bn.momentum='fast'"),
    ("--config.placements=(none,input)", "quote each string"),
    ("--config.num_epochs=1.5", "--config.num_epochs=1.5"),
    ("--config.widths=()", "config.placement='before_activation' puts no "
     "normalization layer in the model (model='mlp', widths=())"),
    ("--config.learning_rate=inf", "config.learning_rate=inf must be > 0"),
    ("--config.bn.epsilon=1e-45", "config.bn.epsilon=1e-45 must be > 0, "
     "finite and at least float32's smallest normal number"),
])
def test_cli_reports_a_bad_value_in_one_line(tmp_path, flag, fragment):
  result = run_cli([sys.executable, "-m", "experiments.main",
                    "--config=studies/placements/main_job.py",
                    f"--workdir={tmp_path / 'run'}", flag])
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_reports_data_error(tmp_path):
  missing = tmp_path / "no-idx-here"
  result = run_cli(cli_command(missing, tmp_path / "run"))
  assert result.returncode != 0
  assert "DataError" in result.stderr
  assert f"Data directory {missing} does not exist" in result.stderr
  assert "--config.data_dir=" in result.stderr  # the fix
  assert not (tmp_path / "run" / "config.json").exists()


# ----------------------------------------------------------------------------
# NaN guard.


def test_nonfinite_flags_name_each_quantity():
  ok = jnp.float32(1.0), {"w": jnp.ones(3)}, {"bn": {"mean": jnp.zeros(2)}}
  assert int(train.nonfinite_flags(*ok)) == 0
  assert train.describe_nonfinite(0) == ""
  cases = {
      "loss": (jnp.float32(jnp.inf), ok[1], ok[2]),
      "parameters": (ok[0], {"w": jnp.array([1.0, jnp.nan])}, ok[2]),
      "BN statistics": (ok[0], ok[1], {"bn": {"mean": jnp.array([jnp.nan,
                                                                0.0])}}),
  }
  for name, args in cases.items():
    assert train.describe_nonfinite(train.nonfinite_flags(*args)) == name
  assert int(train.nonfinite_flags(ok[0], ok[1], {})) == 0  # no BN layers
  # Quantities left out (None) are not checked.
  assert int(train.nonfinite_flags(jnp.float32(jnp.nan))) == 1
  assert int(train.nonfinite_flags(params={"w": jnp.array([jnp.inf])})) == 2


def test_diverged_flag_is_a_finite_loss_above_the_threshold():
  threshold = train.divergence_threshold(10.0)  # 23.03
  flag = lambda loss, factor=10.0: int(train.diverged_flag(
      jnp.float32(loss), factor, 10))
  assert flag(threshold * 0.99) == 0
  assert flag(threshold * 1.01) == train.DIVERGED_FLAG
  assert flag(1e30) == train.DIVERGED_FLAG
  # A non-finite loss is nonfinite_flags' (bit 0), not a divergence.
  assert flag(jnp.inf) == 0 and flag(jnp.nan) == 0
  assert flag(1e30, None) == 0  # off
  assert train.DIVERGED_FLAG >> len(train.NONFINITE_QUANTITIES) == 1
  assert train.describe_nonfinite(train.DIVERGED_FLAG) == ""


def _one_epoch_guard(spec, data, poison_step=None):
  """(first_nonfinite_step, described flags) of one epoch of one run whose
  parameters are made NaN by the update of `poison_step` (1-based)."""
  real_step = train.train_step

  def step(state, images, labels, *, spec):
    new_state, metrics = real_step(state, images, labels, spec=spec)
    if poison_step is not None:
      poison = jnp.where(new_state.step == poison_step, jnp.nan, 0.0)
      new_state = new_state._replace(params=jax.tree.map(
          lambda p: p + poison, new_state.params))
    return new_state, metrics

  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(train, "train_step", step)
    state = train.create_train_state(spec, 0, {
        "learning_rate": 1e-3, "bn_momentum": 0.9, "bn_epsilon": 1e-3})
    _, metrics = jax.jit(functools.partial(train.train_epoch, spec=spec))(
        state, data)
  return (int(metrics["first_nonfinite_step"]),
          train.describe_nonfinite(metrics["nonfinite"]))


@pytest.mark.slow
def test_nan_guard_catches_a_bad_update_at_the_next_loss_or_at_epoch_end():
  """An update that makes the parameters NaN (a NaN gradient's effect) is
  reported at the next step's loss and BN statistics, or, after the epoch's
  last step, as the parameters."""
  spec = train.TrainSpec(placement="before_activation", widths=(8,),
                         batch_size=4, steps_per_epoch=3, num_epochs=1)
  rng = np.random.default_rng(0)
  data = train.to_device(rng.random((12, 784), np.float32),
                         rng.integers(0, 10, 12), rng.random((4, 784),
                                                             np.float32),
                         rng.integers(0, 10, 4))
  assert _one_epoch_guard(spec, data) == (-1, "")
  assert _one_epoch_guard(spec, data, 1) == (2, "loss, BN statistics")
  assert _one_epoch_guard(spec, data, 3) == (3, "parameters")


def test_nan_guard_off_computes_no_flags():
  spec = train.TrainSpec(widths=(8,), batch_size=4, steps_per_epoch=2,
                         num_epochs=1)
  hparams = {"learning_rate": 1e-3, "bn_momentum": 0.99, "bn_epsilon": 1e-3}
  state = jax.eval_shape(functools.partial(train.create_train_state, spec),
                         0, hparams)
  data = train.DeviceData(*(jax.ShapeDtypeStruct(s, d) for s, d in (
      ((8, 784), jnp.float32), ((8,), jnp.int32),
      ((8, 784), jnp.float32), ((8,), jnp.int32))))
  checks = {}
  for nan_guard in (True, False):
    epoch = functools.partial(
        train.train_epoch,
        spec=dataclasses.replace(spec, nan_guard=nan_guard))
    metrics = jax.eval_shape(epoch, state, data)[1]
    assert ("first_nonfinite_step" in metrics) == nan_guard
    checks[nan_guard] = str(jax.make_jaxpr(epoch)(state, data)).count(
        "is_finite")
  # The loss's logsumexp has is_finite checks of its own.
  assert checks[True] > checks[False]


def test_nan_guard_stops_with_the_step_and_keeps_the_last_epoch(
    idx_dir, reference, tmp_path, monkeypatch):
  """NaN inputs in epoch 2: stopped there, epoch 1 intact, resumable."""
  real_sweep_epoch = train.sweep_epoch
  epochs = []

  def sweep_epoch(states, data, *, spec):
    epochs.append(None)
    if len(epochs) == 2:  # float NaN images (uint8 pixels cannot be NaN)
      data = data._replace(train_images=jnp.full(
          data.train_images.shape, jnp.nan, jnp.float32))
    return real_sweep_epoch(states, data, spec=spec)

  monkeypatch.setattr(train, "sweep_epoch", sweep_epoch)
  config = tiny_config(idx_dir)
  with pytest.raises(train.NonFiniteError) as info:
    train_placements(config, tmp_path)
  assert isinstance(info.value, FloatingPointError)
  message = str(info.value)
  step = STEPS_PER_EPOCH + 1
  for fragment in [f"[{COMBO}]", "run 0 (seed 0", "run 1 (seed 1",
                   f"global step {step} (step 1 of {STEPS_PER_EPOCH} in "
                   "epoch 2)", "loss, BN statistics",
                   "last good checkpoint (epoch 1)", "learning rate",
                   "epsilon", "--config.nan_guard=False"]:
    assert fragment in message, message
  checkpoints = tmp_path / "checkpoints" / COMBO
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1"]
  rows = training_metrics(tmp_path)
  assert [r["epoch"] for r in rows] == [1, 1]
  assert all(np.isfinite(r["train_loss"]) for r in rows)
  assert not (tmp_path / "results.json").exists()

  # The same command resumes from epoch 1 as if nothing had happened.
  monkeypatch.setattr(train, "sweep_epoch", real_sweep_epoch)
  train_placements(config, tmp_path)
  assert_same_run(tmp_path, reference)


def test_nan_guard_names_the_diverging_run_of_a_sweep(idx_dir, tmp_path):
  config = tiny_config(idx_dir, seeds=(0,))
  config.sweep.learning_rate = (1e-3, 1e30)
  with pytest.raises(train.NonFiniteError) as info:
    train_placements(config, tmp_path)
  message = str(info.value)
  assert "run 1 (seed 0, learning_rate=1e+30" in message, message
  assert "run 0" not in message
  assert "in epoch 1)" in message
  assert not list((tmp_path / "checkpoints" / COMBO).iterdir())


def _exploding_sweep(idx_dir, **changes):
  """Plain SGD at learning rates 1e-3 (trains) and 1e4, whose loss grows
  to ~1e6 within two steps, finite (issue 24: it ended an epoch at 1e18 and
  10% accuracy, unnoticed)."""
  config = tiny_config(idx_dir, seeds=(0,), optimizer="sgd", **changes)
  config.sweep.learning_rate = (1e-3, 1e4)
  return config


def test_a_finite_divergence_stops_the_run_naming_loss_and_threshold(
    idx_dir, tmp_path):
  with pytest.raises(train.NonFiniteError) as info:
    train_placements(_exploding_sweep(idx_dir), tmp_path)
  message = str(info.value)
  run_line, = [l for l in message.splitlines() if l.startswith("  run ")]
  for fragment in ["run 1 (seed 0, learning_rate=10000.0", "training loss ",
                   "above the divergence threshold 2303 (config."
                   "divergence_factor=1000 x ln(10), an untrained "
                   "classifier's loss) at global step 2 (step 2 of 4 in "
                   "epoch 1)"]:
    assert fragment in run_line, message
  loss = float(run_line.split("training loss ")[1].split()[0])
  assert 2303 < loss < np.inf
  assert "raise --config.divergence_factor or set it to None" in (
      message.splitlines()[-1])
  assert not list((tmp_path / "checkpoints" / COMBO).iterdir())


def test_a_finite_divergence_is_recorded_and_changes_no_other_run(
    idx_dir, tmp_path):
  """nan_guard="record": the run at 1e4 is frozen at the step its loss
  passed the threshold and marked, the run at 1e-3 trains on; and it
  trains bit for bit as with the check off."""
  config = _exploding_sweep(idx_dir, nan_guard="record")
  train_placements(config, tmp_path / "on")
  rows = training_metrics(tmp_path / "on")
  assert [r["diverged_at"] for r in rows if r["run"] == 1] == [2, 2, 2]
  good = [r for r in rows if r["run"] == 0]
  assert [r["diverged_at"] for r in good] == [None, None, None]
  assert all(np.isfinite(r["train_loss"]) for r in good)
  config.divergence_factor = None  # the NaN guard alone
  train_placements(config, tmp_path / "off")
  assert good == [r for r in training_metrics(tmp_path / "off")
                  if r["run"] == 0]


@pytest.mark.slow
def test_a_finite_divergence_through_the_cli(idx_dir, tmp_path):
  """SGD at learning rate 30 passes the threshold at step 1 of epoch 2:
  the CLI exits non-zero with the guard's message, whose last line says how
  to fix it, and keeps epoch 1; rerunning resumes from it, diverges at
  the same step, and changes nothing already written."""
  workdir = tmp_path / "run"
  command = [a for a in cli_command(idx_dir, workdir, "--config.optimizer=sgd",
                                    "--config.learning_rate=30.0")
             if not a.startswith("--config.seeds=")] + ["--config.seeds=(0,)"]
  written = None
  for _ in range(2):
    result = run_cli(command)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "raise --config.divergence_factor or set it to None" in (
        lines[-1]), result.stderr[-3000:]
    assert any(l.startswith("  run 0 (seed 0, learning_rate=30.0")
               and "above the divergence threshold 2303" in l
               and "at global step 5 (step 1 of 4 in epoch 2)" in l
               for l in lines), result.stderr[-3000:]
    files = {p.relative_to(workdir): p.read_bytes()
             for p in sorted(workdir.rglob("*")) if p.is_file()
             and "tensorboard" not in p.parts}
    log = files.pop(Path("log.txt"))  # appended to by every run
    assert [r["epoch"] for r in training_metrics(workdir)] == [1]
    assert sorted(p.name for p in (workdir / "checkpoints" / COMBO).iterdir()
                  if p.name.isdigit()) == ["1"]
    assert not (workdir / "results.json").exists()
    if written is not None:
      assert files == written[0] and log.startswith(written[1])
    written = files, log


# ----------------------------------------------------------------------------
# Determinism, checkpoints, faults.


def test_same_config_and_seed_give_identical_metrics(
    idx_dir, reference, tmp_path):
  train_placements(tiny_config(idx_dir), tmp_path)
  assert_same_run(tmp_path, reference)
  # Every output was written whole: no temporary file is left behind.
  assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_corrupt_checkpoints_fall_back_to_older_ones(
    idx_dir, reference, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  (workdir / "results.json").unlink()
  checkpoints = workdir / "checkpoints" / COMBO
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2", "3"]
  # Epoch 3's save killed before orbax renamed its temporary directory.
  (checkpoints / "3").rename(checkpoints / "3.orbax-checkpoint-tmp")
  # Epoch 2 finalized, then truncated: every file cut to half.
  for file in (checkpoints / "2").rglob("*"):
    if file.is_file():
      file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])

  with caplog.at_level("INFO"):
    train_placements(tiny_config(idx_dir), workdir)
  assert f"checkpoint {checkpoints / '2'} is corrupt" in caplog.text
  assert f"[{COMBO}] resumed from checkpoint at epoch 1" in caplog.text
  assert (checkpoints.parent / f"{COMBO}.corrupt" / "2").is_dir()
  # Epochs 2 and 3 saved again, without colliding with the old ones.
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2", "3"]
  assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_identical_metrics(
    idx_dir, reference, tmp_path):
  """A real CLI run, killed once its first checkpoint exists, then the
  same command again: bitwise the metrics of the uninterrupted run (which
  compiled its own programs, in this process)."""
  workdir = tmp_path / "run"
  command = cli_command(idx_dir, workdir)
  # Only to save time: the restarted run loads the killed run's programs.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with open(tmp_path / "killed.log", "w") as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    try:
      deadline = time.monotonic() + CLI_TIMEOUT_S
      while not any(p.name.isdigit()
                    for p in workdir.glob("checkpoints/*/*")):
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
      process.send_signal(signal.SIGKILL)
    finally:
      process.kill()
      process.wait()
  assert process.returncode == -signal.SIGKILL  # killed, not finished
  assert not (workdir / "results.json").exists()

  result = run_cli(command, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resumed from checkpoint" in result.stderr
  assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------
# The workdir: resuming the same experiment, one writer, a full disk.


def test_resume_allows_only_fields_that_do_not_change_results(
    idx_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  moved = tmp_path / "moved-idx"  # the same files elsewhere
  shutil.copytree(idx_dir, moved)
  train_placements(
      tiny_config(moved, progress_seconds=5.0, target_accuracy=0.5,
                  keep_checkpoints=4), workdir)
  assert training_metrics(workdir) == training_metrics(reference)

  with pytest.raises(workdir_lib.ConfigMismatch) as info:
    train_placements(
        tiny_config(idx_dir, learning_rate=0.01, widths=(16,)), workdir)
  message = str(info.value)
  assert "learning_rate, widths differ" in message, message
  assert "new --workdir" in message
  assert training_metrics(workdir) == training_metrics(reference)


def test_a_second_run_on_a_busy_workdir_stops_and_names_the_first(
    idx_dir, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with workdir_lib.Lock(workdir):  # a run in progress (this process)
    with pytest.raises(workdir_lib.WorkdirInUse) as info:
      train_placements(tiny_config(idx_dir, num_epochs=1),
                                    workdir)
  message = str(info.value)
  assert f"in use by process {os.getpid()}" in message, message
  assert "\n" not in message
  assert not (workdir / "metrics.jsonl").exists()
  # Released on exit: the same command now runs.
  train_placements(tiny_config(idx_dir, num_epochs=1), workdir)
  assert (workdir / "results.json").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(idx_dir, tmp_path,
                                                      caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / ".lock").write_text("process 999999999 on elsewhere\n")
  with caplog.at_level("INFO"):
    train_placements(tiny_config(idx_dir, num_epochs=1),
                                  workdir)
  assert "stale lock of process 999999999" in caplog.text
  assert (workdir / "results.json").exists()


@pytest.mark.slow
def test_two_cli_runs_on_one_workdir(idx_dir, tmp_path):
  """The second of two concurrent runs stops at once, in one line naming
  the first one's process; the first finishes undisturbed."""
  workdir = tmp_path / "run"
  command = cli_command(idx_dir, workdir, "--config.num_epochs=30")
  first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not (workdir / "config.json").exists():
      assert first.poll() is None and time.monotonic() < deadline
      time.sleep(0.05)
    second = run_cli(command)
  finally:
    first.kill()
    first.wait()
  lines = second.stderr.strip().splitlines()
  assert second.returncode != 0
  assert len(lines) == 1, second.stderr
  assert f"WorkdirInUse: {workdir} is in use by process {first.pid}" in (
      lines[0])


def _fail_writes_to(monkeypatch, name: str) -> None:
  """Every write of a file called `name` fails as on a full disk."""
  real_fsync = os.fsync

  def fsync(fd):
    if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
      raise OSError(28, "No space left on device")
    real_fsync(fd)
  monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name", ["metrics.jsonl", ".results.json.tmp"])
def test_a_full_disk_stops_in_one_line_and_rerunning_resumes(
    idx_dir, reference, tmp_path, monkeypatch, name):
  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    _fail_writes_to(patch, name)
    with pytest.raises(workdir_lib.WriteError) as info:
      train_placements(tiny_config(idx_dir), workdir)
  message = str(info.value)
  target = name.strip(".").removesuffix(".tmp")
  assert f"could not write {workdir / target}" in message, message
  assert "No space left on device" in message
  assert "rerun the same command" in message
  assert "\n" not in message
  assert not list(workdir.glob(".*.tmp"))
  if name == "metrics.jsonl":  # the first epoch's rows: nothing kept
    assert (workdir / "metrics.jsonl").read_text() == ""
  train_placements(tiny_config(idx_dir), workdir)
  assert_same_run(workdir, reference)


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  workdir_lib.write_atomic(path, "old\n")
  lines = tmp_path / "metrics.jsonl"
  workdir_lib.append_lines(lines, ["{}"])
  _fail_writes_to(monkeypatch, ".results.json.tmp")
  with pytest.raises(workdir_lib.WriteError):
    workdir_lib.write_atomic(path, "new\n")
  _fail_writes_to(monkeypatch, "metrics.jsonl")
  with pytest.raises(workdir_lib.WriteError):
    workdir_lib.append_lines(lines, ['{"a": 1}', '{"b": 2}'])
  assert path.read_text() == "old\n"
  assert lines.read_text() == "{}\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl",
                                                        "results.json"]


def test_a_run_stopped_before_any_result_does_not_pin_its_config(
    idx_dir, reference, tmp_path):
  """config.json alone (a run stopped before its first epoch: a bad value
  found late, Ctrl-C while compiling) does not make the corrected command a
  'different config'."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      {**tiny_config(idx_dir).to_dict(), "learning_rate": 99.0},
      default=list))
  train_placements(tiny_config(idx_dir), workdir)
  assert_same_run(workdir, reference)


def test_a_row_cut_off_mid_write_is_trained_again(idx_dir, reference,
                                                  tmp_path):
  """kill -9 in the middle of an append leaves a last line without its
  newline: resuming drops it (with the epoch's other rows, their checkpoint
  never saved) and trains that epoch again."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / COMBO / "3")
  (workdir / "results.json").unlink()
  lines = (workdir / "metrics.jsonl").read_text().splitlines(True)
  # Epoch 3's append cut off in its first row: no whole row of it on disk.
  (workdir / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:30])
  train_placements(tiny_config(idx_dir), workdir)
  assert_same_run(workdir, reference)


def test_a_corrupt_metrics_line_is_a_one_line_error(idx_dir, reference,
                                                    tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  lines = (workdir / "metrics.jsonl").read_text().splitlines(True)
  lines[1] = "{not json\n"
  (workdir / "metrics.jsonl").write_text("".join(lines))
  with pytest.raises(workdir_lib.CorruptMetrics,
                     match=r"metrics.jsonl, line 2 is not a JSON row"):
    train_placements(tiny_config(idx_dir), workdir)


def test_a_failed_checkpoint_save_is_a_one_line_write_error(
    idx_dir, reference, tmp_path, monkeypatch):
  """Whatever orbax raises for a full disk: one line naming the step's
  directory; the checkpoints before stay, and the rerun resumes."""
  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 2:
      raise ValueError("Error writing: [Errno 28] No space left on device\n"
                       "  (TensorStore details)")
    return real_save(self, step, *args, **kwargs)

  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(workdir_lib.WriteError) as info:
      train_placements(tiny_config(idx_dir), workdir)
  message = str(info.value)
  assert f"could not write {workdir / 'checkpoints' / COMBO / '2'}" in (
      message), message
  assert "No space left on device" in message and "\n" not in message
  assert sorted(p.name for p in (workdir / "checkpoints" / COMBO).iterdir()
                if p.name.isdigit()) == ["1"]
  train_placements(tiny_config(idx_dir), workdir)
  assert_same_run(workdir, reference)


class _OldState(NamedTuple):  # a state as saved before a field was added
  step: jax.Array
  diverged_at: jax.Array | None = None


class _NewState(NamedTuple):  # the same with a new optional field
  step: jax.Array
  diverged_at: jax.Array | None = None
  noise_key: jax.Array | None = None


def test_checkpoints_from_before_an_optional_field_still_restore(tmp_path):
  """A checkpoint written before train.TrainState gained an optional (None
  unless used) field restores into today's state, the field None, and is
  not moved aside as corrupt; a real mismatch still is."""
  from bn_lab import checkpoints  # pylint: disable=g-import-not-at-top
  manager = checkpoints.manager(tmp_path / "checkpoints", keep=2)
  checkpoints.save(manager, 1, _OldState(jnp.arange(3)))
  template = _NewState(jax.ShapeDtypeStruct((3,), jnp.int32))
  epoch, restored = checkpoints.restore_newest(manager, template)
  assert epoch == 1 and isinstance(restored, _NewState)
  np.testing.assert_array_equal(restored.step, np.arange(3))
  assert restored.diverged_at is None and restored.noise_key is None
  assert not (tmp_path / "checkpoints.corrupt").exists()
  wrong = _NewState(jax.ShapeDtypeStruct((3,), jnp.int32),
                    noise_key=jax.ShapeDtypeStruct((2,), jnp.uint32))
  assert checkpoints.restore_newest(manager, wrong) is None
  assert (tmp_path / "checkpoints.corrupt" / "1").is_dir()
