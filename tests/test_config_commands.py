"""Every config's docstring gives its full run and a short run, and every
short run works exactly as written.

A config file (lab/bn_lab/config.py, and every module of a study's folder
that defines get_config) documents its runs in its docstring as indented
command lines, `.venv/bin/python -m experiments.main --config=...
--workdir=workdirs/<name>`. A short run is a paragraph that starts with
"Short run" and ends with ":", the time it took ("about N s on 2 CPU
cores, measured YYYY-MM-DD"), then its indented command line(s): several
lines are a chain, run in order (domain_shift's needs a placement study).

The `slow` tests run each short run from the repository root as a user
would, with the interpreter running the tests for `.venv/bin/python` and
only the workdirs (--workdir, --config.*workdir) moved under a temporary
folder; unoptimized XLA (helpers.run_cli).
"""

import ast
from pathlib import Path
import re
import shlex

import helpers
import pytest

from studies import registry

PREFIX = [".venv/bin/python", "-m", "experiments.main"]
# A paragraph that starts with "Short run" and ends with ":", a blank line,
# then the indented command lines.
SHORT_RUN = re.compile(
    r"^(Short run\b(?:.+\n)*?.*:)\n\n((?:    \S.*(?:\n|$))+)", re.MULTILINE)
MEASURED = re.compile(r"\(about \d+ s on 2 CPU cores, measured "
                      r"\d{4}-\d{2}-\d{2}[;)]")
# The files a run writes: its results and its report (classifier studies:
# summary.md; the others: report.md).
REPORTS = ("summary.md", "report.md")
DATA_FLAGS = ("--config.dataset=", "--config.data_dir=",
              "--config.data_source=")


def config_files() -> list[str]:
  """The base config and every config file of a registered study (a
  module of its folder that defines get_config), from the repository
  root."""
  found = ["lab/bn_lab/config.py"]
  for name in registry.STUDIES:
    for path in sorted(registry.folder(name).glob("*.py")):
      if "def get_config(" in path.read_text():
        found.append(str(path.relative_to(helpers.REPO)))
  return found


def docstring(path: str) -> str:
  return ast.get_docstring(ast.parse((helpers.REPO / path).read_text()),
                           clean=True)


def short_runs(path: str) -> list[tuple[str, list[list[str]]]]:
  """[(heading, [argv of each command line])] of the docstring's short
  runs."""
  return [(heading, [shlex.split(line) for line in block.splitlines()])
          for heading, block in SHORT_RUN.findall(docstring(path))]


def full_runs(path: str) -> list[list[str]]:
  """argv of every other indented experiments.main command line."""
  doc = SHORT_RUN.sub("", docstring(path))
  return [shlex.split(line) for line in re.findall(
      r"^    (\S*python -m experiments\.main .*)$", doc, re.MULTILINE)]


def flag(argv: list[str], name: str) -> list[str]:
  return [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]


# Short runs that a study's own test already trains in full, with more
# checks than here: the command itself (read from the docstring), or a
# config its test proves equal to the command's (`resolved_config`). Run
# again here they would cost CI a second training and show nothing new;
# the command's flags are still parsed by the cheap test below.
# "path#index" -> (test file, the test that trains it, the test that reads
# the documented command).
TRAINED_BY_STUDY_TESTS = {
    "studies/real_shift/config.py#0": (
        "studies/real_shift/test_real_shift.py", "test_short_run_end_to_end",
        "test_documented_short_command_is_short_config"),
    "studies/mode_collapse/config.py#0": (
        "studies/mode_collapse/test_mode_collapse.py",
        "test_short_study_end_to_end", "test_short_study_end_to_end"),
}

CONFIGS = config_files()
SHORT_RUNS = [pytest.param(path, commands, id=f"{path}#{i}")
              for path in CONFIGS
              for i, (_, commands) in enumerate(short_runs(path))]
TRAINED_HERE = [p for p in SHORT_RUNS
                if p.id not in TRAINED_BY_STUDY_TESTS]


