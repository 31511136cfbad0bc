"""The CNN's training step: bn_jax's matmul convolution against flax's Conv.

    .venv/bin/python benchmarks/cnn_conv.py          # ~2.5 min
    .venv/bin/python benchmarks/cnn_conv.py --quick  # smoke

The `:cnn` variant of studies/placements/main_job.py (two 3x3 conv blocks of 32 and
64 channels with 2x2 max-pooling, Dense(128), BN after each activation;
Adam, batch 128) on real MNIST, trained by `train.train_epoch` for
`--steps` steps of one epoch, in two versions (`TrainSpec.conv`, the
config's `conv`) timed in interleaved rounds in one process:

  im2col          what the CLI runs on a CPU (config.conv="auto"): each 3x3
                  convolution as one matmul over the 9 shifted copies of its
                  padded input (`models.Conv`).
  xla             the same model with flax.linen.Conv (XLA's convolution),
                  what "auto" picks on GPU and TPU.

Both have the same parameters (names, shapes, initial values); the table
gives milliseconds per step (medians) and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from bn_lab import train  # noqa: E402

HPARAMS = {"learning_rate": 1e-3, "bn_momentum": 0.99, "bn_epsilon": 1e-3}


def epoch_fn(spec: train.TrainSpec):
  """A jitted epoch of the CNN (its convolution: `spec.conv`)."""
  def epoch(state, data):
    return train.train_epoch(state, data, spec=spec)[0]
  return jax.jit(epoch, donate_argnums=0)


class Runner:
  def __init__(self, spec, data):
    self.state = train.create_train_state(spec, 0, HPARAMS)
    self._epoch, self._data = epoch_fn(spec), data

  def __call__(self):
    self.state = self._epoch(self.state, self._data)
    return self.state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser)
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per timed call (default 20; "
                      "--quick: 4)")
  args = parser.parse_args()
  rounds = args.rounds or (1 if args.quick else 5)
  steps = args.steps or (4 if args.quick else 20)

  print(_common.header("CNN training step: matmul convolution vs flax Conv"),
        flush=True)
  data = _common.load_mnist(args.data_dir)
  spec = dataclasses.replace(
      train.TrainSpec(model="cnn", placement="after_activation",
                      widths=(128,), channels=(32, 64)),
      steps_per_epoch=steps)
  counter = _common.CompileCounter()
  runners = {
      "models.Conv (im2col matmul)": Runner(
          dataclasses.replace(spec, conv="im2col"), data),
      "flax.linen.Conv": Runner(dataclasses.replace(spec, conv="xla"), data)}
  first = {name: _common.first_call(fn, counter)
           for name, fn in runners.items()}
  for fn in runners.values():
    _common.block(fn())
  wall, cpu = _common.interleaved(runners, rounds)

  print(f"\nCNN 784 -> conv(32) -> pool -> conv(64) -> pool -> 128 -> 10, BN "
        f"after each activation, batch {spec.batch_size}; {steps} steps per "
        f"call; median of {rounds} rounds\n")
  print("| convolution | ms/step | min-max s per call | CPU s per call | "
        "vs flax.linen.Conv | first call s (compile s) |")
  print("|---|---:|---:|---:|---:|---:|")
  baseline = _common.median(wall["flax.linen.Conv"])
  for name, times in wall.items():
    seconds = _common.median(times)
    f = first[name]
    print(f"| {name} | {1e3 * seconds / steps:.1f} | {_common.spread(times)} "
          f"| {_common.median(cpu[name]):.2f} | {baseline / seconds:.2f}x | "
          f"{f['first_call_s']:.1f} ({f['compile_s']:.1f}) |", flush=True)
  if args.malloc == "both":
    _common.run_tuned_child(__file__)


if __name__ == "__main__":
  main()
