r"""The reports' command line: a run's report, or the studies page.

    python -m experiments.report --workdir=workdirs/placements

(re)writes the run's report into --out (default: the workdir): the one
its study writes after a run (summary.md, learning curves and the study's
own figures), then prints where. Several --workdir flags put all their
combinations into one table, with a workdir column, and one set of plots
in --out, which is then required:

    python -m experiments.report --workdir=workdirs/placements \
        --workdir=workdirs/placements_cnn --out=workdirs/compared

With --page, the studies page instead: docs/studies.md and its figures,
every registered study's section from its workdirs (studies/registry.py;
--workdir flags name others instead):

    python -m experiments.report --page=docs/studies.md
"""

from __future__ import annotations

from pathlib import Path
import shlex
import sys
from typing import Sequence

from absl import flags

from bn_lab import page as page_lib
from bn_lab import report
from bn_lab import workdir as workdir_lib
from studies import registry


def _flag_values() -> flags.FlagValues:
  """The CLI's flags, in a FlagValues of their own: experiments.main
  defines a global --workdir (one string), so a global --workdir here
  would clash where both are imported (tests). A fresh one per call also
  keeps repeated `main` calls from accumulating --workdir."""
  values = flags.FlagValues()
  flags.DEFINE_multi_string(
      "workdir", None, "A study's workdir (results.json, metrics.jsonl); "
      "repeat the flag to put several into one table.", flag_values=values)
  flags.DEFINE_string(
      "out", None, "Directory for summary.md and the PNGs; default the "
      "workdir; required with several.", flag_values=values)
  flags.DEFINE_string(
      "page", None, "Instead of a run's report: the studies page (e.g. "
      "docs/studies.md) of the given workdirs (default: every registered "
      "study's), its figures beside it.", flag_values=values)
  return values


def run_report(workdir: str) -> str:
  """One workdir's report, as its study writes it after a run (the
  generic classifier report for a workdir of no registered study)."""
  name = workdir_lib.recorded_study(Path(workdir))
  if name in registry.STUDIES:
    return registry.get(name).report(workdir)
  return report.write_report([workdir], workdir)


def main(argv: Sequence[str]) -> None:
  """The command line: argv[0] is the program name.

  Every problem the user can fix (a flag, a workdir, a corrupt line, a
  failed write) ends in a one-line `sys.exit` message, no traceback.
  """
  values = _flag_values()
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
    print(__doc__ + "\nFlags:\n" + values.get_help())
    return
  try:
    extra = values(list(argv))[1:]
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  workdirs, out = values["workdir"].value or [], values["out"].value
  if extra:
    sys.exit(f"FATAL unexpected arguments {extra}; give --workdir=DIR.")
  try:
    if values["page"].value is not None:
      _write_page(workdirs, values["page"].value, argv)
      return
    if not workdirs:
      sys.exit("FATAL give at least one --workdir=DIR.")
    if out is None and len(workdirs) > 1:
      sys.exit("FATAL --out=DIR is required with several --workdir flags.")
    if out is None:
      print(run_report(workdirs[0]), end="")
      print(f"\nWrote the report to {workdirs[0]}", flush=True)
    else:
      print(report.write_report(workdirs, out), end="")
      print(f"\nWrote summary.md, learning_curves.png and curves_*.png to "
            f"{out}", flush=True)
  except report.ReportError as e:
    sys.exit(f"ReportError: {e}")
  except workdir_lib.WriteError as e:
    sys.exit(f"WriteError: {e}")
  except KeyboardInterrupt:  # Ctrl-C: every file is whole (atomic writes)
    print("Interrupted: the files written so far are whole; rerun to write "
          "the rest.", file=sys.stderr, flush=True)
    sys.exit(130)


def _write_page(workdirs: Sequence[str], page: str,
                argv: Sequence[str]) -> None:
  command = " ".join(["python", "-m", "experiments.report",
                      *(shlex.quote(a) for a in argv[1:])])
  studies = registry.all_studies()
  page_lib.write_page(workdirs or page_lib.missing_workdirs(studies),
                      page, command, studies)
  print(f"Wrote {page} and its figures beside it.", flush=True)


if __name__ == "__main__":
  main(sys.argv)
