r"""The accelerator check: one short run, one Markdown table.

    benchmarks/accelerator.sh                  # a GPU: ~6 min, 9 at most
    benchmarks/accelerator.sh --quick          # a CPU smoke run, ~2 min
    benchmarks/accelerator.sh --parts bn_op,sweep --out /tmp/check.md

(benchmarks/accelerator.sh runs this file with the project's .venv, or
`python3` where there is none, e.g. on a lent GPU machine.)

Five parts, each in its own process, one after another, so that a part that
fails, runs out of memory or hangs costs its own rows only: its row says
FAILED and why, and the others still appear. Each part has a time limit and
the whole run stops by --budget_s. The table is rewritten (atomically) after
every part, so a run stopped from outside keeps what it had measured. The
exit status is 1 if any part failed.

  bn_op           One batch-norm op in training mode, forward + backward
                  (benchmarks/bn_op.py's step: y, the new statistics, then
                  dx, dscale, dbias for a cotangent), bn_jax against
                  flax.linen.BatchNorm, float32, as a percentage of the
                  device's memory bandwidth, measured in the same rounds by
                  a jitted `x + 1` on a large array (bytes read + written
                  over its time). The op's bytes count x, y, dy and dx once
                  each. The tensors are 8x bn_op.py's, well beyond a GPU's
                  L2 cache. (On a CPU, glibc serves such buffers with fresh
                  mmaps that page-fault on every call, so the fraction says
                  little there: benchmarks/bn_op.py measures a CPU.)
  epochs          One training epoch of real MNIST (468 steps of batch 128)
                  of the reference MLP (lab/bn_lab/config.py) and of the CNN
                  (studies/placements/main_job.py:cnn, BN after the activation), on
                  the CLI's training path (`train.over_runs(train.train_epoch)`
                  for one run, as benchmarks/train_throughput.py times it;
                  evaluation not included); median over epochs after the
                  compile.
  sweep           One epoch of 64 reference runs (seeds 0..63) vmapped
                  against one run, and the throughput ratio 64 x t(1) /
                  t(64) (> 1: the sweep trains runs faster than one at a
                  time); as benchmarks/sweep_throughput.py.
  time_to_target  The CLI on the CNN (studies/placements/main_job.py:cnn,
                  after_activation, seed 0): the training wall time
                  (compile, evaluation and checkpoints included; metrics.
                  jsonl's wall_time) to the end of the first epoch whose test
                  accuracy is >= 98%.
  ioffe           The whole CLI run of studies/ioffe2015/config.py (its
                  figure: 2 placements x 5 seeds x 50 epochs, probes, report
                  and plots), wall time of the command.

--quick cuts everything down for a CPU: small tensors, 50 (MLP) and 4
(CNN) steps per epoch, 4 runs instead of 64, time to 90% for the MLP
(studies/placements/main_job.py, after_activation, 1 epoch) instead of 98% for the
CNN, and 1 epoch of one seed of the Ioffe figure. Its numbers say only
that the script works.

Every row names the device (`jax.devices()[0].device_kind`), the jax
version and the command that measures it alone.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(BENCHMARKS), str(REPO)]

PARTS = ("bn_op", "epochs", "sweep", "time_to_target", "ioffe")
# Seconds each part may take before it is stopped (a GPU, then --quick on a
# CPU); the whole run also stops by --budget_s.
PART_LIMITS_S = {"bn_op": (120, 150), "epochs": (150, 200),
                 "sweep": (150, 200), "time_to_target": (150, 200),
                 "ioffe": (360, 200)}
MIN_PART_S = 20  # a part that would get less is not started
# The lent GPU machine stops a command at 600 s; this leaves room for the
# installs before it and the last writes.
DEFAULT_BUDGET_S = (540, 600)
WRAPPER = "benchmarks/accelerator.sh"
ROWS_FILE = "rows.json"  # a part's rows, in its scratch directory
NUM_TRAIN = 60000


@dataclasses.dataclass
class Row:
  part: str
  measurement: str
  value: float | None  # None: failed, `detail` says why
  unit: str
  detail: str
  device: str = "?"
  jax: str = "?"
  command: str = ""


class Recorder:
  """Collects a part's rows and rewrites them to a JSON file after each one,
  so that the rows measured before a crash or a kill are kept."""

  def __init__(self, path: Path, device: str, jax_version: str,
               command: str):
    self.path, self.rows = path, []
    self.defaults = dict(device=device, jax=jax_version, command=command)

  def __call__(self, part: str, measurement: str, value: float, unit: str,
               detail: str, **overrides) -> None:
    row = Row(part, measurement, value, unit, detail,
              **{**self.defaults, **overrides})
    self.rows.append(row)
    print(format_row(row), flush=True)
    from bn_lab import workdir  # pylint: disable=g-import-not-at-top
    workdir.write_atomic(self.path, json.dumps(
        [dataclasses.asdict(r) for r in self.rows]))


def part_command(part: str, quick: bool) -> str:
  return f"{WRAPPER} --parts {part}" + (" --quick" if quick else "")


# ----------------------------------------------------------------------------
# The parts, each run in a child process: `accelerator.py --part NAME`.


def _device():
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return f"{device.platform}: {device.device_kind}", jax.__version__


def _repeated(fn, args, reps: int) -> Callable[[], object]:
  """A call of `fn(*args)` `reps` times back to back, returning the last
  result: asynchronous dispatch keeps a GPU busy between the calls, so the
  time per call is the op's, not Python's."""
  def run():
    out = None
    for _ in range(reps):
      out = fn(*args)
    return out
  return run


def part_bn_op(record: Recorder, quick: bool, scratch: Path) -> None:
  del scratch
  import bn_op  # pylint: disable=g-import-not-at-top
  import _common  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import bn_jax  # pylint: disable=g-import-not-at-top
  from bn_lab import models  # pylint: disable=g-import-not-at-top

  on_cpu = jax.default_backend() == "cpu"
  if quick:
    shapes, copy_mib, rounds, reps = ((4096, 256), (64, 14, 14, 64)), 16, 5, 2
  else:
    # bn_op.py's shapes x 8: 128 MiB and 196 MiB, several times a GPU's L2.
    shapes, copy_mib, rounds, reps = ((32768, 1024), (256, 56, 56, 64)), (
        256 if on_cpu else 1024), 20, (2 if on_cpu else 10)
  impl = models.resolve_backend_choice("auto", "xla_cpu", "plain")
  bn_options = dict(grad="paper_jvp", impl=impl)

  big = jnp.zeros((copy_mib * 2**20 // 4,), jnp.float32)
  copy = jax.jit(bn_op.copy_step)
  candidates = {"copy": _repeated(copy, (big, jnp.float32(1)), reps)}
  for shape in shapes:
    kx, kdy = jax.random.split(jax.random.key(0))
    x = 3.0 + 2.0 * jax.random.normal(kx, shape, jnp.float32)
    dy = jax.random.normal(kdy, shape, jnp.float32)
    params, state = bn_jax.init(shape[-1])
    flax_vars = jax.jit(nn.BatchNorm(use_running_average=False).init)(
        jax.random.key(1), x)
    candidates[("bn_jax", shape)] = _repeated(
        jax.jit(functools.partial(bn_op.bn_jax_step, **bn_options)),
        (params, state, x, dy), reps)
    candidates[("flax", shape)] = _repeated(
        jax.jit(bn_op.flax_step(jnp.float32)),
        (flax_vars["params"], flax_vars["batch_stats"], x, dy), reps)
  _common.interleaved(candidates, 2)  # compile, first allocations
  wall, _ = _common.interleaved(candidates, rounds)
  seconds = {k: _common.median(v) / reps for k, v in wall.items()}

  copy_gbps = 2 * big.nbytes / seconds["copy"] / 1e9
  timing = f"median of {rounds} interleaved rounds of {reps} calls"
  record("bn_op", f"memory bandwidth: jitted x + 1, float32 x of "
         f"{copy_mib} MiB", copy_gbps, "GB/s",
         f"bytes read + written / time; {seconds['copy'] * 1e3:.3f} ms; "
         f"{timing}")
  for shape in shapes:
    nbytes = 4 * math.prod(shape)
    ours, theirs = seconds[("bn_jax", shape)], seconds[("flax", shape)]
    for name, t in (("bn_jax", ours), ("flax.linen", theirs)):
      gbps = 4 * nbytes / t / 1e9
      extra = (f"; flax/bn_jax time {theirs / ours:.2f}" if name != "bn_jax"
               else f"; impl={impl!r}, grad='paper_jvp'")
      record("bn_op", f"{name} BatchNorm, train, forward + backward, x "
             f"{shape} float32", 100 * gbps / copy_gbps,
             "% of copy bandwidth",
             f"{t * 1e3:.3f} ms, {gbps:.1f} GB/s counting x, y, dy, dx once"
             f"{extra}; {timing}")


def _config(path: str, arg: str | None = None, **fields):
  """A config file's `get_config(arg)` with `fields` set, as the CLI's
  --config=PATH:ARG --config.FIELD=VALUE would give it."""
  module_spec = importlib.util.spec_from_file_location(
      Path(path).stem, REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for field, value in fields.items():
    config[field] = value
  return config


def _spec_and_hparams(config, steps: int | None = None):
  """The first combination's TrainSpec and the run hparams, as
  bn_lab.runner builds them; `steps` cuts the epoch (--quick)."""
  from bn_lab import sweep  # pylint: disable=g-import-not-at-top
  from bn_lab import train  # pylint: disable=g-import-not-at-top
  combo = sweep.combinations(config)[0]
  spec = sweep.make_spec(combo.config, NUM_TRAIN)
  if steps:
    spec = dataclasses.replace(spec, steps_per_epoch=steps)
  runs = sweep.run_grid(combo.config)
  hparams = {n: [r["hparams"][n] for r in runs] for n in train.SWEEPABLE
             if runs[0]["hparams"][n] is not None}
  return spec, hparams, [r["seed"] for r in runs]


def _epoch_runner(spec, hparams, seeds, data):
  """One epoch per call of the stacked runs, on the CLI's training path."""
  import train_throughput  # pylint: disable=g-import-not-at-top
  from bn_lab import train  # pylint: disable=g-import-not-at-top
  epoch = train_throughput.sweep_train_epoch(spec)
  return train_throughput.Runner(
      train.create_sweep_states(spec, seeds, hparams),
      lambda s: epoch(s, data)[0])


