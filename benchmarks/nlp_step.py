"""The NLP studies' training steps: bn_jax against PyTorch eager, back to back.

    .venv/bin/python benchmarks/nlp_step.py --torch_python=build/torch-venv/bin/python
    .venv/bin/python benchmarks/nlp_step.py --quick   # smoke run ($BN_JAX_TORCH_PYTHON or bn_jax only)

One training step (forward, backward, gradient clipping to global norm 1,
Adam) of each model of two studies, bn_jax/JAX as the study runs it against
the same model in PyTorch eager:

  char-LM       studies/char_lm/lm.py: one LSTM layer of 128 units on one-hot
                characters (vocabulary 113), windows of T=50, batch 32, Adam
                2e-3; the plain LSTM, the LN-LSTM and the BN-LSTM (BN per
                time step, `bn_jax.recurrent`). bn_jax: the study's
                `make_train_chunk` (a jitted scan of `--steps` steps,
                vmapped over seeds), for 1 seed and for the study's 5 seeds
                at once. PyTorch: the plain LSTM is the fused
                `torch.nn.LSTM`; the LN- and BN-LSTM a Python loop over the
                cells, with W_x x and its norm computed for all steps at
                once before the loop (BN per step all the same) and
                `F.layer_norm` / `F.batch_norm` with per-step running
                statistics; 5 seeds are 5 models stepped one after another.
  Transformer   studies/transformer/model.py's `Classifier` (2 pre-norm
                blocks, width 64, 4 heads, MLP 128, batch 64 of 128 tokens,
                the study's batches of that length, vocabulary 3000), with
                LayerNorm and with BN over the real tokens (`mask`); Adam
                1e-3 with the study's warmup-cosine schedule. bn_jax: the
                study's jitted `make_train_step`, called once per step as
                the study does. PyTorch: the same encoder written with
                torch.nn (`MultiheadAttention` with a key padding mask, GELU
                tanh as flax's, a masked BN as the mean and variance over
                the real tokens).

The PyTorch side runs in worker processes under `--torch_python` (a
Python with torch: PyTorch is not a bn_jax dependency; this file is also
the worker, `--worker`, and imports no jax there), one per `--threads`
count (default: the CPU count, as asked of a fair comparison, then 1: on
a loaded machine PyTorch's threads wait for each other at every op). Both
sides start from the same weights (bn_jax's, copied; nn.LSTM's second
bias held at 0) and read the same batches, and the first call of each pair
is the equal-work check: its losses, step by step, must agree within
`TOLERANCE` (the one difference left: F.batch_norm's running variance is
unbiased, bn_jax's biased; no training loss reads it). Every candidate then
runs `--steps` steps per call in interleaved rounds, so that the load of a
shared machine hits all alike; the table gives the median ms per step,
PyTorch / bn_jax (> 1: bn_jax is faster) and the floor of the step's
matmuls at this machine's large-matmul rate. `--profile` adds where bn_jax's
step goes (its XLA kernels by part of the model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _worker  # benchmarks/, the script's folder

# This file is also the PyTorch worker (`--worker`), run by a Python that
# has torch and no jax: the bn_jax side is imported only where it runs.
_IS_WORKER = __name__ == "__main__" and sys.argv[1:2] == ["--worker"]
if not _IS_WORKER:
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(Path(__file__).resolve().parent))
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  import _common  # noqa: E402

  from studies.char_lm import config as char_lm_config  # noqa: E402
  from studies.char_lm import lm  # noqa: E402
  from studies.transformer import config as transformer_config  # noqa: E402
  from studies.transformer import train as transformer_train  # noqa: E402

CHAR_LM_NORMS = {"none": "LSTM", "layer": "LN-LSTM", "batch": "BN-LSTM"}
TRANSFORMER_NORMS = {"layer": "LayerNorm", "batch": "masked BN"}
SEED_COUNTS = (1, 5)  # the study's 5 seeds train at once (vmapped)
TOLERANCE = 1e-4  # |loss difference| of a pair, step by step
TRANSFORMER_LENGTH = 128


def char_lm_name(norm: str, seeds: int) -> str:
  if seeds == 1:
    return f"char-LM {CHAR_LM_NORMS[norm]}, 1 seed"
  return (f"char-LM {CHAR_LM_NORMS[norm]}, {seeds} seeds (bn_jax vmapped, "
          "PyTorch one after another)")


def transformer_name(norm: str) -> str:
  return f"Transformer, {TRANSFORMER_NORMS[norm]}"


def row_names() -> list[str]:
  """Every row of the table, in its order."""
  return [char_lm_name(norm, seeds) for norm in CHAR_LM_NORMS
          for seeds in SEED_COUNTS] + [transformer_name(norm)
                                       for norm in TRANSFORMER_NORMS]


# ----------------------------------------------------------------------------
# The bn_jax side: the studies' own jitted steps.


def char_lm_study_config(seeds: int):
  config = char_lm_config.get_config()
  config.seeds = tuple(range(seeds))
  return config


class JaxCharLM:
  """`steps` training steps of the char-LM study per call, every seed at
  once: the study's `make_train_chunk` (a jitted, vmapped scan)."""
  KIND = "char_lm"

  def __init__(self, norm: str, seeds: int, vocab_size: int, ids, starts,
               state=None):
    config = char_lm_study_config(seeds)
    # Seeds 0..seeds-1 of a larger `state` (the same values), or
    # `init_states`'s, computed faster: the study's `init_model` jitted
    # for one seed at a time, stacked (eagerly, as the study runs it, every
    # op of the initializers compiles on its own: 5-15 s; jitted and
    # vmapped, the batched QR factorizations of the orthogonal initializer
    # can deadlock XLA:CPU's 2-thread pool: jaxlib's ParallelBatchMap blocks
    # pool threads, seen with jax 0.10.2; one seed's QRs run inline).
    if state is None:
      init = jax.jit(lambda key: lm.init_model(key, vocab_size, config, norm))
      models, stats = jax.tree.map(
          lambda *v: jnp.asarray(np.stack(v)),
          *[init(jax.random.key(seed)) for seed in config.seeds])
      state = (models, stats,
               jax.jit(jax.vmap(lm.optimizer(config).init))(models))
    self.state = jax.tree.map(lambda v: jnp.asarray(np.asarray(v)[:seeds]),
                              state)
    self._chunk = lm.make_train_chunk(config, norm)
    self._ids, self._starts = ids, jnp.asarray(starts[:seeds])
    self.matmul_flops = seeds * char_lm_matmul_flops(vocab_size)
    self.losses = None

  def weights(self, prefix: str) -> dict[str, np.ndarray]:
    """The initial weights of every seed, as the worker reads them."""
    models = self.state[0]
    fields = {f"lstm.{k}": v for k, v in models.lstm._asdict().items()
              if v is not None}
    fields.update(readout_kernel=models.readout_kernel,
                  readout_bias=models.readout_bias)
    return {f"{prefix}/{seed}/{name}": np.asarray(value[seed])
            for name, value in fields.items()
            for seed in range(value.shape[0])}

  def __call__(self):
    self.state, self.losses = self._chunk(self.state, self._ids,
                                          self._starts)
    return self.losses

  def programs(self):
    """(jitted, arguments) of what a call runs: `compile` compiles them
    ahead of the first call, `profile` reads their compiled text."""
    return [(self._chunk, (self.state, self._ids, self._starts))]

  def loss_curves(self) -> np.ndarray:
    """(seeds, steps) losses of the last call."""
    return np.asarray(self.losses)


