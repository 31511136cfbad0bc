"""Evaluates a finished study's runs on shifted MNIST (configs/domain_shift.py).

    python -m experiments.domain_shift --config=configs/domain_shift.py --workdir=workdirs/domain_shift

Fields of the config can be overridden as --config.FIELD=VALUE. No
training: the runs are restored from `config.source_workdir`'s
checkpoints; the evaluation lives in bn_jax.domain_shift, the report
(report.md and its figure, in the workdir) in experiments.domain_shift_page.
"""


from absl import app

from bn_jax import domain_shift
from configs import base
from experiments import cli
from experiments import report

_FLAGS = {}  # "config", "workdir": see define_flags


def define_flags() -> None:
  _FLAGS.update(cli.define_config_and_workdir(
      "configs/domain_shift.py", "Directory for config.json, results.json and "
      "the report."))


def parse_flags(argv):
  return cli.parse_flags(argv, fields_file="configs/domain_shift.py")


def main(argv):
  def write_report(workdir):
    from experiments import domain_shift_page  # matplotlib: after the work
    return domain_shift_page.write_report(workdir)

  cli.run_study(
      argv, "experiments.domain_shift",
      lambda workdir, command: domain_shift.evaluate_domain_shift(
          cli.load_config(lambda: _FLAGS["config"].value,
                          example="--config=configs/domain_shift.py"),
          workdir, command=command, source_defaults=base.get_config()),
      write_report, errors=(report.ReportError,))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
