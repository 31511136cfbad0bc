r"""Transfer learning with BN: pretrain on digits 0-4, a new readout for 5-9.

    .venv/bin/python -m experiments.main --config=studies/transfer/config.py --workdir=workdirs/transfer

Ioffe & Szegedy's MNIST network (784 -> 3 x Dense(100) -> readout, the
normalization before each sigmoid, as in their Section 4.1) with BN, with
LayerNorm, and without normalization, 5 seeds each (vmapped), pretrained by
Adam(1e-3) for 5 epochs of batch 128 on the 30,596 training images of
digits 0-4. Then a fresh 5-way Dense readout for digits 5-9 (relabeled
0-4), learned from 100 or 1,000 labeled training images of 5-9 (the same
number per class, a different subset per seed) for 2,000 Adam steps of
batch 50 (learning rate 1e-3; 1e-2 where only the readout trains).
5,000 of the 29,404 training images of 5-9 are held out first as
validation images; budgets come from the other 24,404.
Variants (studies.transfer.transfer): frozen (only the readout trains, BN's running
statistics from pretraining), recomputed (BN's statistics first recomputed
on the labeled budget's images), recomputed_unlabeled (on the 24,404
training images of 5-9 outside the validation part, labels unused: AdaBN's
operation, here under a label shift), trained (fine-tune everything, BN in
training mode) and scratch (no pretraining). Where only the readout trains,
a convex probe scores the features (studies.transfer.probe: multinomial
logistic regression, L2 penalty chosen by 5-fold cross-validation on the
budget, solved by L-BFGS in float64 to a gradient tolerance of 1e-6),
beside the features' effective rank and sigmoid saturation on the
validation images. Score: test accuracy on the 4,861 test images of 5-9,
the page pairing cells seed by seed (one labeled subset per seed). A rerun
reuses the pretrained networks saved in the workdir.

The network with 3 BN layers between nonlinearities, not the reference
MLP's single BN after the last ReLU: there BN is a per-feature affine map
right before the new readout, which the readout absorbs, so frozen and
recomputed statistics could differ only in optimization.

`:short` is a smoke run: BN and no norm, 2 seeds, 1 pretraining epoch,
the budget of 100, 200 transfer steps, the probe's penalty from 2 values
by 2 folds.

Short run (about 17 s on 2 CPU cores, measured 2026-12-08; under load from
other sessions; `:short` with BN only, every variant):

    .venv/bin/python -m experiments.main --config=studies/transfer/config.py:short --workdir=workdirs/transfer_short --config.norms="('batch',)"
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.study = "Transfer learning with BN: digits 0-4 -> 5-9"

  c.dataset = "mnist"  # any IDX data set of 28x28 images (bn_lab.data)
  c.data_dir = ""  # "" = $BN_JAX_DATA_DIR, the cache, the bundled MNIST
  c.data_source = "auto"  # auto | idx | download | tfds
  c.input_scaling = "unit"  # unit | standardize | raw
  c.source_classes = (0, 1, 2, 3, 4)  # pretraining
  c.target_classes = (5, 6, 7, 8, 9)  # transfer, relabeled 0..C-1

  # The network: 784 -> widths -> readout (an MLP of bn_lab.models), the
  # norm before (or after) each activation; "none" has no normalization.
  c.norms = ("batch", "layer", "none")  # batch | layer | none
  c.widths = (100, 100, 100)
  c.activation = "sigmoid"  # relu | sigmoid | tanh
  c.placement = "before_activation"  # before_activation | after_activation
  c.bn = ml_collections.ConfigDict()
  c.bn.momentum = 0.99  # flax convention (PyTorch's 0.01)
  c.bn.epsilon = 1e-5  # LayerNorm reads it too

  c.seeds = (0, 1, 2, 3, 4)

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.learning_rate = 1e-3  # Adam
  c.pretrain.batch_size = 128
  c.pretrain.num_epochs = 5

  c.transfer = ml_collections.ConfigDict()
  # Labeled training images of the target classes per run, the same number
  # of each class.
  c.transfer.budgets = (100, 1000)
  # frozen | recomputed | recomputed_unlabeled | trained | scratch
  # (studies.transfer.transfer; the recomputed ones only for BN).
  c.transfer.variants = ("frozen", "recomputed", "recomputed_unlabeled",
                         "trained", "scratch")
  c.transfer.learning_rate = 1e-3  # Adam: trained, scratch
  # Adam for the readout-only variants (frozen, recomputed*): a linear
  # readout on fixed sigmoid features converges slowly, so it gets a larger
  # rate than the variants that train every layer, to come near its optimum
  # within the same number of steps.
  c.transfer.readout_learning_rate = 1e-2
  c.transfer.batch_size = 50  # or the whole budget where it is smaller
  c.transfer.steps = 2000  # rounded up to whole passes over the budget
  # recomputed_unlabeled: the target images in batches of this many (the
  # last partial batch is left out); the estimate is their exact mean and
  # variance whatever the size.
  c.transfer.recompute_chunk = 1000
  # Target training images held out (drawn by validation_seed) before any
  # budget is drawn: the page picks each norm's best variant on them, and
  # the features' rank and saturation are measured on them; budgets and
  # the unlabeled pool come from the rest. The test set is read only for
  # the final numbers.
  c.transfer.validation_images = 5000
  c.transfer.validation_seed = 0
  # The convex probe of the readout-only variants (studies.transfer.probe):
  # its L2 penalty chosen among these by this many stratified folds of the
  # budget.
  c.transfer.probe_l2_grid = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
  c.transfer.probe_folds = 5

  if arg == "short":
    c.study = "Transfer learning with BN: digits 0-4 -> 5-9 (short)"
    c.seeds = (0, 1)
    c.norms = ("batch", "none")
    c.pretrain.num_epochs = 1
    c.transfer.budgets = (100,)
    c.transfer.steps = 200
    c.transfer.probe_l2_grid = (1e-3, 1e-2)
    c.transfer.probe_folds = 2
  elif arg:
    raise ValueError(f"studies/transfer/config.py:{arg}: the variants are '' (the "
                     "study) and 'short'.")
  return c
