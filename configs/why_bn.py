r"""Why BN helps: Santurkar et al. (2018)'s measurements on MNIST.

    python -m experiments.main --config=configs/why_bn.py --workdir=workdirs/why_bn_ics

runs the variant `ics` (the default); the other two:

    python -m experiments.main --config=configs/why_bn.py:ics_mlp --workdir=workdirs/why_bn_ics_mlp
    python -m experiments.main --config=configs/why_bn.py:landscape --workdir=workdirs/why_bn_landscape

"How Does Batch Normalization Help Optimization?" (NeurIPS 2018) tests the
2015 explanation, that BN reduces internal covariate shift (ICS), and offers
another, that BN smooths the loss landscape. The measurements are
bn_jax.landscape's, taken by the trainer on the training batch of every
k-th step, at the state before that step's update (config.ics,
config.landscape in configs/base.py).

Variants (the argument after the colon):
  ics        The Ioffe net of configs/ioffe2015_mnist.py (784 -> 3 x
             Dense(100) -> [norm] -> sigmoid -> Dense(10), SGD 0.5, batch
             60, 50 epochs = 50,000 steps) as standard (norm none), BN and
             noisy BN (norm noisy_batch: BN then the paper's Algorithm 1
             noise, config.noisy_bn), 3 seeds; ICS of every layer every
             250 steps (200 measurements per run).
  ics_mlp    The reference MLP of configs/base.py (784 -> Dense(50, relu)
             -> [norm] -> Dense(10), Adam 1e-3, batch 128, 10 epochs), the
             same three norms, 3 seeds; ICS every 78 steps (6 per epoch).
             ICS uses Adam's actual update of the step.
  landscape  The Ioffe net with and without BN (placements none and
             before_activation), 3 seeds; every 250 steps, along the
             gradient at 8 step sizes evenly spaced over [0.5, 4] x the
             learning rate 0.5, i.e. eta in {0.25, 0.5, ..., 2.0} (the
             paper's VGG grid, [1/2, 4] x its learning rate): the loss at
             each, the gradient's l2 change, and the largest change per
             distance.

Short variants (under a minute each; one epoch, one seed: ics and
landscape 1,000 steps and 4 measurements per run, ics_mlp 468 steps and 6):

    python -m experiments.main --config=configs/why_bn.py:ics --workdir=/tmp/why_bn_short --config.num_epochs=1 --config.seeds='(0,)'
    python -m experiments.main --config=configs/why_bn.py:ics_mlp --workdir=/tmp/why_bn_ics_mlp_short --config.num_epochs=1 --config.seeds='(0,)'
    python -m experiments.main --config=configs/why_bn.py:landscape --workdir=/tmp/why_bn_landscape_short --config.num_epochs=1 --config.seeds='(0,)'

With one seed the page's verdicts read "undetermined" (no seed noise to
judge a difference by); --config.seeds='(0, 1)' gives verdicts.
"""

from configs import base
from configs import ioffe2015_mnist

VARIANTS = ("ics", "ics_mlp", "landscape")


def get_config(arg: str = "ics"):
  arg = arg or "ics"
  if arg not in VARIANTS:
    raise ValueError(f"configs/why_bn.py:{arg}: choose one of {VARIANTS}.")
  if arg == "ics_mlp":
    config = base.get_config()
    config.study = ("Santurkar et al. (2018): internal covariate shift of "
                    "the reference MLP, standard / BN / noisy BN")
    config.norms = ("none", "batch", "noisy_batch")
    config.ics.every_steps = 78  # 468 steps per epoch
    return config
  config = ioffe2015_mnist.get_config()
  config.probe.every_steps = 0  # Figure 1's probe belongs to ioffe2015
  config.placements = ()
  config.placement = "before_activation"
  if arg == "ics":
    config.study = ("Santurkar et al. (2018): internal covariate shift of "
                    "the Ioffe net, standard / BN / noisy BN")
    config.norms = ("none", "batch", "noisy_batch")
    config.ics.every_steps = 250
  else:
    config.study = ("Santurkar et al. (2018): the loss landscape of the "
                    "Ioffe net with and without BN")
    config.placements = ("none", "before_activation")
    config.landscape.every_steps = 250
    config.landscape.step_factors = (0.5, 4.0)
    config.landscape.num_step_sizes = 8
  return config
