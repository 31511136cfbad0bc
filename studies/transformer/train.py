"""The Transformer study's trainer: every norm, every seed, the sentiment
reviews (bn_lab.text), Adam with warmup and cosine decay, bucketed batches.

Seeds run one after another (bucketed batches have one shape each, so the
seeds cannot share one vmapped program); the jitted step of a norm is
compiled once per batch shape and reused by every seed. Seed s of every
norm reads the same batches in the same order and initializes the layers
they share (embeddings, attention, MLP, readout: flax names them alike)
from the same key, so norms compare pairwise by seed.
"""

from __future__ import annotations

import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_jax import power
from bn_lab import study as study_lib
from bn_lab import sweep
from bn_lab import text
from bn_lab import workdir as workdir_lib
from studies.transformer import model as model_lib

EVAL_BATCH = 256


# ----------------------------------------------------------------------------
# Data.


def load_data(config) -> tuple[dict[str, Any], str]:
  """The reviews as character ids per split, the vocabulary's size and the
  corpus counts (duplicates and conflicting texts dropped before the
  split)."""
  corpus = text.load_sentiment()
  vocab = text.build_vocabulary(corpus.train.texts,
                                max_size=config.vocab_size)
  data = {"vocab_size": vocab.size, "counts": corpus.counts.to_dict()}
  for split in text.SPLITS:
    part = corpus.split(split)
    data[split] = (vocab.encode_all(part.texts), np.asarray(part.labels))
  if config.train_examples:
    order = np.random.default_rng(0).permutation(len(data["train"][0]))
    keep = order[:config.train_examples]
    data["train"] = ([data["train"][0][i] for i in keep],
                     data["train"][1][keep])
  logging.info("%s: %d / %d / %d reviews (train / validation / test), "
               "%d character ids", corpus.origin, len(data["train"][1]),
               len(data["validation"][1]), len(data["test"][1]), vocab.size)
  return data, corpus.origin


def batches(config, split, *, seed: int, batch_size: int,
            drop_remainder: bool):
  sequences, labels = split
  return list(text.classification_batches(
      sequences, labels, batch_size, mode="bucket", seed=seed,
      max_length=config.max_length, length_multiple=config.length_multiple,
      drop_remainder=drop_remainder))


# ----------------------------------------------------------------------------
# The model's steps.


def make_model(config, norm: str) -> model_lib.Classifier:
  return model_lib.Classifier(
      norm={"kind": norm, "momentum": config.norm.momentum,
            "epsilon": config.norm.epsilon,
            "power_warmup_steps": config.norm.power_warmup_steps},
      vocab_size=config.vocab_size, max_length=config.max_length,
      num_layers=config.num_layers, width=config.width,
      num_heads=config.num_heads, mlp_width=config.mlp_width)


def optimizer(config, total_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, total_steps - 1),
      total_steps)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.adam(schedule))


def init_state(model, tx, seed: int, tokens, mask) -> dict[str, Any]:
  variables = model.init(jax.random.key(seed), tokens, mask, train=False)
  params = variables["params"]
  return {"params": params, "batch_stats": variables.get("batch_stats", {}),
          "probes": variables.get("power_probe", {}),
          "opt_state": tx.init(params)}


def _variables(state, probes=None) -> dict[str, Any]:
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  probes = state["probes"] if probes is None else probes
  if probes:
    variables["power_probe"] = probes
  return variables


