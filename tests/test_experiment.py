"""The trainer end to end: a two-axis study, its files, its report, the CLI.

One study (placements x batch sizes, 2 seeds x 2 swept BN momenta, 2 epochs
of an 8-unit MLP on tiny generated IDX files) trains in this process; the
tests read what it wrote. The CLI tests (`slow`) run the real entry points
in subprocesses.
"""

import ast
import json
import math
import shlex
import shutil
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest

from bn_lab import classifier
from bn_lab import cli
from bn_lab import report
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from studies import registry
from studies.placements import main_job as placements

NUM_TRAIN, NUM_TEST = 400, 200
PLACEMENTS = ("none", "before_activation")
BATCH_SIZES = (50, 100)
NUM_EPOCHS = 2
SEEDS, MOMENTA = (0, 1), (0.9, 0.99)
RUNS = [(s, m) for s in SEEDS for m in MOMENTA]  # seeds x swept momenta
OVERRIDES = {"dataset": "tiny", "num_epochs": NUM_EPOCHS, "seeds": SEEDS,
             "widths": (8,), "progress_seconds": 0.0,
             "placements": PLACEMENTS, "batch_sizes": BATCH_SIZES,
             "target_accuracy": 0.3}
AXIS_FIELDS = ("placement", "batch_size", "model", "activation", "norm",
               "bn.virtual_batch_size")


def study_config(idx_dir, **changes):
  config = placements.get_config()
  for field, value in {**OVERRIDES, "data_dir": str(idx_dir),
                       **changes}.items():
    config[field] = value
  config.sweep.bn_momentum = MOMENTA
  return config


def combo_name(placement, batch_size):
  return f"placement={placement}__batch_size={batch_size}"


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), NUM_TRAIN,
                                NUM_TEST)


@pytest.fixture(scope="module")
def study_run(idx_dir, tmp_path_factory):
  """The study's workdir, its metrics.jsonl after every epoch's write, and
  the report's table."""
  workdir = tmp_path_factory.mktemp("study")
  snapshots = []
  real_write = runner.workdir_lib.MetricsWriter.write

  def write(self, rows, step_rows=()):
    real_write(self, rows, step_rows)
    snapshots.append(self.path.read_text())

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(runner.workdir_lib.MetricsWriter, "write", write)
    classifier.train_and_evaluate(study_config(idx_dir), workdir)
  table = report.write_report([workdir], workdir)
  return workdir, snapshots, table


def read_rows(workdir, name="metrics.jsonl"):
  return [json.loads(line)
          for line in (workdir / name).read_text().splitlines()]


