"""The domain-shift study's report: report.md in the workdir, the studies
page's section of this one run (studies.domain_shift.page), with its
figure.

`write_report(workdir)` is the study's `report`
(`studies.domain_shift.STUDY`), written after `python -m experiments.main
--config=studies/domain_shift/config.py --workdir=...`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bn_lab import report
from bn_lab import workdir as workdir_lib
from studies.domain_shift import page as domain_shift_page


def load(workdir: Path | str) -> dict[str, Any]:
  """The workdir as the studies page's `load_study` gives a study."""
  workdir = Path(workdir)
  try:
    results = json.loads((workdir / "results.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise report.ReportError(
        f"{workdir} has no readable results.json and config.json ({e}); run "
        "python -m experiments.main --config=studies/domain_shift/config.py "
        f"--workdir={workdir} first.") from None
  if "domain_shift" not in results:
    raise report.ReportError(f"{workdir}/results.json is not the domain-"
                             "shift study's (no \"domain_shift\" entry).")
  return {"path": workdir, "label": workdir.name, "results": results,
          "benchmark": None, "rows": [], "config": config,
          "config_name": "domain_shift", "config_arg": None}


def write_report(workdir: Path | str) -> str:
  """report.md and its figure in `workdir`; returns the report's path."""
  workdir = Path(workdir)
  text = domain_shift_page.section([load(workdir)], workdir)
  path = workdir / "report.md"
  workdir_lib.write_atomic(path, text)
  return str(path)
