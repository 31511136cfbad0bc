"""Old workdirs still load: a workdir written before the library, the lab
and the study folders were separated (tests/fixtures/README.md says how)
resumes with today's code to the very numbers the old code wrote, and its
results.json, which names no study, still finds its study and report."""

import json
import shutil

import helpers
import pytest

from bn_lab import page
from bn_lab import report
from bn_lab import runner
from bn_lab import workdir as workdir_lib
from studies import placements
from studies import registry
from studies.placements import main_job

FIXTURES = helpers.REPO / "tests" / "fixtures"
OVERRIDES = {"dataset": "tiny", "num_epochs": 2, "seeds": (0, 1),
             "widths": (8,), "batch_size": 50,
             "placements": ("none", "before_activation"),
             "progress_seconds": 0.0}


def _rows(workdir):
  """metrics.jsonl without the timings (what may differ between runs), in
  (combination, run, epoch) order: a resumed run appends its combinations'
  later epochs after the earlier ones."""
  rows = [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return sorted(rows, key=lambda r: (r["combo"], r["run"], r["epoch"]))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 200, 100)


def _config(idx_dir):
  config = main_job.get_config()
  for field, value in {**OVERRIDES, "data_dir": str(idx_dir)}.items():
    config[field] = value
  return config


@pytest.mark.slow
def test_an_interrupted_old_workdir_resumes_to_the_old_numbers(idx_dir,
                                                                tmp_path):
  """The old run, killed after epoch 1 (its config.json has the fields the
  base config has since handed to the studies), resumes from its epoch-1
  checkpoints: epoch 2 equals, bit for bit, what the old code wrote when
  it ran on uninterrupted."""
  workdir = tmp_path / "old"
  shutil.copytree(FIXTURES / "workdir_v1", workdir)
  saved = json.loads((workdir / "config.json").read_text())
  assert "probe" in saved and "noisy_bn" in saved  # moved to studies since
  results = runner.run(placements.STUDY, _config(idx_dir), workdir)
  assert results["study_id"] == "placements" and results["schema"] == 2
  resumed = _rows(workdir)
  assert len(resumed) == 8 and {r["epoch"] for r in resumed} == {1, 2}
  assert resumed == _rows(FIXTURES / "workdir_v1_uninterrupted")
  assert "| none | 2 |" in report.write_report([workdir], workdir)


def test_an_old_results_json_finds_its_study_and_report(tmp_path):
  """results.json from before it named its study (schema 1): the page
  finds the study by the config file of its command; the report reads it."""
  workdir = tmp_path / "old"
  shutil.copytree(FIXTURES / "workdir_v1_uninterrupted", workdir)
  results = json.loads((workdir / "results.json").read_text())
  assert "study_id" not in results
  assert "--config=configs/placements.py" in results["command"]
  loaded = page.load_study(workdir)
  assert page.study_of(loaded, registry.all_studies()).name == "placements"
  assert workdir_lib.recorded_study(workdir) is None
  table = report.write_report([workdir], workdir)
  assert table.count("| placement=") == 0 and "| none |" in table
  assert (workdir / "summary.md").exists()


def test_an_old_workdir_refuses_another_config(idx_dir, tmp_path):
  workdir = tmp_path / "old"
  shutil.copytree(FIXTURES / "workdir_v1", workdir)
  config = _config(idx_dir)
  config.learning_rate = 0.01
  with pytest.raises(workdir_lib.ConfigMismatch, match="learning_rate"):
    runner.run(placements.STUDY, config, workdir)
