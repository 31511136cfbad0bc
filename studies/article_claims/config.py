"""The source article's claims about BN, measured on its own example.

    .venv/bin/python -m experiments.main --config=studies/article_claims/config.py --workdir=workdirs/article_claims

The article's Keras example, Dense(50, relu) -> BN -> Dense(10), Adam 1e-3,
batch 128, 10 epochs; its code declares input_shape=(100,), which cannot
take MNIST's 784 pixels: here the input is the 784 flattened pixels (the
one fix). Against the same network without BN and with BN on the input
only, 5 seeds, with the whole training set evaluated in eval mode every
epoch (config.eval_train, as Keras' `evaluate` reports "train accuracy").
A second run with --config.input_scaling=raw (and its own --workdir)
feeds raw 0..255 pixels (no preprocessing):

    .venv/bin/python -m experiments.main --config=studies/article_claims/config.py --workdir=workdirs/article_claims_raw --config.input_scaling=raw

Step time and memory: benchmarks/bn_cost.py. The section (page.py) judges
each claim on every run, Welch's t between networks and the one-sample t
against a stated level, one Holm family; "BN may hurt generalization" on
test accuracy and test NLL, with the train - test gap split into its two
parts.

Short run (about 14 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, the three networks):

    .venv/bin/python -m experiments.main --config=studies/article_claims/config.py --workdir=workdirs/article_claims_short --config.num_epochs=1 --config.seeds='(0,)'
"""

from bn_lab import config as base


def get_config():
  config = base.get_config()
  config.study = "the source article's claims (its Keras example)"
  config.placements = ("none", "after_activation", "input")
  config.seeds = (0, 1, 2, 3, 4)
  config.eval_train = True
  return config