class JaxTransformer:
  """`steps` training steps of the Transformer study per call: its jitted
  `make_train_step`, once per batch, as the study's loop calls it."""
  KIND = "transformer"

  def __init__(self, norm: str, batches, total_steps: int):
    config = transformer_config.get_config()
    model = transformer_train.make_model(config, norm)
    tx = transformer_train.optimizer(config, total_steps)
    tokens, mask, _ = batches[0]
    self.state = jax.jit(lambda t, m: transformer_train.init_state(
        model, tx, 0, t, m))(tokens, mask)  # jitted as JaxCharLM's
    self._step = transformer_train.make_train_step(model, tx)
    self._batches = batches
    self.matmul_flops = transformer_matmul_flops()
    self.losses = None

  def weights(self, prefix: str) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(self.state["params"])[0]
    return {prefix + "/" + "/".join(k.key for k in path): np.asarray(v)
            for path, v in flat}

  def __call__(self):
    losses = []
    for tokens, mask, labels in self._batches:
      self.state, loss = self._step(self.state, tokens, mask, labels)
      losses.append(loss)
    self.losses = losses
    return self.state, losses

  def programs(self):
    return [(self._step, (self.state, *self._batches[0]))]

  def loss_curves(self) -> np.ndarray:
    """(1, steps) losses of the last call."""
    return np.asarray(jax.device_get(self.losses))[None]


def transformer_batches(steps: int):
  """(batches of 64 reviews padded to 128 tokens from the study's bucketed
  batches, the study's total steps for its schedule)."""
  config = transformer_config.get_config()
  data, _ = transformer_train.load_data(config)
  epochs = [transformer_train.batches(config, data["train"], seed=epoch,
                                      batch_size=config.batch_size,
                                      drop_remainder=True)
            for epoch in range(config.num_epochs)]
  full = [b for b in epochs[0] if b[0].shape[1] == TRANSFORMER_LENGTH]
  if len(full) < steps:
    raise SystemExit(f"--steps={steps}: the study has {len(full)} batches "
                     f"of {TRANSFORMER_LENGTH} tokens per epoch.")
  return full[:steps], sum(map(len, epochs))


def warmup_cosine(spec: dict):
  """The Transformer study's learning rate over its peak, by step:
  optax.warmup_cosine_decay_schedule(0, lr, min(warmup, total - 1), total)
  / lr (studies/transformer/train.py's `optimizer`), for LambdaLR."""
  warmup = min(spec["warmup_steps"], spec["total_steps"] - 1)
  decay = spec["total_steps"] - warmup

  def factor(count: int) -> float:
    if count < warmup:
      return count / warmup
    progress = min(count - warmup, decay) / decay
    return 0.5 * (1.0 + math.cos(math.pi * progress))
  return factor


