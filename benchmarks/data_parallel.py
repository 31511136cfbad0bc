"""Throughput of the data-parallel training step on 1, 2, 4, 8 devices.

    .venv/bin/python benchmarks/data_parallel.py            # ~5 minutes (loaded 2-core CPU)
    .venv/bin/python benchmarks/data_parallel.py --quick    # smoke run

The reference model (MLP 784-50-10, ReLU, BN after the activation, Adam),
global batch 128 split over the devices, synchronized BN (bn_stats="sync")
unless --bn-stats=per_device. Each timed call is one epoch of `--steps`
steps: `train.train_epoch` under `jax.shard_map` over the `data` mesh, one
run vmapped, exactly as `bn_lab.parallel.sweep_epoch` trains (evaluation
left out). The data are synthetic (uniform pixels, random labels) and
replicated on every device, as in the experiments.

JAX fixes the device count at import, so every device count runs in its own
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N. The
"1, no mesh" row is the single-device code path an experiment takes with
mesh_devices=1 (`train.over_runs` of the same epoch, no shard_map), for the
overhead of the mesh itself.

On a CPU the "devices" are slices of the same cores: more of them cannot be
faster, and every step adds their collectives (psum of the BN statistics and
gradients). The table is a sanity figure for the data-parallel path, not a
measure of scaling; run it on several GPUs for that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEVICE_COUNTS = (1, 2, 4, 8)
GLOBAL_BATCH = 128


def worker(devices: int, steps: int, rounds: int, bn_stats: str) -> list:
  """Runs in a subprocess on `devices` devices (forced host devices on a
  CPU, the first `devices` accelerators otherwise); one JSON row
  per code path (the no-mesh path only for one device)."""
  import jax
  import numpy as np

  import _common
  from bn_lab import parallel
  from bn_lab import train

  assert jax.device_count() >= devices, jax.devices()
  counter = _common.CompileCounter()
  rng = np.random.default_rng(0)
  num = steps * GLOBAL_BATCH
  data = train.to_device(rng.random((num, 784), np.float32),
                         rng.integers(0, 10, num),
                         rng.random((GLOBAL_BATCH, 784), np.float32),
                         rng.integers(0, 10, GLOBAL_BATCH))
  spec = train.TrainSpec(model="mlp", placement="after_activation",
                         widths=(50,), batch_size=GLOBAL_BATCH,
                         steps_per_epoch=steps, num_epochs=1000,
                         nan_guard=False)
  hparams = {"learning_rate": [1e-3], "bn_momentum": [0.99],
             "bn_epsilon": [1e-3]}

  paths = {}
  if devices == 1:
    paths["1, no mesh"] = (jax.jit(
        train.over_runs(train.train_epoch, spec),
        donate_argnums=0), None)
  mesh = parallel.make_mesh(devices)
  parallel_spec = parallel.data_parallel_spec(spec, bn_stats)
  paths[str(devices)] = (jax.jit(parallel.shard_sweep(
      train.train_epoch, parallel_spec, mesh),
      donate_argnums=0), mesh)

  candidates, first = {}, {}
  for label, (epoch, mesh) in paths.items():
    runner = {"states": parallel.replicate(
        train.create_sweep_states(spec, [0], hparams), mesh)}
    local_data = parallel.replicate(data, mesh)

    def run(epoch=epoch, runner=runner, local_data=local_data):
      runner["states"], metrics = epoch(runner["states"], local_data)
      return metrics
    first[label] = _common.first_call(run, counter)
    candidates[label] = run
  compiles = counter.count
  times, cpu_times = _common.interleaved(candidates, rounds)
  if counter.count != compiles:
    raise RuntimeError("a timed epoch recompiled")
  rows = []
  for label, seconds in times.items():
    median = _common.median(seconds)
    rows.append({"path": label, "per_device_batch": GLOBAL_BATCH // devices,
                 "steps_per_s": steps / median,
                 "examples_per_s": steps * GLOBAL_BATCH / median,
                 "spread_s": _common.spread(seconds),
                 "cpu_s": _common.median(cpu_times[label]), **first[label]})
  return rows


def run_worker(devices: int, args) -> list:
  env = dict(os.environ)
  if args.platform == "cpu":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  else:  # real accelerators: the mesh takes the first `devices` of them
    env["JAX_PLATFORMS"] = args.platform
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [repo] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run(
      [sys.executable, __file__, "--worker", str(devices),
       f"--steps={args.steps}", f"--rounds={args.rounds}",
       f"--bn-stats={args.bn_stats}"],
      env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{devices}-device worker failed:\n{result.stderr}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list) -> str:
  base = next(r for r in rows if r["path"] == "1")["steps_per_s"]
  lines = ["| devices | examples / device | steps/s | examples/s | "
           "vs 1 device | epoch min-max (s) | CPU s / epoch | "
           "first call (s) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['path']} | {r['per_device_batch']} | {r['steps_per_s']:.0f} | "
        f"{r['examples_per_s']:.0f} | {r['steps_per_s'] / base:.2f}x | "
        f"{r['spread_s']} | {r['cpu_s']:.2f} | {r['first_call_s']:.1f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer steps and rounds (smoke run)")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per timed epoch (default 200, quick 20)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed epochs per device count, median reported "
                      "(default 5, quick 2)")
  parser.add_argument("--bn-stats", default="sync",
                      choices=("sync", "per_device"))
  parser.add_argument("--devices", default=",".join(map(str, DEVICE_COUNTS)),
                      help="comma-separated device counts")
  parser.add_argument("--platform", default="cpu",
                      help="cpu (forced host devices, the default) or a real "
                      "accelerator platform, e.g. cuda or tpu: then the "
                      "device counts must not exceed the devices present")
  parser.add_argument("--worker", type=int, default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.steps = args.steps or (20 if args.quick else 200)
  args.rounds = args.rounds or (2 if args.quick else 5)
  if args.worker is not None:
    print(json.dumps(worker(args.worker, args.steps, args.rounds,
                            args.bn_stats)))
    return
  counts = [int(n) for n in args.devices.split(",")]
  if 1 not in counts:
    counts.insert(0, 1)  # the baseline of the ratios
  # The children get their own device counts; this process needs only one.
  import _common
  header = _common.header(
      "Data-parallel train step (forced host devices)"
      if args.platform == "cpu" else f"Data-parallel train step ({args.platform})")
  rows = []
  for devices in counts:
    rows += run_worker(devices, args)
    print(f"  {devices} device(s) done", file=sys.stderr, flush=True)
  print(header)
  print(f"\nMLP 784-50-10 (BN after ReLU), Adam, global batch "
        f"{GLOBAL_BATCH}, bn_stats={args.bn_stats}; one epoch of "
        f"{args.steps} steps per timed call, median of {args.rounds} "
        "rounds; each device count in its own process.\n")
  print(table(rows))


if __name__ == "__main__":
  main()
