"""Character-level language models: BN-LSTM, LN-LSTM and LSTM in bits per
character, on the fortunes text. See README.md; the trainer is
studies.char_lm.lm's, the page section studies.char_lm.page's:

    python -m experiments.main --config=studies/char_lm/config.py --workdir=workdirs/char_lm
"""

from bn_lab import page as studies_page
from bn_lab import study
from studies.char_lm import lm
from studies.char_lm import page

STUDY = study.Study(
    name="char_lm", title=page.TITLE,
    validate=lm.validate_config, load_data=lm.load_data, run=lm.run,
    report=studies_page.section_report(page.section), section=page.section,
    commands=study.main_commands(
        {"workdirs/char_lm": "studies/char_lm/config.py"}),
    result_dirs=("variants",))
