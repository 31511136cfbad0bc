"""A real domain shift: printed digits <-> MNIST; BN's source, AdaBN,
test-batch and TENT statistics against GN and LN nets.

The training and evaluation are studies.real_shift.real_shift's, the
section of the studies page (and the run's report.md) studies.real_shift.
page's; bn_lab.runner runs it:

    python -m experiments.main --config=studies/real_shift/config.py --workdir=workdirs/real_shift
"""

from bn_lab import page as page_lib
from bn_lab import study
from studies.real_shift import page
from studies.real_shift import real_shift

STUDY = study.Study(
    name="real_shift",
    title="A real domain shift: printed digits and MNIST",
    validate=real_shift.validate, load_data=real_shift.load_data,
    run=real_shift.run, report=page_lib.section_report(page.section),
    section=page.section,
    commands=study.main_commands(
        {"workdirs/real_shift": "studies/real_shift/config.py"}),
    # The source nets' checkpoints and metrics: a workdir holding them
    # belongs to this config.
    result_dirs=("source",))
