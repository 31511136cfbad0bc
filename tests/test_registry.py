"""The registry is the one list of studies: every entry is a folder whose
STUDY carries the entry's name, and every command a study names runs a
config of its own folder (so the page's default workdirs are its own)."""

import re
import shlex

import pytest

from bn_lab import classifier
from studies import registry


@pytest.mark.parametrize("name", list(registry.STUDIES))
def test_each_entry_is_its_own_folder_and_commands(name):
  study = registry.get(name)
  assert study.name == name
  assert registry.folder(name).name == name
  assert study.title and study.validate and study.run and study.report
  for workdir, command in study.commands.items():
    if "experiments.main" not in command:  # a benchmark's JSON
      continue
    args = shlex.split(command)
    config = next(a for a in args if a.startswith("--config="))
    path = config.split("=", 1)[1].split(":")[0]
    assert registry.for_config_file(path) is study, command
    assert f"--workdir={workdir}" in args


def test_a_config_outside_the_studies_is_the_generic_classifier():
  assert registry.for_config_file("lab/bn_lab/config.py") is (
      classifier.GENERIC)


def test_an_unknown_study_is_named_with_the_known_ones():
  with pytest.raises(KeyError, match=re.escape("no study 'vgg'")):
    registry.get("vgg")


def test_no_two_studies_share_a_default_workdir():
  workdirs = [w for s in registry.all_studies() for w in s.commands]
  assert len(workdirs) == len(set(workdirs))
