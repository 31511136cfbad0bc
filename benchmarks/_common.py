"""Shared pieces of the training benchmarks (train_throughput.py and
sweep_throughput.py): data, interleaved timing, compile counting, the matmul
floor, memory and allocator settings.

Timing: every candidate is a zero-argument callable that runs one unit of
work (an epoch) and returns something to block on. Candidates run in
interleaved rounds, so that load from other processes on a shared machine
hits all of them alike; tables show medians over rounds.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_lab import data as data_lib
from bn_lab import train

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456",
              "MALLOC_TRIM_THRESHOLD_": "1073741824"}
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def add_common_flags(parser) -> None:
  parser.add_argument("--data_dir", default=os.environ.get(
      "BN_JAX_DATA_DIR", ""), help="directory with the MNIST IDX files "
      "(default: $BN_JAX_DATA_DIR, then bn_lab.data's cache, then the "
      "MNIST bundled with bn_jax)")
  parser.add_argument("--quick", action="store_true",
                      help="a short smoke run: fewer rounds")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds (after warm-up)")
  parser.add_argument("--malloc", choices=("current", "both"),
                      default="current", help="'both' repeats the run in a "
                      "child process with MALLOC_ENV (glibc reads it only "
                      "at start-up); doubles the run time")


def add_torch_python_flag(parser) -> None:
  """--torch_python: the Python of a benchmark's PyTorch worker."""
  parser.add_argument("--torch_python", default=os.environ.get(
      "BN_JAX_TORCH_PYTHON", ""), help="a Python with torch (default: "
      "$BN_JAX_TORCH_PYTHON); empty: bn_jax only")


def run_tuned_child(script: str) -> None:
  """Repeats the current command line in a child with MALLOC_ENV set."""
  argv, skip = [], False
  for a in sys.argv[1:]:
    if skip:
      skip = False
      continue
    if a == "--malloc":
      skip = True
      continue
    if a.startswith("--malloc="):
      continue
    argv.append(a)
  print("\n" + "=" * 72 + "\nSame run in a child process with "
        + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + "\n"
        + "=" * 72, flush=True)
  subprocess.run([sys.executable, script, *argv, "--malloc", "current"],
                 env={**os.environ, **MALLOC_ENV}, check=True)


def header(title: str) -> str:
  """One line naming the software, the machine and the allocator setting."""
  tuned = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
  malloc = ("MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_="
            "1073741824" if tuned else "glibc malloc defaults")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"## {title}\n\njax {jax.__version__}, flax {flax.__version__}, "
          f"optax {optax.__version__}, {jax.devices()[0].platform} "
          f"({os.cpu_count()} CPUs, {platform.machine()}), {malloc}; "
          f"1-min load average at start {load:.1f}")


def load_mnist(data_dir: str) -> train.DeviceData:
  """MNIST as the CLI loads it: uint8 pixels on the device, scaled to [0, 1]
  per batch inside bn_jax's compiled step (`train.model_inputs`)."""
  dataset = data_lib.load_dataset("mnist", data_dir=data_dir or None)
  return train.to_device(
      data_lib.flatten_pixels(dataset.train_images), dataset.train_labels,
      data_lib.flatten_pixels(dataset.test_images), dataset.test_labels)


def float_images(data: train.DeviceData) -> train.DeviceData:
  """The same data with [0, 1] float32 images, preprocessed once, as
  flax's examples/mnist keep them (for the flax baselines)."""
  scale = lambda x: jax.device_put(data_lib.scale_pixels(np.asarray(x),
                                                         "unit"))
  return data._replace(train_images=scale(data.train_images),
                       test_images=scale(data.test_images))


# ----------------------------------------------------------------------------
# Compilations.


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) in this process."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration_secs, **kwargs):
    del kwargs
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += duration_secs

  def snapshot(self) -> tuple[int, float]:
    return self.count, self.seconds


# ----------------------------------------------------------------------------
# Timing.


def block(value):
  return jax.block_until_ready(value)


