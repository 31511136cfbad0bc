"""Training throughput: bn_jax's epoch (a `lax.scan`) against a flax.linen loop.

    .venv/bin/python benchmarks/train_throughput.py          # 1.5-4 min
    .venv/bin/python benchmarks/train_throughput.py --quick  # smoke
    .venv/bin/python benchmarks/train_throughput.py --malloc both

Two models, trained on real MNIST ([0, 1] pixels, as the CLI loads them):

  reference  784 -> Dense(50) -> relu -> BN -> Dense(10); Adam 1e-3, batch
             128, 468 steps per epoch (the CLI's default config; its
             default sweep is 3 seeds, K=3).
  ioffe      Ioffe & Szegedy's MNIST net as studies/ioffe2015/config.py has it:
             3 x [Dense(100, no bias) -> BN -> sigmoid] -> Dense(10); SGD
             0.5, batch 60, 1000 steps per epoch, one seed (K=1).

Candidates, timed in interleaved rounds in one process (medians):

  bn_jax sweep K=1   what the CLI runs for one run: `train.train_epoch` on
                     K=1 stacked runs, unstacked as `train.sweep_epoch` does
                     for K=1 (it vmaps `train.epoch_and_eval`, i.e. this same
                     `train_epoch` followed by evaluation, for K > 1;
                     evaluation is left out here).
  bn_jax jit epoch   `train.jit_train_epoch` on an unstacked state.
  bn_jax jit epoch, float32 images
                     the same on float32 images preprocessed once, as the
                     flax loops get them (the CLI keeps uint8 pixels and
                     scales each batch in the step: `train.model_inputs`).
  flax loop (device) flax.linen.BatchNorm, the same model and optimizer: one
                     jitted call shuffles and gathers the epoch's batches on
                     the device, then a Python loop calls a jitted train step
                     per batch (it slices batch i inside the step).
  flax loop (host)   the flax examples/mnist loop: NumPy shuffle, NumPy batch
                     gather, jitted train step per batch.
  its matmuls alone (ceiling)
                     the step's dots and nothing else (`matmuls_alone`): what
                     these matrix shapes reach through XLA:CPU.
  bn_jax train.sweep_epoch K=1 (+ eval)
                     (--with_eval, reference only) the CLI's whole epoch
                     function, for the cost of its evaluation.

Every epoch shuffles (all candidates but the matmul ceiling). Targets are
judged against the faster flax loop. "CPU s/epoch" is process CPU time (all
threads): on a shared machine it moves less with other people's load than
wall time does. FLOPs are counted analytically: the matmuls a step needs,
forward 2B * sum(fan_in * fan_out), weight gradients the same again, and
input gradients for every layer but the first (the images get no gradient);
a jitted 2048 x 2048 @ 2048 x 2048 float32 matmul timed in the same rounds
is the floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # studies/
import _common  # noqa: E402

from bn_lab import sweep  # noqa: E402
from bn_lab import train  # noqa: E402
from bn_lab import config as base  # noqa: E402
from studies.ioffe2015 import probes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  """A model as the CLI trains it: a config (the defaults or a file in
  studies/), a few overrides, and the spec sweep.make_spec builds with what
  the study measures during training (`measure`, as its Study does)."""
  name: str
  config_file: str | None = None  # relative to the repository root
  overrides: tuple[tuple[str, Any], ...] = ()
  measure: Callable[[Any], tuple[train.Measurement, ...]] | None = None

  @functools.cached_property
  def config(self):
    if self.config_file is None:
      config = base.get_config()
    else:
      path = REPO / self.config_file
      module_spec = importlib.util.spec_from_file_location(path.stem, path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      config = module.get_config()
    for field, value in self.overrides:
      config[field] = value
    return config

  @property
  def spec(self) -> train.TrainSpec:
    combo, *_ = sweep.combinations(self.config)
    return sweep.make_spec(combo.config, NUM_TRAIN, self.measure(
        combo.config) if self.measure else ())

  @property
  def learning_rate(self) -> float:
    return self.config.learning_rate

  @property
  def hparams(self) -> dict[str, float]:
    return {"learning_rate": self.config.learning_rate,
            "bn_momentum": self.config.bn.momentum,
            "bn_epsilon": self.config.bn.epsilon}

  @property
  def flops_per_step(self) -> float:
    """Matmul FLOPs of one step (forward + backward), counted analytically."""
    dims = (784, *self.spec.widths, 10)
    layers = [2.0 * self.spec.batch_size * a * b
              for a, b in zip(dims[:-1], dims[1:])]
    forward = sum(layers)
    return forward + forward + (forward - layers[0])


NUM_TRAIN = 60000
REPO = Path(__file__).resolve().parent.parent
CASES = (
    # The CLI's defaults: the reference Keras model.
    Case("reference"),
    # studies/ioffe2015/config.py, its BN variant (SGD lr 0.5, batch 60,
    # BN epsilon 1e-5, unbiased running variance), with the study's probe
    # every 500 steps (Figure 1), as the CLI trains it.
    Case("ioffe", "studies/ioffe2015/config.py",
         (("placements", ("before_activation",)),),
         measure=probes.measurements),
)


# ----------------------------------------------------------------------------
# The flax.linen baseline.


class FlaxMLP(nn.Module):
  """bn_lab.models.MLP with flax.linen.BatchNorm (placements used here)."""
  widths: Sequence[int]
  activation: Callable[[Any], Any]
  placement: str
  bn_momentum: float
  bn_epsilon: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train,
                                momentum=self.bn_momentum,
                                epsilon=self.bn_epsilon)
    for width in self.widths:
      if self.placement == "before_activation":
        x = self.activation(norm()(nn.Dense(width, use_bias=False)(x)))
      else:
        x = norm()(self.activation(nn.Dense(width)(x)))
    return nn.Dense(10)(x)


def flax_parts(case: Case):
  """(init_state, train_step) of the flax loop for a case."""
  spec = case.spec
  model = FlaxMLP(widths=spec.widths, activation=getattr(nn, spec.activation),
                  placement=spec.placement,
                  bn_momentum=case.hparams["bn_momentum"],
                  bn_epsilon=case.hparams["bn_epsilon"])
  tx = (optax.adam(case.learning_rate) if spec.optimizer == "adam" else
        optax.sgd(case.learning_rate))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 784)), train=False)
  state = (variables["params"], variables["batch_stats"],
           tx.init(variables["params"]))

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats,
            opt_state), loss

  return state, train_step


def flax_device_loop(case: Case, data: train.DeviceData):
  """Epoch function: batches shuffled and gathered on device, Python loop."""
  state, step_fn = flax_parts(case)
  steps, batch = case.spec.steps_per_epoch, case.spec.batch_size

  @jax.jit
  def shuffle(key, images, labels):
    order = jax.random.permutation(key, images.shape[0])
    order = order[:steps * batch].reshape(steps, batch)
    return images[order], labels[order]

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, labels, i):
    return step_fn(state, images[i], labels[i])

  indices = [jax.device_put(np.int32(i)) for i in range(steps)]
  epoch = [0]

  def run_epoch(state):
    epoch[0] += 1
    images, labels = shuffle(jax.random.key(epoch[0]), data.train_images,
                             data.train_labels)
    for i in indices:
      state, _ = step(state, images, labels, i)
    return state

  return state, run_epoch, step


def flax_host_loop(case: Case, data: train.DeviceData):
  """Epoch function in the style of flax's examples/mnist: NumPy batches."""
  state, step_fn = flax_parts(case)
  step = jax.jit(step_fn, donate_argnums=0)
  images = np.asarray(data.train_images)
  labels = np.asarray(data.train_labels)
  epoch = [0]

  def run_epoch(state):
    epoch[0] += 1
    order = _common.host_permutation(epoch[0], images.shape[0],
                                      case.spec.steps_per_epoch,
                                      case.spec.batch_size)
    for batch in order:
      state, _ = step(state, images[batch], labels[batch])
    return state

  return state, run_epoch, step


