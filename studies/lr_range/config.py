r"""The learning-rate range with and without BN (Bjorck et al. 2018).

    .venv/bin/python -m experiments.main --config=studies/lr_range/config.py --workdir=workdirs/lr_range

Plain SGD (no momentum) at 13 learning rates on a log grid from 1e-3 to 10
(3 per decade), with BN before each ReLU (as Ioffe & Szegedy and Bjorck et
al.'s ResNets place it) and without, 5 seeds, 10 epochs of batch 128 over
the 50,000 training images left after 10,000 are held out for validation
(`validation_examples`: every selection reads them), one data order for
every run (`data_seed`: runs differ only in their
initialization and learning rate). Each network's 13 x 3 runs train as one
vmapped sweep; with `nan_guard="record"` a run whose loss or weights turn
NaN/inf is frozen at its last finite state and its rows carry
`diverged_at` (the global step of its first non-finite update), while the
other runs train on.

The network: 784 -> 3 x (Dense(100) -> [BN] -> relu) -> Dense(10), not the
reference 784 -> Dense(50) -> Dense(10) MLP: without BN, the reference
MLP's ReLUs die at large rates and it sits at chance with a finite loss,
so no divergence is recorded and the range says little; three layers
give the unnormalized net's curvature room to limit its rate, Bjorck et
al.'s mechanism. (The Ioffe 3 x 100 sigmoid net was the other candidate:
it did not diverge either, and without BN its sigmoids barely train at
small rates, a vanishing-gradient effect rather than the learning-rate
one.)

The small-learning-rate pair (`lr_range.small_learning_rate`, one grid
point, 0.01): both networks at the same small rate, where Bjorck et al.
find that BN gives little or no benefit. At a fixed epoch the network
without BN has not converged there, so the page compares the pair at a
matched training loss. A run "trains" when its final validation accuracy
reaches `lr_range.trains_at` (90%); the page (studies/lr_range/page.py)
reports the largest rate at which every seed trains, with and without BN,
and each network at its best rate on validation.

Short run (about 16 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, four of the rates):

    .venv/bin/python -m experiments.main --config=studies/lr_range/config.py --workdir=workdirs/lr_range_short --config.num_epochs=1 --config.seeds='(0,)' --config.sweep.learning_rate='(0.01,0.1,1.0,10.0)'
"""

import ml_collections

from bn_lab import config as base

# 10^(k/3) for k = -9..3, to 3 significant digits: 0.001, 0.00215, ..., 10.
LEARNING_RATES = tuple(float(f"{10 ** (k / 3):.3g}") for k in range(-9, 4))
SMALL_LEARNING_RATE = 0.01


def get_config():
  config = base.get_config()
  config.study = ("the learning-rate range of plain SGD, with and without "
                  "BN (Bjorck et al. 2018)")
  config.widths = (100, 100, 100)
  config.activation = "relu"
  config.placements = ("none", "before_activation")
  config.optimizer = "sgd"
  config.learning_rate = SMALL_LEARNING_RATE  # overridden by the sweep
  config.sweep.learning_rate = LEARNING_RATES
  config.num_epochs = 10
  config.seeds = (0, 1, 2, 3, 4)
  config.data_seed = 0
  config.validation_examples = 10_000
  config.nan_guard = "record"  # a diverging run is frozen and marked
  config.target_accuracy = 0.97
  # Read by the page only (training ignores them).
  config.lr_range = ml_collections.ConfigDict()
  config.lr_range.small_learning_rate = SMALL_LEARNING_RATE  # a grid point
  config.lr_range.trains_at = 0.9  # final test accuracy of "trains"
  return config
