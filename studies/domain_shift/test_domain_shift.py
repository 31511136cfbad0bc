"""The domain-shift study (studies.domain_shift: domain_shift, page, report):
deterministic shifts, exact recovery of an affine shift by adapted
statistics (against NumPy), the study end to end through bn_lab.runner on a
tiny placement run (against the source's own evaluation), and its errors
(in the runner and through the one command line, experiments.main)."""

import ast
import json
import re
import shlex
import shutil

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_lab import classifier
from bn_lab import data
from bn_lab import runner
from bn_lab import sweep
from bn_lab import train
from bn_lab import workdir as workdir_lib
from studies import registry
import studies.domain_shift as domain_shift_study
from studies.domain_shift import config as domain_shift_config
from studies.domain_shift import domain_shift
from studies.domain_shift import page as domain_shift_page
from studies.domain_shift import report as domain_shift_report
from studies.placements import config as placement_study


def _pixels(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 784), np.uint8)


@pytest.mark.parametrize("kind", data.SHIFT_KINDS)
def test_shifts_are_deterministic(kind):
  """The same call gives the same array; only the noise depends on the
  seed; the clean case is the pixels / 255."""
  pixels = _pixels(4)
  shift = lambda seed: domain_shift.shifted_inputs(pixels, kind, 3,
                                                   clip=False, seed=seed)
  np.testing.assert_array_equal(shift(0), shift(0))
  if kind == "noise":
    assert not np.allclose(shift(0), shift(1))
  else:
    np.testing.assert_array_equal(shift(0), shift(1))
  np.testing.assert_allclose(
      domain_shift.shifted_inputs(pixels, domain_shift.CLEAN, 0, clip=False,
                                  seed=0), pixels / 255.0, rtol=1e-6)


def _features(placement, variables, x):
  """What the first BN layer sees, in float64: the input, or the
  bias-free first Dense of it."""
  if placement == "input":
    return x.astype(np.float64)
  kernel = np.asarray(variables["params"]["hidden_0"]["Dense_0"]["kernel"],
                      np.float64)
  return x.astype(np.float64) @ kernel


@pytest.mark.parametrize("placement, kind, severity", [
    ("input", "brightness", 5), ("input", "contrast", 3),
    ("before_activation", "brightness", 2),
    ("before_activation", "contrast", 3)])
def test_adapted_statistics_undo_an_affine_shift_exactly(placement, kind,
                                                         severity):
  """Brightness and contrast map every pixel by a x + b; the BN that sees
  it (input BN, or BN after a bias-free Dense) with statistics adapted on
  shifted inputs gives the logits of clean inputs with clean statistics.
  Both sets of statistics are checked against NumPy, and the clean
  logits use NumPy's clean statistics. epsilon 1e-8: a^2 var + eps against
  a^2 (var + eps) then differs by a relative 1e-8 / (a^2 var) < 1e-5."""
  spec = train.TrainSpec(placement=placement, widths=(8,),
                         bn=(("epsilon", 1e-8),))
  model = spec.make_model({})
  variables = model.init(jax.random.key(0), jnp.zeros((1, 784)), train=False)
  pixels = _pixels(256 + 64)
  shift = lambda x: domain_shift.shifted_inputs(x, kind, severity,
                                                clip=False, seed=0)
  clean = pixels / np.float32(255)
  adapt_clean, test_clean = clean[:256], clean[256:]
  adapt_shifted, test_shifted = shift(pixels[:256]), shift(pixels[256:])
  adapted = domain_shift.adapted_statistics(model, variables,
                                            jnp.asarray(adapt_shifted), 64)
  layer = "input_bn" if placement == "input" else "hidden_0"
  stats = adapted[layer] if placement == "input" else adapted[layer][
      "BatchNorm_0"]
  h = _features(placement, variables, adapt_shifted)
  np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["var"], h.var(0), rtol=1e-4, atol=1e-6)
  h_clean = _features(placement, variables, adapt_clean)
  numpy_clean = {"mean": h_clean.mean(0).astype(np.float32),
                 "var": h_clean.var(0).astype(np.float32)}
  clean_stats = ({layer: numpy_clean} if placement == "input" else
                 {layer: {"BatchNorm_0": numpy_clean}})
  on_clean = np.asarray(model.apply(
      {"params": variables["params"], "batch_stats": clean_stats},
      jnp.asarray(test_clean), train=False))
  on_shifted = np.asarray(model.apply(
      {"params": variables["params"], "batch_stats": adapted},
      jnp.asarray(test_shifted), train=False))
  scale = np.max(np.abs(on_clean))
  np.testing.assert_allclose(on_shifted, on_clean, rtol=0, atol=2e-5 * scale)
  # The running (here: clean) statistics do not undo it.
  stale = np.asarray(model.apply(
      {"params": variables["params"], "batch_stats": clean_stats},
      jnp.asarray(test_shifted), train=False))
  assert np.max(np.abs(stale - on_clean)) > 0.1 * scale


