"""How stale BN"s moving average is, by momentum. See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.staleness import page

STUDY = classifier.study(
    "staleness", "How stale the moving average is",
    section=page.section,
    commands=study.main_commands({
        "workdirs/staleness": "studies/staleness/config.py",
    }))