def _time_epochs(runners: dict, rounds: int):
  """(first call {first_call_s, compile_s}, median s per epoch) of each."""
  import _common  # pylint: disable=g-import-not-at-top
  counter = _common.CompileCounter()
  first = {name: _common.first_call(fn, counter)
           for name, fn in runners.items()}
  for fn in runners.values():  # one more epoch: allocator and caches warm
    _common.block(fn())
  wall, _ = _common.interleaved(runners, rounds)
  return first, {name: _common.median(t) for name, t in wall.items()}


def part_epochs(record: Recorder, quick: bool, scratch: Path) -> None:
  del scratch
  import _common  # pylint: disable=g-import-not-at-top
  from bn_lab import models  # pylint: disable=g-import-not-at-top
  data = _common.load_mnist("")
  cases = {
      "reference MLP (lab/bn_lab/config.py)": (
          _config("lab/bn_lab/config.py", seeds=(0,)), 50 if quick else None),
      "CNN (studies/placements/main_job.py:cnn, after_activation)": (
          _config("studies/placements/main_job.py", "cnn", seeds=(0,),
                  placements=("after_activation",)), 4 if quick else None),
  }
  runners, specs = {}, {}
  for name, (config, steps) in cases.items():
    spec, hparams, seeds = _spec_and_hparams(config, steps)
    runners[name], specs[name] = _epoch_runner(spec, hparams, seeds,
                                               data), spec
  rounds = 2 if quick else 3
  first, median = _time_epochs(runners, rounds)
  for name, seconds in median.items():
    spec = specs[name]
    conv = (", conv " + models.resolve_backend_choice(spec.conv, "im2col",
                                                      "xla")
            if spec.model == "cnn" else "")
    record("epochs", f"{name}: one training epoch, one run", seconds,
           "s/epoch",
           f"{spec.steps_per_epoch} steps of batch {spec.batch_size}"
           f"{' (cut from 468: --quick)' if quick else ''}{conv}; training "
           "only (the CLI's path, no evaluation); median of "
           f"{rounds} epochs after 2; first epoch "
           f"{first[name]['first_call_s']:.1f} s (compile "
           f"{first[name]['compile_s']:.1f} s)")


