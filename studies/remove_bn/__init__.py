"""Can you remove BN? A residual CNN with BN, its replacements and the
normalizer-free recipes at batch sizes 2 to 512. See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.remove_bn import page

STUDY = classifier.study(
    "remove_bn", "Can you remove BN?", section=page.section,
    commands=study.main_commands(
        {"workdirs/remove_bn": "studies/remove_bn/config.py"}))
