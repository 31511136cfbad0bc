"""The PyTorch side of benchmarks/cnn_step.py: the same CNN step, eager.

Runs in its own process, under a Python that has torch (PyTorch is not a
dependency of bn_jax; cnn_step.py's --torch_python names that Python), and
imports nothing from bn_jax. It reads one command per line on stdin:

    steps N   run N training steps; print {"wall": s, "cpu": s} as JSON
    quit      exit

and answers one JSON line per command, so the parent can interleave its
rounds with bn_jax's under the same machine load.

The model is bn_jax's `:cnn` (models.CNN with BN after each activation):
conv3x3(32) -> relu -> BN -> maxpool 2x2 -> conv3x3(64) -> relu -> BN ->
maxpool 2x2 -> Dense(128) -> relu -> BN -> Dense(10), or with
--model=resnet the residual CNN's twin (_torch_resnet.py, ResNet-20); Adam
1e-3, batch
128, BN epsilon 1e-3 and momentum 0.01 (PyTorch's momentum is the weight
of the new batch: bn_jax's 0.99 is PyTorch's 0.01). Each step takes the
next batch of a per-epoch random permutation of the uint8 training images
and scales it to [0, 1], as bn_jax's compiled step does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn


RESNET_WIDTHS, RESNET_BLOCKS = (16, 32, 64), 3  # ResNet-20


def make_model(model: str = "cnn") -> nn.Module:
  """The `:cnn` model, or (model="resnet") ResNet-20 (_torch_resnet.py;
  widths 16, 32, 64, BN epsilon 1e-3, PyTorch momentum 0.01)."""
  if model == "resnet":
    import _torch_resnet  # pylint: disable=g-import-not-at-top
    return _torch_resnet.ResNet(RESNET_WIDTHS, RESNET_BLOCKS, True, False,
                                eps=1e-3, momentum=0.01)
  def block(linear, features, norm):
    return [linear, nn.ReLU(), norm(features, eps=1e-3, momentum=0.01)]
  return nn.Sequential(
      *block(nn.Conv2d(1, 32, 3, padding=1), 32, nn.BatchNorm2d),
      nn.MaxPool2d(2),
      *block(nn.Conv2d(32, 64, 3, padding=1), 64, nn.BatchNorm2d),
      nn.MaxPool2d(2),
      nn.Flatten(),
      *block(nn.Linear(64 * 7 * 7, 128), 128, nn.BatchNorm1d),
      nn.Linear(128, 10))


class Trainer:
  def __init__(self, images: np.ndarray, labels: np.ndarray, batch: int,
               channels_last: bool, seed: int, model: str = "cnn"):
    torch.manual_seed(seed)
    self.format = (torch.channels_last if channels_last
                   else torch.contiguous_format)
    self.model = make_model(model).to(memory_format=self.format)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
    self.loss = nn.CrossEntropyLoss()
    self.images = torch.from_numpy(images.reshape(-1, 1, 28, 28))
    self.labels = torch.from_numpy(labels.astype(np.int64))
    self.batch, self.order, self.position = batch, None, 0

  def _next_batch(self):
    if self.order is None or self.position + self.batch > len(self.order):
      self.order, self.position = torch.randperm(len(self.images)), 0
    index = self.order[self.position:self.position + self.batch]
    self.position += self.batch
    x = self.images[index].float().div_(255.0)
    return x.contiguous(memory_format=self.format), self.labels[index]

  def step(self):
    x, y = self._next_batch()
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(self.model(x), y)
    loss.backward()
    self.optimizer.step()
    return loss.detach()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True,
                      help=".npz with uint8 `images` (N, 784) and `labels`")
  parser.add_argument("--layout", choices=("channels_last", "default"),
                      required=True)
  parser.add_argument("--threads", type=int, required=True)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  with np.load(args.data) as data:
    trainer = Trainer(data["images"], data["labels"], args.batch,
                      args.layout == "channels_last", args.seed,
                      args.model)
  trainer.step()  # allocations and the first-call work, untimed
  print(json.dumps({"torch": torch.__version__,
                    "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    command = line.split()
    if command == ["quit"]:
      return
    if len(command) != 2 or command[0] != "steps":
      print(json.dumps({"error": f"unknown command {line.strip()!r}"}),
            flush=True)
      continue
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(int(command[1])):
      loss = trainer.step()
    loss = loss.item()  # eager ops are synchronous on the CPU; for clarity
    print(json.dumps({"wall": time.perf_counter() - start,
                      "cpu": time.process_time() - start_cpu,
                      "loss": loss}), flush=True)


if __name__ == "__main__":
  main()
