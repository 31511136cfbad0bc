"""The study interface: what one study tells the runner and the page.

A study is a folder under `studies/` (a package) whose `__init__.py`
defines `STUDY = Study(...)`, and one line in `studies/registry.py`. The
runner (`bn_lab.runner.run`) does the rest for every study, in one order:
validate -> lock -> resume check -> data -> run -> metrics -> results.json.
The page (`bn_lab.page`) finds a study's workdirs by the name that
results.json records, and asks the study for its section.

Most studies train classifier sweeps with the shared trainer:
`bn_lab.runner.classifier_study` builds their `Study`. Studies with a
trainer of their own (a GAN, transfer, domain shift) give their own `run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# results.json's layout. 1: before results.json named its study (read by
# the command's config file, `Study.legacy_configs`); 2: "study_id" and
# "schema" at the top level.
SCHEMA_VERSION = 2


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What the runner hands a study's `run`, after the checks and the lock.

  `writes`: whether this process writes files (process 0 of several);
  `data` and `origin`: what the study's `load_data` returned.
  """
  config: Any
  workdir: Path
  data: Any
  origin: str
  writes: bool
  command: str | None


@dataclasses.dataclass(frozen=True)
class Study:
  """One study.

  Attributes:
    name: the registry key; results.json's "study_id".
    title: the page section's heading.
    validate: config -> None; raises bn_lab.sweep.ConfigError (one line).
      Called first, before any other work; a study whose runs may span
      several processes starts JAX's distributed runtime here.
    load_data: config -> (data, origin): the data the runs need and where
      they came from (one line), checked against the config.
    run: RunContext -> dict: trains or evaluates; returns the study's part
      of results.json (the runner adds "study_id", "schema" and the
      provenance).
    report: workdir -> str: a run's own report (summary.md, figures),
      written after the run; returns the path or text to print.
    section: (loaded workdirs, page folder) -> Markdown: the study's
      section of docs/studies.md (figures written beside it); None: the
      generic summary table.
    commands: default workdir -> the command that makes it (the page's
      default workdirs, and the line naming a missing one).
    result_dirs: subfolders whose presence means a run got somewhere (the
      resume check refuses another config there), beyond metrics.jsonl and
      checkpoints/.
    legacy_configs: config file stems whose workdirs, written before
      results.json named its study (schema 1), belong to this study.
    benchmark: a benchmark JSON (schema 1's "benchmark" key) whose numbers
      join this study's section.
    extension_refusal: (saved config, config) -> why a finished run cannot
      train on to config's larger num_epochs, or None; None as the field:
      the study's runs are never extended (a rerun must match).
  """
  name: str
  title: str
  validate: Callable[[Any], None]
  load_data: Callable[[Any], tuple[Any, str]]
  run: Callable[[RunContext], dict]
  report: Callable[[Path], str]
  section: Callable[[Sequence[Mapping[str, Any]], Path], str] | None = None
  commands: Mapping[str, str] = dataclasses.field(default_factory=dict)
  result_dirs: tuple[str, ...] = ()
  legacy_configs: tuple[str, ...] = ()
  benchmark: str | None = None
  extension_refusal: Callable[[Mapping[str, Any], Mapping[str, Any]],
                              str | None] | None = None

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f"study name {self.name!r}: use a Python identifier "
                       "(it names the folder and results.json's study_id).")


def main_commands(workdir_configs: Mapping[str, str]) -> dict[str, str]:
  """{workdir: the experiments.main command that makes it} from {workdir:
  its --config argument (and any further flags)}: a study's `commands`."""
  return {workdir: f"python -m experiments.main --config={config} "
                   f"--workdir={workdir}"
          for workdir, config in workdir_configs.items()}
