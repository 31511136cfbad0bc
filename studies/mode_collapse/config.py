r"""BN against mode collapse: the GAN study's nets on Stacked-MNIST.

    .venv/bin/python -m experiments.main --config=studies/mode_collapse/config.py --workdir=workdirs/mode_collapse

Generator norm (batch | none) x discriminator norm (none | batch_separate:
real and fake batches normalized separately, as DCGAN's code), 10 seeds
each (vmapped), the nets, loss and Adam(2e-4, b1=0.5) of studies/gan with
3-channel images, batch 32, 20 x 100 steps (an "epoch" is a chunk of
steps, not a pass over the 60,000 images). Each run is measured on 10,000
samples (VEEGAN and PacGAN use 26,000; the time budget): modes covered of
1,000 and KL(mode histogram || uniform), each channel read by an MNIST
classifier trained here (cached in the workdir); after every epoch on
1,000 samples (the plateau curve). A run with fewer than `collapse_modes` modes covered
counts as collapsed. See docs/mode_collapse.md for the measured time.

Short run (about 38 s on 2 CPU cores, measured 2026-12-08; at a load
average of 1 to 2, 57 s of CPU time. `:short` is a smoke run: 2 variants x 2
seeds x 2 epochs of 10 steps, 1,000 samples per run):

    .venv/bin/python -m experiments.main --config=studies/mode_collapse/config.py:short --workdir=workdirs/mode_collapse_short
"""

import ml_collections

from studies.gan import config as gan_config


def get_config(arg: str = ""):
  if arg not in ("", "short"):
    raise ValueError(f"studies/mode_collapse/config.py:{arg}: the variants "
                     "are '' (the study) and 'short'.")
  # The GAN study's config (same fields, same meaning), then this study's.
  c = gan_config.get_config(arg)
  c.study = "BN against mode collapse on Stacked-MNIST"
  c.generator_norms = ("batch", "none")
  c.discriminator_norms = ("none", "batch_separate")
  c.seeds = tuple(range(10))
  # Sized to the 40-minute budget on the 2-core CPU (measured 2026-12-08:
  # 800 steps took 15.5 minutes alone and every variant was still gaining
  # modes): batch 32, 2,000 steps (an epoch here is a chunk of 100 steps,
  # one point of the plateau curve).
  c.batch_size = 32
  c.steps_per_epoch = 100
  c.num_epochs = 20

  # Stacked-MNIST (bn_lab.synthetic.load_stacked_mnist) from MNIST's
  # splits: each channel an independent uniform draw.
  c.stacked = ml_collections.ConfigDict()
  c.stacked.num_train = 60000
  c.stacked.num_test = 10000  # the reference: real images, as many as samples
  c.stacked.seed = 0

  # Per run at the end: 10,000, not VEEGAN's and PacGAN's 26,000 (the time
  # budget; 10,000 uniform samples cover 1,000 modes but for 0.05 expected).
  c.eval.num_samples = 10000
  c.eval.curve_samples = 1000  # per run after every epoch; 0: none
  c.eval.grid_samples = 16
  c.eval.epoch_grid_samples = 16  # read by the GAN study's checks only
  c.eval.chunk = 500
  # A run covering fewer modes (of 1,000, in eval.num_samples samples)
  # counts as collapsed; fixed before the full run.
  c.collapse_modes = 500

  if arg == "short":
    # A smoke run of the whole pipeline (no result): 2 variants x 2 seeds
    # x 2 epochs of 10 steps, a classifier of 50 steps, 1,000 samples.
    c.study = "BN against mode collapse on Stacked-MNIST (short)"
    c.discriminator_norms = ("batch_separate",)
    c.seeds = (0, 1)
    c.steps_per_epoch = 10
    c.num_epochs = 2
    c.stacked.num_train = 1000
    c.stacked.num_test = 1000
    c.eval.num_samples = 1000
    c.eval.curve_samples = 200
    c.eval.grid_samples = 4
    c.classifier.steps_per_epoch = 50
  return c
