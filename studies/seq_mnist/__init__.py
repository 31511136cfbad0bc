"""Recurrent BN on sequential MNIST: BN-LSTM, LN-LSTM and LSTM. See README.md."""

from bn_lab import classifier
from bn_lab import study

STUDY = classifier.study(
    "seq_mnist", "Recurrent BN on sequential MNIST",
    commands=study.main_commands({
        "workdirs/seq_mnist": "studies/seq_mnist/config.py",
    }))
