"""BN against mode collapse on Stacked-MNIST (1,000 modes): the GAN
study's nets with 3-channel images, modes counted by a classifier trained
here. Trainer: studies.mode_collapse.mode_collapse; report and page
section: studies.mode_collapse.page; bn_lab.runner runs it:

    python -m experiments.main --config=studies/mode_collapse/config.py --workdir=workdirs/mode_collapse
"""

from bn_lab import study
from studies.mode_collapse import mode_collapse
from studies.mode_collapse import page

STUDY = study.Study(
    name="mode_collapse", title="BN against mode collapse (Stacked-MNIST)",
    validate=mode_collapse.validate_config, load_data=mode_collapse.load_data,
    run=mode_collapse.run, report=page.write_report, section=page.section,
    commands=study.main_commands(
        {"workdirs/mode_collapse": "studies/mode_collapse/config.py"}),
    # The classifier and the finished variants are results too: a workdir
    # with them resumes only the same config.
    result_dirs=("classifier", "variants"))
