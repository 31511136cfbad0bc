"""The parent's side of a benchmark's PyTorch worker process: no jax here,
since benchmarks/nlp_step.py is also the worker, run by a Python that has
torch and no jax."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
import subprocess


class JsonLineWorker:
  """A worker process (the PyTorch side of a benchmark) that answers each
  command line on its stdin with one JSON line: its first line on start,
  then one per `ask`; `quit` ends it."""

  def __init__(self, argv: list[str]):
    self.name = Path(argv[1]).name
    self.process = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
    self.info = self._answer()

  def _answer(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker ({self.name}) exited with "
                         f"code {self.process.wait()}; its error is above.")
    answer = json.loads(line)
    if "error" in answer:
      raise RuntimeError(f"the PyTorch worker: {answer['error']}")
    return answer

  def ask(self, command: str) -> dict:
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self._answer()

  def close(self):
    with contextlib.suppress(OSError):
      self.process.stdin.write("quit\n")
      self.process.stdin.close()
    self.process.wait(timeout=60)