@pytest.mark.parametrize("path", CONFIGS)
def test_docstring_gives_full_and_short_commands(path):
  """Full and short runs use the README's interpreter prefix; each config
  string of a full run has a short run (`X:short` counts for `X`), which
  trains on the bundled MNIST in a workdir of its own."""
  doc = docstring(path)
  assert not re.search(r"(?<![\w/.])python -m", doc), (
      f"{path}: a command says `python -m`; write `.venv/bin/python -m`, "
      "as the README does")
  full, shorts = full_runs(path), short_runs(path)
  assert full, f"{path}: no full command"
  assert shorts, (f"{path}: no short run (a paragraph 'Short run (about N "
                  "s on 2 CPU cores, measured ...):', then its commands)")
  full_workdirs = {w for argv in full for w in flag(argv, "workdir")}
  for argv in full:
    assert argv[:3] == PREFIX, argv
    workdir, = flag(argv, "workdir")
    assert workdir.startswith("workdirs/"), argv
  short_configs = set()
  for heading, commands in shorts:
    assert MEASURED.search(" ".join(heading.split())), (
        f"{path}: {heading!r} does not say 'about N s on 2 CPU cores, "
        "measured YYYY-MM-DD'")
    # The last command runs this config file.
    assert flag(commands[-1], "config")[0].split(":")[0] == path
    for argv in commands:
      assert argv[:3] == PREFIX, argv
      config, = flag(argv, "config")
      short_configs.add(config.removesuffix(":short"))
      workdir, = flag(argv, "workdir")
      assert workdir.startswith("workdirs/") and workdir.endswith(
          "_short"), f"{path}: {workdir}: name it workdirs/<name>_short"
      assert workdir not in full_workdirs, (
          f"{path}: the short run writes to the full run's {workdir}")
      assert not [a for a in argv if a.startswith(DATA_FLAGS)], (
          f"{path}: a short run trains on the bundled MNIST: {argv}")
  missing = {flag(argv, "config")[0] for argv in full} - short_configs
  assert not missing, f"{path}: no short run of {sorted(missing)}"


def test_short_runs_write_to_workdirs_of_their_own():
  """Across configs too (a chain's first command runs another study): no
  short run writes to a full run's workdir, and two short commands share
  one only when they are the same command (a rerun resumes it)."""
  full = {w for path in CONFIGS for argv in full_runs(path)
          for w in flag(argv, "workdir")}
  short = {}
  for path in CONFIGS:
    for _, commands in short_runs(path):
      for argv in commands:
        workdir, = flag(argv, "workdir")
        assert short.setdefault(workdir, argv) == argv, (
            f"two short commands write to {workdir}: {short[workdir]}, "
            f"{argv}")
  assert short and not set(short) & full, set(short) & full


def test_study_readmes_give_the_same_short_runs():
  """A study's README repeats its configs' short runs, word for word."""
  for name in registry.STUDIES:
    folder = registry.folder(name)
    documented = {
        line.strip() for path in CONFIGS if path.startswith(f"studies/{name}/")
        for _, block in SHORT_RUN.findall(docstring(path))
        for line in block.splitlines()}
    readme = (folder / "README.md").read_text()
    listed = {line.strip() for line in readme.splitlines()
              if "experiments.main" in line and "_short" in line}
    assert listed == documented, name


@pytest.mark.parametrize("path, commands", SHORT_RUNS)
def test_short_run_commands_parse_and_validate(path, commands):
  """Cheap: each command's flags exist and give a config its study
  accepts (the run test below trains)."""
  del path
  for argv in commands:
    config = helpers.resolved_config(argv[3:])
    config_file = flag(argv, "config")[0].split(":")[0]
    registry.for_config_file(config_file).validate(config)


# Short commands already run in this session: {redirected argv: stdout}.
# A chain's first command may be another config's short run, run once.
_RAN = {}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  return tmp_path_factory.mktemp("workdirs")


def _redirect(argv, root):
  """argv with every workdir-valued flag's value moved under `root`."""
  out = []
  for a in argv:
    name, _, value = a.partition("=")
    if name.startswith("--") and name.endswith("workdir"):
      a = f"{name}={root / value}"
    out.append(a)
  return out


def test_short_runs_trained_elsewhere_are_trained_there():
  """Each short run skipped below names study tests that exist: one reads
  the documented command (by its workdir) and one trains it: runs that
  command, or `short_config()` where the reader proves them equal."""
  runs = {p.id: p.values[1] for p in SHORT_RUNS}
  for run_id, (test_file, trains, reads) in TRAINED_BY_STUDY_TESTS.items():
    (command,) = runs[run_id]
    workdir, = flag(command, "workdir")
    tree = ast.parse((helpers.REPO / test_file).read_text())
    tests = {f.name: ast.unparse(f) for f in tree.body
             if isinstance(f, ast.FunctionDef)}
    assert workdir in tests[reads], (test_file, reads, workdir)
    if trains == reads:
      assert "run_cli(" in tests[trains], (test_file, trains)
    else:
      assert "short_config()" in tests[trains], (test_file, trains)
      assert "short_config()" in tests[reads] and "resolved_config" in (
          tests[reads]), (test_file, reads)


@pytest.mark.slow
@pytest.mark.parametrize("path, commands", TRAINED_HERE)
def test_short_run_runs_as_written(path, commands, workdirs):
  """Each command, in order, exits 0 and names the files it wrote in its
  workdir: results.json and the study's report among them. A command
  another short run has already run in this session is not run again."""
  del path
  for argv in commands:
    assert argv[:3] == PREFIX
    args = _redirect(argv[3:], workdirs)
    if tuple(args) not in _RAN:
      _RAN[tuple(args)] = helpers.run_cli(args).stdout
    stdout = _RAN[tuple(args)]
    workdir, = flag(args, "workdir")
    written = helpers.files_written(stdout, workdir)
    assert "results.json" in written, written
    assert [r for r in REPORTS if r in written], written
    for name in written:
      assert (Path(workdir) / name).is_file(), name
