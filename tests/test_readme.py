"""The README's code and commands must stay true."""

import re
import shlex

import helpers
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import sweep
from studies import registry

README = (helpers.REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def _block(marker: str) -> str:
  """The README's one Python block that contains `marker`."""
  found = [b for b in BLOCKS if marker in b]
  assert len(found) == 1, f"{len(found)} Python blocks contain {marker!r}"
  return found[0]


def _run(block: str, **names) -> dict:
  namespace = dict(names)
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace
# Every `python -m experiments.main ...` command of the README (in a code
# block or a table's cell), its flags.
EXPERIMENT_COMMANDS = [
    shlex.split(command)
    for command in re.findall(r"-m experiments\.main ([^`|\n]*)", README)]


@pytest.mark.slow  # the example's (128, 28, 28, 64) batch: seconds on a CPU
def test_python_example_runs_and_sync_bn_matches_whole_batch():
  namespace = _run(_block("y_sync"))
  y, y_sync, x = namespace["y"], namespace["y_sync"], namespace["x"]
  # Synchronized statistics over 4 x 32 examples == statistics of all 128.
  assert jnp.allclose(y_sync.reshape(y.shape), y, atol=1e-5)
  assert namespace["dx"].shape == x.shape


def test_normalization_family_example_runs():
  """The family's example: every line runs, and what it computes is what
  the comments say (checked against NumPy formulas)."""
  namespace = _run(_block("y_ghost"))
  x = np.asarray(namespace["x"], np.float64)
  standardize = lambda v: (v - v.mean(0)) / np.sqrt(v.var(0) + 1e-5)
  # The first renorm step (count 0 < hold) is plain BN.
  np.testing.assert_allclose(namespace["y"], standardize(x), atol=1e-4)
  ghost = np.concatenate([standardize(c) for c in np.split(x, 4)])
  np.testing.assert_allclose(namespace["y_ghost"], ghost, atol=1e-4)
  ln = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True)
                                                + 1e-6)
  np.testing.assert_allclose(namespace["y_ln"], ln, atol=1e-4)
  inputs = np.asarray(namespace["batches"]).reshape(-1, 784)
  kernel = np.asarray(namespace["variables"]["params"]["hidden_0"][
      "Dense_0"]["kernel"])
  stats = namespace["stats"]["hidden_0"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], (inputs @ kernel).mean(0),
                             rtol=1e-4, atol=1e-5)


def test_the_linen_snippet_runs_as_flax_would(capsys):
  """The user's linen model with bn_jax.nn.BatchNorm gives flax's logits
  and running statistics: the same block run with flax.linen.BatchNorm."""
  block = _block("class CNN(nn.Module)")
  ours = _run(block)
  assert capsys.readouterr().out.strip() == "(8, 10) (32,)"
  flax_block = block.replace("bn_jax.nn.BatchNorm(", "nn.BatchNorm(")
  assert flax_block != block
  theirs = _run(flax_block)
  np.testing.assert_allclose(ours["logits"], theirs["logits"], rtol=1e-5,
                             atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(
        ours["variables"]["batch_stats"]["BatchNorm_0"][name],
        theirs["variables"]["batch_stats"]["BatchNorm_0"][name],
        rtol=1e-5, atol=1e-6)


def test_the_nnx_snippet_runs_as_flax_would(capsys):
  """The user's nnx model with bn_jax.nnx.BatchNorm: training and
  evaluation outputs and the updated statistics are flax.nnx's."""
  block = _block("class MLP(nnx.Module)")
  ours = _run(block)
  assert capsys.readouterr().out.strip() == "(32, 10) (64,)"
  flax_block = block.replace("bn_jax.nnx.BatchNorm(", "nnx.BatchNorm(")
  assert flax_block != block
  theirs = _run(flax_block)
  for name in ("y_train", "y_eval"):
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(ours["model"].bn.var[...],
                             theirs["model"].bn.var[...], rtol=1e-5)
  assert not np.allclose(ours["y_train"], ours["y_eval"])  # modes differ


@pytest.mark.parametrize("args", EXPERIMENT_COMMANDS,
                         ids=[" ".join(a)[:60] for a in EXPERIMENT_COMMANDS])
def test_experiment_commands_parse_and_validate(args):
  """Each command's flags, as printed, go through the entry point's parser
  and give a config that passes its study's checks."""
  config = helpers.resolved_config(args)
  config_file = next(a for a in args if a.startswith("--config="))
  registry.for_config_file(config_file.split("=", 1)[1].split(":")[0]
                           ).validate(config)


def test_readme_has_the_main_and_the_test_command():
  """The two set-up commands: the main job runs the placements study with
  no data flag (the bundled MNIST), and CI runs exactly the test command."""
  main_job, = [line for line in README.splitlines()
               if line.startswith("bash scripts/setup.sh && ")
               and "experiments.main" in line]
  args = shlex.split(main_job.split("experiments.main", 1)[1])
  assert not [a for a in args if a.startswith("--config.data_dir")]
  config = helpers.resolved_config(args)
  assert len(sweep.combinations(config)) == 4
  test_command, = [line for line in README.splitlines()
                   if line.startswith("bash scripts/setup.sh && ")
                   and "pytest" in line]
  ci = [line for line in (helpers.REPO / ".ci" / "run").read_text()
        .splitlines() if line and not line.startswith(("#", "set ", "cd "))]
  assert ci == [part.strip() for part in test_command.split("&&")]
