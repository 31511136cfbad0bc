r"""Can you remove BN? BN and its replacements in a ResNet, batch 2 to 512.

    .venv/bin/python -m experiments.main --config=studies/remove_bn/config.py --workdir=workdirs/remove_bn

ResNet-8 (bn_lab.resnet: a strided 3x3 stem, three stages of one basic
block at widths 8, 16, 32, global average pooling, Dense(10)) on
Fashion-MNIST at batch sizes 2, 16, 128 and 512, one epoch over a fixed
16,000-example subset of its training set (`train_examples`: 8,000 steps at
batch 2, 31 at batch 512), 5 seeds vmapped per program, one data order for
every run. SGD with Nesterov momentum 0.9 and a cosine decay to 0, the learning rate
0.1 x B / 256 (Goyal et al.'s linear rule, the GN and NF papers' base rate);
no rate is tuned, so nothing is selected and no validation split is needed.
The variants (`variant_settings`), each at every batch size:

  bn           BatchNorm after every convolution (He et al.)
  gn           GroupNorm, 4 groups (Wu & He 2018; our widths 8-32 leave
               no room for their 32 groups)
  ln           LayerNorm (one group)
  frn          FRN + TLU (Singh & Krishnan 2020), in place of BN + ReLU
  evonorm_s0   EvoNorm-S0, 4 groups (Liu et al. 2020)
  evonorm_b0   EvoNorm-B0 (batch variance, running average in eval)
  ws_gn        Weight Standardization + GroupNorm (Qiao et al. 2019)
  nf           no norm: Scaled WS + SkipInit + Adaptive Gradient Clipping
               (Brock et al. 2021a/b), AGC's clip 0.16 at batch 256,
               scaled as 1 / the rate's factor (bn_lab/config.py, agc_clip)
  skip_init    no norm, SkipInit alone (De & Smith 2020)
  none         no norm, nothing else

A run whose training loss becomes non-finite or explodes is frozen and
reported as diverged (`nan_guard="record"`), never averaged in.

Short run (about 60 s on 2 CPU cores, measured 2026-12-08; BN and NF at
batch 64, 2 seeds, 512 examples):

    .venv/bin/python -m experiments.main --config=studies/remove_bn/config.py --workdir=workdirs/remove_bn_short --config.variants="('bn','nf')" --config.batch_sizes='(64,)' --config.seeds='(0,1)' --config.train_examples=512
"""

from bn_lab import config as base

BATCH_SIZES = (2, 16, 128, 512)
NO_NORM = {"norm": "none", "placement": "none"}
VARIANTS = {
    "bn": {"norm": "batch"},
    "gn": {"norm": "group"},
    "ln": {"norm": "layer"},
    "frn": {"norm": "frn"},
    "evonorm_s0": {"norm": "evonorm_s0"},
    "evonorm_b0": {"norm": "evonorm_b0"},
    "ws_gn": {"norm": "group", "resnet": {"standardize": "ws"}},
    "nf": {**NO_NORM, "agc_clip": 0.16,
           "resnet": {"standardize": "scaled", "skip_init": True}},
    "skip_init": {**NO_NORM, "resnet": {"skip_init": True}},
    "none": dict(NO_NORM),
}


def get_config():
  config = base.get_config()
  config.study = "can you remove BN? (ResNet-8, Fashion-MNIST, batch 2-512)"
  config.dataset = "fashion_mnist"
  config.model = "resnet"
  config.channels = (8, 16, 32)
  config.resnet.blocks_per_stage = 1
  config.resnet.stem_stride = 2
  config.placement = "before_activation"
  config.bn.num_groups = 4
  config.bn.momentum = 0.9  # PyTorch's 0.1, the papers' code
  config.bn.epsilon = 1e-5
  config.optimizer = "momentum"
  config.schedule = "cosine"
  config.learning_rate = 0.1
  config.lr_scaling = "linear"
  config.lr_reference_batch_size = 256
  config.train_examples = 16000
  config.num_epochs = 1
  config.seeds = (0, 1, 2, 3, 4)
  config.data_seed = 0
  config.nan_guard = "record"
  config.batch_sizes = BATCH_SIZES
  config.variants = tuple(VARIANTS)
  config.variant_settings = VARIANTS
  config.target_accuracy = 0.85
  return config