# ----------------------------------------------------------------------------
# The PyTorch side, in its own process (`--worker`).


def _torch_models():
  """The PyTorch models and trainers (torch imported here: the worker's
  Python has it, bn_jax's need not)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  def tensor(a):
    return torch.from_numpy(np.array(a, np.float32))  # a copy of its own

  def copy_(parameter, value):
    with torch.no_grad():
      parameter.copy_(tensor(value).reshape(parameter.shape))

  class CharLM(nn.Module):
    """bn_jax.recurrent's LSTM (gates f, i, o, g) and a Dense readout."""

    def __init__(self, w: dict, norm: str, spec: dict):
      super().__init__()
      hidden, vocab = spec["hidden_size"], spec["vocab_size"]
      self.norm, self.epsilon = norm, spec["epsilon"]
      self.momentum = 1.0 - spec["momentum"]  # PyTorch's: the new batch's
      if norm == "none":
        self.lstm = nn.LSTM(vocab, hidden, batch_first=True)
        # PyTorch's gate order is (i, f, g, o).
        h = np.arange(hidden)
        order = np.concatenate([h + hidden, h, h + 3 * hidden, h + 2 * hidden])
        copy_(self.lstm.weight_ih_l0, w["lstm.input_kernel"][:, order].T)
        copy_(self.lstm.weight_hh_l0, w["lstm.hidden_kernel"][:, order].T)
        copy_(self.lstm.bias_ih_l0, w["lstm.bias"][order])
        # One bias b, as bn_jax's: the second stays 0 and untrained.
        with torch.no_grad():
          self.lstm.bias_hh_l0.zero_()
        self.lstm.bias_hh_l0.requires_grad_(False)
      else:
        for name in ("input_kernel", "hidden_kernel", "bias", "input_scale",
                     "hidden_scale", "cell_scale", "cell_bias"):
          setattr(self, name, nn.Parameter(tensor(w[f"lstm.{name}"])))
        if norm == "batch":  # per-step running statistics (T_max, features)
          t_max = spec["seq_len"]
          for name, features in (("input", 4 * hidden), ("hidden", 4 * hidden),
                                 ("cell", hidden)):
            self.register_buffer(f"{name}_mean", torch.zeros(t_max, features))
            self.register_buffer(f"{name}_var", torch.ones(t_max, features))
      self.readout = nn.Linear(hidden, vocab)
      copy_(self.readout.weight, w["readout_kernel"].T)
      copy_(self.readout.bias, w["readout_bias"])

    def _bn(self, value, mean, var, scale, bias):
      return F.batch_norm(value, mean, var, scale, bias, training=True,
                          momentum=self.momentum, eps=self.epsilon)

    def _ln(self, value, scale, bias):
      return F.layer_norm(value, value.shape[-1:], scale, bias, self.epsilon)

    def _cells(self, x):
      batch, steps, _ = x.shape
      hidden = self.hidden_kernel.shape[0]
      # W_x x of every step at once, and its norm (BN per time step: the
      # (batch, steps * 4H) features of F.batch_norm are the steps' own).
      xw = x @ self.input_kernel
      if self.norm == "batch":
        assert steps == self.input_mean.shape[0], "windows of T_max only"
        xw = self._bn(xw.reshape(batch, -1), self.input_mean.view(-1),
                      self.input_var.view(-1), self.input_scale.repeat(steps),
                      None).view(batch, steps, -1)
      else:
        xw = self._ln(xw, self.input_scale, None)
      h = c = x.new_zeros(batch, hidden)
      hs = []
      for t in range(steps):
        hw = h @ self.hidden_kernel
        if self.norm == "batch":
          hw = self._bn(hw, self.hidden_mean[t], self.hidden_var[t],
                        self.hidden_scale, None)
        else:
          hw = self._ln(hw, self.hidden_scale, None)
        f, i, o, g = (hw + xw[:, t] + self.bias).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if self.norm == "batch":
          cell = self._bn(c, self.cell_mean[t], self.cell_var[t],
                          self.cell_scale, self.cell_bias)
        else:
          cell = self._ln(c, self.cell_scale, self.cell_bias)
        h = torch.sigmoid(o) * torch.tanh(cell)
        hs.append(h)
      return torch.stack(hs, dim=1)

    def forward(self, x):
      hs = self.lstm(x)[0] if self.norm == "none" else self._cells(x)
      return self.readout(hs)

  class MaskedBatchNorm(nn.Module):
    """BN over the real tokens of (B, T, C): their mean and biased variance,
    as bn_jax.nn.BatchNorm(mask=...); flax's momentum for the running
    averages (which the training step does not read)."""

    def __init__(self, features: int, momentum: float, epsilon: float):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(features))
      self.bias = nn.Parameter(torch.zeros(features))
      self.register_buffer("running_mean", torch.zeros(features))
      self.register_buffer("running_var", torch.ones(features))
      self.momentum, self.epsilon = momentum, epsilon

    def forward(self, x, weight, count):
      mean = (x * weight).sum(dim=(0, 1)) / count
      var = ((x - mean).square() * weight).sum(dim=(0, 1)) / count
      with torch.no_grad():
        self.running_mean.lerp_(mean, 1.0 - self.momentum)
        self.running_var.lerp_(var, 1.0 - self.momentum)
      return (x - mean) * torch.rsqrt(var + self.epsilon) * self.weight + (
          self.bias)

  class LayerNorm(nn.LayerNorm):
    def forward(self, x, weight, count):  # pylint: disable=arguments-differ
      del weight, count
      return super().forward(x)

  def make_norm(spec, norm):
    if norm == "layer":
      return LayerNorm(spec["width"], eps=spec["epsilon"])
    return MaskedBatchNorm(spec["width"], spec["momentum"], spec["epsilon"])

  class Block(nn.Module):
    def __init__(self, spec, norm):
      super().__init__()
      width = spec["width"]
      self.attention_norm = make_norm(spec, norm)
      self.attention = nn.MultiheadAttention(width, spec["num_heads"],
                                             batch_first=True)
      self.mlp_norm = make_norm(spec, norm)
      self.mlp_in = nn.Linear(width, spec["mlp_width"])
      self.mlp_out = nn.Linear(spec["mlp_width"], width)

    def forward(self, h, padding, weight, count):
      y = self.attention_norm(h, weight, count)
      h = h + self.attention(y, y, y, key_padding_mask=padding,
                             need_weights=False)[0]
      y = self.mlp_norm(h, weight, count)
      return h + self.mlp_out(F.gelu(self.mlp_in(y), approximate="tanh"))

  class Classifier(nn.Module):
    """studies/transformer/model.py's Classifier."""

    def __init__(self, w: dict, spec: dict, norm: str):
      super().__init__()
      width = spec["width"]
      self.embed = nn.Embedding(spec["vocab_size"], width)
      self.position = nn.Embedding(spec["max_length"], width)
      self.blocks = nn.ModuleList(Block(spec, norm)
                                  for _ in range(spec["num_layers"]))
      self.final_norm = make_norm(spec, norm)
      self.readout = nn.Linear(width, spec["num_classes"])
      self._load(w, norm)

    def _load(self, w, norm):
      flax_norm = {"layer": "LayerNorm_0", "batch": "BatchNorm_0"}[norm]

      def load_norm(module, prefix):
        copy_(module.weight, w[f"{prefix}/{flax_norm}/scale"])
        copy_(module.bias, w[f"{prefix}/{flax_norm}/bias"])

      def load_dense(module, prefix):
        copy_(module.weight, w[f"{prefix}/kernel"].T)
        copy_(module.bias, w[f"{prefix}/bias"])

      copy_(self.embed.weight, w["embed/embedding"])
      copy_(self.position.weight, w["position/embedding"])
      for i, block in enumerate(self.blocks):
        prefix = f"block{i}"
        load_norm(block.attention_norm, f"{prefix}/attention_norm")
        load_norm(block.mlp_norm, f"{prefix}/mlp_norm")
        attention = f"{prefix}/attention"
        # flax's (in, heads, head_dim) kernels are PyTorch's packed
        # in_proj rows (q, k, v), transposed.
        copy_(block.attention.in_proj_weight, np.concatenate([
            w[f"{attention}/{p}/kernel"].reshape(
                w[f"{attention}/{p}/kernel"].shape[0], -1).T
            for p in ("query", "key", "value")]))
        copy_(block.attention.in_proj_bias, np.concatenate([
            w[f"{attention}/{p}/bias"].reshape(-1)
            for p in ("query", "key", "value")]))
        out = w[f"{attention}/out/kernel"]
        copy_(block.attention.out_proj.weight,
              out.reshape(-1, out.shape[-1]).T)
        copy_(block.attention.out_proj.bias, w[f"{attention}/out/bias"])
        load_dense(block.mlp_in, f"{prefix}/mlp_in")
        load_dense(block.mlp_out, f"{prefix}/mlp_out")
      load_norm(self.final_norm, "final_norm")
      load_dense(self.readout, "readout")

    def forward(self, tokens, mask):
      weight = mask[..., None].to(torch.float32)
      count = weight.sum().clamp_min(1.0)
      h = self.embed(tokens) + self.position.weight[:tokens.shape[1]][None]
      padding = ~mask
      for block in self.blocks:
        h = block(h, padding, weight, count)
      h = self.final_norm(h, weight, count)
      pooled = (h * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
      return self.readout(pooled)

  class Trainer:
    """One or more models, each with its Adam, stepped one after another."""

    def __init__(self, models, spec):
      self.models = models
      self.parameters = [[p for p in m.parameters() if p.requires_grad]
                         for m in models]
      self.optimizers = [torch.optim.Adam(p, lr=spec["learning_rate"])
                         for p in self.parameters]
      self.schedules = [
          torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(spec))
          if "warmup_steps" in spec else None for o in self.optimizers]
      self.clip = spec["grad_clip_norm"]

    def step(self, index, loss_fn):
      optimizer = self.optimizers[index]
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(self.models[index])
      loss.backward()
      nn.utils.clip_grad_norm_(self.parameters[index], self.clip)
      optimizer.step()
      if self.schedules[index] is not None:
        self.schedules[index].step()
      return loss.detach()

  class CharLMCandidate:
    def __init__(self, arrays, spec, norm, seeds):
      self.spec = spec["char_lm"]
      self.trainer = Trainer([
          CharLM({k.rsplit("/", 1)[1]: v for k, v in arrays.items()
                  if k.startswith(f"char_lm/{norm}/{seed}/")}, norm,
                 self.spec) for seed in range(seeds)], self.spec)
      self.ids = torch.from_numpy(arrays["char_lm_ids"].astype(np.int64))
      self.starts = torch.from_numpy(
          arrays["char_lm_starts"][:seeds].astype(np.int64))
      self.offsets = torch.arange(self.spec["seq_len"] + 1)

    def run(self, steps):
      vocab = self.spec["vocab_size"]
      losses = [[] for _ in self.trainer.models]
      for k in range(steps):
        for seed in range(len(self.trainer.models)):
          windows = self.ids[self.starts[seed, k][:, None] + self.offsets]
          x = F.one_hot(windows[:, :-1], vocab).to(torch.float32)
          targets = windows[:, 1:].reshape(-1)
          losses[seed].append(self.trainer.step(
              seed, lambda m, x=x, targets=targets: F.cross_entropy(
                  m(x).reshape(-1, vocab), targets)))
      return [[float(v) for v in row] for row in losses]

  class TransformerCandidate:
    def __init__(self, arrays, spec, norm):
      self.spec = spec["transformer"]
      w = {k.split("/", 2)[2]: v for k, v in arrays.items()
           if k.startswith(f"transformer/{norm}/")}
      self.trainer = Trainer([Classifier(w, self.spec, norm)], self.spec)
      self.batches = [
          (torch.from_numpy(t.astype(np.int64)), torch.from_numpy(m),
           torch.from_numpy(y.astype(np.int64)))
          for t, m, y in zip(arrays["transformer_tokens"],
                             arrays["transformer_mask"],
                             arrays["transformer_labels"])]

    def run(self, steps):
      losses = []
      for k in range(steps):
        tokens, mask, labels = self.batches[k % len(self.batches)]
        losses.append(self.trainer.step(
            0, lambda m, t=tokens, s=mask, y=labels: F.cross_entropy(
                m(t, s), y)))
      return [[float(v) for v in losses]]

  return torch, CharLMCandidate, TransformerCandidate


