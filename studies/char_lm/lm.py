"""The character-level language-model study: BN-LSTM, LN-LSTM and LSTM.

One LSTM layer (`bn_jax.recurrent`) reads one-hot characters and a Dense
layer predicts the next one. Every seed of a norm trains at once (vmapped);
seed i of every norm shares the LSTM's and the readout's initial weights
(one key, `init_model`) and the training windows, so that norms compare
pairwise by seed. Bits per character (bpc) are the mean negative log
likelihood over predicted characters, in bits.

Evaluation reads held-out text in non-overlapping windows, each from
h_0 = c_0 = 0 as in training: windows of T_max characters for the curves
and the final bpc, and windows of `long_factor` x T_max characters for the
generalization to longer sequences, where the BN-LSTM's steps past T_max
read the statistics of the last slot (`bn_jax.recurrent`'s convention, the
paper's).
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bn_jax import recurrent
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import text
from bn_lab import workdir as workdir_lib

NORMS = recurrent.NORMS
LOG2 = math.log(2.0)


class Model(NamedTuple):
  lstm: recurrent.LSTMParams
  readout_kernel: jax.Array  # (H, V)
  readout_bias: jax.Array  # (V,)


# ----------------------------------------------------------------------------
# The model.


def scale_init(config, norm: str) -> float | None:
  """gamma's initial value: the paper's 0.1 for BN, 1 for LN."""
  return {"batch": config.bn.scale_init,
          "layer": config.layer_scale_init}.get(norm)


def init_model(key: jax.Array, vocab_size: int, config, norm: str):
  """(Model, per-step statistics or None) of one seed; the same key gives
  every norm the same W_x, W_h, bias and readout."""
  lstm_key, readout_key = jax.random.split(key)
  lstm = recurrent.init_params(lstm_key, vocab_size, config.hidden_size,
                               norm=norm, scale_init=scale_init(config, norm))
  kernel = jax.nn.initializers.lecun_normal()(
      readout_key, (config.hidden_size, vocab_size))
  stats = (recurrent.init_stats(config.hidden_size, config.seq_len)
           if norm == "batch" else None)
  return Model(lstm, kernel, jnp.zeros((vocab_size,))), stats


def log_likelihoods(model: Model, stats, windows, *, norm: str,
                    training: bool, momentum, epsilon: float):
  """(per-character negative log likelihood (B, T), new statistics) of
  `windows` (B, T + 1): characters 0..T-1 predict 1..T."""
  vocab_size = model.readout_bias.shape[0]
  x = jax.nn.one_hot(windows[:, :-1], vocab_size)
  hs, new_stats = recurrent.unroll(model.lstm, stats, x, norm=norm,
                                   training=training, momentum=momentum,
                                   epsilon=epsilon)
  logits = hs @ model.readout_kernel + model.readout_bias[None, None, :]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                        windows[:, 1:])
  return nll, new_stats


def optimizer(config) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.adam(config.learning_rate))


# ----------------------------------------------------------------------------
# Training and evaluation, all seeds at once.


def gather_windows(ids: jax.Array, starts: jax.Array, length: int):
  """(B, length) windows of `ids` starting at `starts` (B,)."""
  return ids[starts[:, None] + jnp.arange(length)[None, :]]


def make_train_chunk(config, norm: str):
  """jit(seeds' states, ids, starts (S, steps, B)) -> (states, mean loss
  per seed and step (S, steps)): `steps` Adam steps of every seed."""
  tx = optimizer(config)
  momentum, epsilon = config.bn.momentum, config.bn.epsilon
  length = config.seq_len + 1

  def loss_fn(model, stats, windows):
    nll, new_stats = log_likelihoods(model, stats, windows, norm=norm,
                                     training=True, momentum=momentum,
                                     epsilon=epsilon)
    return jnp.mean(nll), new_stats

  def one_seed(state, ids, starts):
    def body(state, step_starts):
      model, stats, opt_state = state
      windows = gather_windows(ids, step_starts, length)
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          model, stats, windows)
      updates, opt_state = tx.update(grads, opt_state, model)
      return (optax.apply_updates(model, updates), stats, opt_state), loss
    return lax.scan(body, state, starts)

  return jax.jit(jax.vmap(one_seed, in_axes=(0, None, 0)))


def init_states(config, vocab_size: int, norm: str):
  """Every seed's (model, statistics, optimizer state), stacked."""
  keys = jnp.stack([jax.random.key(seed) for seed in config.seeds])
  models, stats = jax.vmap(
      lambda k: init_model(k, vocab_size, config, norm))(keys)
  return models, stats, jax.vmap(optimizer(config).init)(models)


