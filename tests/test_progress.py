"""Progress lines during an epoch (bn_lab.progress) and the step windows'
training metrics (train.step_windows, steps.jsonl)."""

import json
import re
import threading
import time

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import classifier
from bn_lab import config as base
from bn_lab import progress
from bn_lab import runner
from bn_lab import train


def test_durations_read_as_a_person_would():
  assert [progress.duration(s) for s in (0.4, 59, 125, 3725)] == [
      "0 s", "59 s", "2 min 05 s", "1 h 02 min"]


def test_before_the_first_report_the_line_says_compiling_or_starting():
  ticks = progress.Ticks()
  assert progress.progress_line("e 1/3", 12.3, 100, ticks, 2, None, 0.0) == (
      "[e 1/3] compiling (first epoch), 12 s")
  assert progress.progress_line("e 2/3", 0.4, 100, ticks, 1, 5.0, 0.0) == (
      "[e 2/3] starting, 0 s")


def test_rate_and_eta_from_the_reports():
  # 10 steps done at t=1 s, 60 at t=1.5 s: 100 steps/s. At t=1.5 s, 40 of
  # 100 steps are left (0.4 s); 3 more epochs of 1 s each (the last one's).
  ticks = progress.Ticks()
  ticks.record(10, 1.0)
  ticks.record(60, 1.5)
  ticks.record(20, 1.6)  # another device's late report: not newer
  line = progress.progress_line("b epoch 2/5", 1.5, 100, ticks, 3, 1.0, 0.0)
  assert line == ("[b epoch 2/5] step 60/100 (60%), 100 steps/s, ETA 0 s "
                  "(epoch), 3 s (all 3 left)")
  # Without an epoch's time, an epoch is steps / rate; 10 s later with no
  # new report, the ETA is not negative.
  line = progress.progress_line("b", 11.5, 100, ticks, 1, None, 0.0)
  assert line.endswith("ETA 0 s (epoch), 1 s (all 1 left)")


def _slow(state, images, labels, *, spec, seconds):
  """A measurement that only waits: a slow step, as a big model's."""
  del images, labels, spec
  jax.debug.callback(lambda: time.sleep(seconds))
  return {"step": state.step}


def test_a_long_epoch_shows_steps_per_second_and_an_eta(tmp_path, caplog):
  """A real run whose steps take 20 ms each: lines during the epoch give
  the step, the rate and an ETA; the terminal's line has no absl prefix."""
  idx = helpers.write_tiny_idx(tmp_path / "idx", 400, 100)
  config = base.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx),
                       "num_epochs": 2, "seeds": (0,), "widths": (8,),
                       "batch_size": 10, "progress_seconds": 0.15}.items():
    config[field] = value
  slow = train.Measurement("slow", 1, _slow, options=(("seconds", 0.02),))
  study = classifier.study("slow", "A slow study",
                           measure=lambda config: (slow,))
  with caplog.at_level("INFO"):
    runner.run(study, config, tmp_path / "work")
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("[run epoch ")]
  running = [line for line in lines if "steps/s" in line]
  assert running, lines
  step, steps, rate, eta = re.search(
      r"^\[run epoch \d/2\] step (\d+)/(\d+) \(\d+%\), ([\d.]+) steps/s, ETA "
      r"(\d+) s \(epoch\)", running[-1]).groups()
  assert int(steps) == 40 and 0 < int(step) <= 40
  assert 5 < float(rate) < 50 and int(eta) <= 2  # 20 ms a step, at most
  # The run's log file keeps absl's prefix.
  log = (tmp_path / "work" / "log.txt").read_text()
  assert re.search(r"^I\d{4} [\d:.]+ +\d+ progress\.py:\d+\] "
                   r"\[run epoch 1/2\] "
                   r"compiling \(first epoch\)",
                   log, re.M)


def test_no_lines_when_off_and_none_after_the_block(caplog):
  with caplog.at_level("INFO"):
    with progress.Epoch("off", 10, 0.0):
      progress.step_done(3)
      time.sleep(0.1)
    with progress.Epoch("on", 10, 0.02) as epoch:
      progress.step_done(np.int32(4))  # as the callback passes it
    time.sleep(0.1)
  assert epoch.ticks.latest[0] == 5
  assert all("[off]" not in r.getMessage() for r in caplog.records)
  assert not [t for t in threading.enumerate() if t.name.startswith(
      "progress")]


@pytest.mark.parametrize("steps, every", [(8, 3), (9, 3), (5, 5), (4, 10)])
def test_step_windows_match_numpy(steps, every):
  rng = np.random.default_rng(steps)
  count = rng.integers(1, 5, steps)
  loss_sum = rng.random(steps) * count
  correct = rng.integers(0, count + 1)
  got = train.step_windows(
      {"loss_sum": jnp.asarray(loss_sum), "correct": jnp.asarray(correct),
       "count": jnp.asarray(count)}, every)
  ends = train.window_ends(steps, min(every, steps))
  starts = [0, *ends[:-1]]
  np.testing.assert_allclose(got["window_train_loss"], [
      loss_sum[a:b].sum() / count[a:b].sum() for a, b in zip(starts, ends)],
                             rtol=1e-6)
  np.testing.assert_allclose(got["window_train_accuracy"], [
      correct[a:b].sum() / count[a:b].sum() for a, b in zip(starts, ends)],
                             rtol=1e-6)


def test_steps_jsonl_windows_add_up_to_the_epoch(tmp_path):
  """steps.jsonl: windows of 3 steps (the last of 2) whose count-weighted
  mean is the epoch's training loss in metrics.jsonl."""
  idx = helpers.write_tiny_idx(tmp_path / "idx", 400, 100)
  config = base.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx),
                       "num_epochs": 2, "seeds": (0, 1), "widths": (8,),
                       "batch_size": 50, "log_every_steps": 3,
                       "progress_seconds": 0.0}.items():
    config[field] = value
  classifier.train_and_evaluate(config, tmp_path / "work")
  rows = [json.loads(line) for line in
          (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
  windows = [json.loads(line) for line in
             (tmp_path / "work" / "steps.jsonl").read_text().splitlines()]
  for row in rows:
    mine = [w for w in windows if w["run"] == row["run"]
            and row["step"] - 8 < w["step"] <= row["step"]]
    assert [w["step"] - row["step"] + 8 for w in mine] == [3, 6, 8]
    weights = np.diff([0, 3, 6, 8])
    np.testing.assert_allclose(
        np.average([w["train_loss"] for w in mine], weights=weights),
        row["train_loss"], rtol=1e-5)