@pytest.mark.slow
def test_rows_carry_every_axis_run_and_epoch(study_run):
  workdir, _, _ = study_run
  rows = read_rows(workdir)
  expected = [(p, b, run, e) for p in PLACEMENTS for b in BATCH_SIZES
              for e in range(1, NUM_EPOCHS + 1) for run in range(len(RUNS))]
  assert [(r["placement"], r["batch_size"], r["run"], r["epoch"])
          for r in rows] == expected
  for row in rows:
    assert {f: row[f] for f in AXIS_FIELDS[2:]} == {
        "model": "mlp", "activation": "relu", "norm": "batch",
        "bn.virtual_batch_size": 32}
    assert row["combo"] == combo_name(row["placement"], row["batch_size"])
    assert (row["seed"], row["bn_momentum"]) == RUNS[row["run"]]
    assert row["learning_rate"] == 1e-3 and row["bn_epsilon"] == 1e-3
    assert row["step"] == row["epoch"] * (NUM_TRAIN // row["batch_size"])
    for key in classifier.METRICS:
      assert math.isfinite(row[key]), (key, row)
      if "accuracy" in key:
        assert 0.0 <= row[key] <= 1.0
  # Learnable: the mean training loss falls from epoch 1 to 2 everywhere.
  for p in PLACEMENTS:
    for b in BATCH_SIZES:
      loss = [np.mean([r["train_loss"] for r in rows if r["placement"] == p
                       and r["batch_size"] == b and r["epoch"] == e])
              for e in (1, 2)]
      assert loss[1] < loss[0], (p, b, loss)


@pytest.mark.slow
def test_metrics_jsonl_grows_by_whole_lines_each_epoch(study_run):
  """Append-only: after every epoch the file is the one before plus that
  epoch's rows, whole lines synced."""
  workdir, snapshots, _ = study_run
  assert len(snapshots) == len(PLACEMENTS) * len(BATCH_SIZES) * NUM_EPOCHS
  previous = ""
  for snapshot in snapshots:
    assert snapshot.startswith(previous) and snapshot.endswith("\n")
    assert snapshot[len(previous):].count("\n") == len(RUNS)
    previous = snapshot
  assert previous == (workdir / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_results_json_has_every_combination(study_run, idx_dir):
  workdir, _, _ = study_run
  results = json.loads((workdir / "results.json").read_text())
  assert str(idx_dir) in results["data_origin"]
  assert results["axes"] == {"placement": list(PLACEMENTS),
                             "batch_size": list(BATCH_SIZES),
                             "model": ["mlp"], "activation": ["relu"],
                             "norm": ["batch"],
                             "bn.virtual_batch_size": [32]}
  assert [(c["combo"], c["runs"], c["epochs"]) for c in results["combos"]] == [
      (combo_name(p, b), len(RUNS), NUM_EPOCHS)
      for p in PLACEMENTS for b in BATCH_SIZES]
  rows = read_rows(workdir)
  for combo in results["combos"]:
    last = [r for r in rows if r["combo"] == combo["combo"]][-1]
    assert combo["wall_time"] == last["wall_time"] > 0
  # Provenance: started in-process, so no command; the machine it ran on.
  assert results["command"] is None
  assert results["machine"]["jax"] == jax.__version__
  assert results["machine"]["platform"] == jax.devices()[0].platform
  assert results["finished"].endswith(" UTC")


def test_the_cli_records_its_command_as_typed():
  assert cli.command_line("experiments.main", [
      "experiments/main.py", "--config=studies/staleness/config.py",
       "--workdir=w", "--config.seeds=(0, 1)"]) == (
           "python -m experiments.main --config=studies/staleness/config.py "
           "--workdir=w '--config.seeds=(0, 1)'")


@pytest.mark.slow
def test_report_has_one_row_per_combination_and_momentum(study_run):
  """The table's accuracy against numpy over the final rows: a line per
  combination and swept momentum, +- over its seeds (never over the
  momenta); one curves figure per combination."""
  workdir, _, table = study_run
  assert (workdir / "summary.md").read_text().count(table.strip()) == 1
  rows = read_rows(workdir)
  lines = [line for line in table.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[:2] == ["placement", "batch_size"] or header[:2] == [
      "batch_size", "placement"]
  assert header[2:4] == ["bn_momentum", "seeds"]
  cells = [[c.strip() for c in line.strip("|").split("|")]
           for line in lines[1:]]
  by_line = {(c[header.index("placement")],
              int(c[header.index("batch_size")]),
              float(c[header.index("bn_momentum")])): c for c in cells}
  assert len(by_line) == len(cells) == len(PLACEMENTS) * len(
      BATCH_SIZES) * len(MOMENTA)
  assert set(by_line) == {(p, b, m) for p in PLACEMENTS for b in BATCH_SIZES
                          for m in MOMENTA}
  column = next(i for i, h in enumerate(header) if "eval mode" in h)
  for (p, b, m), cell in by_line.items():
    final = [r["test_accuracy"] for r in rows if r["placement"] == p
             and r["batch_size"] == b and r["bn_momentum"] == m
             and r["epoch"] == NUM_EPOCHS]
    assert len(final) == len(SEEDS)
    mean, std = 100 * np.mean(final), 100 * np.std(final, ddof=1)
    assert cell[column] == f"{mean:.2f} +- {std:.2f}", (p, b, m, cell)
    assert cell[header.index("seeds")] == str(len(SEEDS))
  assert (f"at one value of bn_momentum (swept within it, never pooled); "
          f"means over {len(SEEDS)} seeds") in table
  for p in PLACEMENTS:
    for b in BATCH_SIZES:
      png = workdir / f"curves_{combo_name(p, b)}.png"
      assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_run_s_curves(study_run):
  """Read back with TensorBoard's own reader: one event directory per run,
  every metric at every epoch's step, the values of metrics.jsonl."""
  workdir, _, _ = study_run
  runs = sorted((workdir / "tensorboard").glob("*/run*"))
  assert [(r.parent.name, r.name) for r in runs] == sorted(
      (combo_name(p, b), f"run{i}") for p in PLACEMENTS for b in BATCH_SIZES
      for i in range(len(RUNS)))
  assert_tensorboard_matches_metrics(workdir)


def assert_tensorboard_matches_metrics(workdir):
  """Every run's TensorBoard scalars, as TensorBoard's reader sees them:
  each metric once per epoch's step, the values of metrics.jsonl; the step
  windows' at theirs, the values of steps.jsonl; and the run's
  hyperparameters for the HParams tab."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import plugin_data_pb2
  rows, step_rows = read_rows(workdir), read_rows(workdir, "steps.jsonl")
  for run_dir in sorted((workdir / "tensorboard").glob("*/run*")):
    events = event_accumulator.EventAccumulator(str(run_dir))
    events.Reload()

    def mine(of):
      return [r for r in of if r["combo"] == run_dir.parent.name
              and f"run{r['run']}" == run_dir.name]

    step_tags = [f"steps/{k}" for k in ("train_loss", "train_accuracy")]
    assert sorted(events.Tags()["scalars"]) == sorted(
        [*classifier.METRICS, *step_tags])
    for key, tag, of in [*((k, k, rows) for k in classifier.METRICS),
                         *((t.split("/")[1], t, step_rows)
                           for t in step_tags)]:
      scalars = events.Scalars(tag)
      assert [s.step for s in scalars] == [r["step"] for r in mine(of)]
      np.testing.assert_allclose([s.value for s in scalars],
                                 [r[key] for r in mine(of)], rtol=1e-6)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")[
            "_hparams_/session_start_info"]).session_start_info
    row = mine(rows)[0]
    assert start.hparams["seed"].number_value == row["seed"]
    assert start.hparams["placement"].string_value == row["placement"]
    assert start.hparams["bn_momentum"].number_value == pytest.approx(
        row["bn_momentum"])


@pytest.mark.slow
def test_a_new_axis_is_one_table_entry(idx_dir, tmp_path, monkeypatch):
  """An axis over the optimizer: one AXES entry (and the config field)."""
  monkeypatch.setitem(sweep.AXES, "optimizers", "optimizer")
  config = study_config(idx_dir, placements=("before_activation",),
                        batch_sizes=(), seeds=(0,), num_epochs=1)
  config.sweep.bn_momentum = ()
  with config.unlocked():
    config.optimizers = ("sgd", "adam")
  results = classifier.train_and_evaluate(config, tmp_path)
  assert [c["combo"] for c in results["combos"]] == [
      "placement=before_activation__optimizer=sgd",
      "placement=before_activation__optimizer=adam"]
  rows = read_rows(tmp_path)
  assert [r["optimizer"] for r in rows] == ["sgd", "adam"]
  # Different programs: the same seed trains differently.
  assert rows[0]["train_loss"] != rows[1]["train_loss"]


def test_a_validation_split_is_held_out_of_training(idx_dir, tmp_path):
  """config.validation_examples: the rows carry val_loss / val_accuracy, and
  the run trains on the rest (its log's train count)."""
  config = study_config(idx_dir, placements=("before_activation",),
                        batch_sizes=(), seeds=(0,), num_epochs=1)
  config.sweep.bn_momentum = ()
  config.validation_examples = 40
  data, _ = classifier.load_data(config)
  assert data.train_images.shape[0] == NUM_TRAIN - 40
  assert data.val_images.shape[0] == 40
  # No validation image is a training image (the tiny set's rows differ).
  train_rows = {bytes(x) for x in np.asarray(data.train_images)}
  assert not any(bytes(x) in train_rows for x in np.asarray(data.val_images))
  classifier.train_and_evaluate(config, tmp_path)
  (row,) = read_rows(tmp_path)
  assert 0 <= row["val_accuracy"] <= 1 and row["val_loss"] > 0
  config.validation_examples = NUM_TRAIN
  with pytest.raises(sweep.ConfigError, match="config.validation_examples="):
    classifier.load_data(config)


@pytest.mark.slow
def test_a_resumed_study_repeats_the_uninterrupted_one(study_run, idx_dir,
                                                       tmp_path):
  """A copy of the workdir as a run killed during the second combination's
  last epoch left it: that epoch's rows were appended but its checkpoint
  never saved; the later combinations never started. The same config
  retrains exactly what is missing and writes the same numbers."""
  workdir, _, _ = study_run
  done, killed, *not_started = [combo_name(p, b) for p in PLACEMENTS
                                for b in BATCH_SIZES]
  resumed = tmp_path / "study"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / killed / str(NUM_EPOCHS))
  for name in not_started:
    shutil.rmtree(resumed / "checkpoints" / name)
  (resumed / "results.json").unlink()
  rows = read_rows(workdir)
  kept = [r for r in rows if r["combo"] in (done, killed)]
  (resumed / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in kept))

  trained = []
  real = train.sweep_epoch

  def counting(states, data, *, spec):
    trained.append(spec.batch_size)
    return real(states, data, spec=spec)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, "sweep_epoch", counting)
    classifier.train_and_evaluate(study_config(idx_dir), resumed)
  # killed: its last epoch; each not started combination: every epoch.
  assert len(trained) == 1 + NUM_EPOCHS * len(not_started)
  without_time = lambda rows: [{k: v for k, v in r.items()
                                if k != "wall_time"} for r in rows]
  assert without_time(read_rows(resumed)) == without_time(rows)
  # The epochs trained again replace their TensorBoard events.
  assert_tensorboard_matches_metrics(resumed)


# ----------------------------------------------------------------------------
# The configs.


def docstring_command(path):
  """The command in the docstring: the first command of the indented
  block after the one-line summary, with backslash continuations joined
  (the block may go on with the commands of other variants)."""
  doc = ast.get_docstring(ast.parse(path.read_text()), clean=True)
  lines = doc.splitlines()
  assert lines[0] and not lines[0].startswith(" ") and lines[1] == "", (
      f"{path}: the docstring starts with a one-line summary, a blank line, "
      "then the command")
  command = []
  for line in lines[2:]:
    if not line.startswith("    "):
      break
    command.append(line.strip().rstrip("\\").strip())
    if not line.rstrip().endswith("\\"):
      break
  assert command, f"{path}: no indented command after the summary line"
  return shlex.split(" ".join(command))


def _config_files():
  """Every config file of a registered study (a module of its folder that
  defines get_config), as a path from the repository root."""
  found = []
  for name in registry.STUDIES:
    for path in sorted(registry.folder(name).glob("*.py")):
      if "def get_config(" in path.read_text():
        found.append(str(path.relative_to(helpers.REPO)))
  return found


CONFIG_FILES = _config_files()


def test_every_study_has_a_config():
  assert {p.split("/")[1] for p in CONFIG_FILES} == set(registry.STUDIES)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_docstring_starts_with_the_command_that_runs_it(path):
  argv = docstring_command(helpers.REPO / path)
  assert argv[:3] == [".venv/bin/python", "-m", "experiments.main"]
  args = argv[3:]
  assert args[0].split(":")[0] == f"--config={path}"  # names the file
  assert any(a.startswith("--workdir=") for a in args)
  config = helpers.resolved_config(args)
  study = registry.for_config_file(helpers.REPO / path)
  assert study.name == path.split("/")[1]
  study.validate(config)
  assert config.study  # says what it studies


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_configs_import_nothing_from_the_training_code(path):
  """A config reads on its own: it imports the base config and other
  configs, nothing that trains."""
  tree = ast.parse((helpers.REPO / path).read_text())
  imported = {alias.name for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) for alias in node.names}
  code = {m for m in imported if m.startswith(("bn_jax", "bn_lab", "studies"))}
  assert all(m == "bn_lab.config" or m.endswith(".config")
             for m in code), code


