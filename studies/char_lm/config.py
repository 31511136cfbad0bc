r"""Character-level language models: BN-LSTM, LN-LSTM and LSTM, in bits per character.

    .venv/bin/python -m experiments.main --config=studies/char_lm/config.py --workdir=workdirs/char_lm

Cooijmans et al. (2016, "Recurrent Batch Normalization") report that the
BN-LSTM reaches a lower bits per character than the LSTM on character-level
Penn Treebank, converges faster, and generalizes to sequences longer than
those it was trained on when steps past T_max use the statistics of T_max.
Penn Treebank does not ship in a package; English text does: Debian's
`fortunes` (bn_lab.text). As the paper: one LSTM layer on one-hot
characters, training windows of T_max characters from random starting
points, each from h_0 = c_0 = 0, no truncated state carried between
windows; Adam; gradients clipped to global norm 1; BN per time step with
epsilon 1e-5 and gammas from 0.1 (LN's from 1, Ba et al.'s initialization).
Smaller than the paper's, for a 2-core CPU: 128 units instead of 1000,
T_max 50 instead of 100, batch 32 instead of 64, 3,000 steps. Population
statistics are recomputed after training (momentum=None over
`population_batches` training batches), as the paper's "estimated over the
whole training set".

Short run (about 30 s on 2 CPU cores, measured 2026-12-07; 2 seeds of 32
units, 40 steps of windows of 12 characters):

    .venv/bin/python -m experiments.main --config=studies/char_lm/config.py:short --workdir=workdirs/char_lm_short
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.study = "BN-LSTM, LN-LSTM and LSTM character-level language models"
  c.norms = ("none", "layer", "batch")  # bn_jax.recurrent.NORMS
  c.seeds = (0, 1, 2, 3, 4)
  c.hidden_size = 128
  c.seq_len = 50  # T_max: training windows, and BN's statistics slots
  c.batch_size = 32
  c.steps = 3000
  c.learning_rate = 2e-3  # Adam
  c.grad_clip_norm = 1.0
  c.eval_every = 250  # steps between validation bpc measurements
  c.eval_chars = 40_000  # validation characters per measurement
  c.long_factor = 4  # test windows this many times T_max long
  c.population_batches = 100
  c.bn = ml_collections.ConfigDict()
  c.bn.momentum = 0.99  # the running averages behind the curves
  c.bn.epsilon = 1e-5  # the paper's; LN reads it too
  c.bn.scale_init = 0.1  # the paper's gamma for BN
  c.layer_scale_init = 1.0  # LN's gamma (Ba et al.)
  c.progress_seconds = 30.0
  if arg == "short":
    c.seeds = (0, 1)
    c.hidden_size = 32
    c.seq_len = 12
    c.batch_size = 8
    c.steps = 40
    c.eval_every = 20
    c.eval_chars = 2_000
    c.long_factor = 2
    c.population_batches = 4
    c.progress_seconds = 0.0
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'short'.")
  return c
