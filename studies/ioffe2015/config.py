r"""Ioffe & Szegedy (2015), Section 4.1: MNIST with and without BN.

    .venv/bin/python -m experiments.main --config=studies/ioffe2015/config.py --workdir=workdirs/ioffe2015

3 fully connected hidden layers of 100 sigmoid units, batch 60, 50,000 steps
(50 epochs of 1,000 steps), BN before each sigmoid (as in the paper) vs no
BN, 5 seeds (seed s gives both networks the same kernel draw and data
order; the page compares them with Welch's t test, as different networks).
The paper does not state the optimizer; plain SGD with learning rate 0.5
trains both variants here (fixed, not tuned: nothing is selected, so no
validation split is needed). Population statistics: the running average
with the unbiased variance of the paper's Algorithm 2.

Figure 1(b, c): every 500 steps the percentiles of the inputs to the last
hidden layer's sigmoids over 1,000 test images (config.probe); the report
draws probes.png, and the page judges the drift of their median and of
their p15-p85 spread (studies/ioffe2015/page.py). Initialization: flax's
default (LeCun normal); the variant `:gaussian` uses the paper's "small
random Gaussian values", N(0, 0.01^2) (the paper gives no scale), in
workdirs/ioffe2015_gaussian.

Short run (about 13 s on 2 CPU cores, measured 2026-12-07; one epoch of
1,000 steps, one seed, with and without BN):

    .venv/bin/python -m experiments.main --config=studies/ioffe2015/config.py --workdir=workdirs/ioffe2015_short --config.num_epochs=1 --config.seeds='(0,)'
"""

import ml_collections

from bn_lab import config as base


def add_probe_fields(config: ml_collections.ConfigDict) -> None:
  """This study's own fields: the probe of Figure 1 (b, c)."""
  # Every probe.every_steps steps (0: off; it must divide the steps per
  # epoch), the 15th, 25th, 50th, 75th and 85th percentiles of every input
  # to the last hidden layer's activation over the first probe.num_images
  # test images, in eval mode (studies.ioffe2015.probes; Ioffe & Szegedy's Figure 1b,
  # c). Written to metrics.jsonl as probe_steps and probe_percentiles.
  config.probe = ml_collections.ConfigDict()
  config.probe.every_steps = 0
  config.probe.num_images = 1000


def get_config(arg: str = "default"):
  config = base.get_config()
  config.init = arg or "default"
  config.study = ("Ioffe & Szegedy (2015), MNIST, BN before each sigmoid "
                  f"({config.init} initialization)")
  config.placements = ("none", "before_activation")
  config.widths = (100, 100, 100)
  config.activation = "sigmoid"
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.batch_size = 60
  config.num_epochs = 50
  config.bn.epsilon = 1e-5
  config.bn.unbiased_running_var = True
  config.seeds = (0, 1, 2, 3, 4)
  add_probe_fields(config)
  config.probe.every_steps = 500
  config.probe.num_images = 1000
  return config