def test_placements_config_cnn_variant_is_valid():
  config = helpers.resolved_config(["--config=studies/placements/main_job.py:cnn",
                                    "--workdir=unused"])
  sweep.validate_config(config)
  assert config.model == "cnn"
  assert [c.values["placement"] for c in sweep.combinations(config)] == [
      "none", "before_activation", "after_activation", "input"]


# ----------------------------------------------------------------------------
# Through the command line.


@pytest.mark.slow
def test_cli_momentum_none_runs_and_reports(idx_dir, tmp_path):
  """--config.bn.momentum=None (the exact cumulative average) end to end;
  then the report regenerates summary.md and the plots from the files."""
  workdir = tmp_path / "run"
  args = ["--config=studies/placements/main_job.py", f"--workdir={workdir}",
          f"--config.data_dir={idx_dir}", "--config.dataset=tiny",
          "--config.num_epochs=1", "--config.seeds=(0,)",
          "--config.widths=(8,)", "--config.bn.momentum=None",
          "--config.placements=('before_activation',)"]
  result = helpers.run_cli(args)
  assert json.loads((workdir / "config.json").read_text())["bn"][
      "momentum"] is None
  row, = read_rows(workdir)
  assert row["bn_momentum"] is None and math.isfinite(row["test_loss"])
  assert "| before_activation |" in result.stdout  # the table, printed
  # Where the files went, and how to see the curves.
  written = helpers.files_written(result.stdout, workdir)
  for name in ("summary.md", "learning_curves.png", "results.json"):
    assert name in written
  assert f"Curves: tensorboard --logdir {workdir / 'tensorboard'}" in (
      result.stdout)
  for name in ("summary.md", "learning_curves.png"):
    (workdir / name).unlink()
  helpers.run_cli([f"--workdir={workdir}"], module="experiments.report")
  assert "| before_activation |" in (workdir / "summary.md").read_text()
  assert (workdir / "learning_curves.png").stat().st_size > 5000


