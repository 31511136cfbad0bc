"""Sweep throughput: K runs trained together by `jax.vmap` against one by one.

    .venv/bin/python benchmarks/sweep_throughput.py          # 2-3.5 min
    .venv/bin/python benchmarks/sweep_throughput.py --quick  # smoke

The reference model (the CLI's default config: 784 -> Dense(50) -> relu ->
BN -> Dense(10), Adam 1e-3, batch 128, 468 steps per epoch) on real MNIST,
K = 1, 4, 8, 16 runs (seeds 0..K-1):

  vmapped     one epoch of K stacked runs (`train.create_sweep_states`):
              `jax.jit(train.over_runs(train.train_epoch, spec))`, what
              `train.sweep_epoch` runs without the evaluation it appends
              (a vmap over the runs; none for K=1).
  shared      the same with one data order for all runs (`data_seed`, the
              CLI's `--config.data_seed`): `train.over_runs` gathers each
              batch once for the K runs, and XLA fuses their first-layer
              matmuls into one (B, 784) @ (784, K * 50) product.
  sequential  one epoch of each of the K runs, one after another, each an
              unstacked state through `train.jit_train_epoch`. The same
              program trains a run whatever its data order, so it is the
              baseline of both.

All are timed in interleaved rounds in one process; the table shows medians
of the time for all K runs' epochs. Throughput ratio = sequential time /
vmapped time (> 1: the vmapped sweep trains more runs per second).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import train_throughput  # noqa: E402

from bn_lab import train  # noqa: E402

KS = (1, 4, 8, 16)


class Sequential:
  """K unstacked runs; calling trains each for one epoch, in turn."""

  def __init__(self, spec, hparams, k: int, data):
    self._spec, self._data = spec, data
    self.states = [train.create_train_state(spec, seed, hparams)
                   for seed in range(k)]

  def __call__(self):
    for i, state in enumerate(self.states):
      self.states[i], _ = train.jit_train_epoch(state, self._data,
                                                spec=self._spec)
    return self.states


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser)
  parser.add_argument("--ks", default=",".join(map(str, KS)))
  args = parser.parse_args()
  rounds = args.rounds or (1 if args.quick else 4)
  ks = (1, 4) if args.quick else tuple(int(k) for k in args.ks.split(","))

  print(_common.header("Sweep throughput"), flush=True)
  counter = _common.CompileCounter()
  data = _common.load_mnist(args.data_dir)
  case = train_throughput.CASES[0]
  spec, hparams = case.spec, case.hparams
  sweep = train_throughput.sweep_train_epoch(spec)
  shared_spec = dataclasses.replace(spec, data_seed=0)
  shared_sweep = train_throughput.sweep_train_epoch(shared_spec)

  runners, first = {}, {}
  for k in ks:
    stacked = train.create_sweep_states(
        spec, list(range(k)), {n: [v] * k for n, v in hparams.items()})
    runners[("vmapped", k)] = train_throughput.Runner(
        stacked, lambda s: sweep(s, data)[0])
    shared = train.create_sweep_states(
        shared_spec, list(range(k)), {n: [v] * k for n, v in hparams.items()})
    runners[("shared", k)] = train_throughput.Runner(
        shared, lambda s: shared_sweep(s, data)[0])
    runners[("sequential", k)] = Sequential(spec, hparams, k, data)
  for key, fn in runners.items():
    first[key] = _common.first_call(fn, counter)
    _common.block(fn())  # one more epoch: allocator and caches warm
  caches = {"train.jit_train_epoch": train.jit_train_epoch,
            "vmapped train_epoch": sweep, "shared-order train_epoch":
            shared_sweep}
  cache_before = {n: f._cache_size() for n, f in caches.items()}
  compiles_before = counter.count
  wall, cpu = _common.interleaved(runners, rounds)
  recompiles = counter.count - compiles_before
  cache_after = {n: f._cache_size() for n, f in caches.items()}

  steps = spec.steps_per_epoch
  print(f"\n### reference model, K runs x 1 epoch ({steps} steps of batch "
        f"{spec.batch_size}), nan_guard={spec.nan_guard}; median of {rounds} "
        "rounds\n")
  print("| K | vmapped s | min-max | CPU s | shared-order vmapped s | min-max "
        "| CPU s | sequential s | min-max | CPU s | throughput vs sequential: "
        "vmapped, shared | run-epochs/s vmapped, shared, sequential | "
        "vmapped first epoch s (compile s) |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for k in ks:
    cells, medians = [], {}
    for mode in ("vmapped", "shared", "sequential"):
      times = wall[(mode, k)]
      medians[mode] = _common.median(times)
      cells += [f"{medians[mode]:.3f}", _common.spread(times),
                f"{_common.median(cpu[(mode, k)]):.3f}"]
    seq = medians["sequential"]
    f = first[("vmapped", k)]
    print(f"| {k} | {' | '.join(cells)} | {seq / medians['vmapped']:.2f}x, "
          f"{seq / medians['shared']:.2f}x | "
          f"{k / medians['vmapped']:.2f}, {k / medians['shared']:.2f}, "
          f"{k / seq:.2f} | {f['first_call_s']:.1f} ({f['compile_s']:.1f}) |")
  print(f"\nRecompilation: {recompiles} XLA compilations during the "
        f"{rounds} timed rounds (epochs 3 and on); jit cache sizes before -> "
        "after: " + ", ".join(f"{n} {cache_before[n]} -> {cache_after[n]}"
                               for n in caches) +
        " (one entry per K for the vmapped epoch).")
  if 8 in ks:
    seq = _common.median(wall[("sequential", 8)])
    for mode, label in (("vmapped", "each run its own data order"),
                        ("shared", "one shared data order")):
      ratio = seq / _common.median(wall[(mode, 8)])
      print(f"\nTarget: K=8 vmapped >= 1.3x sequential throughput, {label}: "
            f"{ratio:.2f}x, {'met' if ratio >= 1.3 else 'NOT met'}.")
  print(f"\nPeak RSS (ru_maxrss): {_common.peak_rss_mib():.0f} MiB; "
        f"{_common.device_memory_line()}.", flush=True)
  if args.malloc == "both":
    _common.run_tuned_child(__file__)


if __name__ == "__main__":
  main()
