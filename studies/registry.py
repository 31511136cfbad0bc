"""The one list of studies, in the page's order.

A study is a folder (a package) whose `__init__.py` defines `STUDY`, a
`bn_lab.study.Study`; its line here makes it known to the command line
(`experiments.main` runs a config from its folder), the page
(`experiments.report --page`) and the tests. Nothing else lists studies.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from bn_lab import classifier
from bn_lab import study as study_lib

# name -> the module that defines STUDY.
STUDIES = {
    "ioffe2015": "studies.ioffe2015",
    "placements": "studies.placements",
    "batch_size": "studies.batch_size",
    "staleness": "studies.staleness",
    "article_claims": "studies.article_claims",
    "gan": "studies.gan",
    "mode_collapse": "studies.mode_collapse",
    "why_bn": "studies.why_bn",
    "lr_range": "studies.lr_range",
    "domain_shift": "studies.domain_shift",
    "real_shift": "studies.real_shift",
    "transfer": "studies.transfer",
    "seq_mnist": "studies.seq_mnist",
    "norms": "studies.norms",
    "remove_bn": "studies.remove_bn",
    "sentiment": "studies.sentiment",
    "char_lm": "studies.char_lm",
    "transformer": "studies.transformer",
}


def get(name: str) -> study_lib.Study:
  """The registered study `name`; KeyError naming the known ones."""
  if name not in STUDIES:
    raise KeyError(f"no study {name!r}; the studies are "
                   f"{', '.join(STUDIES)} (studies/registry.py).")
  study = importlib.import_module(STUDIES[name]).STUDY
  if study.name != name:
    raise ValueError(f"{STUDIES[name]}.STUDY is named {study.name!r}, but "
                     f"registered as {name!r}; make them the same.")
  return study


def all_studies() -> list[study_lib.Study]:
  return [get(name) for name in STUDIES]


def folder(name: str) -> Path:
  """The folder of the registered study `name`."""
  return Path(importlib.import_module(STUDIES[name]).__file__).parent


def for_config_file(path: str | Path) -> study_lib.Study:
  """The study whose folder holds the config file `path`; the generic
  classifier study (`bn_lab.classifier.GENERIC`) for a config elsewhere
  (lab/bn_lab/config.py, a user's own)."""
  where = Path(path).resolve().parent
  for name in STUDIES:
    if folder(name).resolve() == where:
      return get(name)
  return classifier.GENERIC
