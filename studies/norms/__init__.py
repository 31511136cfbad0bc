"""The normalization family side by side on the reference MLP. See README.md."""

from bn_lab import classifier

STUDY = classifier.study(
    "norms", "The normalization family")
