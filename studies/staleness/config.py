r"""How stale is the moving average: BN momentum 0.9, 0.99 and 0.999.

    .venv/bin/python -m experiments.main --config=studies/staleness/config.py --workdir=workdirs/staleness
    .venv/bin/python -m experiments.main --config=studies/staleness/config.py:deep --workdir=workdirs/staleness_deep

The reference MLP (784 -> Dense(50) -> relu -> BN -> Dense(10), Adam 1e-3,
batch 128, 10 epochs, 5 seeds, one data order for all runs) with BN
momentum 0.9, 0.99 and 0.999 trained together (a vmapped sweep). After
every epoch every BN layer's statistics are recomputed over 100 training
batches with the weights frozen ("pooled": the biased variance, as the
running average stores it), and the run reports the test accuracy and NLL
(test_loss) with the moving average (eval mode), the test accuracy with the
recomputed statistics, and the gaps between the two (running_mean_gap: the
mean's error in population standard deviations; running_var_gap: |log| of
the variance ratio; both averaged over every BN layer's features).

In the reference MLP the only BN layer feeds the readout, where an error in
its statistics mostly rescales and shifts the logits. The variant `:deep`
(workdirs/staleness_deep) is the probe with three BN layers, Ioffe &
Szegedy's MNIST net (784 -> 3 x [Dense(100) -> BN -> sigmoid] ->
Dense(10)), trained exactly as the reference (same optimizer, batch,
epochs, seeds, data order, momenta, recomputation): the errors of the lower
layers pass through sigmoids and the layers above.

Short run (about 15 s on 2 CPU cores, measured 2026-12-08; under load;
one epoch, one seed, the three momenta):

    .venv/bin/python -m experiments.main --config=studies/staleness/config.py --workdir=workdirs/staleness_short --config.num_epochs=1 --config.seeds='(0,)'

Short run of the deep probe (about 28 s on 2 CPU cores, measured
2026-12-08; under load; one epoch, one seed, the three momenta):

    .venv/bin/python -m experiments.main --config=studies/staleness/config.py:deep --workdir=workdirs/staleness_deep_short --config.num_epochs=1 --config.seeds='(0,)'
"""

from bn_lab import config as base

# The network each variant trains: (placement, hidden widths, activation).
NETWORKS = {
    "reference": ("after_activation", (50,), "relu"),
    "deep": ("before_activation", (100, 100, 100), "sigmoid"),
}


def get_config(arg: str = "reference"):
  arg = arg or "reference"
  if arg not in NETWORKS:
    raise ValueError(f"studies/staleness/config.py:{arg}: the variants are "
                     f"{', '.join(NETWORKS)}.")
  config = base.get_config()
  config.placement, config.widths, config.activation = NETWORKS[arg]
  config.study = ("how stale the moving average is (BN momentum), "
                  f"{arg} network")
  config.sweep.bn_momentum = (0.9, 0.99, 0.999)
  # Five seeds, one data order: momentum only shapes the running averages,
  # so runs of one seed have the same weights at every momentum (paired).
  config.seeds = (0, 1, 2, 3, 4)
  config.data_seed = 0
  config.precise_bn.num_batches = 100
  config.precise_bn.estimator = "pooled"
  return config