def part_sweep(record: Recorder, quick: bool, scratch: Path) -> None:
  del scratch
  import _common  # pylint: disable=g-import-not-at-top
  data = _common.load_mnist("")
  k = 4 if quick else 64
  config = _config("lab/bn_lab/config.py", seeds=tuple(range(k)))
  spec, hparams, seeds = _spec_and_hparams(config, 50 if quick else None)
  runners = {k: _epoch_runner(spec, hparams, seeds, data),
             1: _epoch_runner(spec, {n: v[:1] for n, v in hparams.items()},
                              seeds[:1], data)}
  rounds = 2 if quick else 3
  first, median = _time_epochs(runners, rounds)
  steps = (f"reference MLP, {spec.steps_per_epoch} steps of batch "
           f"{spec.batch_size}{' (cut from 468: --quick)' if quick else ''}"
           f"; median of {rounds} epochs after 2")
  for runs in (k, 1):
    record("sweep", f"{runs} run{'s' * (runs > 1)} "
           f"{'vmapped ' if runs > 1 else ''}(seeds 0..{runs - 1}), one epoch",
           median[runs], "s/epoch",
           f"{steps}; first epoch {first[runs]['first_call_s']:.1f} s "
           f"(compile {first[runs]['compile_s']:.1f} s)")
  record("sweep", f"{k} runs vmapped vs one at a time: throughput",
         k * median[1] / median[k], "x",
         f"{k} x t(1 run) / t({k} runs); each run its own data order")


