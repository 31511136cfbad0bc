"""The CNN's training step: bn_jax against PyTorch eager, back to back.

    .venv/bin/python benchmarks/cnn_step.py --torch_python=build/torch-venv/bin/python
    .venv/bin/python benchmarks/cnn_step.py --quick     # smoke run (no PyTorch needed)
    .venv/bin/python benchmarks/cnn_step.py --ab --profile  # + the A/B, where the time goes
    .venv/bin/python benchmarks/cnn_step.py --model=resnet --torch_python=...  # ResNet-20

The `:cnn` model of studies/placements/main_job.py (conv3x3(32) -> relu -> BN ->
maxpool 2x2 -> conv3x3(64) -> relu -> BN -> maxpool 2x2 -> Dense(128) ->
relu -> BN -> Dense(10); Adam 1e-3, batch 128, real MNIST), or with
--model=resnet the lab's residual CNN as ResNet-20 (bn_lab.resnet, widths
16, 32, 64, BN after every convolution; its PyTorch twin is
benchmarks/_torch_resnet.py), one training step of each implementation:

  bn_jax          `train.train_epoch` of `--steps` steps, jitted, as the
                  CLI trains (config.conv="auto" is models.Conv on a CPU).
  bn_jax, before  `--ab`: the same with one change of the step undone
                  (`AB_CHANGES`), compiled in this process: the same-process
                  A/B that kept the change.
  PyTorch         the same model in eager mode (benchmarks/_torch_cnn.py),
                  channels_last and the default layout, `--threads` threads
                  (default: this machine's CPU count), each in its own
                  process under `--torch_python` (a Python that has torch:
                  PyTorch is not a bn_jax dependency; benchmarks/README.md
                  says how to make one).

Every candidate runs `--steps` steps per call, in interleaved rounds, so that
the load of a shared machine hits all of them alike; the table gives the
median ms per step and each one's ratio to bn_jax (PyTorch channels_last /
bn_jax is the figure the speed-up is judged by).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from unittest import mock

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _worker  # noqa: E402

from bn_lab import data as data_lib  # noqa: E402
from bn_lab import models  # noqa: E402
from bn_lab import train  # noqa: E402

HPARAMS = {"learning_rate": 1e-3, "bn_momentum": 0.99, "bn_epsilon": 1e-3}
SPEC = train.TrainSpec(model="cnn", placement="after_activation",
                       widths=(128,), channels=(32, 64))
# --model: the CNN above, or ResNet-20 (bn_lab.resnet: widths 16, 32, 64, 3
# blocks per stage, BN after every convolution).
SPECS = {"cnn": SPEC,
         "resnet": train.TrainSpec(model="resnet",
                                   placement="before_activation", widths=(),
                                   channels=(16, 32, 64), blocks_per_stage=3)}
TORCH_WORKER = Path(__file__).resolve().parent / "_torch_cnn.py"


def _flax_max_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


# Each change to the step, as the patch that undoes it: `--ab` times the
# step with and without it in this process.
AB_CHANGES = {
    "conv matmul on 2-D patches (not 4-D)":
        lambda: mock.patch.object(models, "patches_matmul",
                                  lambda patches, kernel: patches @ kernel),
    "2x2 max-pool as reshape + max (not flax.linen.max_pool)":
        lambda: mock.patch.object(models, "max_pool_2x2", _flax_max_pool),
}


class JaxStep:
  """`steps` jitted training steps of bn_jax's CNN per call, compiled under
  `patch` (a context manager; the model is traced on the first call)."""

  def __init__(self, data, steps: int, patch=contextlib.nullcontext,
               spec=SPEC):
    spec = dataclasses.replace(spec, steps_per_epoch=steps)
    self.state = train.create_train_state(spec, 0, HPARAMS)
    self._data = data
    self._epoch = jax.jit(
        lambda state, data: train.train_epoch(state, data, spec=spec)[0],
        donate_argnums=0)
    with patch():
      _common.block(self())

  def compiled_text(self) -> str:
    """The optimized HLO of the compiled epoch (kernel names, metadata)."""
    return self._epoch.lower(self.state, self._data).compile().as_text()

  def __call__(self):
    self.state = self._epoch(self.state, self._data)
    return self.state


class TorchStep(_worker.JsonLineWorker):
  """A PyTorch worker process (benchmarks/_torch_cnn.py); each call runs
  `steps` steps there and returns once they are done."""

  def __init__(self, python: str, data_file: str, layout: str, threads: int,
               steps: int, model: str = "cnn"):
    self.steps = steps
    super().__init__([python, str(TORCH_WORKER), f"--data={data_file}",
                      f"--layout={layout}", f"--threads={threads}",
                      f"--model={model}"])

  def __call__(self):
    return self.ask(f"steps {self.steps}")


def max_param_difference(a: JaxStep, b: JaxStep) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)))


# Where the time of a step goes: each XLA kernel's category from the op
# that the compiled program's metadata names (op_name) and its output shape.
# "backward" is the transpose of the forward pass (JAX's reverse mode).
_LAYER = re.compile(r"(conv_\d+|hidden_\d+|readout)/")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = \w+\[([\d,]*)\]"
                          r".*?op_name=\"([^\"]*)\"")


def kernel_category(op_name: str, shape: tuple[int, ...],
                    kernel_sizes: set[int]) -> str:
  """The part of the step an XLA kernel belongs to (`op_name`: its HLO
  metadata; `shape`: its output's; `kernel_sizes`: the conv kernels' sizes,
  which only their gradients match)."""
  if "jvp(CNN)" not in op_name:
    return "data, loss, Adam and the rest"
  direction = "backward" if "transpose(jvp(CNN))" in op_name else "forward"
  layer = _LAYER.search(op_name)
  if layer is None:  # between the blocks: the pooling (and free reshapes)
    return f"max-pool ({direction})"
  layer = layer.group(1)
  if "BatchNorm" in op_name:
    return f"BN ({direction})"
  if "relu" in op_name:
    return f"relu ({direction})"
  if layer.startswith("conv") and direction == "backward" and (
      math.prod(shape) in kernel_sizes):  # the weight gradient's matmul
    return "conv weight gradients"
  if layer.startswith("conv") and "dot_general" in op_name:
    return ("conv matmuls (forward)" if direction == "forward"
            else "conv input gradients")
  if layer.startswith("conv"):
    return f"im2col copies ({direction})"
  return f"dense layers ({direction})"


def profile_by_category(step: JaxStep, steps: int) -> dict[str, float]:
  """ms per step of each `kernel_category`, from one profiled call."""
  hlo = step.compiled_text()
  kernel_sizes = {math.prod(k.shape) for k in jax.tree.leaves(
      step.state.params) if k.ndim == 4}
  categories = {}
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, dims, op_name = match.groups()
      shape = tuple(int(d) for d in dims.split(",") if d)
      categories[name] = kernel_category(op_name, shape, kernel_sizes)
  totals = collections.Counter()
  for name, ms, _ in _common.kernel_profile(step, top=None):
    totals[categories.get(name, "data, loss, Adam and the rest")] += (
        ms / steps)
  return dict(totals.most_common())


def matmul_floor_ms(rounds: int, spec: train.TrainSpec = SPEC) -> float:
  """ms for `step_matmul_flops` at the median rate of a large matmul here."""
  matmul, flops = _common.matmul_candidate()
  wall, _ = _common.interleaved({"matmul": matmul}, rounds)
  return 1e3 * step_matmul_flops(spec) * _common.median(wall["matmul"]) / flops


def _conv_layers(spec: train.TrainSpec) -> list[tuple[int, int, int, int]]:
  """(output side, kernel size, in, out) of each convolution, in order."""
  if spec.model == "cnn":
    sides = [28 // 2**i for i in range(len(spec.channels))]
    ins = (1, *spec.channels[:-1])
    return [(s, 3, i, o) for s, i, o in zip(sides, ins, spec.channels)]
  side, width = 28, spec.channels[0]
  layers = [(side, 3, 1, width)]  # the stem
  for stage, features in enumerate(spec.channels):
    for block in range(spec.blocks_per_stage):
      if stage and not block:
        side = -(-side // 2)
      layers += [(side, 3, width, features), (side, 3, features, features)]
      if width != features or (stage and not block):
        layers.append((side, 1, width, features))  # the projection
      width = features
  return layers


def step_matmul_flops(spec: train.TrainSpec) -> float:
  """FLOPs of the matmuls of one training step (2 m n k each): every conv
  (SAME padding) and Dense layer forward, its weight gradient and its input
  gradient (none for the first layer, whose input is data). The CNN's
  Dense layers read the pooled 7x7 maps; the ResNet's readout the
  globally pooled last stage."""
  layers = [spec.batch_size * side * side * k * k * cin * cout
            for side, k, cin, cout in _conv_layers(spec)]
  if spec.model == "cnn":
    side = 28 // 2**len(spec.channels)
    width = spec.channels[-1] * side * side
    dense = (*spec.widths, 10)
  else:
    width, dense = spec.channels[-1], (10,)
  for features in dense:
    layers.append(spec.batch_size * width * features)
    width = features
  return sum(2 * multiply_adds * (2 if i == 0 else 3)
             for i, multiply_adds in enumerate(layers))


def write_training_data(dataset, directory: str) -> str:
  path = os.path.join(directory, "mnist_train.npz")
  np.savez(path, images=data_lib.flatten_pixels(dataset.train_images),
           labels=dataset.train_labels)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser)
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per timed call (default 20; "
                      "--quick: 4)")
  _common.add_torch_python_flag(parser)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="PyTorch's intra-op threads (default: the CPU "
                      "count, which XLA:CPU also uses)")
  parser.add_argument("--ab", action="store_true",
                      help="also time bn_jax with each change in AB_CHANGES "
                      "undone")
  parser.add_argument("--profile", action="store_true",
                      help="print where bn_jax's step goes, by part")
  parser.add_argument("--model", choices=tuple(SPECS), default="cnn",
                      help="the CNN (default) or ResNet-20 (bn_lab.resnet)")
  args = parser.parse_args()
  if args.model != "cnn" and (args.ab or args.profile):
    raise SystemExit(f"--model={args.model}: --ab and --profile are the "
                     "CNN's (its changes and kernel names); leave them out.")
  spec = SPECS[args.model]
  rounds = args.rounds or (2 if args.quick else 7)
  steps = args.steps or (4 if args.quick else 20)
  torch_version = (_common.check_torch_python(args.torch_python)
                   if args.torch_python else None)

  print(_common.header(f"{args.model.upper()} training step: bn_jax vs "
                       "PyTorch eager"), flush=True)
  dataset = data_lib.load_dataset("mnist", data_dir=args.data_dir or None)
  data = train.to_device(
      data_lib.flatten_pixels(dataset.train_images), dataset.train_labels,
      data_lib.flatten_pixels(dataset.test_images), dataset.test_labels)
  candidates = {"bn_jax": JaxStep(data, steps, spec=spec)}
  if args.ab:
    for change, undo in AB_CHANGES.items():
      candidates[f"bn_jax without: {change}"] = JaxStep(data, steps, undo)
  workers = []
  with tempfile.TemporaryDirectory() as directory:
    if torch_version:
      data_file = write_training_data(dataset, directory)
      for layout in ("channels_last", "default"):
        worker = TorchStep(args.torch_python, data_file, layout,
                           args.threads, steps, args.model)
        workers.append(worker)
        candidates[f"PyTorch {torch_version} eager, {layout}, "
                   f"{worker.info['threads']} threads"] = worker
    try:
      for fn in candidates.values():  # one untimed round of warm-up
        _common.block(fn())
      wall, cpu = _common.interleaved(candidates, rounds)
    finally:
      for worker in workers:
        worker.close()

  floor_ms = matmul_floor_ms(rounds, spec)
  print(f"\n{steps} steps per call, median of {rounds} interleaved rounds; "
        "ratio = the row's ms per step / bn_jax's\n")
  print("| implementation | ms/step | min-max s per call | ratio to bn_jax |")
  print("|---|---:|---:|---:|")
  jax_ms = 1e3 * _common.median(wall["bn_jax"]) / steps
  for name, times in wall.items():
    ms = 1e3 * _common.median(times) / steps
    print(f"| {name} | {ms:.1f} | {_common.spread(times)} | "
          f"{ms / jax_ms:.2f} |", flush=True)
  if args.ab:
    print("\nParameters after the same calls, max |difference| from "
          "bn_jax's (0: the change leaves training bit for bit the same):")
    for name, step in candidates.items():
      if name != "bn_jax" and isinstance(step, JaxStep):
        difference = max_param_difference(step, candidates["bn_jax"])
        print(f"- {name}: {difference:.3g}")
  print(f"\nThe floor: the step's matmuls ({step_matmul_flops(spec) / 1e9:.2f}"
        f" GFLOP) at this run's rate of a {_common.MATMUL_N}^3 float32 "
        f"matmul take {floor_ms:.1f} ms.")
  if args.profile:
    parts = profile_by_category(candidates["bn_jax"], steps)
    total = sum(parts.values())
    print(f"\nWhere bn_jax's step goes: its XLA kernels (jax.profiler, one "
          f"call of {steps} steps, summed over threads; Eigen's "
          "asynchronous matmuls from launch to end, while other kernels "
          "run) by the op each computes\n")
    print("| part of the step | ms/step | share |")
    print("|---|---:|---:|")
    for part, ms in parts.items():
      print(f"| {part} | {ms:.2f} | {ms / total:.0%} |")


if __name__ == "__main__":
  main()
