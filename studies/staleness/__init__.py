"""How stale BN's moving average is, by momentum, in the reference MLP (one
BN layer, before the readout) and a deep probe (three). See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.staleness import page

STUDY = classifier.study(
    "staleness", "How stale the moving average is",
    section=page.section,
    commands=study.main_commands({
        "workdirs/staleness": "studies/staleness/config.py",
        "workdirs/staleness_deep": "studies/staleness/config.py:deep",
    }))