# ----------------------------------------------------------------------------
# The config.


def test_config_command_and_short_variant():
  """The docstring starts with the command that runs it; the short
  variant's overrides give a valid config."""
  doc = domain_shift_config.__doc__
  command = shlex.split(doc.strip().splitlines()[2])
  assert command == [".venv/bin/python", "-m", "experiments.main",
                     "--config=studies/domain_shift/config.py",
                     "--workdir=workdirs/domain_shift"]
  # The study's own record of the command names no interpreter path.
  assert domain_shift_study.STUDY.commands == {
      "workdirs/domain_shift": " ".join(["python", *command[1:]])}
  assert registry.get("domain_shift") is domain_shift_study.STUDY
  assert registry.for_config_file(command[3].removeprefix("--config=")) is (
      domain_shift_study.STUDY)
  config = domain_shift_config.get_config()
  domain_shift.validate_config(config)
  source_line, short_line = re.findall(r"^\s+(\.venv/bin/python -m .*)$",
                                       doc, re.MULTILINE)[-2:]
  source = shlex.split(source_line)
  assert source[2] == "experiments.main"
  sweep.validate_config(helpers.resolved_config(source[3:]))
  short = shlex.split(short_line)
  assert short[2:4] == ["experiments.main",
                        "--config=studies/domain_shift/config.py"]
  for flag in short[5:]:
    field, value = flag.removeprefix("--config.").split("=", 1)
    config[field] = (value if field == "source_workdir"
                     else ast.literal_eval(value))
  domain_shift.validate_config(config)
  assert tuple(config.severities) == (1, 5)
  assert config.source_workdir == source[4].removeprefix("--workdir=")


@pytest.mark.parametrize("field, value, message", [
    ("source_workdir", "", "config.source_workdir=''"),
    ("shifts", ("blur",), "config.shifts has 'blur'"),
    ("severities", (0, 1), "config.severities=(0, 1)"),
    ("clipped_shifts", ("translation",), "config.clipped_shifts has "
     "['translation'], not in config.shifts"),
    ("adapt_examples", 1200, "config.adapt_examples=1200 is not a multiple"),
    ("adapt_noise_seed", 0, "config.adapt_noise_seed=0 equals"),
    ("test_batch_size", 0, "config.test_batch_size=0 must be a positive"),
])
def test_bad_values_are_named(field, value, message):
  config = domain_shift_config.get_config()
  config.shifts = ("brightness", "noise")
  config.clipped_shifts = ()
  config[field] = value
  with pytest.raises(domain_shift.ConfigError, match=re.escape(message)):
    domain_shift.validate_config(config)


