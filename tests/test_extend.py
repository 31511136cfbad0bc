"""A finished run trained on to more epochs: the same numbers as a run of
that many epochs from the start, where the schedule allows; otherwise one
line that says why not."""

import json

import helpers
import pytest

from bn_lab import classifier
from bn_lab import config as base
from bn_lab import workdir as workdir_lib


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 400, 100)


def tiny_config(idx_dir, **changes):
  config = base.get_config()
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "seeds": (0, 1), "widths": (8,), "batch_size": 50,
                       "placements": ("before_activation",),
                       "progress_seconds": 0.0, **changes}.items():
    config[field] = value
  return config


def rows(workdir):
  """metrics.jsonl's rows without their wall times (measured, not
  computed)."""
  return [{k: v for k, v in row.items() if k != "wall_time"}
          for row in workdir_lib.read_jsonl(workdir / "metrics.jsonl")]


@pytest.mark.parametrize("changes", [
    {},  # a constant learning rate
    {"schedule": "cosine", "schedule_epochs": 3},  # its length stated
], ids=["constant", "cosine_stated"])
def test_two_epochs_extended_to_three_are_a_three_epoch_run(
    idx_dir, tmp_path, changes):
  extended, straight = tmp_path / "extended", tmp_path / "straight"
  classifier.train_and_evaluate(tiny_config(idx_dir, num_epochs=2, **changes),
                                extended)
  assert [r["epoch"] for r in rows(extended)] == [1, 1, 2, 2]
  results = classifier.train_and_evaluate(
      tiny_config(idx_dir, num_epochs=3, **changes), extended)
  classifier.train_and_evaluate(tiny_config(idx_dir, num_epochs=3, **changes),
                                straight)
  assert rows(extended) == rows(straight)
  assert [r["epoch"] for r in rows(extended)] == [1, 1, 2, 2, 3, 3]
  assert results["num_epochs"] == 3
  assert json.loads((extended / "config.json").read_text())[
      "num_epochs"] == 3
  steps = workdir_lib.read_jsonl(extended / "steps.jsonl")
  assert steps == workdir_lib.read_jsonl(straight / "steps.jsonl")


def test_a_schedule_laid_out_over_num_epochs_is_not_extended(idx_dir,
                                                            tmp_path):
  config = tiny_config(idx_dir, num_epochs=1, schedule="cosine")
  classifier.train_and_evaluate(config, tmp_path)
  before = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(workdir_lib.ConfigMismatch) as refused:
    classifier.train_and_evaluate(
        tiny_config(idx_dir, num_epochs=2, schedule="cosine"), tmp_path)
  message = str(refused.value)
  assert "\n" not in message
  assert "holds a run of 1 epochs" in message
  assert "learning-rate schedule (cosine)" in message
  assert "--config.schedule_epochs" in message
  assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost


def test_a_run_is_not_shortened(idx_dir, tmp_path):
  classifier.train_and_evaluate(tiny_config(idx_dir, num_epochs=2), tmp_path)
  with pytest.raises(workdir_lib.ConfigMismatch, match="not shortened"):
    classifier.train_and_evaluate(tiny_config(idx_dir, num_epochs=1),
                                  tmp_path)


def test_the_study_decides_and_other_fields_must_match(tmp_path):
  """check_resumable alone: a study without an extension rule refuses; a
  second changed field is a different experiment, as before."""
  saved = {"num_epochs": 2, "schedule": "constant", "learning_rate": 0.1}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
  longer = {**saved, "num_epochs": 3}
  workdir_lib.check_resumable(tmp_path, longer,
                              extension_refusal=lambda saved, config: None)
  with pytest.raises(workdir_lib.ConfigMismatch,
                     match="this study's runs are not extended"):
    workdir_lib.check_resumable(tmp_path, longer)
  with pytest.raises(workdir_lib.ConfigMismatch,
                     match="learning_rate, num_epochs differ"):
    workdir_lib.check_resumable(
        tmp_path, {**longer, "learning_rate": 0.2},
        extension_refusal=lambda saved, config: None)
