r"""What the test suite costs: wall time, CPU time and peak memory.

    .venv/bin/python benchmarks/test_suite_cost.py             # the README's command
    .venv/bin/python benchmarks/test_suite_cost.py -m "not slow"  # the quick subset

runs `.venv/bin/python -m pytest -q [ARGS]` from the repository root and
prints its exit code, its wall time, the CPU time of it and all its
children (pytest-xdist's workers, the CLI runs they start) and the peak of
their summed resident memory, sampled from /proc every 0.2 s (a peak
shorter than that can be missed). Measure on an idle machine: the wall
time is the machine's, the CPU time the suite's.
"""

from __future__ import annotations

import os
from pathlib import Path
import resource
import subprocess
import sys
import time

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2


def _children(pid: int) -> list[int]:
  try:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir()
            for c in (t / "children").read_text().split()]
  except OSError:  # the process ended
    return []


def tree_rss_bytes(pid: int) -> int:
  """The summed resident memory of `pid` and all its descendants."""
  total, todo = 0, [pid]
  page = os.sysconf("SC_PAGE_SIZE")
  while todo:
    p = todo.pop()
    try:
      total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
    except OSError:
      continue
    todo += _children(p)
  return total


def main(args: list[str]) -> int:
  start = time.perf_counter()
  suite = subprocess.Popen([sys.executable, "-m", "pytest", "-q", *args],
                           cwd=REPO)
  peak = 0
  while suite.poll() is None:
    peak = max(peak, tree_rss_bytes(suite.pid))
    time.sleep(SAMPLE_S)
  wall = time.perf_counter() - start
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(f"pytest -q {' '.join(args)}: exit {suite.returncode}, wall "
        f"{wall:.0f} s, CPU {usage.ru_utime + usage.ru_stime:.0f} s, peak "
        f"memory {peak / 2**30:.1f} GiB (summed over its processes), "
        f"{os.cpu_count()} CPU cores")
  return suite.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
