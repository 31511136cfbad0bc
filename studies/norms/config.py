r"""The normalization family side by side on the reference MLP, 3 seeds.

    .venv/bin/python -m experiments.main --config=studies/norms/config.py --workdir=workdirs/norms

Every layer of bn_lab.models.NORMS that suits an MLP after its ReLU:
batch (plain BN), renorm (Batch Renormalization; its clipping relaxed over
training, `bn.renorm_schedule`), ghost (statistics per 32 examples of each
batch of 128), sampled (statistics from every 4th example), layer, group (5
groups of 10 of the 50 features), rms, and none (no normalization). Instance
norm needs conv features (`:cnn`). Exact population statistics (PreciseBN,
100 batches) are recomputed after each epoch beside the moving averages.
Otherwise the reference Keras model, 3 epochs.

Short run (about 14 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, batch norm, layer norm and none):

    .venv/bin/python -m experiments.main --config=studies/norms/config.py --workdir=workdirs/norms_short --config.num_epochs=1 --config.seeds='(0,)' --config.norms="('batch','layer','none')"
"""

from bn_lab import config as base


def get_config(arg: str = "mlp"):
  config = base.get_config()
  config.model = arg or "mlp"
  config.study = f"the normalization family ({config.model})"
  config.norms = ("batch", "renorm", "ghost", "sampled", "layer", "group",
                  "rms", "none")
  config.num_epochs = 3
  config.precise_bn.num_batches = 100
  if config.model == "cnn":
    config.widths = ()  # conv features only, so that instance norm fits
    config.channels = (30, 60)  # divisible by bn.num_groups = 5
    config.norms = (*config.norms[:-1], "instance", "none")
  return config
