"""Progress lines while an epoch runs: the step, steps per second, an ETA.

An epoch is one compiled program (train.train_epoch's scan), so the host
sees nothing of it until it returns. With `TrainSpec.progress_every` set,
the scan calls `step_done` every that many steps (a `jax.debug.callback`,
which changes no number the program computes); `Epoch` records those calls
and a thread of its own writes a line every `seconds`:

  [batch epoch 2/10] step 300/468 (64%), 412 steps/s, ETA 1 s (epoch), 35 s (all 9 left)

Before the first call of an epoch's program has come back the program is
still compiling (first epoch) or starting, and the line says so.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from absl import logging

_lock = threading.Lock()
_active: "Epoch | None" = None  # the epoch whose program is running


def step_done(step) -> None:
  """Called from inside the compiled epoch: `step` (0-based, within the
  epoch) has been taken. Several devices or runs may report the same step."""
  with _lock:
    if _active is not None:
      _active.record(int(step) + 1, time.perf_counter())


@dataclasses.dataclass
class Ticks:
  """The first and the latest (steps done, time) an epoch reported."""
  first: tuple[int, float] | None = None
  latest: tuple[int, float] | None = None

  def record(self, steps: int, now: float) -> None:
    if self.first is None:
      self.first = (steps, now)
    if self.latest is None or steps > self.latest[0]:
      self.latest = (steps, now)


def duration(seconds: float) -> str:
  """4 s, 2 min 05 s, 1 h 02 min."""
  seconds = max(0, round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(label: str, elapsed: float, steps: int, ticks: Ticks,
                  epochs_after: int, epoch_seconds: float | None,
                  start: float) -> str:
  """The line for an epoch `elapsed` seconds in, of `steps` steps, followed
  by `epochs_after` more (each about `epoch_seconds`, the last one's time
  with its evaluation, when known); `start` is the epoch's start time on
  the ticks' clock."""
  if ticks.latest is None:
    doing = "starting" if epoch_seconds else "compiling (first epoch)"
    return f"[{label}] {doing}, {duration(elapsed)}"
  done, now = ticks.latest
  line = f"[{label}] step {done}/{steps} ({done / steps:.0%})"
  first_done, first_time = ticks.first
  if done > first_done and now > first_time:
    rate = (done - first_done) / (now - first_time)
    # The steps left from now on: the latest tick's are done.
    left = max(0.0, (steps - done) / rate - (start + elapsed - now))
    per_epoch = epoch_seconds or steps / rate
    line += (f", {rate:.3g} steps/s, ETA {duration(left)} (epoch)")
    if epochs_after:
      line += (f", {duration(left + epochs_after * per_epoch)} (all "
               f"{epochs_after} left)")
  return line


class Epoch:
  """While the block runs, a line every `seconds` (`progress_line`) for an
  epoch of `steps` steps; `seconds=0`: none."""

  def __init__(self, label: str, steps: int, seconds: float,
               epochs_after: int = 0, epoch_seconds: float | None = None):
    self.label, self.steps, self.seconds = label, steps, seconds
    self.epochs_after, self.epoch_seconds = epochs_after, epoch_seconds
    self.ticks = Ticks()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._report, daemon=True,
                                    name=f"progress {label}")
    self._start = None

  def record(self, steps: int, now: float) -> None:
    self.ticks.record(steps, now)

  def line(self) -> str:
    with _lock:
      return progress_line(self.label, time.perf_counter() - self._start,
                           self.steps, self.ticks, self.epochs_after,
                           self.epoch_seconds, self._start)

  def _report(self) -> None:
    while not self._stop.wait(self.seconds):
      logging.info("%s", self.line())

  def __enter__(self) -> "Epoch":
    global _active
    self._start = time.perf_counter()
    if self.seconds > 0:
      with _lock:
        _active = self
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    global _active
    self._stop.set()
    with _lock:
      if _active is self:
        _active = None
    if self._thread.is_alive():
      self._thread.join()