class PartFailure(RuntimeError):
  """A part ran but did not measure what it should (e.g. a target not
  reached): its row says why."""


def _run_cli(args: list[str], workdir: Path):
  """`python -m experiments.main ARGS --workdir=WORKDIR` from the
  repository root: (seconds, {name: text} of metrics.jsonl and
  results.json). Its log goes to this process's output."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "experiments.main", *args,
                  f"--workdir={workdir}"], cwd=REPO, check=True)
  seconds = time.perf_counter() - start
  return seconds, {name: (workdir / name).read_text()
                   for name in ("metrics.jsonl", "results.json")}


def _cli_command(args: list[str]) -> str:
  return " ".join(["python -m experiments.main",
                   *map(shlex.quote, args), "--workdir=$(mktemp -d)"])


def _machine(results: dict) -> dict:
  machine = results["machine"]
  return dict(device=f"{machine['platform']}: {machine['device']}",
              jax=machine["jax"])


def part_time_to_target(record: Recorder, quick: bool, scratch: Path,
                        ) -> None:
  if quick:
    target, args = 0.90, ["--config=studies/placements/main_job.py",
                          "--config.num_epochs=1"]
    model = "reference MLP (studies/placements/main_job.py)"
  else:
    # The :cnn config trains 3 epochs; 5 leave room (each 98% by epoch 2
    # in docs/studies.md's CNN study).
    target, args = 0.98, ["--config=studies/placements/main_job.py:cnn",
                          "--config.num_epochs=5"]
    model = "CNN (studies/placements/main_job.py:cnn)"
  args += ['--config.placements=("after_activation",)',
           "--config.seeds=(0,)"]
  seconds, files = _run_cli(args, scratch / "workdir")
  rows = [json.loads(line) for line in files["metrics.jsonl"].splitlines()]
  reached = [r for r in rows if r["test_accuracy"] >= target]
  if not reached:
    raise PartFailure(
        f"test accuracy {max(r['test_accuracy'] for r in rows):.4f} < "
        f"{target} after {len(rows)} epochs")
  first = reached[0]
  record("time_to_target", f"{model}, after_activation, seed 0: time to "
         f"{target:.0%} test accuracy", first["wall_time"], "s",
         f"reached at epoch {first['epoch']} of {len(rows)} (test accuracy "
         f"{first['test_accuracy']:.4f}); training wall time to the end of "
         "that epoch (metrics.jsonl: compile, evaluation, checkpoints); the "
         f"whole command {seconds:.1f} s",
         command=_cli_command(args),
         **_machine(json.loads(files["results.json"])))


def part_ioffe(record: Recorder, quick: bool, scratch: Path) -> None:
  args = ["--config=studies/ioffe2015/config.py"]
  if quick:  # one epoch of one seed: the whole pipeline, a CPU's minute
    args += ["--config.num_epochs=1", "--config.seeds=(0,)"]
  seconds, files = _run_cli(args, scratch / "workdir")
  results = json.loads(files["results.json"])
  combos = results["combos"]
  record("ioffe", "Ioffe & Szegedy figure (studies/ioffe2015/config.py): the "
         "whole CLI run", seconds, "s",
         f"{len(combos)} placements x {combos[0]['runs']} seeds x "
         f"{results['num_epochs']} epochs of 1000 steps"
         f"{' (cut from 50, one seed: --quick)' if quick else ''}, probes, "
         "report and "
         "plots; training " + " + ".join(
             f"{c['wall_time']:.1f}" for c in combos) + " s (compile "
         + " + ".join(f"{c['compile_time']:.1f}" for c in combos)
         + " s with the first epochs)", command=_cli_command(args),
         **_machine(results))


PART_FUNCTIONS = {"bn_op": part_bn_op, "epochs": part_epochs,
                  "sweep": part_sweep, "time_to_target": part_time_to_target,
                  "ioffe": part_ioffe}
# The CLI parts start the CLI in a process of its own: this one must not
# take the accelerator first.
CLI_PARTS = ("time_to_target", "ioffe")


def run_part(part: str, quick: bool, scratch: Path,
             inject_failure: str | None) -> None:
  """The child process: measures one part, writing its rows to
  `scratch`/rows.json as they come (a CLI part's workdir goes there too;
  the driver removes the directory, also after a kill)."""
  if part in CLI_PARTS:
    import jax  # pylint: disable=g-import-not-at-top
    device, version = "?", jax.__version__  # the rows take results.json's
  else:
    device, version = _device()
  record = Recorder(scratch / ROWS_FILE, device, version,
                    part_command(part, quick))
  PART_FUNCTIONS[part](record, quick, scratch)
  if inject_failure == part:  # after its rows: they must survive it
    raise RuntimeError(f"injected failure (--inject_failure {part})")


# ----------------------------------------------------------------------------
# The driver: every part in a child process, then the table.


def _pump(stream, tail: collections.deque) -> None:
  """Copies a child's output to ours, keeping its last lines."""
  for line in stream:
    sys.stderr.write(line)
    sys.stderr.flush()
    tail.append(line.rstrip("\n"))


