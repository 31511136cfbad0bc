"""Domain shift: a finished study's runs on shifted MNIST, with BN's
running, adapted (AdaBN) and test-batch statistics. No training.

The evaluation is studies.domain_shift.domain_shift's, its report
(report.md) studies.domain_shift.report's, its section of the studies page
studies.domain_shift.page's; bn_lab.runner runs it:

    python -m experiments.main --config=studies/domain_shift/config.py --workdir=workdirs/domain_shift
"""

from bn_lab import study
from studies.domain_shift import domain_shift
from studies.domain_shift import page
from studies.domain_shift import report

STUDY = study.Study(
    name="domain_shift",
    title="Domain shift: running, adapted and test-batch statistics",
    validate=domain_shift.validate, load_data=domain_shift.load_data,
    run=domain_shift.run, report=report.write_report, section=page.section,
    commands=study.main_commands(
        {"workdirs/domain_shift": "studies/domain_shift/config.py"}))
