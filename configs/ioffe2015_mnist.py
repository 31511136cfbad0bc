r"""Ioffe & Szegedy (2015), Section 4.1: MNIST with and without BN.

    python -m experiments.main --config=configs/ioffe2015_mnist.py --workdir=workdirs/ioffe2015

3 fully connected hidden layers of 100 sigmoid units, batch 60, 50,000 steps
(50 epochs of 1,000 steps), BN before each sigmoid (as in the paper) vs no
BN. The paper does not state the optimizer; plain SGD with learning rate 0.5
trains both variants here. Population statistics: the running average with
the unbiased variance of the paper's Algorithm 2.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.study = "Ioffe & Szegedy (2015), MNIST, BN before each sigmoid"
  config.placements = ("none", "before_activation")
  config.widths = (100, 100, 100)
  config.activation = "sigmoid"
  config.optimizer = "sgd"
  config.learning_rate = 0.5
  config.batch_size = 60
  config.num_epochs = 50
  config.bn.epsilon = 1e-5
  config.bn.unbiased_running_var = True
  config.seeds = (0,)
  return config
