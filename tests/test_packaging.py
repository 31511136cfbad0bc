"""The library installs on its own: `pip install .` builds a wheel of
bn_jax alone, whose only dependencies are jax, flax and numpy, with no data
set in it; the lab (lab/pyproject.toml) owns the rest."""

import email
import json
from pathlib import Path
import subprocess
import sys
import tomllib
import zipfile

import helpers
import pytest

# What the lab brings and a user of the layers must not get.
LAB_ONLY = ("matplotlib", "tensorboard", "tensorboardx", "ml-collections",
            "pooch", "tensorflow-datasets", "keras", "orbax-checkpoint",
            "optax", "absl-py")


def _name(requirement: str) -> str:
  """The distribution name of a requirement, normalized ("ml_collections
  >=0.1" -> "ml-collections")."""
  for stop in "<>=!~;[ ":
    requirement = requirement.split(stop)[0]
  return requirement.strip().lower().replace("_", "-")


def test_the_library_depends_on_jax_flax_numpy_only():
  project = tomllib.loads((helpers.REPO / "pyproject.toml").read_text())
  assert sorted(map(_name, project["project"]["dependencies"])) == [
      "flax", "jax", "numpy"]
  assert project["tool"]["setuptools"]["packages"] == ["bn_jax"]
  lab = tomllib.loads((helpers.REPO / "lab/pyproject.toml").read_text())
  assert "bn-jax" in map(_name, lab["project"]["dependencies"])
  assert set(LAB_ONLY) - {"keras", "optax"} <= set(
      map(_name, lab["project"]["dependencies"]))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The library's wheel, built as `pip install .` builds it (setuptools,
  from the repository root; no build isolation, so offline)."""
  out = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                  "--outdir", str(out), str(helpers.REPO)], check=True,
                 capture_output=True, text=True, timeout=300)
  wheel, = out.glob("bn_jax-*.whl")
  return wheel


@pytest.mark.slow
def test_the_wheel_is_the_library_alone(wheel):
  assert wheel.stat().st_size < 1_000_000
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = email.message_from_bytes(archive.read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))))
  packages = {n.split("/")[0] for n in names}
  assert {p for p in packages if not p.endswith(".dist-info")} == {"bn_jax"}
  assert not [n for n in names if n.endswith((".gz", ".npz", ".npy"))]
  assert any(n.endswith("licenses/LICENSE") for n in names), names
  requires = [r for r in metadata.get_all("Requires-Dist") or []
              if "extra ==" not in r]
  assert sorted(map(_name, requires)) == ["flax", "jax", "numpy"]
  assert metadata["License-Expression"] == "Apache-2.0"


@pytest.mark.parametrize("old", sorted(__import__("bn_jax").MOVED))
def test_moved_modules_are_where_bn_jax_says(old):
  """The modules that left the library resolve at the place bn_jax.MOVED
  names, and bn_jax's attribute error says where."""
  import importlib  # pylint: disable=g-import-not-at-top
  import bn_jax  # pylint: disable=g-import-not-at-top
  new = bn_jax.MOVED[old]
  assert importlib.import_module(new).__name__ == new
  with pytest.raises(AttributeError, match=f"import {new}"):
    getattr(bn_jax, old)


def test_the_library_modules_are_attributes():
  import bn_jax  # pylint: disable=g-import-not-at-top
  for name in ("core", "norms", "precise", "recurrent", "nn", "nnx"):
    assert getattr(bn_jax, name).__name__ == f"bn_jax.{name}"
  assert bn_jax.nn.BatchNorm and bn_jax.nnx.BatchNorm


@pytest.mark.slow
def test_console_scripts_run_a_study_and_its_report_outside_the_repo(
    tmp_path):
  """bn-lab and bn-lab-report (lab/pyproject.toml's scripts, installed by
  scripts/setup.sh) from a directory outside the repository: the
  --config path is read from the repository, --workdir from here."""
  scripts = Path(sys.executable).parent
  idx = helpers.write_tiny_idx(tmp_path / "idx", 200, 100)
  env = helpers.cli_env()  # on the CPU, unoptimized XLA (as every command)
  run = subprocess.run(
      [scripts / "bn-lab", "--config=studies/placements/main_job.py",
       "--workdir=work", f"--config.data_dir={idx}", "--config.dataset=tiny",
       "--config.num_epochs=1", "--config.seeds=(0,)",
       "--config.widths=(8,)", "--config.batch_size=50",
       "--config.placements=('none',)"],
      cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=helpers.CLI_TIMEOUT_S)
  assert run.returncode == 0, run.stderr[-3000:]
  assert json.loads((tmp_path / "work" / "results.json").read_text())[
      "study_id"] == "placements"
  (tmp_path / "work" / "summary.md").unlink()
  again = subprocess.run([scripts / "bn-lab-report", "--workdir=work"],
                         cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=helpers.CLI_TIMEOUT_S)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "| none |" in (tmp_path / "work" / "summary.md").read_text()
  # A config that is nowhere: one line naming it.
  missing = subprocess.run(
      [scripts / "bn-lab", "--config=studies/nowhere.py", "--workdir=w"],
      cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=helpers.CLI_TIMEOUT_S)
  assert missing.returncode != 0
  assert "--config file could not be loaded" in missing.stderr
  assert not (tmp_path / "w").exists()