def _reason(tail) -> str:
  """The child's error in one line: the last line of its traceback."""
  lines = [line.strip() for line in tail if line.strip()]
  for line in reversed(lines):
    if not line.startswith(("File ", "^", "~")) and ":" in line:
      return line[:300]
  return lines[-1][:300] if lines else "no output"


def run_child(part: str, args, timeout_s: float) -> list[Row]:
  """Runs one part in a child process (its own process group, so that a
  timeout stops the CLI it may have started as well); its rows, then a
  FAILED row if it did not finish."""
  with tempfile.TemporaryDirectory(prefix="accelerator_") as scratch:
    rows_file = Path(scratch) / ROWS_FILE
    argv = [sys.executable, str(Path(__file__).resolve()), "--part", part,
            "--scratch", scratch]
    if args.quick:
      argv.append("--quick")
    if args.inject_failure:
      argv += ["--inject_failure", args.inject_failure]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    tail = collections.deque(maxlen=40)
    start = time.perf_counter()
    # Its own process group (in this session: whatever ends the session
    # ends it too), so that killing the group stops what it started.
    child = subprocess.Popen(argv, cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, process_group=0)
    pump = threading.Thread(target=_pump, args=(child.stdout, tail),
                            daemon=True)
    pump.start()
    try:
      child.wait(timeout=timeout_s)
      failure = None if child.returncode == 0 else (
          f"exit status {child.returncode}: {_reason(tail)}")
    except subprocess.TimeoutExpired:
      os.killpg(child.pid, signal.SIGKILL)  # the child and the CLI it ran
      child.wait()
      last = [line for line in tail if line.strip()]
      failure = (f"stopped at its time limit, {timeout_s:.0f} s"
                 + (f"; its last output: {last[-1].strip()[:200]}"
                    if last else ""))
    except BaseException:  # this process is being stopped: the part too
      os.killpg(child.pid, signal.SIGKILL)
      raise
    pump.join(timeout=10)
    seconds = time.perf_counter() - start
    rows = ([Row(**r) for r in json.loads(rows_file.read_text())]
            if rows_file.exists() else [])
  if failure:
    rows.append(Row(part, f"{part} (did not finish)", None, "",
                    f"FAILED after {seconds:.0f} s: {failure}",
                    command=part_command(part, args.quick)))
  return rows