def eval_windows(ids: np.ndarray, length: int, limit: int | None = None):
  """Non-overlapping windows (n, length + 1) of held-out `ids`: each
  window's last character is the next one's first, so every character
  after the first is predicted once; `limit` caps the characters read."""
  ids = ids[:limit] if limit else ids
  n = (ids.size - 1) // length
  if n < 1:
    raise ValueError(f"held-out text of {ids.size} characters has no "
                     f"window of {length + 1}; use a shorter seq_len.")
  starts = np.arange(n) * length
  return ids[starts[:, None] + np.arange(length + 1)]


def make_evaluate(config, norm: str, chunk: int = 256):
  """jit(models, stats, windows (n, L + 1)) -> mean bpc per seed and
  position (S, L), in eval mode (running or population statistics)."""
  epsilon = config.bn.epsilon

  def one_seed(model, stats, windows):
    def body(total, batch):
      nll, _ = log_likelihoods(model, stats, batch, norm=norm,
                               training=False, momentum=None,
                               epsilon=epsilon)
      return total + jnp.sum(nll, axis=0), None
    n = windows.shape[0] // chunk * chunk
    total = jnp.zeros((windows.shape[1] - 1,))
    if n:
      total, _ = lax.scan(body, total, windows[:n].reshape(
          -1, chunk, windows.shape[1]))
    if n < windows.shape[0]:
      total, _ = body(total, windows[n:])
    return total / windows.shape[0] / LOG2

  return jax.jit(jax.vmap(one_seed, in_axes=(0, 0, None)))


def population_statistics(config, models, ids: jax.Array, norm: str):
  """The BN-LSTM's per-step statistics averaged exactly (momentum=None)
  over `population_batches` training batches (one draw for every seed);
  None for the other norms."""
  if norm != "batch":
    return None
  rng = np.random.default_rng(10_000)
  length = config.seq_len + 1
  starts = jnp.asarray(rng.integers(
      0, ids.shape[0] - length,
      (config.population_batches, config.batch_size)))

  def one_seed(model):
    def body(stats, step_starts):
      _, stats = log_likelihoods(
          model, stats, gather_windows(ids, step_starts, length), norm=norm,
          training=True, momentum=None, epsilon=config.bn.epsilon)
      return stats, None
    stats, _ = lax.scan(body, recurrent.init_stats(config.hidden_size,
                                                   config.seq_len), starts)
    return stats
  return jax.jit(jax.vmap(one_seed))(models)


def training_starts(config, num_ids: int, first_step: int, steps: int):
  """(S, steps, B) window starts: seed s's draw for steps
  first_step..first_step + steps - 1, the same for every norm."""
  high = num_ids - config.seq_len - 1
  return np.stack([
      np.random.default_rng([seed, first_step]).integers(
          0, high, (steps, config.batch_size))
      for seed in config.seeds])


# ----------------------------------------------------------------------------
# The study.


def validate_config(config) -> None:
  sweep.check_choices("norms", config.norms, NORMS)
  for field in ("hidden_size", "seq_len", "batch_size", "steps",
                "eval_every", "eval_chars", "long_factor",
                "population_batches"):
    value = config[field]
    sweep.check(isinstance(value, int) and not isinstance(value, bool)
                and value >= 1, field, value, "must be a positive integer")
  sweep.check(config.steps % config.eval_every == 0, "steps", config.steps,
              f"must be a multiple of eval_every={config.eval_every}")
  sweep.check(len(config.seeds) >= 1 and len(set(config.seeds)) == len(
      config.seeds), "seeds", config.seeds, "must be distinct, at least one")
  sweep.check(config.learning_rate > 0, "learning_rate",
              config.learning_rate, "must be positive")
  sweep.check(config.bn.epsilon > 0, "bn.epsilon", config.bn.epsilon,
              "must be positive")
  sweep.check(config.bn.momentum is not None and 0 <= config.bn.momentum < 1,
              "bn.momentum", config.bn.momentum, "must be in [0, 1)")


def load_data(config) -> tuple[dict[str, Any], str]:
  """The corpus as character ids (train, validation, test) and its
  vocabulary, from the installed package (bn_lab.text)."""
  corpus = text.load_fortunes()
  vocab = text.build_vocabulary(corpus.train)
  data = {"vocab": vocab, "counts": corpus.counts.to_dict(), **{
      split: vocab.encode(corpus.split(split))
      for split in ("train", "validation", "test")}}
  long_chars = config.seq_len * config.long_factor + 1
  for split in ("validation", "test"):
    if data[split].size < long_chars:
      raise sweep.ConfigError(
          f"the {split} text has {data[split].size} characters, fewer than "
          f"one window of seq_len x long_factor + 1 = {long_chars}.")
  logging.info("%s: %d / %d / %d characters (train / validation / test), "
               "%d symbols", corpus.origin, data["train"].size,
               data["validation"].size, data["test"].size, vocab.size)
  return data, corpus.origin