def test_missing_source_is_one_line_naming_the_command(tmp_path):
  config = domain_shift_config.get_config()
  config.source_workdir = str(tmp_path / "nowhere")
  with pytest.raises(domain_shift.ConfigError) as error:
    runner.run(domain_shift_study.STUDY, config, tmp_path / "out")
  message = str(error.value)
  assert "\n" not in message
  assert message == (
      f"config.source_workdir='{tmp_path / 'nowhere'}' holds no finished "
      "study (no results.json); make it with: python -m experiments.main "
      "--config=studies/placements/config.py "
      f"--workdir={tmp_path / 'nowhere'}")
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_reports_a_missing_source_in_one_line(tmp_path):
  result = helpers.run_cli(
      ["--config=studies/domain_shift/config.py", f"--workdir={tmp_path / 'out'}",
       f"--config.source_workdir={tmp_path / 'nowhere'}"], check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ConfigError: config.source_workdir=")
  assert "--config=studies/placements/config.py" in last


# ----------------------------------------------------------------------------
# The verdicts on hand-made accuracies.

_GROUP = "mlp, relu"


def _hand_made(noise_running, noise_adapted):
  """after_activation (and none) on clean and noise-1 test sets, 3 seeds
  whose clean accuracies are 5 points apart."""
  clean = np.array([0.90, 0.95, 0.85])
  acc = {}
  for stats in domain_shift_page.STATISTICS:
    acc[(_GROUP, "none", "clean", 0, False, stats)] = clean
    acc[(_GROUP, "none", "noise", 1, False, stats)] = clean - 0.1
    acc[(_GROUP, "after_activation", "clean", 0, False, stats)] = clean
  acc[(_GROUP, "after_activation", "noise", 1, False, "running")] = (
      np.asarray(noise_running))
  acc[(_GROUP, "after_activation", "noise", 1, False, "adapted")] = (
      np.asarray(noise_adapted))
  acc[(_GROUP, "after_activation", "noise", 1, False, "test_batch")] = (
      np.asarray(noise_adapted))
  return acc


def test_drop_and_recovery_are_paired_over_the_same_runs():
  """The noise costs each seed 10, 11, 9 points (running statistics) and
  adapted statistics win back 5, 6, 4: both paired (the same runs
  evaluated two ways), mean 10 (5), sd 1, t = 17.3 (8.66) at df = 2, p =
  0.0033 (0.013); Holm over the family of 2: 2 x 0.0033 = 0.0066 and
  0.013, both beyond noise, so "partly" holds. Welch's test would see the
  seeds' 5-point spread instead (p = 0.057 for the drop: not judged)."""
  from scipy import stats as sps
  clean = np.array([0.90, 0.95, 0.85])
  running = clean - [0.10, 0.11, 0.09]
  adapted = running + [0.05, 0.06, 0.04]
  acc = _hand_made(running, adapted)
  placements = ["none", "after_activation"]
  family = domain_shift_page.comparisons(acc, [_GROUP], placements, 0.001)
  case = ("noise", 1, False)
  drop = family[("drop", _GROUP, "after_activation", case)]
  recovery = family[("recovery", _GROUP, "after_activation", case)]
  assert len(family) == 2 and drop.paired and recovery.paired
  assert drop.p == pytest.approx(sps.ttest_rel(clean, running).pvalue,
                                 rel=1e-9)
  assert recovery.p == pytest.approx(sps.ttest_rel(adapted, running).pvalue,
                                     rel=1e-9)
  assert (drop.p_holm, recovery.p_holm) == pytest.approx(
      (2 * drop.p, recovery.p), rel=1e-9)
  assert sps.ttest_ind(clean, running, equal_var=False).pvalue > 0.05
  text = domain_shift_page._verdicts(acc, family, _GROUP, placements, 0.001)
  assert ("Gaussian noise: adapted statistics recover partly, at every BN "
          "placement: holds.** after_activation: of 1 cases where the shift "
          "costs accuracy, 1 partly; recovered share 0.50 to 0.50.") in text
  # Adapted statistics winning back +1, -1, +0.5 points: within noise, so
  # "not at all"; the claim does not hold.
  acc = _hand_made(running, running + [0.01, -0.01, 0.005])
  family = domain_shift_page.comparisons(acc, [_GROUP], placements, 0.001)
  text = domain_shift_page._verdicts(acc, family, _GROUP, placements, 0.001)
  assert "at every BN placement: does not hold.** after_activation: of 1 " \
      "cases where the shift costs accuracy, 1 not at all" in text, text


# ----------------------------------------------------------------------------
# End to end on a tiny placement run.


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  idx_dir = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 200, 100)
  root = tmp_path_factory.mktemp("runs")
  source = root / "placement_study"
  config = placement_study.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "progress_seconds": 0.0, "num_epochs": 1,
                       "batch_size": 50, "seeds": (0, 1), "widths": (8,),
                       "activations": ("relu",),
                       "placements": ("none", "before_activation")}.items():
    config[field] = value
  classifier.train_and_evaluate(config, source)
  files = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
  shift_config = domain_shift_config.get_config()
  for field, value in {"source_workdir": str(source),
                       "shifts": ("brightness", "noise"),
                       "severities": (1,), "clipped_shifts": ("brightness",),
                       "adapt_examples": 100, "adapt_batch_size": 50,
                       "test_batch_size": 50}.items():
    shift_config[field] = value
  workdir = root / "domain_shift"
  results = runner.run(
      domain_shift_study.STUDY, shift_config, workdir,
      command="python -m experiments.main "
      f"--config=studies/domain_shift/config.py --workdir={workdir}")
  return source, files, workdir, results


def _accuracy(rows, **where):
  return np.array([r["test_accuracy"] for r in sorted(
      (r for r in rows if all(r[k] == v for k, v in where.items())),
      key=lambda r: r["seed"])])


