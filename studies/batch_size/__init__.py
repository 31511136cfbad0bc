"""Batch size and BN: the normalization batch, then the SGD batch. See
README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.batch_size import page

STUDY = classifier.study(
    "batch_size", "Batch size, decomposed",
    section=page.section,
    commands=study.main_commands({
        "workdirs/batch_size_norm": "studies/batch_size/config.py",
        "workdirs/batch_size_sgd": "studies/batch_size/config.py:sgd",
    }))
