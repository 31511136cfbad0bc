"""BN in a small DCGAN-style GAN on MNIST: does it reduce mode collapse?

The study's trainer and evaluation are studies.gan.gan's, its report
(report.md, sample grids) studies.gan.report's, its section of the studies
page studies.gan.page's; bn_lab.runner runs it:

    python -m experiments.main --config=studies/gan/config.py --workdir=workdirs/gan
"""

from bn_lab import study
from studies.gan import gan
from studies.gan import page
from studies.gan import report

STUDY = study.Study(
    name="gan", title="BN in a GAN",
    validate=gan.validate_config, load_data=gan.load_data, run=gan.run,
    report=report.write_report, section=page.section,
    commands=study.main_commands({"workdirs/gan": "studies/gan/config.py"}),
    # The evaluation classifier and the finished variants are results too:
    # a workdir with them resumes only the same config.
    result_dirs=("classifier", "variants"))
