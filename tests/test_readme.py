"""The README's code and commands must stay true."""

import re
import shlex
from pathlib import Path

import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs_and_sync_bn_matches_whole_batch():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert blocks, "README lost its Python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  y, y_sync, x = namespace["y"], namespace["y_sync"], namespace["x"]
  # Synchronized statistics over 4 x 32 examples == statistics of all 128.
  assert jnp.allclose(y_sync.reshape(y.shape), y, atol=1e-5)
  assert namespace["dx"].shape == x.shape


def test_commands_name_files_that_exist():
  commands = re.findall(
      r"^(?:bash scripts/setup.sh && |XLA_FLAGS=\S+ )?(\.venv/bin/python -m .*)$",
      README, re.M)
  assert len(commands) >= 5
  for command in commands:
    for arg in shlex.split(command):
      if arg.startswith("--config="):
        path = arg.split("=", 1)[1].split(":")[0]
        assert (ROOT / path).is_file(), f"README names missing {path}"


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "bash scripts/setup.sh" in ci
  assert ".venv/bin/python -m pytest -q" in README
  assert ".venv/bin/python -m pytest -q" in ci


def test_config_fields_named_in_readme_exist():
  from bn_jax import experiment
  config = experiment.default_config()
  fields = set(re.findall(r"--config\.([a-z_.]+)=", README))
  assert {"data_dir", "mesh_devices", "bn.momentum"} <= fields
  for field in fields:
    node = config
    for part in field.split("."):
      assert part in node, f"README names --config.{field}, not in the config"
      node = node[part]
