r"""The reference model of the Keras example this project started from.

    .venv/bin/python -m experiments.main --config=studies/placements/keras_reference.py --workdir=workdirs/seed_keras

784 -> Dense(50, relu) -> BatchNormalization -> Dense(10) softmax, Adam 1e-3,
batch 128, 10 epochs, inputs scaled to [0, 1], Keras' BN defaults (momentum
0.99, epsilon 1e-3), 3 seeds trained together as one vmapped program. These
are the base config's values, restated here so the file reads on its own.

Short run (about 7 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed):

    .venv/bin/python -m experiments.main --config=studies/placements/keras_reference.py --workdir=workdirs/seed_keras_short --config.num_epochs=1 --config.seeds='(0,)'
"""

from bn_lab import config as base


def get_config():
  config = base.get_config()
  config.study = "the Keras example's model"
  config.placement = "after_activation"
  config.widths = (50,)
  config.activation = "relu"
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.batch_size = 128
  config.num_epochs = 10
  config.seeds = (0, 1, 2)
  return config
