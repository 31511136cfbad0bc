r"""BN in a small DCGAN-style GAN on MNIST: does it reduce mode collapse?

    .venv/bin/python -m experiments.main --config=studies/gan/config.py --workdir=workdirs/gan

Every combination of the generator's normalization (batch | layer | none)
and the discriminator's (none | batch_separate: real and fake batches
normalized separately, in two calls, as DCGAN's code | batch_joint: one
call on both, one set of statistics), each trained with 3 seeds (vmapped),
non-saturating loss, Adam(2e-4, b1=0.5), batch 64, 1000 steps (5 epochs of
200; an "epoch" here is a chunk of steps, not a pass over the data). A CNN
classifier trained once by bn_lab.train (cached in the workdir) measures
10,000 samples per run: class coverage (entropy of the predicted-label
histogram, classes with >= 5%) and the Frechet distance to the test images
in its penultimate features. The nets are studies.gan.gan's; see docs/gan.md
for the measured time (14 minutes alone on a 2-core CPU).

`:short` is a smoke run (2 x 20 steps, 2 seeds, 2000 samples, the
classifier trained for 100 steps), of every pair of norms by default.

Short run (about 29 s on 2 CPU cores, measured 2026-12-07; `:short` for one
pair, DCGAN's: BN in the generator, separate real and fake batches in the
discriminator; one epoch of 20 steps, 500 samples per run):

    .venv/bin/python -m experiments.main --config=studies/gan/config.py:short --workdir=workdirs/gan_short --config.generator_norms="('batch',)" --config.discriminator_norms="('batch_separate',)" --config.num_epochs=1 --config.eval.num_samples=500 --config.eval.curve_samples=0
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.study = "BN in a DCGAN-style GAN on MNIST"

  c.dataset = "mnist"  # any IDX data set of 28x28 images (bn_lab.data)
  c.data_dir = ""  # "" = $BN_JAX_DATA_DIR, the cache, the bundled MNIST
  c.data_source = "auto"  # auto | idx | download | tfds

  # The study's variants: every pair of these (studies.gan.gan.GENERATOR_NORMS,
  # DISCRIMINATOR_NORMS), each one compiled program.
  c.generator_norms = ("none", "batch", "layer")
  c.discriminator_norms = ("none", "batch_separate", "batch_joint")

  c.latent_dim = 64
  c.generator_channels = (32, 16)  # at 7x7 and 14x14
  c.discriminator_channels = (16, 32)  # at 14x14 and 7x7
  c.output = "tanh"  # tanh (data in [-1, 1]) | sigmoid (data in [0, 1])
  c.conv = "auto"  # auto (im2col on a CPU, else xla) | im2col | xla

  # The normalization layers' options (bn_jax.nn.BatchNorm's arguments;
  # LayerNorm reads epsilon). Momentum 0.9 is PyTorch's 0.1, DCGAN's.
  c.bn = ml_collections.ConfigDict()
  c.bn.momentum = 0.9
  c.bn.epsilon = 1e-5
  c.bn.impl = "auto"  # auto | xla_cpu | plain

  c.learning_rate = 2e-4  # Adam for both nets, as DCGAN
  c.b1 = 0.5
  c.b2 = 0.999
  c.batch_size = 64
  c.steps_per_epoch = 200  # one D step + one G step each; a checkpoint,
  # metrics and sample grid after every epoch
  c.num_epochs = 5
  c.seeds = (0, 1, 2)
  # None: each seed's own data order; an int: every run sees that order.
  c.data_seed = config_dict.placeholder(int)
  c.keep_checkpoints = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 10000  # per run, at the end
  c.eval.curve_samples = 2000  # per run after every epoch; 0: none
  c.eval.grid_samples = 64  # a square: the final sample grid per run
  c.eval.epoch_grid_samples = 16  # per run after every epoch
  c.eval.chunk = 500  # samples per generator/classifier call

  # The evaluation classifier, trained once by bn_lab.train and cached in
  # <workdir>/classifier; its last hidden layer gives the features.
  c.classifier = ml_collections.ConfigDict()
  c.classifier.model = "cnn"  # cnn | mlp
  c.classifier.channels = (16, 32)
  c.classifier.widths = (64,)  # the last is the feature dimension
  c.classifier.placement = "before_activation"
  c.classifier.batch_size = 128
  c.classifier.learning_rate = 1e-3
  c.classifier.bn_momentum = 0.99
  c.classifier.num_epochs = 2
  # None: whole epochs; an int: at most this many steps per epoch.
  c.classifier.steps_per_epoch = config_dict.placeholder(int)
  c.classifier.seed = 0

  if arg == "short":
    c.study = "BN in a DCGAN-style GAN on MNIST (short)"
    c.steps_per_epoch = 20
    c.num_epochs = 2
    c.seeds = (0, 1)
    c.eval.num_samples = 2000
    c.eval.curve_samples = 500
    c.classifier.num_epochs = 1
    c.classifier.steps_per_epoch = 100
    c.classifier.bn_momentum = 0.9  # running statistics warm in 100 steps
  elif arg:
    raise ValueError(f"studies/gan/config.py:{arg}: the variants are '' (the "
                     "study) and 'short'.")
  return c
