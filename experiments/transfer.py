"""Runs the transfer-learning study of a config (configs/transfer.py), then
writes its report.

    python -m experiments.transfer --config=configs/transfer.py --workdir=workdirs/transfer

Fields of the config can be overridden as --config.FIELD=VALUE. A rerun of
the same command reuses the pretrained networks saved in the workdir.
Training and evaluation live in bn_jax.transfer; this file parses the flags
and writes report.md in the workdir (the studies page's section, from
experiments/transfer_page.py).
"""

from pathlib import Path
from typing import Any

from absl import app

from bn_jax import transfer
from bn_jax import workdir as workdir_lib
from experiments import cli
from experiments import studies_page
from experiments import transfer_page

_FLAGS: dict[str, Any] = {}  # "config", "workdir": see define_flags


def define_flags() -> None:
  _FLAGS.update(cli.define_config_and_workdir(
      "configs/transfer.py", "Directory for the config, the pretrained "
      "networks, results.json and report.md."))


def parse_flags(argv):
  return cli.parse_flags(argv, fields_file="configs/transfer.py")


def load_config():
  return cli.load_config(
      lambda: _FLAGS["config"].value,
      example="--config=configs/transfer.py or "
              "--config=configs/transfer.py:short")


def write_report(workdir) -> str:
  """report.md in `workdir`: the studies page's section of this run."""
  workdir = Path(workdir)
  text = transfer_page.transfer_section(
      [studies_page.load_study(workdir)], workdir)
  path = workdir / "report.md"
  workdir_lib.write_atomic(path, text)
  return str(path)


def main(argv):
  cli.run_study(
      argv, "experiments.transfer",
      lambda workdir, command: transfer.train_and_evaluate(
          load_config(), workdir, command=command),
      write_report, errors=(FloatingPointError,))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