def format_value(value: float | None) -> str:
  """Three significant digits, or whole numbers from 100 on."""
  if value is None:
    return "FAILED"
  if abs(value) >= 100:
    return f"{value:.0f}"
  return f"{value:#.3g}".rstrip(".")


def format_row(row: Row) -> str:
  cells = (row.part, row.measurement, format_value(row.value), row.unit,
           row.detail, row.device, row.jax, f"`{row.command}`")
  return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


HEADER = ("| part | measurement | value | unit | detail | device | jax | "
          "command |\n|---|---|---:|---|---|---|---|---|")


def table(rows: list[Row], args, started: str, pending: list[str]) -> str:
  # Rows of failed parts name no device: every part ran on the same one.
  known = [r for r in rows if r.device != "?"]
  for row in rows:
    if row.device == "?" and known:
      row.device, row.jax = known[0].device, known[0].jax
  command = " ".join([WRAPPER, *map(shlex.quote, sys.argv[1:])])
  lines = [f"## Accelerator check{' (--quick: a CPU smoke run)' * args.quick}",
           "", f"`{command}`, started {started}"
           + (f"; still to run: {', '.join(pending)}" if pending else "")
           + ".", "", HEADER, *map(format_row, rows)]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a CPU smoke run: every part cut down")
  parser.add_argument("--out", default=None, help="the Markdown table "
                      "(default benchmarks/accelerator_results.md, with "
                      "--quick benchmarks/accelerator_results_quick.md)")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated, in this order: {PARTS}")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="stop the run by then (default "
                      f"{DEFAULT_BUDGET_S[0]} s, --quick "
                      f"{DEFAULT_BUDGET_S[1]} s): a part never starts with "
                      f"less than {MIN_PART_S} s left")
  parser.add_argument("--inject_failure", default=None, choices=PARTS,
                      help="make this part raise once it has recorded its "
                      "rows (tests the failure path)")
  parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
  parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.part:  # a child
    run_part(args.part, args.quick, args.scratch, args.inject_failure)
    return
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
  out = Path(args.out or BENCHMARKS / ("accelerator_results_quick.md"
                                       if args.quick else
                                       "accelerator_results.md"))
  out.parent.mkdir(parents=True, exist_ok=True)
  from bn_lab import workdir  # pylint: disable=g-import-not-at-top
  started = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  deadline = time.monotonic() + (
      DEFAULT_BUDGET_S[int(args.quick)] if args.budget_s is None
      else args.budget_s)
  # A `kill` or `timeout` of this process stops the part running as well.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  rows = []
  for i, part in enumerate(parts):
    left = deadline - time.monotonic()
    if left < MIN_PART_S:
      rows.append(Row(part, f"{part} (not run)", None, "",
                      f"FAILED: not started, {left:.0f} s of --budget_s "
                      "left", command=part_command(part, args.quick)))
    else:
      print(f"[accelerator] {part}: up to "
            f"{min(left, PART_LIMITS_S[part][int(args.quick)]):.0f} s",
            file=sys.stderr, flush=True)
      start = time.monotonic()
      rows += run_child(part, args, min(
          left, PART_LIMITS_S[part][int(args.quick)]))
      print(f"[accelerator] {part}: done in {time.monotonic() - start:.0f} s",
            file=sys.stderr, flush=True)
    workdir.write_atomic(out, table(rows, args, started, parts[i + 1:]))
  text = table(rows, args, started, [])
  workdir.write_atomic(out, text)
  print(text, flush=True)
  failed = sorted({r.part for r in rows if r.value is None})
  print(f"[accelerator] written to {out}"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        file=sys.stderr, flush=True)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