def test_an_axis_may_set_a_nested_field(monkeypatch):
  monkeypatch.setitem(sweep.AXES, "bn_epsilons", "bn.epsilon")
  config = placements.get_config()
  with config.unlocked():
    config.bn_epsilons = (1e-5, 1e-1)
  combos = sweep.combinations(config)
  assert [c.name for c in combos] == [
      f"placement={p}__bn.epsilon={e}" for p in config.placements
      for e in (1e-5, 1e-1)]
  assert [c.config.bn.epsilon for c in combos[:2]] == [1e-5, 1e-1]
  assert combos[1].values["bn.epsilon"] == 1e-1
  assert config.bn.epsilon == 1e-3  # the study's own config is untouched


def _with_variants(**settings):
  config = placements.get_config()
  with config.unlocked():
    config.placements = ()
    config.batch_sizes = (32, 64)
    config.variants = tuple(settings)
    config.variant_settings = settings
  return config


def test_a_variant_sets_its_bundle_of_fields():
  config = _with_variants(
      plain={"norm": "none", "placement": "none"},
      ws_gn={"norm": "group", "bn": {"num_groups": 2},
             "resnet": {"standardize": "ws"}})
  combos = sweep.combinations(config)
  assert [c.name for c in combos] == [
      f"batch_size={b}__variant={v}" for b in (32, 64)
      for v in ("plain", "ws_gn")]
  ws_gn = combos[1].config
  assert (ws_gn.norm, ws_gn.bn.num_groups, ws_gn.resnet.standardize,
          ws_gn.batch_size) == ("group", 2, "ws", 32)
  assert (combos[2].config.norm, combos[2].config.placement) == ("none",
                                                                 "none")
  # Every row names the variant and the fields it set.
  assert combos[1].values["variant"] == "ws_gn"
  assert combos[1].values["norm"] == "group"
  assert config.norm == "batch" and config.resnet.standardize == "none"


@pytest.mark.parametrize("settings, message", [
    ({"a": {"nrom": "none"}}, "config.variant_settings.a.nrom: no such "
     "config field"),
    ({"a": {"batch_size": 8}}, "config.variant_settings.a sets batch_size, "
     "which another axis of the study also sweeps"),
])
def test_variant_errors_name_the_field(settings, message):
  with pytest.raises(sweep.ConfigError, match=message):
    sweep.combinations(_with_variants(**settings))


def test_a_variant_without_settings_is_one_line():
  config = _with_variants(a={"norm": "none"})
  with config.unlocked():
    config.variants = ("a", "b")
  with pytest.raises(sweep.ConfigError) as info:
    sweep.validate_config(config)
  assert "config.variants has 'b'" in str(info.value)
  assert "\n" not in str(info.value)


@pytest.mark.slow
def test_the_trainer_imports_no_plotting():
  """The library and the trainer load without matplotlib (plots load when a
  report is drawn) and without any study or entry point."""
  code = ("import sys, bn_jax, bn_lab.runner, bn_jax.nn, bn_lab.parallel; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('matplotlib', 'experiments', 'studies')))")
  result = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO,
                          capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]", result.stdout