@pytest.mark.slow
def test_study_end_to_end_against_the_source(tiny_study):
  """Every (combination, run, data set, statistics) has a row; the clean
  running and test-batch accuracies are the source trainer's own final
  evaluations (eval mode, batch statistics of its batch size); without BN
  the three statistics are one network; with BN before the activation an
  unclipped brightness shift is undone by adapted statistics; the source
  workdir is left untouched."""
  source, files, workdir, results = tiny_study
  assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == files
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))  # what run returned
  assert saved["study_id"] == "domain_shift" and saved["schema"] == 2
  assert saved["command"].startswith("python -m experiments.main")
  assert saved["machine"]["jax"] == jax.__version__
  rows = saved["domain_shift"]["rows"]
  assert len(rows) == 2 * 2 * (1 + 2 + 1) * 3
  source_rows = [json.loads(l) for l in
                 (source / "metrics.jsonl").read_text().splitlines()]
  for placement in ("none", "before_activation"):
    finals = sorted((r for r in source_rows if r["placement"] == placement),
                    key=lambda r: r["seed"])
    mine = lambda stats: _accuracy(rows, placement=placement, shift="clean",
                                   statistics=stats)
    np.testing.assert_allclose(
        mine("running"), [r["test_accuracy"] for r in finals], atol=1e-6)
    np.testing.assert_allclose(
        mine("test_batch"), [r["test_accuracy_batch_stats"] for r in finals],
        atol=1e-6)
  for shift, clip in (("brightness", False), ("noise", False),
                      ("brightness", True)):
    three = [_accuracy(rows, placement="none", shift=shift, clip=clip,
                       statistics=s) for s in domain_shift.STATISTICS]
    np.testing.assert_array_equal(three[0], three[1])
    np.testing.assert_array_equal(three[0], three[2])
  np.testing.assert_array_equal(
      _accuracy(rows, placement="before_activation", shift="brightness",
                clip=False, statistics="adapted"),
      _accuracy(rows, placement="before_activation", shift="clean",
                statistics="adapted"))


@pytest.mark.slow
def test_another_studys_workdir_is_refused(tiny_study, tmp_path):
  """The runner refuses a workdir whose results.json names another study,
  and (through its config check) a training study's workdir from before
  results.json named its study; neither is touched."""
  source, files, _, _ = tiny_study
  config = domain_shift_config.get_config()
  config.source_workdir = str(source)
  with pytest.raises(workdir_lib.ConfigMismatch, match=re.escape(
      f"{source} holds results of the study ")):
    runner.run(domain_shift_study.STUDY, config, source)
  assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == files
  legacy = tmp_path / "legacy"
  shutil.copytree(source, legacy)
  results = json.loads((legacy / "results.json").read_text())
  del results["study_id"], results["schema"]
  (legacy / "results.json").write_text(json.dumps(results))
  legacy_files = {p: p.stat().st_mtime_ns for p in legacy.rglob("*")}
  with pytest.raises(workdir_lib.ConfigMismatch, match=re.escape(
      f"{legacy} holds a run with a different config")):
    runner.run(domain_shift_study.STUDY, config, legacy)
  assert {p: p.stat().st_mtime_ns for p in legacy.rglob("*")} == (
      legacy_files)


@pytest.mark.slow
def test_report_section_matches_the_rows(tiny_study, tmp_path):
  _, _, workdir, _ = tiny_study
  path = domain_shift_study.STUDY.report(workdir)
  assert path == str(workdir / "report.md")
  text = open(path).read()
  assert (workdir / "domain_shift.png").read_bytes()[:4] == b"\x89PNG"
  rows = json.loads((workdir / "results.json").read_text())[
      "domain_shift"]["rows"]
  cells = [100 * _accuracy(rows, placement="before_activation",
                           shift="noise", statistics=s).mean()
           for s in domain_shift.STATISTICS]
  assert "| noise | 1 | " in text
  assert " / ".join(f"{c:.2f}" for c in cells) in text
  none_clean = 100 * _accuracy(rows, placement="none", shift="clean",
                               statistics="running").mean()
  assert f"| clean | - | {none_clean:.2f} |" in text
  # Exact for before_activation (brightness undone, checked above), and
  # the verdict says so with the gap recomputed here.
  gap = np.max(np.abs(
      _accuracy(rows, placement="before_activation", shift="brightness",
                clip=False, statistics="adapted")
      - _accuracy(rows, placement="before_activation", shift="clean",
                  statistics="adapted")))
  assert ("before_activation, brightness and contrast: adapted statistics "
          "recover clean accuracy exactly: holds.** Largest per-seed gap "
          f"{100 * gap:.2f} points") in text
  # The page's section is the same text.
  section = domain_shift_page.section(
      [domain_shift_report.load(workdir)], tmp_path)
  assert section == text