def first_call(fn: Callable[[], object], counter: CompileCounter,
               ) -> dict[str, float]:
  """Times the first call (trace + compile + one run) and its compilations."""
  count, seconds = counter.snapshot()
  start = time.perf_counter()
  block(fn())
  wall = time.perf_counter() - start
  return {"first_call_s": wall, "compiles": counter.count - count,
          "compile_s": counter.seconds - seconds}


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int,
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Wall and CPU seconds (all threads of this process) per call of each
  candidate over `rounds` interleaved rounds."""
  wall = {name: [] for name in candidates}
  cpu = {name: [] for name in candidates}
  for _ in range(rounds):
    for name, fn in candidates.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      block(fn())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return wall, cpu


def median(values) -> float:
  return statistics.median(values)


def spread(values) -> str:
  """`min-max` of a list of seconds, to show how noisy the machine was."""
  return f"{min(values):.3f}-{max(values):.3f}"


def kernel_profile(fn: Callable[[], object], top: int = 12,
                   ) -> list[tuple[str, float, int]]:
  """(kernel, ms, calls) of the XLA kernels that one call of `fn` ran, the
  `top` most expensive, summed over threads (jax.profiler on the CPU;
  `kernel_times` says how)."""
  import glob
  import tempfile
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      block(fn())
    path = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0]
    profile = jax.profiler.ProfileData.from_file(path)
  events = [(event.name, event.start_ns, event.duration_ns)
            for plane in profile.planes for line in plane.lines
            if line.name.startswith("tf_XLA")  # XLA's threads only
            for event in line.events]
  return kernel_times(events)[:top]


def kernel_times(events) -> list[tuple[str, float, int]]:
  """(kernel, ms, calls), most expensive first, from profiler events
  (name, start_ns, duration_ns) of XLA's threads.

  A plain `dot` (one that XLA:CPU leaves to Eigen's thread pool) runs
  asynchronously: its event is the launch alone, and an "end: dot.N" event
  marks its completion; its time is counted from launch to end, during which
  other kernels may run on the same cores. (Loop fusions have end events
  too, but their own events cover their work.)
  """
  import collections
  total, calls = collections.Counter(), collections.Counter()
  launches, ends = collections.defaultdict(list), collections.defaultdict(list)
  for name, start_ns, duration_ns in events:
    if name.startswith(("ThunkExecutor", "while")):
      continue  # containers of the kernels below
    if name.startswith("end: "):
      ends[name[len("end: "):]].append(start_ns)
      continue
    launches[name].append(start_ns)
    total[name] += duration_ns / 1e6
    calls[name] += 1
  for name, end_times in ends.items():  # asynchronous dots: launch to end
    starts = sorted(launches[name])
    if name.startswith("dot") and len(starts) == len(end_times):
      total[name] = sum(end - start for start, end in zip(
          starts, sorted(end_times))) / 1e6
  return [(name, ms, calls[name]) for name, ms in total.most_common()]


# ----------------------------------------------------------------------------
# The floor: a large float32 matmul.

MATMUL_N = 2048


def matmul_candidate(n: int = MATMUL_N) -> tuple[Callable[[], object], float]:
  """A jitted n x n @ n x n float32 matmul and its FLOPs (2 n^3)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  block(matmul(a, b))
  return (lambda: matmul(a, b)), 2.0 * n ** 3


# ----------------------------------------------------------------------------
# Memory.


def peak_rss_mib() -> float:
  """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_memory_line() -> str:
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return "jax device memory stats: not available on this backend"
  peak = stats.get("peak_bytes_in_use")
  return f"jax device peak_bytes_in_use: {peak / 2**20:.0f} MiB"


def program_memory(compiled) -> str:
  """Arguments and temporaries of one compiled program, from XLA."""
  stats = compiled.memory_analysis()
  if stats is None:
    return "n/a"
  return (f"args {stats.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"temp {stats.temp_size_in_bytes / 2**20:.2f} MiB")


def tree_copy(tree):
  """A fresh copy of every leaf, so that donating one copy leaves others."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def host_permutation(seed: int, num_examples: int, steps: int,
                     batch: int) -> np.ndarray:
  return np.random.default_rng(seed).permutation(num_examples)[
      :steps * batch].reshape(steps, batch)


def check_torch_python(python: str) -> str:
  """The torch version under `python`, or SystemExit saying how to get one."""
  try:
    result = subprocess.run([python, "-c", "import torch; "
                             "print(torch.__version__)"],
                            capture_output=True, text=True, timeout=120)
  except OSError as e:
    raise SystemExit(f"--torch_python={python}: cannot run it ({e}); name a "
                     "Python that has torch (benchmarks/README.md says "
                     "how to make one).") from e
  if result.returncode:
    raise SystemExit(f"--torch_python={python}: `import torch` failed "
                     f"({result.stderr.strip().splitlines()[-1]}); install "
                     "torch there (benchmarks/README.md says how).")
  return result.stdout.strip()