def worker_main(argv) -> None:
  """The PyTorch worker: builds every candidate from --data, then answers
  one JSON line per command on stdin: `run NAME STEPS` (wall and CPU
  seconds and each model's losses) or `quit`."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--data", required=True)
  parser.add_argument("--threads", type=int, required=True)
  args = parser.parse_args(argv)
  torch, CharLMCandidate, TransformerCandidate = _torch_models()
  torch.set_num_threads(args.threads)
  with np.load(args.data) as data:
    arrays = dict(data)
  spec = json.loads(str(arrays.pop("spec")))
  candidates = {}
  for c in spec["candidates"]:
    candidates[c["name"]] = (
        CharLMCandidate(arrays, spec, c["norm"], c["seeds"])
        if c["kind"] == "char_lm" else
        TransformerCandidate(arrays, spec, c["norm"]))
  print(json.dumps({"torch": torch.__version__,
                    "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    command = line.rstrip("\n").split("\t")
    if command == ["quit"]:
      return
    if len(command) != 3 or command[0] != "run" or (
        command[1] not in candidates):
      print(json.dumps({"error": f"unknown command {line.strip()!r}"}),
            flush=True)
      continue
    start, start_cpu = time.perf_counter(), time.process_time()
    losses = candidates[command[1]].run(int(command[2]))
    print(json.dumps({"wall": time.perf_counter() - start,
                      "cpu": time.process_time() - start_cpu,
                      "losses": losses}), flush=True)


# ----------------------------------------------------------------------------
# The parent's end of the worker.


class TorchWorker(_worker.JsonLineWorker):
  """The worker process; `candidate(name, steps)` is one candidate's
  callable (each call runs `steps` steps there)."""

  def __init__(self, python: str, data_file: str, threads: int):
    super().__init__([python, str(Path(__file__).resolve()), "--worker",
                      f"--data={data_file}", f"--threads={threads}"])
    self.last = {}

  def run(self, name: str, steps: int) -> dict:
    self.last[name] = self.ask(f"run\t{name}\t{steps}")
    return self.last[name]

  def candidate(self, name: str, steps: int):
    return lambda: self.run(name, steps)


def resolve_python(python: str) -> str:
  """A path relative to the repository (as $BN_JAX_TORCH_PYTHON is in the
  tests), an absolute one, or a command name."""
  if os.sep in python and not os.path.isabs(python) and not os.path.exists(
      python):
    return str(Path(__file__).resolve().parent.parent / python)
  return python


def char_lm_spec(vocab_size: int) -> dict:
  c = char_lm_config.get_config()
  return {"hidden_size": c.hidden_size, "vocab_size": vocab_size,
          "seq_len": c.seq_len, "learning_rate": c.learning_rate,
          "grad_clip_norm": c.grad_clip_norm, "momentum": c.bn.momentum,
          "epsilon": c.bn.epsilon}


def transformer_spec(total_steps: int) -> dict:
  c = transformer_config.get_config()
  return {"width": c.width, "num_heads": c.num_heads,
          "mlp_width": c.mlp_width, "num_layers": c.num_layers,
          "vocab_size": c.vocab_size, "max_length": c.max_length,
          "num_classes": 2, "momentum": c.norm.momentum,
          "epsilon": c.norm.epsilon, "learning_rate": c.learning_rate,
          "warmup_steps": c.warmup_steps, "total_steps": total_steps,
          "grad_clip_norm": c.grad_clip_norm}


# ----------------------------------------------------------------------------
# The floor: the step's matmuls at the rate of a large matmul.


def char_lm_matmul_flops(vocab_size: int) -> float:
  """FLOPs of one seed's step's matmuls (2 m n k each): per time step
  W_x x and W_h h forward, W_x's and W_h's gradients and h's gradient
  backward (x is data), and the readout's forward, weight and input
  gradients."""
  c = char_lm_config.get_config()
  b, t, h = c.batch_size, c.seq_len, c.hidden_size
  v, g = vocab_size, 4 * c.hidden_size
  return 2.0 * (t * (2 * b * v * g + 3 * b * h * g) + 3 * b * t * h * v)


def transformer_matmul_flops() -> float:
  """FLOPs of one step's matmuls: per block the q, k, v and output
  projections, the scores and the weighted values, the MLP; forward and
  twice that backward (the gradients of both operands), padding
  included (both sides compute it)."""
  c = transformer_config.get_config()
  n, t, d = c.batch_size * TRANSFORMER_LENGTH, TRANSFORMER_LENGTH, c.width
  forward = 2.0 * (4 * n * d * d + 2 * n * t * d + 2 * n * d * c.mlp_width)
  return 3 * c.num_layers * forward


# ----------------------------------------------------------------------------
# Where bn_jax's step goes: its XLA kernels, by the part of the model that
# the compiled program's metadata (op_name) names.

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = \w+\[([\d,]*)\]"
                          r".*?op_name=\"([^\"]*)\"")


def kernel_part(op_name: str, shape: tuple[int, ...]) -> str:
  """The part of a training step an XLA kernel computes ("backward": the
  transpose of the forward pass, JAX's reverse mode)."""
  if "jvp(" not in op_name:
    return "loss, clipping, Adam, batches"
  direction = "backward" if "transpose(jvp(" in op_name else "forward"
  if "/while/body/" in op_name.split("jvp(", 1)[1]:
    part = "LSTM time steps"
  elif len(shape) == 4 and shape[-1] == shape[-2] == TRANSFORMER_LENGTH:
    part = "attention weights (B, heads, T, T): scores, mask, softmax"
  elif "/attention/" in op_name:
    part = "attention projections"
  elif "norm/" in op_name:
    part = "norms"
  elif "/mlp_" in op_name:
    part = "MLP"
  elif re.search(r"/block\d+/", op_name):
    part = "GELU, residual adds"
  else:
    part = "embeddings, pooling, readout, loss"
  return f"{part} ({direction})"


_ANY_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) ")
_WHILE_BODY = re.compile(r" while\(.*?body=%?([\w.-]+)")
UNNAMED_IN_LOOP = "LSTM time steps, kernels XLA made (no op_name)"
UNNAMED = "kernels XLA made outside the time steps (no op_name)"