def sweep_train_epoch(spec: train.TrainSpec):
  """The training half of train.sweep_epoch: train.train_epoch over K
  stacked runs through the same `train.over_runs` (no vmap for K=1)."""
  return jax.jit(train.over_runs(train.train_epoch, spec), donate_argnums=0)


# ----------------------------------------------------------------------------
# One case.


class Runner:
  """Holds a candidate's state between calls; calling runs one epoch."""

  def __init__(self, state, epoch_fn):
    self.state, self._epoch_fn = state, epoch_fn

  def __call__(self):
    self.state = self._epoch_fn(self.state)
    return self.state


def matmuls_alone(case: Case, data) -> Runner:
  """The dots of `case`'s training step and nothing else: forward, weight
  gradients and input gradients (all layers but the first), on the epoch's
  batches gathered up front, each step's weights updated by the last step's
  weight gradients so that nothing can be hoisted out of the scan. No
  gather, shuffle, BN, activation, loss or optimizer: its GFLOP/s is what
  this step's matrix shapes reach through XLA:CPU, the ceiling for any
  implementation of it here."""
  spec = case.spec
  dims = (784, *spec.widths, 10)
  used = spec.steps_per_epoch * spec.batch_size
  batches = data.train_images[:used].reshape(spec.steps_per_epoch,
                                             spec.batch_size, 784)
  weights = [jnp.full((a, b), 1.0 / a, jnp.float32)
             for a, b in zip(dims[:-1], dims[1:])]

  def step(weights, x):
    inputs = [x]
    for w in weights[:-1]:
      inputs.append(inputs[-1] @ w)
    grad = inputs[-1] @ weights[-1]  # the logits stand in for dloss/dlogits
    updated = list(weights)
    for i in reversed(range(len(weights))):
      updated[i] = weights[i] - 1e-6 * (inputs[i].T @ grad)
      if i:
        grad = grad @ weights[i].T
    return updated, None

  # The batches are an argument, not a closed-over constant compiled into
  # the program.
  epoch = jax.jit(lambda w, xs: jax.lax.scan(step, w, xs)[0],
                  donate_argnums=0)
  return Runner(weights, lambda w: epoch(w, batches))


