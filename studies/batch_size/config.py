r"""Batch size and BN, decomposed: the normalization batch, then the SGD batch.

    .venv/bin/python -m experiments.main --config=studies/batch_size/config.py --workdir=workdirs/batch_size_norm
    .venv/bin/python -m experiments.main --config=studies/batch_size/config.py:sgd --workdir=workdirs/batch_size_sgd

The reference MLP (784 -> Dense(50) -> relu -> norm -> Dense(10), Adam),
3 seeds, one data order for all runs, evaluated after every epoch four
ways: the training set in eval mode (train_accuracy_eval), the test set
with batch statistics (test_accuracy_batch_stats: BN as in training), with
the moving averages (test_accuracy: eval mode) and with exact population
statistics (test_accuracy_precise: every BN layer's mean and biased
variance pooled over the whole training set, weights frozen).

Default, the normalization batch alone: SGD batch 1024 for every run (Adam
at 1e-3 x sqrt(1024 / 128), 20 epochs = 1,160 steps), BN over ghost batches
of 2 to 1,024 examples, with layer norm, group norm and no normalization as
references; optimization differs only by the normalization.
`:sgd`, the SGD batch: batch sizes 2 to 1,024 with plain BN (statistics of
the whole batch), layer norm, group norm and none, Adam at 1e-3 x sqrt(B /
128) (the square-root rule), 10 epochs each (the same examples seen, so
the small batches take more steps), the second command above.

Short run (about 11 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, ghost batches of 16 against the whole batch of 1,024, plain BN):

    .venv/bin/python -m experiments.main --config=studies/batch_size/config.py --workdir=workdirs/batch_size_norm_short --config.num_epochs=1 --config.seeds='(0,)' --config.norms="('ghost',)" --config.virtual_batch_sizes='(16,1024)'

Short run of `:sgd` (about 11 s on 2 CPU cores, measured 2026-12-07; one
epoch, one seed, BN at SGD batches of 64 and 1,024):

    .venv/bin/python -m experiments.main --config=studies/batch_size/config.py:sgd --workdir=workdirs/batch_size_sgd_short --config.num_epochs=1 --config.seeds='(0,)' --config.norms="('batch',)" --config.batch_sizes='(64,1024)'
"""

from bn_lab import config as base

SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REFERENCES = ("layer", "group", "none")


def get_config(arg: str = "norm"):
  config = base.get_config()
  config.data_seed = 0
  config.eval_train = True
  config.precise_bn.num_examples = 60000
  config.precise_bn.estimator = "pooled"
  config.lr_scaling = "sqrt"
  config.nan_guard = "record"  # a diverging run is marked, the rest go on
  if arg == "sgd":
    config.study = "the SGD batch size (BN, LN, GN, none)"
    config.batch_sizes = SIZES
    config.norms = ("batch", *REFERENCES)
  elif arg in ("", "norm"):
    config.study = ("the normalization batch alone (ghost batches at SGD "
                    "batch 1024)")
    config.batch_size = 1024
    config.num_epochs = 20
    config.norms = ("ghost", *REFERENCES)
    config.virtual_batch_sizes = SIZES
  else:
    raise ValueError(f"studies/batch_size/config.py:{arg}: choose norm (the "
                     "default) or sgd.")
  return config
