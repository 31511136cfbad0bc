r"""Every BN placement x 3 seeds on MNIST: the project's main comparison.

    .venv/bin/python -m experiments.main --config=studies/placements/main_job.py --workdir=workdirs/placements

The CNN variant: --config=studies/placements/main_job.py:cnn. Placements: none,
before_activation (Dense without bias -> BN -> act, as in Ioffe & Szegedy),
after_activation (Dense -> act -> BN, as in common Keras code), input (BN on
the raw pixels only). Otherwise the reference Keras model's hyperparameters.

Short run (about 15 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, every placement):

    .venv/bin/python -m experiments.main --config=studies/placements/main_job.py --workdir=workdirs/placements_short --config.num_epochs=1 --config.seeds='(0,)'
"""

from bn_lab import config as base


def get_config(arg: str = "mlp"):
  config = base.get_config()
  config.model = arg or "mlp"
  config.study = f"where BN goes ({config.model})"
  config.placements = ("none", "before_activation", "after_activation",
                       "input")
  if config.model == "cnn":
    config.widths = (128,)
    config.num_epochs = 3
  return config