def kernel_parts(hlo: str) -> dict[str, str]:
  """Each instruction of optimized HLO text by `kernel_part`; those
  without op_name metadata (copies, dots and fusions that XLA's passes
  made) by whether a time step holds them: the body of a while loop inside
  another one (the char-LM's chunk is a loop over training steps, each
  with a loop over time forward and one backward)."""
  parts, computation, parents, members = {}, None, {}, {}
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      match = _COMPUTATION.match(line)
      computation = match.group(1) if match else None
      continue
    body = _WHILE_BODY.search(line)
    if body:
      parents[body.group(1)] = computation
    match = _INSTRUCTION.match(line)
    if match:
      name, dims, op_name = match.groups()
      shape = tuple(int(d) for d in dims.split(",") if d)
      parts[name] = kernel_part(op_name, shape)
    elif _ANY_INSTRUCTION.match(line):
      members[_ANY_INSTRUCTION.match(line).group(1)] = computation
  time_steps = {body for body, parent in parents.items() if parent in parents}
  for name, computation in members.items():
    parts[name] = UNNAMED_IN_LOOP if computation in time_steps else UNNAMED
  return parts


def profile(step, steps: int) -> dict[str, list[float]]:
  """{part: [kernel ms/step summed over threads, kernels run per step]} of
  one call of `step`, a JaxCharLM or JaxTransformer, largest first
  (`_common.kernel_profile`: an asynchronous Eigen dot counts from launch
  to end; the profiler's own events are left out)."""
  parts = kernel_parts("\n".join(
      jitted.lower(*args).compile().as_text()
      for jitted, args in step.programs()))
  kernels = _common.kernel_profile(step, top=None)
  totals = {}
  for name, ms, calls in kernels:
    if name in parts:  # not ThreadpoolListener's markers
      total = totals.setdefault(parts[name], [0.0, 0.0])
      total[0] += ms / steps
      total[1] += calls / steps
  return dict(sorted(totals.items(), key=lambda kv: -kv[1][0]))


