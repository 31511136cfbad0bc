"""The transfer study's report: report.md in the workdir, the studies
page's section of this one run (studies.transfer.page), with its figure.

`write_report(workdir)` is the study's `report` (`studies.transfer.STUDY`),
written after `python -m experiments.main --config=studies/transfer/config.py
--workdir=...`.
"""

from __future__ import annotations

from pathlib import Path

from bn_lab import page as studies_page
from bn_lab import workdir as workdir_lib
from studies.transfer import page as transfer_page


def write_report(workdir) -> str:
  """report.md in `workdir`: the studies page's section of this run;
  returns its path."""
  workdir = Path(workdir)
  text = transfer_page.section([studies_page.load_study(workdir)], workdir)
  path = workdir / "report.md"
  workdir_lib.write_atomic(path, text)
  return str(path)
