"""The source article's claims about BN, measured on its own example. See
README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.article_claims import page

STUDY = classifier.study(
    "article_claims", "The source article's claims",
    section=page.section,
    commands=study.main_commands({
        "workdirs/article_claims": "studies/article_claims/config.py",
        "workdirs/article_claims_raw":
            "studies/article_claims/config.py --config.input_scaling=raw",
    }) | {"workdirs/bn_cost": "python benchmarks/bn_cost.py "
                              "--json=workdirs/bn_cost/results.json"},
    benchmark="bn_cost")
