"""Why BN helps: internal covariate shift, noisy BN and the loss landscape
(Santurkar et al. 2018). See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.why_bn import measurements
from studies.why_bn import page

STUDY = classifier.study(
    "why_bn", "Why BN helps (Santurkar et al. 2018)",
    check=measurements.check_config, measure=measurements.measurements,
    section=page.section,
    commands=study.main_commands({
        "workdirs/why_bn_ics": "studies/why_bn/config.py:ics",
        "workdirs/why_bn_ics_mlp": "studies/why_bn/config.py:ics_mlp",
        "workdirs/why_bn_landscape": "studies/why_bn/config.py:landscape",
    }))
