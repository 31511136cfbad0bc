"""What BN costs: one training step with and without BN, time and memory.

    .venv/bin/python benchmarks/bn_cost.py            # ~1 minute
    .venv/bin/python benchmarks/bn_cost.py --quick    # smoke run

The source article says BN costs computation and memory. For the article's
MLP (784 -> Dense(50, relu) -> [BN] -> Dense(10)) and the small CNN (conv
32 -> relu -> [BN] -> pool, conv 64 -> relu -> [BN] -> pool, Dense(128) ->
relu -> [BN], Dense(10)), both Adam, batch 128: the jitted training step
(`bn_lab.train.train_step`, forward, backward and update) with placement
"none" and "after_activation", timed in interleaved rounds in one process,
and the compiled program's memory from XLA's memory analysis (temporary
buffers: what the step needs beyond its inputs and outputs).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import numpy as np

from bn_lab import runner
from bn_lab import train
from bn_lab import workdir


def step_and_memory(spec: train.TrainSpec):
  """(a zero-argument call of one jitted step, its temporary bytes)."""
  state = train.create_train_state(spec, 0, {"learning_rate": 1e-3})
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (spec.batch_size, 784)),
                       jnp.uint8)
  labels = jnp.asarray(rng.integers(0, 10, spec.batch_size), jnp.int32)
  step = jax.jit(functools.partial(train.train_step, spec=spec))
  compiled = step.lower(state, images, labels).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return functools.partial(compiled, state, images, labels), temp


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="5 rounds")
  parser.add_argument("--json", default=None, help="also write the rows, "
                      "the command and the machine to this JSON file (the "
                      "studies page reads it: experiments.report --page)")
  args = parser.parse_args()
  rounds = 5 if args.quick else 100
  print(_common.header("bn_cost: a training step with and without BN"))
  print(f"\nmedian of {rounds} interleaved rounds of one step each.\n")
  print("| model | placement | ms per step | vs none | temporary memory "
        "(KiB) | vs none |")
  print("|---|---|---:|---:|---:|---:|")
  rows = []
  for model, extra in (("mlp", dict(widths=(50,))),
                       ("cnn", dict(widths=(128,), channels=(32, 64)))):
    candidates, memory = {}, {}
    for placement in ("none", "after_activation"):
      spec = train.TrainSpec(model=model, placement=placement, batch_size=128,
                             nan_guard=False, **extra)
      candidates[placement], memory[placement] = step_and_memory(spec)
    _common.interleaved(candidates, 2)  # warm up
    wall, _ = _common.interleaved(candidates, rounds)
    median = {k: _common.median(v) for k, v in wall.items()}
    for placement in candidates:
      rows.append({"model": model, "placement": placement,
                   "ms_per_step": median[placement] * 1e3,
                   "time_ratio": median[placement] / median["none"],
                   "temp_bytes": memory[placement],
                   "memory_ratio": memory[placement] / max(memory["none"], 1)})
      print(f"| {model} | {placement} | {rows[-1]['ms_per_step']:.2f} | "
            f"{rows[-1]['time_ratio']:.2f} | {memory[placement] / 1024:.0f} "
            f"| {rows[-1]['memory_ratio']:.2f} |", flush=True)
  if args.json:
    command = " ".join(["python", "benchmarks/bn_cost.py",
                        *map(shlex.quote, sys.argv[1:])])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    workdir.write_atomic(Path(args.json), json.dumps(
        {"benchmark": "bn_cost", "rounds": rounds, "rows": rows,
         **runner.provenance(command)}, indent=2) + "\n")


if __name__ == "__main__":
  main()
