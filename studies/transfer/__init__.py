"""Transfer learning with BN: pretrain on digits 0-4, a new readout for 5-9.

The study's training and evaluation are studies.transfer.transfer's, its
section of the studies page studies.transfer.page's (report.md is that
section of the one run); bn_lab.runner runs it:

    python -m experiments.main --config=studies/transfer/config.py --workdir=workdirs/transfer
"""

from bn_lab import page as studies_page
from bn_lab import study
from studies.transfer import page
from studies.transfer import transfer

STUDY = study.Study(
    name="transfer", title="Transfer learning with BN",
    validate=transfer.validate_config, load_data=transfer.load_data,
    run=transfer.run, report=studies_page.section_report(page.section),
    section=page.section,
    commands=study.main_commands(
        {"workdirs/transfer": "studies/transfer/config.py"}),
    # The pretrained networks are results: a workdir with them resumes
    # only the same config.
    result_dirs=("pretrained",))
