"""Shared by the experiment tests: tiny IDX data sets, the CLI, its config.

Imported as `helpers` (pytest puts tests/ on sys.path).
"""

import contextlib
import functools
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300


def write_idx(path: Path, array, magic: int) -> None:
  """IDX: big-endian int32 magic (2051 images, 2049 labels), the dims, then
  the uint8 values."""
  array = np.asarray(array, np.uint8)
  path.write_bytes(struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
                   + array.tobytes())


def write_tiny_idx(directory: Path, num_train: int, num_test: int) -> Path:
  """The four IDX files of a learnable task: class c brightens rows
  2c..2c+4 of 28x28 noise. Data set names without a known md5 load them."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", num_train), ("t10k", num_test)):
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, c in enumerate(labels):
      images[i, 2 * c:2 * c + 5] += 180
    write_idx(directory / f"{split}-images-idx3-ubyte", images, 2051)
    write_idx(directory / f"{split}-labels-idx1-ubyte", labels, 2049)
  return directory


def cli_env(env=None) -> dict[str, str]:
  """The environment of every command a test runs: on the CPU, with
  unoptimized XLA (compiles several times faster; one setting for all, as
  optimization levels round differently)."""
  return dict(env or os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_backend_optimization_level=0")


def run_cli(args, *, module="experiments.main", env=None, check=True,
            ) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repository root, on the CPU, with
  unoptimized XLA (compiles several times faster; every run in a test
  uses the same setting)."""
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=cli_env(env), capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
  if check:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[
        -5000:]
  return result


def run_studies(runs, timeout=900) -> list[dict]:
  """`runner.run(registry.get(study), config, workdir, command=command)` for
  each (study name, config, workdir, command) of `runs`, in order, in one
  process of its own with the commands' environment (cli_env: unoptimized
  XLA, which compiles several times faster); what each returned. For runs
  whose files the tests check against those files themselves (rows,
  results.json, reports, pages), never against numbers computed in the
  test's own process."""
  import pickle  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  env = cli_env()
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  with tempfile.TemporaryDirectory() as directory:
    given, returned = Path(directory, "runs"), Path(directory, "results")
    given.write_bytes(pickle.dumps([(study, config, str(workdir), command)
                                    for study, config, workdir, command
                                    in runs]))
    result = subprocess.run(
        [sys.executable, __file__, str(given), str(returned)], cwd=REPO,
        env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-3000:]
                                    + result.stderr[-5000:])
    return pickle.loads(returned.read_bytes())


def _run_studies_here(given: Path, returned: Path) -> None:
  """run_studies' process: the runs pickled in `given`, what they return
  pickled to `returned`."""
  import pickle  # pylint: disable=g-import-not-at-top
  from bn_lab import runner  # pylint: disable=g-import-not-at-top
  from studies import registry  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_numpy_rank_promotion", "raise")  # as conftest.py
  returned.write_bytes(pickle.dumps([
      runner.run(registry.get(study), config, workdir, command=command)
      for study, config, workdir, command in pickle.loads(
          given.read_bytes())]))


def files_written(stdout: str, workdir) -> list[str]:
  """The file names a run's closing "Wrote to WORKDIR: a, b" line lists."""
  wrote, = [line for line in stdout.splitlines()
            if line.startswith(f"Wrote to {workdir}: ")]
  return wrote.split(": ", 1)[1].split(", ")


def resolved_config(args):
  """The config experiments/main.py builds from ARGS by its own flags, from
  the repository root (config paths are relative to it)."""
  import experiments.main as main_module  # pylint: disable=g-import-not-at-top
  argv = ["experiments.main", *args]
  with flagsaver.flagsaver(), pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.chdir(REPO)
    # config_flags finds the --config.FIELD overrides in sys.argv.
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS(argv)
    return main_module._CONFIG.value  # pylint: disable=protected-access


def slow_except(cases, keep_fast, ids=None):
  """`cases` as pytest params, those for which `keep_fast(*case)` is false
  marked `slow`: `pytest -m "not slow"` keeps one representative of an
  exhaustive matrix, CI runs all of it."""
  ids = ids or ["-".join(map(str, case)) for case in cases]
  return [pytest.param(*case, id=case_id,
                       marks=() if keep_fast(*case) else pytest.mark.slow)
          for case, case_id in zip(cases, ids)]


