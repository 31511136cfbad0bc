"""Exact BN under gradient accumulation: memory and time, against the
whole batch in one piece and against naive accumulation.

    .venv/bin/python benchmarks/accumulate.py           # ~40 s, idle
    .venv/bin/python benchmarks/accumulate.py --quick   # smoke run

The lab's MLP (784 -> 3 x Dense(256) with BN after the activation ->
Dense(10)) at a batch of 1024 and its CNN (conv 32, conv 64, Dense(128),
each with BN) at a batch of 256; one step's loss and gradient (and new
running statistics): `jax.value_and_grad` on the whole batch,
`bn_jax.accumulate.naive_value_and_grad` (micro-batch statistics, what the
frameworks do) and `bn_jax.accumulate.value_and_grad` (the whole batch's
statistics), with 4 and 16 micro-batches. Memory is XLA's analysis of the
compiled program: the total (inputs, outputs and temporary buffers,
less what outputs alias; the whole batch is an input), and the temporary
buffers alone, what the step needs beyond its inputs and outputs. (XLA:CPU's
own `peak_memory_in_bytes` leaves the temporary buffers out, so it is not
used.) Time: the median of
interleaved rounds, as a ratio to the whole batch in the same process.
"""

from __future__ import annotations

import argparse
import functools

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_jax import accumulate
from bn_lab import models

MODELS = {
    "mlp": (dict(widths=(256, 256, 256)), 1024, (784,)),
    "cnn": (dict(widths=(128,), channels=(32, 64)), 256, (28, 28, 1)),
}


def problem(name: str, batch_size: int):
  """(loss_fn, params, batch_stats, batch) of the lab's model `name`."""
  extra, _, shape = MODELS[name]
  model = models.make_model(name, placement="after_activation",
                            activation="relu", **extra)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.random((batch_size, *shape)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  variables = model.init(jax.random.key(0), batch["x"][:2], train=False)
  return (classifier_loss(model), variables["params"],
          variables["batch_stats"], batch)


def classifier_loss(model):
  """The loss_fn of `bn_jax.accumulate`: `model`'s mean cross entropy on
  a micro-batch {"x", "y"} in training mode, and its new batch_stats."""
  def loss_fn(params, batch_stats, micro):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, micro["x"],
        train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, micro["y"]).mean()
    return loss, updates["batch_stats"]
  return loss_fn


def whole_batch(loss_fn, params, batch_stats, batch):
  """The reference: `jax.value_and_grad` on the whole batch, returned as
  `bn_jax.accumulate.value_and_grad` returns."""
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, batch)
  return loss, grads, stats


def total_bytes(memory) -> int:
  """What the compiled step holds at once, at most: inputs, outputs and
  temporary buffers, less the outputs that reuse an input's buffer."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def candidates(name: str, batch_size: int, micro_batches: tuple[int, ...]):
  """{label: (a zero-argument call of the compiled step, XLA's memory
  analysis of it)}."""
  loss_fn, *arguments = problem(name, batch_size)
  steps = {"whole batch": functools.partial(whole_batch, loss_fn)}
  for k in micro_batches:
    steps[f"naive, {k} micro-batches"] = functools.partial(
        accumulate.naive_value_and_grad, loss_fn, micro_batches=k)
    steps[f"exact, {k} micro-batches"] = functools.partial(
        accumulate.value_and_grad, loss_fn, micro_batches=k)
  compiled = {}
  for label, step in steps.items():
    program = jax.jit(step).lower(*arguments).compile()
    compiled[label] = (functools.partial(program, *arguments),
                       program.memory_analysis())
  return compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small batches, 2 rounds")
  args = parser.parse_args()
  rounds = 2 if args.quick else 10
  print(_common.header("accumulate: exact BN over micro-batches"))
  print(f"\nmedian of {rounds} interleaved rounds of one step each; "
        "ratios against the whole batch.\n")
  print("| model | batch | step | total memory (MiB) | vs whole | "
        "temporary (MiB) | vs whole | ms per step | vs whole |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
  for name, (_, batch_size, _) in MODELS.items():
    if args.quick:
      batch_size //= 4
    compiled = candidates(name, batch_size, (4, 16))
    calls = {label: call for label, (call, _) in compiled.items()}
    _common.interleaved(calls, 1)  # warm up
    wall, _ = _common.interleaved(calls, rounds)
    whole_time = _common.median(wall["whole batch"])
    whole = compiled["whole batch"][1]
    for label, (_, memory) in compiled.items():
      time = _common.median(wall[label])
      print(f"| {name} | {batch_size} | {label} | "
            f"{total_bytes(memory) / 2**20:.2f} | "
            f"{total_bytes(memory) / total_bytes(whole):.2f}"
            f" | {memory.temp_size_in_bytes / 2**20:.2f} | "
            f"{memory.temp_size_in_bytes / whole.temp_size_in_bytes:.2f} | "
            f"{time * 1e3:.1f} | {time / whole_time:.2f} |", flush=True)
  passes = accumulate.passes(3)
  print(f"\nBoth models have 3 BN layers: the exact step makes "
        f"{passes['forward']} forward passes and "
        f"{passes['forward_and_backward']} forward-and-backward passes over "
        "the micro-batches, naive accumulation one forward-and-backward "
        "pass.")


if __name__ == "__main__":
  main()
