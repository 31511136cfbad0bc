r"""Where BN goes, for which activation: every placement x 5 seeds (MLP).

    python -m experiments.main --config=studies/placements/config.py --workdir=workdirs/placement_study

The reference MLP (784 -> Dense(50) -> act -> Dense(10), Adam 1e-3, batch
128, 10 epochs) with relu and with sigmoid, each with BN nowhere
(`none`), before the activation (Ioffe & Szegedy), after it (common Keras
code) and on the input only, 5 seeds. `:cnn`: the small CNN (conv 16 ->
conv 32 -> Dense(64), relu), 3 seeds, 3 epochs, its channels halved from
studies/placements/main_job.py's so that it fits in about 20 minutes on a 2-core CPU.
A short run: --config.num_epochs=1 --config.seeds='(0,1)' (MLP); for
`:cnn`, --config.num_epochs=1 --config.seeds='(0,)'
--config.placements="('none','before_activation')".
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
