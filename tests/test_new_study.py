"""A new study is one folder and one registry line: a tiny study, made only
here (a copy of the studies and entry points in a temporary directory, one
folder added and one line in the copied registry), runs through the
command line and gets its section on the page, with no other file changed.
"""

import filecmp
import shutil
import subprocess
import sys
import textwrap

import helpers
import pytest

CONFIG = '''\
    r"""A tiny study: BN or not, on a tiny data set.

        python -m experiments.main --config=studies/tiny/config.py --workdir=workdirs/tiny
    """

    from bn_lab import config as base


    def get_config():
      config = base.get_config()
      config.study = "a tiny study"
      config.placements = ("none", "before_activation")
      config.widths = (8,)
      config.num_epochs = 1
      config.seeds = (0, 1)
      config.batch_size = 50
      config.progress_seconds = 0.0
      config.dataset = "tiny"
      return config
'''
PAGE = '''\
    """The tiny study's section: the final accuracies."""

    from bn_lab import page


    def section(studies, out):
      del out
      finals = page.final_rows(studies[0]["rows"])
      lines = [(p, page.percent([r["test_accuracy"] for r in finals
                                 if r["placement"] == p]))
               for p in ("none", "before_activation")]
      return ("## The tiny study\\n\\n"
              + page.table(["placement", "test accuracy"], lines))
'''
INIT = '''\
    """A tiny study, defined by a test."""

    from bn_lab import classifier
    from bn_lab import study
    from studies.tiny import page

    STUDY = classifier.study(
        "tiny", "The tiny study", section=page.section,
        commands=study.main_commands({"workdirs/tiny":
                                      "studies/tiny/config.py"}))
'''


def _copy(tmp_path):
  """The studies and entry points, copied as they are in the repository."""
  ignore = shutil.ignore_patterns("__pycache__", "*.png", "workdirs")
  for folder in ("studies", "experiments"):
    shutil.copytree(helpers.REPO / folder, tmp_path / folder, ignore=ignore)
  return tmp_path


def _add_tiny_study(root):
  folder = root / "studies" / "tiny"
  folder.mkdir()
  for name, text in (("__init__.py", INIT), ("config.py", CONFIG),
                     ("page.py", PAGE)):
    (folder / name).write_text(textwrap.dedent(text))
  registry = root / "studies" / "registry.py"
  text = registry.read_text()
  assert text.count("\n}\n") == 1  # the STUDIES dict's end
  registry.write_text(text.replace("\n}\n", '\n    "tiny": "studies.tiny",\n}\n'))


def _changed_files(a, b):
  """Files that differ or exist on one side only, recursively."""
  cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
  found = [*cmp.diff_files, *cmp.left_only, *cmp.right_only]
  for name, sub in cmp.subdirs.items():
    found += [f"{name}/{f}" for f in _changed_files(sub.left, sub.right)]
  return found


@pytest.mark.slow
def test_a_new_study_is_one_folder_and_one_registry_line(tmp_path):
  root = _copy(tmp_path / "repo")
  _add_tiny_study(root)
  assert sorted(_changed_files(helpers.REPO / "studies", root / "studies")
                ) == ["registry.py", "tiny"]
  assert _changed_files(helpers.REPO / "experiments",
                        root / "experiments") == []
  idx_dir = helpers.write_tiny_idx(tmp_path / "idx", 200, 100)
  workdir = tmp_path / "run"
  env = {"PYTHONPATH": str(root)}
  result = run(root, env, "experiments.main",
               "--config=studies/tiny/config.py", f"--workdir={workdir}",
               f"--config.data_dir={idx_dir}")
  assert "| before_activation |" in result.stdout  # the run's report
  results = (workdir / "results.json").read_text()
  assert '"study_id": "tiny"' in results
  page = tmp_path / "docs" / "studies.md"
  run(root, env, "experiments.report", f"--page={page}",
      f"--workdir={workdir}")
  text = page.read_text()
  assert "## The tiny study" in text
  assert "| before_activation |" in text.split("## The tiny study")[1]
  # Its default workdir is named to the page like every study's.
  missing = run(root, env, "experiments.report", f"--page={page}",
                check=False)
  assert "--config=studies/tiny/config.py --workdir=workdirs/tiny" in (
      missing.stderr)


def run(root, env, module, *args, check=True):
  import os  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, "-m", module, *args], cwd=root, capture_output=True,
      text=True, timeout=helpers.CLI_TIMEOUT_S,
      env={**os.environ, **env, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_backend_optimization_level=0"})
  if check:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[
        -4000:]
  return result
