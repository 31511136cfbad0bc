"""Where BN goes (before or after the activation, on the input, nowhere), for
which activation. See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.placements import page

STUDY = classifier.study(
    "placements", "Where BN goes",
    section=page.section,
    commands=study.main_commands({
        "workdirs/placement_study": "studies/placements/config.py",
        "workdirs/placement_study_cnn": "studies/placements/config.py:cnn",
    }),
    legacy_configs=("placement_study", "placements", "seed_keras"))