def _bpc_parts(per_position: np.ndarray, t_max: int) -> dict[str, list]:
  """Per seed: bpc over positions < T_max and >= T_max of long windows."""
  return {"within_t_max": per_position[:, :t_max].mean(axis=1).tolist(),
          "past_t_max": per_position[:, t_max:].mean(axis=1).tolist()}


def train_norm(config, norm: str, data, writer) -> dict[str, Any]:
  """Trains every seed of `norm`, writing the curves; returns its result."""
  started = time.perf_counter()
  vocab_size = data["vocab"].size
  ids = jnp.asarray(data["train"])
  models, stats, opt_states = init_states(config, vocab_size, norm)
  train_chunk = make_train_chunk(config, norm)
  evaluate = make_evaluate(config, norm)
  valid = jnp.asarray(eval_windows(data["validation"], config.seq_len,
                                   config.eval_chars))
  writer.start(norm)
  curve = {"step": [], "valid_bpc": [], "train_bpc": []}
  chunks = config.steps // config.eval_every
  for chunk in range(1, chunks + 1):
    starts = training_starts(config, ids.shape[0],
                             (chunk - 1) * config.eval_every,
                             config.eval_every)
    (models, stats, opt_states), losses = train_chunk(
        (models, stats, opt_states), ids, jnp.asarray(starts))
    losses = np.asarray(losses)
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(
          f"[{norm}] the training loss is not finite by step "
          f"{chunk * config.eval_every} (seeds "
          f"{[s for s, l in zip(config.seeds, losses) if not np.all(np.isfinite(l))]}); "
          "lower learning_rate or raise bn.epsilon.")
    step = chunk * config.eval_every
    train_bpc = losses.mean(axis=1) / LOG2
    valid_bpc = np.asarray(evaluate(models, stats, valid)).mean(axis=1)
    curve["step"].append(step)
    curve["train_bpc"].append(train_bpc.tolist())
    curve["valid_bpc"].append(valid_bpc.tolist())
    writer.write(norm, step, {"train_bpc": train_bpc, "valid_bpc": valid_bpc})
    logging.info("[%s] step %d/%d: train bpc %.3f, validation bpc %.3f "
                 "(mean of %d seeds), %.0f s", norm, step, config.steps,
                 train_bpc.mean(), valid_bpc.mean(), len(config.seeds),
                 time.perf_counter() - started)
  population = population_statistics(config, models, ids, norm)
  test = evaluate(models, population, jnp.asarray(
      eval_windows(data["test"], config.seq_len)))
  long_test = np.asarray(evaluate(models, population, jnp.asarray(
      eval_windows(data["test"], config.seq_len * config.long_factor))))
  result = {
      "norm": norm, "curve": curve,
      "test_bpc": np.asarray(test).mean(axis=1).tolist(),
      "long": {"length": config.seq_len * config.long_factor,
               **_bpc_parts(long_test, config.seq_len),
               "mean_by_position": long_test.mean(axis=0).tolist()},
      "train_time": time.perf_counter() - started}
  if norm == "batch":  # the running averages the curves read, for contrast
    result["test_bpc_running_averages"] = np.asarray(evaluate(
        models, stats, jnp.asarray(eval_windows(
            data["test"], config.seq_len)))).mean(axis=1).tolist()
  return result


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`. Written here: curves.jsonl (+ tensorboard/), one
  row per norm, seed and evaluation; variants/<norm>.json, a finished
  norm's result (a rerun of the same command skips it). Returns
  results.json's study part."""
  assert context.writes, "the char-LM study runs in one process"
  config, workdir, data = context.config, context.workdir, context.data
  started = time.perf_counter()
  logging.info("%d norm(s) x %d seed(s) x %d steps", len(config.norms),
               len(config.seeds), config.steps)
  results = workdir_lib.run_variants(
      workdir, config.norms,
      lambda norm, writer: train_norm(config, norm, data, writer),
      config.seeds)
  return {"study": config.study, "corpus": "Debian fortunes (English)",
          "corpus_counts": data["counts"],
          "data_origin": context.origin, "vocab_size": data["vocab"].size,
          "characters": {split: int(data[split].size)
                         for split in ("train", "validation", "test")},
          "seeds": list(config.seeds), "variants": results,
          "wall_time": time.perf_counter() - started}