def build(steps: int, models: str = ""):
  """(bn_jax's candidates by row name, the arrays the PyTorch worker reads:
  the same initial weights and batches, the Transformer's batches); only
  the rows whose names `models` (a regular expression) matches."""
  chosen = lambda name: re.search(models, name)
  data, _ = lm.load_data(char_lm_study_config(1))
  vocab_size = data["vocab"].size
  ids = jnp.asarray(data["train"])
  starts = lm.training_starts(char_lm_study_config(max(SEED_COUNTS)),
                              ids.shape[0], 0, steps)
  batches, total_steps = transformer_batches(steps)

  jax_steps, specs = {}, []
  for norm in CHAR_LM_NORMS:
    state = None  # the most seeds' first, so that the others take theirs
    for seeds in sorted(SEED_COUNTS, reverse=True):
      name = char_lm_name(norm, seeds)
      if not chosen(name):
        continue
      jax_steps[name] = JaxCharLM(norm, seeds, vocab_size, ids, starts,
                                  state)
      state = state or jax_steps[name].state
      specs.append({"name": name, "kind": "char_lm", "norm": norm,
                    "seeds": seeds})
  for norm in TRANSFORMER_NORMS:
    name = transformer_name(norm)
    if not chosen(name):
      continue
    jax_steps[name] = JaxTransformer(norm, batches, total_steps)
    specs.append({"name": name, "kind": "transformer", "norm": norm})

  order = {name: i for i, name in enumerate(row_names())}
  jax_steps = dict(sorted(jax_steps.items(), key=lambda kv: order[kv[0]]))
  specs.sort(key=lambda spec: order[spec["name"]])
  arrays = {}
  for name, step in jax_steps.items():  # seed i's weights are the same in
    norm = next(s["norm"] for s in specs if s["name"] == name)  # every row
    arrays.update(step.weights(f"{type(step).KIND}/{norm}"))
  arrays.update(
      char_lm_ids=np.asarray(data["train"]), char_lm_starts=starts,
      char_lm_vocab=np.asarray(vocab_size),
      transformer_tokens=np.stack([b[0] for b in batches]),
      transformer_mask=np.stack([b[1] for b in batches]),
      transformer_labels=np.stack([b[2] for b in batches]),
      spec=np.array(json.dumps({
          "candidates": specs, "char_lm": char_lm_spec(vocab_size),
          "transformer": transformer_spec(total_steps)})))
  return jax_steps, arrays, batches


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a short smoke run: 2 steps per call, 1 round")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds after the check (default 7; "
                      "--quick: 1)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per timed call (default 10; "
                      "--quick: 2)")
  _common.add_torch_python_flag(parser)
  parser.add_argument("--threads", default=f"{os.cpu_count()},1",
                      help="PyTorch's intra-op threads, one worker (and "
                      "column) each, comma-separated (default: the CPU "
                      "count, which XLA:CPU also uses, then 1)")
  parser.add_argument("--models", default="",
                      help="only the rows whose names this regular "
                      "expression matches (default: every row)")
  parser.add_argument("--profile", action="store_true",
                      help="print where bn_jax's steps go (jax.profiler, "
                      "by part)")
  args = parser.parse_args()
  rounds = args.rounds or (1 if args.quick else 7)
  steps = args.steps or (2 if args.quick else 10)
  python = resolve_python(args.torch_python) if args.torch_python else ""
  torch_version = _common.check_torch_python(python) if python else None

  print(_common.header("NLP training steps: bn_jax vs PyTorch eager"),
        flush=True)
  if not torch_version:
    print("\nPyTorch: skipped (set BN_JAX_TORCH_PYTHON or --torch_python to "
          "a Python with torch; benchmarks/README.md says how to make one); "
          "bn_jax only.", flush=True)

  jax_steps, arrays, batches = build(steps, args.models)
  if not jax_steps:
    raise SystemExit(f"--models={args.models!r} matches no row.")
  threads = list(dict.fromkeys(int(t) for t in args.threads.split(",")))
  candidates, pairs, workers = {}, {}, {}
  with tempfile.TemporaryDirectory() as directory:
    try:
      if torch_version:
        data_file = os.path.join(directory, "nlp_step.npz")
        np.savez(data_file, **arrays)
        for n in threads:
          workers[n] = TorchWorker(python, data_file, n)
      # The first call of each: compilation (bn_jax), allocation, and the
      # equal-work check (both from the same weights, on the same batches).
      compile_s = {}
      for name, step in jax_steps.items():
        start = time.perf_counter()
        _common.block(step())
        compile_s[name] = time.perf_counter() - start
        candidates[("bn_jax", name)] = step
        for n, worker in workers.items():
          pairs[(n, name)] = (step.loss_curves(), np.asarray(
              worker.run(name, steps)["losses"]))
          candidates[(n, name)] = worker.candidate(name, steps)
      # A large matmul in every round, for the floor under the same load.
      matmul, matmul_flops = _common.matmul_candidate()
      candidates[("matmul", "")] = matmul
      wall, _ = _common.interleaved(candidates, rounds)
      ms_per_gflop = 1e3 * _common.median(wall[("matmul", "")]) / (
          matmul_flops / 1e9)
    finally:
      for worker in workers.values():
        worker.close()

  print(f"\n{steps} steps per call, median of {rounds} interleaved rounds "
        "after one untimed call; a 5-seed row's step is one step of every "
        "seed. ratio = PyTorch / bn_jax (> 1: bn_jax is faster)\n")
  heads = "".join(f" PyTorch {torch_version} eager, {n} thread"
                  f"{'s' if n > 1 else ''}, ms/step | ratio |"
                  for n in workers) or " PyTorch | ratio |"
  print(f"| model | matmul floor ms/step | bn_jax ms/step |{heads}")
  print("|---|---:|---:|" + "---:|---:|" * max(1, len(workers)))
  for name, step in jax_steps.items():
    jax_ms = 1e3 * _common.median(wall[("bn_jax", name)]) / steps
    cells = ""
    for n in workers:
      torch_ms = 1e3 * _common.median(wall[(n, name)]) / steps
      cells += f" {torch_ms:.1f} | {torch_ms / jax_ms:.2f} |"
    floor = ms_per_gflop * step.matmul_flops / 1e9
    print(f"| {name} | {floor:.1f} | {jax_ms:.1f} |"
          f"{cells or ' skipped | - |'}", flush=True)
  print(f"\nmatmul floor: the step's matmuls (char-LM "
        f"{char_lm_matmul_flops(int(arrays['char_lm_vocab'])) / 1e9:.2f} "
        f"GFLOP per seed, Transformer {transformer_matmul_flops() / 1e9:.2f}"
        f" GFLOP) at the rate of a {_common.MATMUL_N}^3 float32 matmul in "
        f"the same rounds ({1e3 / ms_per_gflop:.0f} GFLOP/s).")

  print("\nbn_jax's first call (trace, compile, one call), s: " + "; ".join(
      f"{name.split(' (')[0]} {s:.1f}" for name, s in compile_s.items()))
  failed = []
  if workers:
    print(f"\nEqual work: each pair's first call from the same weights on "
          f"the same batches, loss per step (every seed), |difference| "
          f"< {TOLERANCE:g}\n")
    print("| model | PyTorch threads | bn_jax loss, step 1 | PyTorch loss, "
          "step 1 | max abs difference, step 1 | over the first call | "
          "same |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for (n, name), (a, b) in pairs.items():
      first = float(np.max(np.abs(a[:, 0] - b[:, 0])))
      every = float(np.max(np.abs(a - b)))
      same = a.shape == b.shape and every < TOLERANCE
      if not same:
        failed.append(f"{name} ({n} threads)")
      print(f"| {name} | {n} | {a[0, 0]:.6f} | {b[0, 0]:.6f} | "
            f"{first:.2g} | {every:.2g} | {'yes' if same else 'NO'} |")
    print("\nequal-work check: " + (
        "passed" if not failed else "FAILED for " + "; ".join(failed)))

  if args.profile:
    print("\nWhere bn_jax's step goes: one call of each under jax.profiler "
          "(which slows the many small kernels of a time step several "
          "fold: read the counts and shares, not the ms); kernel ms summed "
          "over threads\n")
    print("| model | kernels run per step | kernel ms/step | largest "
          "parts: kernel ms/step (kernels per step) |")
    print("|---|---:|---:|---|")
    for name, step in jax_steps.items():
      parts = profile(step, steps)
      largest = "; ".join(f"{part} {ms:.1f} ({n:.0f})"
                          for part, (ms, n) in list(parts.items())[:4])
      print(f"| {name} | {sum(n for _, n in parts.values()):.0f} | "
            f"{sum(ms for ms, _ in parts.values()):.1f} | {largest} |",
            flush=True)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  if _IS_WORKER:
    worker_main(sys.argv[1:])
  else:
    main()
