"""Ioffe & Szegedy (2015)'s MNIST experiment and Figure 1: with and without BN.
See README.md."""

from bn_lab import classifier
from bn_lab import study
from studies.ioffe2015 import figure
from studies.ioffe2015 import page
from studies.ioffe2015 import probes

STUDY = classifier.study(
    "ioffe2015", "Ioffe & Szegedy (2015), Figure 1",
    check=probes.check_config, measure=probes.measurements,
    report_extras=(figure.probe_report,),
    section=page.section,
    commands=study.main_commands({
        "workdirs/ioffe2015": "studies/ioffe2015/config.py",
        "workdirs/ioffe2015_gaussian": "studies/ioffe2015/config.py:gaussian",
    }),
    legacy_configs=("ioffe2015_mnist",))
