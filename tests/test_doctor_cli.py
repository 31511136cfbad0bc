"""The BN doctor over a lab workdir: bn_lab.doctor, the report's doctor.md,
and the command line (experiments.doctor, bn-lab-doctor).

One tiny study (an 8-unit MLP, BN before the activation and none, one
epoch of 400 generated examples in batches of 50: 8 steps) trains through
the entry point; the `slow` tests run the doctor's entry points too.
"""

import os
from pathlib import Path
import subprocess
import sys

import helpers
import pytest

from bn_lab import doctor
from bn_lab import report
from studies.placements import main_job as placements

NUM_TRAIN, BATCH = 400, 50
BN_COMBO, PLAIN_COMBO = "placement=before_activation", "placement=none"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  idx = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), NUM_TRAIN, 100)
  path = tmp_path_factory.mktemp("study")
  # In a process of its own: a worker that has compiled the suite's other
  # programs once crashed (a segfault) compiling this one in process.
  helpers.run_cli([f"--config={placements.__file__}", f"--workdir={path}",
                   "--config.dataset=tiny", f"--config.data_dir={idx}",
                   "--config.num_epochs=1", "--config.seeds=(0,1)",
                   "--config.widths=(8,)", f"--config.batch_size={BATCH}",
                   "--config.progress_seconds=0",
                   "--config.placements=('before_activation','none')"])
  return path


def test_a_run_s_report_names_it_and_flags_the_short_run(workdir):
  text = doctor.run_markdown(workdir, seed=1)
  # The first combination, the run of seed 1, 400 // 50 = 8 steps.
  assert text.startswith(f"## {BN_COMBO}: run 1 (seed 1), epoch 1, step 8;")
  assert "| 1 | hidden_0/BatchNorm_0 |" in text
  # momentum 0.99 over 8 steps: the initial statistics weigh 0.99^8 = 92%.
  assert "- error [momentum] hidden_0/BatchNorm_0: momentum=0.99 averages " \
         "over ~100 steps, but the run trained 8" in text
  # 400 examples in batches of 50, and the trainer drops no partial batch.
  assert "few_values" not in text
  plain = doctor.run_markdown(workdir, combo=PLAIN_COMBO)
  assert "the model has no BatchNorm layer" in plain
  with pytest.raises(doctor.DoctorError, match="combinations are"):
    doctor.run_markdown(workdir, combo="placement=input")


def test_the_report_writes_doctor_md_and_links_it(workdir, tmp_path):
  table = report.write_report([workdir], tmp_path)
  assert "BN doctor: [doctor.md](doctor.md)" in table
  assert "[doctor.md](doctor.md)" in (tmp_path / "summary.md").read_text()
  text = (tmp_path / "doctor.md").read_text()
  assert f"## {BN_COMBO}: run 0 (seed 0)" in text
  assert f"## {PLAIN_COMBO}: run 0 (seed 0)" in text
  assert "the model has no BatchNorm layer" in text


def test_a_failing_doctor_keeps_the_rest_of_the_report(workdir, tmp_path,
                                                        monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("out of memory\nmore lines")

  monkeypatch.setattr(doctor, "workdir_markdown", broken)
  table = report.write_report([workdir], tmp_path)
  assert "| before_activation |" in table
  assert ("BN doctor: could not run (RuntimeError: out of memory); see "
          "[doctor.md](doctor.md).") in table
  for name in ("summary.md", "learning_curves.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert "Could not run: RuntimeError: out of memory" in (
      tmp_path / "doctor.md").read_text()


def test_a_workdir_without_checkpoints_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(doctor.DoctorError, match="no checkpoints/"):
    doctor.run_markdown(tmp_path)
  with pytest.raises(doctor.DoctorError, match="missing or not JSON"):
    doctor.run_markdown(tmp_path / "nowhere")


@pytest.mark.slow
def test_the_command_line_and_the_console_script(workdir, tmp_path):
  result = helpers.run_cli([f"--workdir={workdir}", f"--combo={BN_COMBO}",
                            "--run=1", "--batches=2"],
                           module="experiments.doctor")
  assert result.stdout.startswith(f"## {BN_COMBO}: run 1 (seed 1)")
  assert "statistics of the first 2 training batches of 50" in result.stdout
  assert "| rank | layer | z (mean) | log var ratio |" in result.stdout
  bad = helpers.run_cli([f"--workdir={workdir}", "--seed=7"],
                        module="experiments.doctor", check=False)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == (
      "DoctorError: --seed=7; the runs' seeds are [0, 1].")
  # From outside the repository, as lab/pyproject.toml installs it.
  script = Path(sys.executable).parent / "bn-lab-doctor"
  run = subprocess.run([script, f"--workdir={workdir}"], cwd=tmp_path,
                       env=helpers.cli_env(dict(os.environ)),
                       capture_output=True, text=True,
                       timeout=helpers.CLI_TIMEOUT_S)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith(f"## {BN_COMBO}: run 0 (seed 0)")