def run_case(case: Case, data, float_data, counter, matmul, rounds: int,
             with_eval: bool, flax_loops: bool, with_noguard: bool):
  """Times every candidate on one case; returns the raw numbers. `data` has
  uint8 images, as the CLI keeps them; `float_data` float32 ones."""
  spec, hp = case.spec, case.hparams
  stack = lambda: train.create_sweep_states(
      spec, [0], {k: [v] for k, v in hp.items()})
  sweep = sweep_train_epoch(spec)
  runners = {
      "bn_jax sweep K=1": Runner(stack(), lambda s: sweep(s, data)[0]),
      "bn_jax jit epoch": Runner(
          train.create_train_state(spec, 0, hp),
          lambda s: train.jit_train_epoch(s, data, spec=spec)[0]),
      "bn_jax jit epoch, float32 images": Runner(
          train.create_train_state(spec, 0, hp),
          lambda s: train.jit_train_epoch(s, float_data, spec=spec)[0]),
  }
  caches = {"train.jit_train_epoch": train.jit_train_epoch,
            "vmapped train_epoch": sweep}
  if with_noguard:
    unguarded = dataclasses.replace(spec, nan_guard=False)
    sweep_unguarded = sweep_train_epoch(unguarded)
    runners["bn_jax sweep K=1, config.nan_guard=False"] = Runner(
        train.create_sweep_states(unguarded, [0],
                                  {k: [v] for k, v in hp.items()}),
        lambda s: sweep_unguarded(s, data)[0])
  for label, make in ((("flax loop (device)", flax_device_loop),
                       ("flax loop (host)", flax_host_loop))
                      if flax_loops else ()):
    state, epoch_fn, caches[label] = make(case, float_data)
    runners[label] = Runner(_common.tree_copy(state), epoch_fn)
  runners["its matmuls alone (ceiling)"] = matmuls_alone(case, float_data)
  if with_eval:
    runners["bn_jax train.sweep_epoch K=1 (+ eval)"] = Runner(
        stack(), lambda s: train.sweep_epoch(s, data, spec=spec)[0])

  first = {name: _common.first_call(fn, counter)
           for name, fn in runners.items()}
  for fn in runners.values():  # second epoch: allocator and caches warm
    _common.block(fn())
  cache_before = {k: f._cache_size() for k, f in caches.items()}
  compiles_before = counter.count
  wall, cpu = _common.interleaved({**runners, "matmul 2048": matmul}, rounds)
  recompiles = counter.count - compiles_before
  cache_after = {k: f._cache_size() for k, f in caches.items()}
  memory = _common.program_memory(
      train.jit_train_epoch.lower(runners["bn_jax jit epoch"].state, data,
                                  spec=spec).compile())
  return dict(wall=wall, cpu=cpu, first=first, recompiles=recompiles,
              cache_before=cache_before, cache_after=cache_after,
              memory=memory, runners=runners)


