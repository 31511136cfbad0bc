"""benchmarks/cnn_step.py: the CNN step against PyTorch, smoke-tested.

PyTorch is not a dependency, so the suite checks the parts that do not need
it: the one-line errors for a Python without torch, and a --quick run of
bn_jax's side with its table (rows, not numbers: timings on a shared CPU say
nothing). The PyTorch worker's model is checked against bn_jax's parameter
count where $BN_JAX_TORCH_PYTHON names a Python with torch.
"""

import os
import re
import subprocess
import sys

import jax
import pytest

import helpers

sys.path.insert(0, str(helpers.REPO / "benchmarks"))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import cnn_step  # noqa: E402  pylint: disable=g-import-not-at-top

from bn_lab import train  # noqa: E402


def test_a_python_without_torch_is_named_in_one_line():
  with pytest.raises(SystemExit, match=r"--torch_python=.*import torch` "
                     r"failed .*install torch there"):
    _common.check_torch_python(sys.executable)  # the venv has no torch
  with pytest.raises(SystemExit, match="cannot run it"):
    _common.check_torch_python("/nonexistent/python")


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path):
  with pytest.raises(RuntimeError, match="PyTorch worker .* exited"):
    cnn_step.TorchStep(sys.executable, str(tmp_path / "none.npz"),
                       "channels_last", 1, 2)


def test_the_torch_model_has_bn_jax_s_parameters():
  """Same layers, so the same number of trainable parameters (flax's
  scale/bias of BN are PyTorch's weight/bias). Runs where
  $BN_JAX_TORCH_PYTHON names a Python with torch."""
  python = os.environ.get("BN_JAX_TORCH_PYTHON")
  if not python:
    pytest.skip("set BN_JAX_TORCH_PYTHON to a Python with torch")
  result = subprocess.run(
      [str(helpers.REPO / python), "-c", "import _torch_cnn; print(sum(p.numel() for p in "
       "_torch_cnn.make_model().parameters()))"],
      cwd=helpers.REPO / "benchmarks", capture_output=True, text=True,
      timeout=300, check=True)
  state = train.create_train_state(cnn_step.SPEC, 0, cnn_step.HPARAMS)
  assert int(result.stdout) == sum(x.size for x in
                                   jax.tree.leaves(state.params))


@pytest.mark.slow
def test_quick_run_prints_the_table():
  env = dict(os.environ, JAX_PLATFORMS="cpu", BN_JAX_TORCH_PYTHON="")
  result = subprocess.run(
      [sys.executable, "benchmarks/cnn_step.py", "--quick", "--steps=2",
       "--rounds=1", "--ab", "--profile"], cwd=helpers.REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = re.findall(r"^\| (bn_jax[^|]*) \| ([0-9.]+) \|", result.stdout,
                    re.MULTILINE)
  assert [name.strip() for name, _ in rows] == [
      "bn_jax", *(f"bn_jax without: {c}" for c in cnn_step.AB_CHANGES)]
  assert all(float(ms) > 0 for _, ms in rows)
  # The 2-D patches change the layout of the matmuls, not their sums.
  assert re.search(r"^- bn_jax without: conv matmul on 2-D patches "
                   r"\(not 4-D\): 0$", result.stdout, re.MULTILINE)
  parts = dict(re.findall(r"^\| ([A-Za-z][^|]*?) \| ([0-9.]+) \| \d+% \|$",
                          result.stdout, re.MULTILINE))
  for part in ("conv weight gradients", "conv input gradients",
               "conv matmuls (forward)", "max-pool (forward)", "BN (forward)"):
    assert float(parts[part]) > 0, (part, parts)


def test_kernel_times_counts_asynchronous_dots_from_launch_to_end():
  """Hand-made profiler events (name, start_ns, duration_ns): a fusion's
  time is its events' durations; an Eigen dot's, each launch to its "end:"
  event; a fusion's own end events change nothing; containers are left
  out."""
  events = [
      ("ThunkExecutor::Execute", 0, 10_000_000),
      ("fusion.1", 0, 1_000_000), ("end: fusion.1", 5_000_000, 100),
      ("dot.2", 1_000_000, 50_000), ("end: dot.2", 4_000_000, 100),
      ("dot.2", 6_000_000, 50_000), ("end: dot.2", 8_000_000, 100),
      ("fusion.1", 7_000_000, 500_000),
  ]
  assert _common.kernel_times(events) == [
      ("dot.2", 5.0, 2), ("fusion.1", 1.5, 2)]


def test_resnet_step_matmul_flops_by_hand():
  """ResNet-20 on 28x28: the stem; per stage 3 blocks of two 3x3
  convolutions (the first of stages 2 and 3 at stride 2: 14x14, 7x7) and
  a 1x1 projection where the width changes; the readout on 64 features."""
  b = 128
  stem = b * 28 * 28 * 9 * 1 * 16
  stage0 = 6 * b * 28 * 28 * 9 * 16 * 16
  stage1 = (b * 14 * 14 * 9 * 16 * 32 + 5 * b * 14 * 14 * 9 * 32 * 32
            + b * 14 * 14 * 16 * 32)
  stage2 = (b * 7 * 7 * 9 * 32 * 64 + 5 * b * 7 * 7 * 9 * 64 * 64
            + b * 7 * 7 * 32 * 64)
  readout = b * 64 * 10
  expected = 2 * (2 * stem + 3 * (stage0 + stage1 + stage2 + readout))
  assert cnn_step.step_matmul_flops(cnn_step.SPECS["resnet"]) == expected


def test_the_torch_resnet_has_bn_jax_s_parameters():
  """The worker's ResNet-20 has the lab's parameter count. Runs where
  $BN_JAX_TORCH_PYTHON names a Python with torch."""
  helpers.require_torch()
  code = (f"sys.path.insert(0, {str(helpers.REPO / 'benchmarks')!r})\n"
          "import _torch_cnn\n"
          "outputs['count'] = np.array(sum(p.numel() for p in "
          "_torch_cnn.make_model('resnet').parameters()))")
  count = helpers.run_torch(code)["count"]
  state = train.create_train_state(cnn_step.SPECS["resnet"], 0,
                                   cnn_step.HPARAMS)
  assert int(count) == sum(x.size for x in jax.tree.leaves(state.params))


def test_step_matmul_flops_by_hand():
  """The issue's 3.2 GFLOP: conv_0 forward and weight gradient (its input
  is data), conv_1, hidden and readout forward, weight and input gradients;
  2 FLOPs per multiply-add."""
  conv_0 = 128 * 28 * 28 * (9 * 1) * 32
  conv_1 = 128 * 14 * 14 * (9 * 32) * 64
  dense = 128 * (7 * 7 * 64) * 128 + 128 * 128 * 10
  expected = 2 * (2 * conv_0 + 3 * conv_1 + 3 * dense)
  assert cnn_step.step_matmul_flops(cnn_step.SPEC) == expected
  assert round(expected / 1e9, 1) == 3.2