# The flax comparisons' dtype cases (test_nn, test_nnx, test_norms): (x
# dtype, module dtype, param_dtype, tolerance on y, on gradients). y is
# bfloat16 with dtype=bfloat16, dx is bfloat16 for bfloat16 x.
FLAX_DTYPES = {
    "f32": (jnp.float32, None, jnp.float32, 2e-5, 1e-4),
    "bf16-compute": (jnp.float32, jnp.bfloat16, jnp.float32, 2e-2, 2e-2),
    "bf16-input": (jnp.bfloat16, None, jnp.float32, 2e-5, 2e-2),
    "bf16-params": (jnp.float32, None, jnp.bfloat16, 2e-5, 2e-2),
}


def random_inputs(shape, dtype=jnp.float32, seed=0):
  """x (mean 0.5, std 2, in `dtype`) and a float32 cotangent dy."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(0.5 + 2.0 * rng.standard_normal(shape), dtype)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return x, dy


def assert_close_to_flax(ours, reference, tol, grad_tol):
  """(y, y_eval, stats, grads) of a bn_jax module against flax's: the
  outputs in the same dtype and close (compared in float32), the updated
  statistics and the gradients close."""
  import chex  # pylint: disable=g-import-not-at-top
  (y, y_eval, stats, grads), (y_ref, y_eval_ref, stats_ref, grads_ref) = (
      ours, reference)
  assert y.dtype == y_ref.dtype and y_eval.dtype == y_eval_ref.dtype
  as_f32 = lambda *ys: [v.astype(jnp.float32) for v in ys]
  chex.assert_trees_all_close(as_f32(y, y_eval), as_f32(y_ref, y_eval_ref),
                              rtol=tol, atol=tol)
  chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, grads_ref, rtol=grad_tol,
                              atol=grad_tol)


def one_epoch_each(specs, data, learning_rate=0.5):
  """(state, metrics) of one jitted `train.train_epoch` from seed 0 under
  each spec: a study's measured epoch beside the plain one."""
  from bn_lab import train  # pylint: disable=g-import-not-at-top
  return [jax.jit(functools.partial(train.train_epoch, spec=spec))(
      train.create_train_state(spec, 0, {"learning_rate": learning_rate}),
      data) for spec in specs]


def require_torch() -> str:
  """$BN_JAX_TORCH_PYTHON, or a skip saying how to set it: called first by
  a test whose own work only serves the PyTorch comparison."""
  python = os.environ.get("BN_JAX_TORCH_PYTHON")
  if not python:
    pytest.skip("PyTorch reference: set BN_JAX_TORCH_PYTHON to a Python with "
                "torch (e.g. python3 -m venv build/torch-venv && "
                "build/torch-venv/bin/pip install torch numpy)")
  return python


def run_torch(code: str, arrays: dict[str, np.ndarray] | None = None
              ) -> dict[str, np.ndarray]:
  """Runs `code` under the Python that $BN_JAX_TORCH_PYTHON names (one with
  torch and numpy: PyTorch is no dependency of the project, so it runs in a
  process of its own); skips the test where the variable is unset.

  The code sees `torch`, `np`, and `inputs` (a dict of the given arrays),
  and fills the dict `outputs` with arrays, which come back.
  """
  python = require_torch()
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as directory:
    given, returned = Path(directory, "in.npz"), Path(directory, "out.npz")
    np.savez(given, **(arrays or {}))
    prologue = (
        "import numpy as np, torch, sys\n"
        "torch.manual_seed(0)\n"
        f"inputs = dict(np.load({str(given)!r}))\n"
        "outputs = {}\n")
    epilogue = (
        "\nnp.savez(" + repr(str(returned)) + ", **{k: np.asarray(v) "
        "for k, v in outputs.items()})\n")
    # A path (relative to the repository, or absolute), or a command name.
    executable = (str(REPO / python) if os.sep in python
                  else shutil.which(python) or python)
    result = subprocess.run(
        [executable, "-c", prologue + code + epilogue],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    if result.returncode:
      raise AssertionError(f"the PyTorch reference failed:\n{result.stderr}")
    return dict(np.load(returned))


if __name__ == "__main__":
  _run_studies_here(Path(sys.argv[1]), Path(sys.argv[2]))


@contextlib.contextmanager
def count_compiles():
  """Yields a list that collects the XLA compilations made inside."""
  compiles = []
  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
