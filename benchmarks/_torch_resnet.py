"""The residual CNN's PyTorch twin: bn_lab.resnet.ResNet written with
torch.nn from He et al.'s description (basic blocks, 1x1 projection
shortcuts, global average pooling). tests/test_resnet.py runs this file's
text with bn_jax's weights copied in and checks parameter count, outputs and
gradients; benchmarks/_torch_cnn.py --model=resnet times its training step.

Imports only torch (it runs under a Python with torch and no jax). The
convolutions pad as lax's "SAME" does: the total padding split with the
smaller half first, (0, 1) for a 3x3 convolution at stride 2 on an even
size, where padding=1 would shift the windows.
"""

import torch
from torch import nn
import torch.nn.functional as F


def same_padding(size, kernel, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Conv(nn.Conv2d):
  def forward(self, x):
    k, s = self.kernel_size[0], self.stride[0]
    top, bottom = same_padding(x.shape[2], k, s)
    left, right = same_padding(x.shape[3], k, s)
    return super().forward(F.pad(x, (left, right, top, bottom)))


def conv_norm(cin, cout, kernel, stride, norm, eps, momentum):
  layers = [Conv(cin, cout, kernel, stride, bias=not norm)]
  if norm:
    layers.append(nn.BatchNorm2d(cout, eps=eps, momentum=momentum))
  return nn.Sequential(*layers)


class Block(nn.Module):
  def __init__(self, cin, cout, stride, norm, skip_init, eps, momentum):
    super().__init__()
    self.first = conv_norm(cin, cout, 3, stride, norm, eps, momentum)
    self.second = conv_norm(cout, cout, 3, 1, norm, eps, momentum)
    self.gain = nn.Parameter(torch.zeros(())) if skip_init else None
    self.shortcut = (conv_norm(cin, cout, 1, stride, norm, eps, momentum)
                     if stride != 1 or cin != cout else nn.Identity())

  def forward(self, x):
    y = self.second(F.relu(self.first(x)))
    if self.gain is not None:
      y = y * self.gain
    return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
  """BN's `momentum` in PyTorch's convention (the new batch's weight)."""

  def __init__(self, widths, blocks, norm, skip_init, eps=1e-5,
               momentum=0.1):
    super().__init__()
    self.stem = conv_norm(1, widths[0], 3, 1, norm, eps, momentum)
    stages, cin = [], widths[0]
    for stage, width in enumerate(widths):
      for block in range(blocks):
        stages.append(Block(cin, width, 2 if stage and not block else 1,
                            norm, skip_init, eps, momentum))
        cin = width
    self.blocks = nn.Sequential(*stages)
    self.readout = nn.Linear(cin, 10)

  def forward(self, x):
    x = self.blocks(F.relu(self.stem(x)))
    return self.readout(x.mean(dim=(2, 3)))
