"""The learning-rate range with and without BN. See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.lr_range import page

STUDY = classifier.study(
    "lr_range", "The learning-rate range (Bjorck et al. 2018)",
    section=page.section,
    commands=study.main_commands({
        "workdirs/lr_range": "studies/lr_range/config.py",
    }))