def with_flax(wall) -> bool:
  return any(k.startswith("flax loop") for k in wall)


def floor_flops(wall) -> float:
  return 2.0 * _common.MATMUL_N ** 3 / _common.median(wall["matmul 2048"])


def best_flax(wall) -> float:
  """Median epoch time of the faster flax loop (bn_jax sweep K=1's if the
  flax loops were left out)."""
  return min((_common.median(v) for k, v in wall.items()
              if k.startswith("flax loop")),
             default=_common.median(wall["bn_jax sweep K=1"]))


def report(case: Case, result, rounds: int):
  spec, wall, cpu = case.spec, result["wall"], result["cpu"]
  steps = spec.steps_per_epoch
  flops = case.flops_per_step * steps
  floor, flax = floor_flops(wall), best_flax(wall)
  print(f"\n### {case.name}: {spec.model} widths={spec.widths} "
        f"{spec.activation}, BN {spec.placement}, {spec.optimizer} "
        f"lr={case.learning_rate}, batch {spec.batch_size}, {steps} "
        f"steps/epoch, nan_guard={spec.nan_guard}; "
        f"median of {rounds} rounds\n")
  print(f"Matmul FLOPs per epoch {flops / 1e9:.2f} GFLOP "
        f"({case.flops_per_step / 1e6:.2f} MFLOP/step); floor: 2048^3 "
        f"matmul {floor / 1e9:.1f} GFLOP/s (median of the same rounds)\n")
  print("| candidate | s/epoch | min-max | CPU s/epoch | steps/s | "
        f"vs {'best flax loop' if with_flax(wall) else 'bn_jax sweep K=1'} "
        "| GFLOP/s | % of floor | first epoch s "
        "(compile s) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name, values in wall.items():
    if name == "matmul 2048":
      continue
    seconds = _common.median(values)
    f = result["first"][name]
    print(f"| {name} | {seconds:.3f} | {_common.spread(values)} | "
          f"{_common.median(cpu[name]):.3f} | {steps / seconds:.0f} | "
          f"{flax / seconds:.2f}x | {flops / seconds / 1e9:.1f} | "
          f"{100 * flops / seconds / floor:.0f}% | "
          f"{f['first_call_s']:.1f} ({f['compile_s']:.1f}) |")
  print(f"\nRecompilation: {result['recompiles']} XLA compilations during "
        f"the {rounds} timed rounds (epochs 3 and on); jit cache sizes "
        "before -> after: " + ", ".join(
            f"{k} {result['cache_before'][k]} -> {result['cache_after'][k]}"
            for k in result["cache_before"]) + ".")
  print(f"XLA memory of the bn_jax jit epoch program: {result['memory']}.")


def print_profile(case: Case, runner: Runner, data) -> None:
  """The most expensive XLA kernels of one epoch of bn_jax sweep K=1, each
  with its result type and the jax operation it came from."""
  hlo = sweep_train_epoch(case.spec).lower(runner.state, data).compile(
      ).as_text()
  described = {}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(",
                     line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      described[match.group(1)] = (
          re.sub(r"\{[\d,]*\}", "", match.group(2)),
          op_name.group(1).split("/")[-1] if op_name else "")
  kernels = [k for k in _common.kernel_profile(runner, top=10**6)
             if k[0] in described]
  total_ms = sum(ms for _, ms, _ in kernels)
  print(f"\nMost expensive XLA kernels of one epoch of bn_jax sweep K=1 "
        f"({case.name}; all its kernels {total_ms:.0f} ms, profiled):\n")
  print("| kernel | result | from | ms/epoch | share | calls |")
  print("|---|---|---|---:|---:|---:|")
  for name, ms, calls in kernels[:12]:
    result, op_name = described[name]
    print(f"| {name} | {result} | {op_name} | {ms:.1f} | "
          f"{100 * ms / total_ms:.0f}% | {calls} |")


def targets(results) -> None:
  """The issue's targets: on bn_jax sweep K=1 (the CLI's training path),
  with bn_jax jit epoch beside it."""
  print("\n### Targets\n")
  for case, result in results:
    wall = result["wall"]
    flax, floor = best_flax(wall), floor_flops(wall)
    flops = case.flops_per_step * case.spec.steps_per_epoch
    names = [n for n in wall if n.startswith("bn_jax sweep K=1")
             or n == "bn_jax jit epoch"]
    seconds = {n: _common.median(wall[n]) for n in names}
    if case.name == "reference":
      checks = (("epoch time, best flax loop / bn_jax", 1.8,
                 {n: flax / s for n, s in seconds.items()}),
                ("achieved GFLOP/s / matmul floor", 0.85,
                 {n: flops / s / floor for n, s in seconds.items()}))
    else:
      checks = (("steps/s, bn_jax / best flax loop", 1.4,
                 {n: flax / s for n, s in seconds.items()}),)
    for label, goal, values in checks:
      main = values["bn_jax sweep K=1"]
      others = "; ".join(f"{n.removeprefix('bn_jax ')} {v:.2f}"
                         for n, v in values.items()
                         if n != "bn_jax sweep K=1")
      print(f"- {case.name}, {label} (target >= {goal}): {main:.2f} on the "
            f"CLI path, {'met' if main >= goal else 'NOT met'} ({others})")
    ceiling = wall.get("its matmuls alone (ceiling)")
    if ceiling:
      seconds = _common.median(ceiling)
      print(f"- {case.name}, its matmuls alone (no other work): "
            f"{flops / seconds / floor:.2f} of the matmul floor, "
            f"{flax / seconds:.2f}x the best flax loop; bn_jax sweep K=1 "
            f"spends {_common.median(wall['bn_jax sweep K=1']) / seconds:.2f}"
            "x their time")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  _common.add_common_flags(parser)
  parser.add_argument("--cases", default="reference,ioffe")
  parser.add_argument("--no_flax", action="store_true",
                      help="leave out the flax loops (to compare bn_jax "
                      "variants only; no targets)")
  parser.add_argument("--with_noguard", action="store_true",
                      help="also time bn_jax sweep K=1 with "
                      "config.nan_guard=False")
  parser.add_argument("--profile", action="store_true",
                      help="also list the most expensive XLA kernels of one "
                      "epoch of bn_jax sweep K=1 (jax.profiler)")
  parser.add_argument("--with_eval", action="store_true",
                      help="also time train.sweep_epoch (training + "
                      "evaluation) on the reference model")
  args = parser.parse_args()
  rounds = args.rounds or (2 if args.quick else 5)

  print(_common.header("Training throughput"), flush=True)
  counter = _common.CompileCounter()
  data = _common.load_mnist(args.data_dir)
  float_data = _common.float_images(data)
  rss_data = _common.peak_rss_mib()
  matmul, _ = _common.matmul_candidate()
  results = []
  for case in CASES:
    if case.name not in args.cases.split(","):
      continue
    result = run_case(case, data, float_data, counter, matmul, rounds,
                      with_eval=args.with_eval and case.name == "reference",
                      flax_loops=not args.no_flax,
                      with_noguard=args.with_noguard)
    report(case, result, rounds)
    if args.profile:
      print_profile(case, result["runners"]["bn_jax sweep K=1"], data)
    results.append((case, result))
  if not args.no_flax:
    targets(results)
  print(f"\nPeak RSS (ru_maxrss): {rss_data:.0f} MiB after loading MNIST, "
        f"{_common.peak_rss_mib():.0f} MiB at the end (all candidates in "
        f"one process); {_common.device_memory_line()}.", flush=True)
  if args.malloc == "both":
    _common.run_tuned_child(__file__)


if __name__ == "__main__":
  main()
