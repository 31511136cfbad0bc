r"""How stale is the moving average: BN momentum 0.9, 0.99 and 0.999.

    .venv/bin/python -m experiments.main --config=studies/staleness/config.py --workdir=workdirs/staleness

The reference MLP (784 -> Dense(50) -> relu -> BN -> Dense(10), Adam 1e-3,
batch 128, 10 epochs, 3 seeds, one data order for all runs) with BN
momentum 0.9, 0.99 and 0.999 trained together (a vmapped sweep). After
every epoch every BN layer's statistics are recomputed over 100 training
batches with the weights frozen ("pooled": the biased variance, as the
running average stores it), and the run reports the test accuracy with the
moving average (eval mode), with the recomputed statistics, and the gaps
between the two (running_mean_gap: the mean's error in population standard
deviations; running_var_gap: |log| of the variance ratio).

Short run (about 8 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, the three momenta):

    .venv/bin/python -m experiments.main --config=studies/staleness/config.py --workdir=workdirs/staleness_short --config.num_epochs=1 --config.seeds='(0,)'
"""

from bn_lab import config as base


def get_config():
  config = base.get_config()
  config.study = "how stale the moving average is (BN momentum)"
  config.sweep.bn_momentum = (0.9, 0.99, 0.999)
  config.data_seed = 0
  config.precise_bn.num_batches = 100
  config.precise_bn.estimator = "pooled"
  return config
