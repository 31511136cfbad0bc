r"""Where BN goes, for which activation: every placement x 5 seeds (MLP).

    .venv/bin/python -m experiments.main --config=studies/placements/config.py --workdir=workdirs/placement_study
    .venv/bin/python -m experiments.main --config=studies/placements/config.py:cnn --workdir=workdirs/placement_study_cnn

The reference MLP (784 -> Dense(50) -> act -> Dense(10), Adam 1e-3, batch
128, 10 epochs) with relu and with sigmoid, each with BN nowhere
(`none`), before the activation (Ioffe & Szegedy), after it (common Keras
code) and on the input only, 5 seeds. `:cnn`: the small CNN (conv 16 ->
conv 32 -> Dense(64), relu), 3 seeds, 3 epochs, its channels halved from
studies/placements/main_job.py's so that it fits in about 20 minutes on a 2-core CPU.

Short run (about 10 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed, relu, BN nowhere and before the activation; the source of
studies/domain_shift/config.py's short run):

    .venv/bin/python -m experiments.main --config=studies/placements/config.py --workdir=workdirs/placement_study_short --config.num_epochs=1 --config.seeds='(0,)' --config.placements="('none','before_activation')" --config.activations="('relu',)"

Short run of `:cnn` (about 14 s on 2 CPU cores, measured 2026-12-07; one
epoch, one seed, BN before the activation only, the convolutions cut to 4
and 8 channels: a smoke run of the code path):

    .venv/bin/python -m experiments.main --config=studies/placements/config.py:cnn --workdir=workdirs/placement_study_cnn_short --config.num_epochs=1 --config.seeds='(0,)' --config.placements="('before_activation',)" --config.channels='(4,8)'
"""

from bn_lab import config as base


def get_config(arg: str = "mlp"):
  config = base.get_config()
  config.model = arg or "mlp"
  config.placements = ("none", "before_activation", "after_activation",
                       "input")
  if config.model == "cnn":
    config.study = "where BN goes (cnn, relu)"
    config.channels = (16, 32)
    config.widths = (64,)
    config.num_epochs = 3
    config.seeds = (0, 1, 2)
  else:
    config.study = "where BN goes, for relu and sigmoid (mlp)"
    config.activations = ("relu", "sigmoid")
    config.seeds = (0, 1, 2, 3, 4)
  config.target_accuracy = 0.98
  return config
