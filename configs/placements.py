r"""Every BN placement x 3 seeds on MNIST: the project's main comparison.

    python -m experiments.main --config=configs/placements.py \
        --workdir=workdirs/placements --config.data_dir=../shared/data/mnist

The CNN variant: --config=configs/placements.py:cnn. Placements: none,
before_activation (Dense without bias -> BN -> act, as in Ioffe & Szegedy),
after_activation (Dense -> act -> BN, as in common Keras code), input (BN on
the raw pixels only). Otherwise the reference Keras model's hyperparameters.
"""

from bn_jax import experiment
from bn_jax import models


def get_config(arg: str = "mlp"):
  config = experiment.default_config()
  config.model = arg or "mlp"
  config.placements = models.PLACEMENTS
  if config.model == "cnn":
    config.widths = (128,)
    config.num_epochs = 3
  config.seeds = (0, 1, 2)
  return config
