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
# Every `python -m experiments.main ...` command of the README (in a code
# block or a table's cell), its flags.
EXPERIMENT_COMMANDS = [
    shlex.split(command)
    for command in re.findall(r"-m experiments\.main ([^`|\n]*)", README)]


@pytest.mark.slow  # the example's (128, 28, 28, 64) batch: seconds on a CPU
def test_python_example_runs_and_sync_bn_matches_whole_batch():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert blocks, "README lost its Python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  y, y_sync, x = namespace["y"], namespace["y_sync"], namespace["x"]
  # Synchronized statistics over 4 x 32 examples == statistics of all 128.
  assert jnp.allclose(y_sync.reshape(y.shape), y, atol=1e-5)
  assert namespace["dx"].shape == x.shape


def test_normalization_family_example_runs():
  """The family's example: every line runs, and what it computes is what
  the comments say (checked against NumPy formulas)."""
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  namespace = {}
  exec(compile(blocks[1], "README.md", "exec"), namespace)  # pylint: disable=exec-used
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