def make_train_step(model, tx):
  """jit(state, tokens, mask, labels) -> (state, loss): one Adam step;
  PowerNorm's nu advanced by its probes' gradients (bn_jax.power)."""

  def loss_fn(params, probes, state, tokens, mask, labels):
    logits, updates = model.apply(
        _variables({**state, "params": params}, probes), tokens, mask,
        train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    return loss, updates.get("batch_stats", {})

  @jax.jit
  def step(state, tokens, mask, labels):
    (loss, batch_stats), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(
            state["params"], state["probes"], state, tokens, mask, labels)
    if state["probes"]:
      batch_stats = power.fold_probe_grads(batch_stats, probe_grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {**state, "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats, "opt_state": opt_state}, loss
  return step


def make_evaluate(model):
  """jit(state, tokens, mask, labels) -> (correct, summed NLL), eval mode
  (running statistics)."""

  @jax.jit
  def evaluate(state, tokens, mask, labels):
    logits = model.apply(_variables(state), tokens, mask, train=False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (jnp.sum(jnp.argmax(logits, -1) == labels), jnp.sum(nll))
  return evaluate


def evaluate_split(evaluate, state, split_batches) -> dict[str, float]:
  correct = nll = count = 0
  for tokens, mask, labels in split_batches:
    c, n = evaluate(state, tokens, mask, labels)
    correct, nll, count = correct + int(c), nll + float(n), count + len(
        labels)
  return {"accuracy": correct / count, "nll": nll / count}


def make_measure(model):
  """jit(state, tokens, mask) -> every Norm's input moments over the real
  tokens of a training batch (the statistics a training pass would use),
  without updating anything."""

  @jax.jit
  def measure(state, tokens, mask):
    _, out = model.apply(_variables(state), tokens, mask, train=True,
                         mutable=[model_lib.MOMENTS, "batch_stats"])
    return out[model_lib.MOMENTS]
  return measure


def _running(batch_stats, path: tuple[str, ...]):
  """The running statistics of the Norm at `path` (BatchNorm_0's or
  PowerNorm_0's variables), or None."""
  node = batch_stats
  for key in path:
    node = node.get(key, {})
  return next(iter(node.values()), None) if node else None


def fluctuation(moments, batch_stats, epsilon: float) -> dict[str, float]:
  """How far one batch's statistics are from the running ones, each a mean
  over the layers and features: BN's |mu_B - mu| / sqrt(var + eps) and
  |var_B / var - 1|; PowerNorm's |psi_B^2 / psi^2 - 1|. Empty for the
  norms without running statistics."""
  out = {"mean": [], "var": [], "square": []}
  flat = jax.tree_util.tree_flatten_with_path(
      moments, is_leaf=lambda v: isinstance(v, dict) and "square" in v)[0]
  for path, batch in flat:
    keys = tuple(k.key for k in path if hasattr(k, "key"))[:-1]
    running = _running(batch_stats, keys)
    if running is None:
      continue
    if "psi2" in running:
      out["square"].append(float(jnp.mean(jnp.abs(
          batch["square"] / running["psi2"] - 1.0))))
    else:
      out["mean"].append(float(jnp.mean(
          jnp.abs(batch["mean"] - running["mean"])
          / jnp.sqrt(running["var"] + epsilon))))
      out["var"].append(float(jnp.mean(jnp.abs(
          batch["var"] / running["var"] - 1.0))))
  return {k: float(np.mean(v)) for k, v in out.items() if v}


# ----------------------------------------------------------------------------
# The study.


def validate_config(config) -> None:
  sweep.check_choices("norms", config.norms, model_lib.NORMS)
  for field in ("num_layers", "width", "num_heads", "mlp_width",
                "vocab_size", "max_length", "length_multiple", "batch_size",
                "num_epochs",
                "fluctuation_batches"):
    value = config[field]
    sweep.check(isinstance(value, int) and not isinstance(value, bool)
                and value >= 1, field, value, "must be a positive integer")
  sweep.check(config.width % config.num_heads == 0, "width", config.width,
              f"must be a multiple of num_heads={config.num_heads}")
  sweep.check(config.vocab_size >= 3, "vocab_size", config.vocab_size,
              "must leave room for PAD, UNK and a character (>= 3)")
  sweep.check(len(config.seeds) >= 1 and len(set(config.seeds)) == len(
      config.seeds), "seeds", config.seeds, "must be distinct, at least one")
  sweep.check(config.learning_rate > 0, "learning_rate",
              config.learning_rate, "must be positive")
  sweep.check(0 <= config.norm.momentum < 1, "norm.momentum",
              config.norm.momentum, "must be in [0, 1)")
  sweep.check(config.norm.epsilon > 0, "norm.epsilon", config.norm.epsilon,
              "must be positive")


def train_norm(config, norm: str, data, writer) -> dict[str, Any]:
  """Trains every seed of `norm`; returns its result (per-seed lists)."""
  started = time.perf_counter()
  model = make_model(config, norm)
  epoch_batches = [batches(config, data["train"], seed=epoch,
                           batch_size=config.batch_size, drop_remainder=True)
                   for epoch in range(config.num_epochs)]
  total_steps = sum(map(len, epoch_batches))
  tx = optimizer(config, total_steps)
  step, evaluate, measure = (make_train_step(model, tx),
                             make_evaluate(model), make_measure(model))
  valid = batches(config, data["validation"], seed=0, batch_size=EVAL_BATCH,
                  drop_remainder=False)
  test = batches(config, data["test"], seed=0, batch_size=EVAL_BATCH,
                 drop_remainder=False)
  probe_batches = batches(config, data["train"], seed=10_000,
                          batch_size=config.batch_size,
                          drop_remainder=True)[:config.fluctuation_batches]
  writer.start(norm)
  result = {"norm": norm, "steps": total_steps, "seed_results": []}
  for seed in config.seeds:
    tokens, mask, _ = epoch_batches[0][0]
    state = init_state(model, tx, seed, tokens, mask)
    curve = {"epoch": [], "valid_accuracy": [], "train_loss": [],
             "fluctuation": []}
    for epoch in range(config.num_epochs):
      # Seed s's order: the epoch's batches permuted by (s, epoch), the
      # same for every norm.
      order = np.random.default_rng([seed, epoch]).permutation(
          len(epoch_batches[epoch]))
      losses = []
      for i in order:
        state, loss = step(state, *epoch_batches[epoch][i])
        losses.append(loss)
      losses = np.asarray(jax.device_get(losses))
      if not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"[{norm}] seed {seed}: the training loss is not finite in "
            f"epoch {epoch + 1}; lower learning_rate or raise norm.epsilon.")
      moments = [fluctuation(measure(state, t, m), state["batch_stats"],
                             config.norm.epsilon)
                 for t, m, _ in probe_batches]
      valid_metrics = evaluate_split(evaluate, state, valid)
      curve["epoch"].append(epoch + 1)
      curve["train_loss"].append(float(losses.mean()))
      curve["valid_accuracy"].append(valid_metrics["accuracy"])
      curve["fluctuation"].append(
          {k: float(np.mean([m[k] for m in moments])) for k in moments[0]}
          if moments and moments[0] else {})
      writer.write(norm, epoch + 1, {
          "train_loss": [curve["train_loss"][-1]],
          "valid_accuracy": [valid_metrics["accuracy"]]}, seeds=(seed,))
      logging.info("[%s] seed %d, epoch %d/%d: train loss %.4f, validation "
                   "accuracy %.4f, %.0f s", norm, seed, epoch + 1,
                   config.num_epochs, curve["train_loss"][-1],
                   valid_metrics["accuracy"], time.perf_counter() - started)
    test_metrics = evaluate_split(evaluate, state, test)
    result["seed_results"].append({"seed": seed, "curve": curve,
                                   "test_accuracy": test_metrics["accuracy"],
                                   "test_nll": test_metrics["nll"]})
  result["train_time"] = time.perf_counter() - started
  return result


def run(context: study_lib.RunContext) -> dict[str, Any]:
  """The study's `run`. Written here: curves.jsonl (+ tensorboard/), one
  row per norm, seed and epoch; variants/<norm>.json, a finished norm's
  result (a rerun of the same command skips it). Returns results.json's
  study part."""
  assert context.writes, "the Transformer study runs in one process"
  config, workdir, data = context.config, context.workdir, context.data
  started = time.perf_counter()
  logging.info("%d norm(s) x %d seed(s) x %d epochs", len(config.norms),
               len(config.seeds), config.num_epochs)
  results = workdir_lib.run_variants(
      workdir, config.norms,
      lambda norm, writer: train_norm(config, norm, data, writer),
      config.seeds)
  return {"study": config.study, "data_origin": context.origin,
          "corpus_counts": data["counts"],
          "vocab_size": data["vocab_size"],
          "examples": {s: len(data[s][1]) for s in text.SPLITS},
          "seeds": list(config.seeds), "variants": results,
          "wall_time": time.perf_counter() - started}
