"""benchmarks/accelerator.sh: the accelerator check's table, smoke-run on CPU.

The full check runs on a GPU only (benchmarks/README.md); here `--quick`
runs every part cut down and the table is checked for its rows, not its
numbers (timings on a shared CPU say nothing).
"""

import argparse
import os
import re
import subprocess
import sys
import time

import jax
import pytest

import helpers

sys.path.insert(0, str(helpers.REPO / "benchmarks"))
import accelerator  # noqa: E402  pylint: disable=g-import-not-at-top

SCRIPT = helpers.REPO / "benchmarks" / "accelerator.sh"
# The rows a --quick run measures, by part (every part's measurements).
EXPECTED_ROWS = {"bn_op": 5, "epochs": 2, "sweep": 3, "time_to_target": 1,
                 "ioffe": 1}


def run_script(*args, timeout=900):
  """The script as a user runs it, on the CPU, with unoptimized XLA (as
  helpers.run_cli: compiles faster; the numbers are not checked)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  return subprocess.run([str(SCRIPT), *args], cwd=helpers.REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def table_rows(text):
  """{part: [row cells]} of the Markdown table in `text`."""
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  header, rows = lines[0], lines[1:]
  assert header.startswith("| part | measurement | value | unit | detail |")
  by_part = {}
  for line in rows:
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    assert len(cells) == 8, line
    by_part.setdefault(cells[0], []).append(cells)
  return by_part


@pytest.mark.slow
def test_quick_run_has_every_row_and_reports_a_failed_part(tmp_path):
  # One part fails after recording its rows: they stay, a FAILED row says
  # why, the parts after it still run, and the exit status says so.
  out = tmp_path / "table.md"
  result = run_script("--quick", "--inject_failure", "sweep",
                      f"--out={out}")
  log = result.stdout[-3000:] + result.stderr[-5000:]
  assert result.returncode == 1, log
  text = out.read_text()
  assert text in result.stdout  # the same table on stdout
  by_part = table_rows(text)
  assert list(by_part) == list(accelerator.PARTS), log
  for part, rows in by_part.items():
    measured = [r for r in rows if r[2] != "FAILED"]
    assert len(measured) == EXPECTED_ROWS[part], (part, rows)
    for _, measurement, value, unit, _, device, version, command in measured:
      assert float(value) > 0, (part, measurement, value)
      assert unit
      assert device == "cpu: cpu" and version == jax.__version__
      assert command.startswith("`") and len(command) > 10
  failed = [r for rows in by_part.values() for r in rows if r[2] == "FAILED"]
  assert len(failed) == 1 and failed[0][0] == "sweep", failed
  assert "injected failure" in failed[0][4]


def test_a_part_past_its_time_limit_is_stopped():
  args = argparse.Namespace(quick=True, inject_failure=None)
  start = time.monotonic()
  rows = accelerator.run_child("ioffe", args, timeout_s=1)
  assert time.monotonic() - start < 30  # killed, not waited for
  assert len(rows) == 1 and rows[0].value is None
  assert "stopped at its time limit, 1 s" in rows[0].detail


def test_no_part_starts_without_time_left(tmp_path):
  out = tmp_path / "table.md"
  result = subprocess.run(
      [sys.executable, str(helpers.REPO / "benchmarks" / "accelerator.py"),
       "--parts", "bn_op,ioffe", "--budget_s", "0", f"--out={out}"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  by_part = table_rows(out.read_text())
  assert list(by_part) == ["bn_op", "ioffe"]
  for (row,) in by_part.values():
    assert row[2] == "FAILED" and "not started" in row[4]
