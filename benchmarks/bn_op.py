"""One batch-norm op, forward + backward: bn_jax against flax.linen.BatchNorm.

    .venv/bin/python benchmarks/bn_op.py            # full run (~1 minute)
    .venv/bin/python benchmarks/bn_op.py --quick    # smoke run
    .venv/bin/python benchmarks/bn_op.py --impl=plain --grad=autodiff
    .venv/bin/python benchmarks/bn_op.py --variants  # the normalization family

`--grad` and `--impl` choose bn_jax's `grad` mode and `impl` (defaults:
"paper_jvp", "xla_cpu"; see `bn_jax.apply`).

Each timed call is one jitted training step of the op alone: y and the new
running statistics from the forward pass, and (dx, dscale, dbias) for a given
cotangent dy (the gradient of sum(y * dy)). Both implementations run with the
same options (axis=-1, momentum=0.99, epsilon=1e-5, params in float32, y in
x's dtype; each its default variance formula: bn_jax's shifted sums, flax's
E[x^2] - E[x]^2) in the same process, timed in interleaved rounds so that
load from other processes hits both alike; the table shows medians.

Bandwidth counts the bytes of x, y, dy and dx once each over the time of a
call; a jitted `x + c` (a copy that really reads and writes) measured in the
same rounds gives the machine's practical bandwidth beside it.

Allocator: glibc serves buffers above its mmap threshold (at most 32 MiB by
default) with a fresh mmap, so a 51 MB activation costs page faults on every
call. `--malloc both` (the default) measures every case twice: as this
process started, then in a child process with MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ raised (benchmarks/_common.py), which keeps such
buffers in the heap. Neither setting favours either library.

`passes r/w` counts, in the compiled HLO, the kernels that read a full-size
tensor and those that write one: on a CPU the time of an op like this one
follows the full-size tensors it writes.
"""

from __future__ import annotations

import argparse
import functools
import re

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp

import bn_jax
from bn_jax import nn as bn_nn

SHAPES = ((4096, 1024), (256, 28, 28, 64))
DTYPES = (jnp.float32, jnp.bfloat16)
MOMENTUM, EPSILON = 0.99, 1e-5


def bn_jax_step(params, state, x, dy, *, grad="paper_jvp", impl="xla_cpu"):
  """(y, new_state, (dx, dparams)) for bn_jax; y takes x's dtype."""
  def forward(x, params):
    return bn_jax.apply(params, state, x, training=True, momentum=MOMENTUM,
                        epsilon=EPSILON, grad=grad, impl=impl)
  y, vjp, new_state = jax.vjp(forward, x, params, has_aux=True)
  return y, new_state, vjp(dy)


def flax_step(x_dtype):
  """The same step for flax.linen.BatchNorm; `dtype` keeps y in x's dtype."""
  module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM,
                        epsilon=EPSILON, dtype=x_dtype,
                        param_dtype=jnp.float32)

  def step(params, state, x, dy):
    def forward(x, params):
      y, updates = module.apply({"params": params, "batch_stats": state}, x,
                                mutable=["batch_stats"])
      return y, updates["batch_stats"]
    y, vjp, new_state = jax.vjp(forward, x, params, has_aux=True)
    return y, new_state, vjp(dy)
  return step


def copy_step(x, c):
  return x + c


# ----------------------------------------------------------------------------
# Passes over full-size tensors in the compiled HLO.

_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s+"
                          r"([a-z][a-z0-9-]*)\((.*)$")
_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element",
                "bitcast"}


def _sizes(type_text):
  """Element counts of the array shapes in an HLO type (tuples included)."""
  sizes = []
  for dims in _SHAPE.findall(type_text):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    sizes.append(size)
  return sizes


def _computations(hlo_text):
  """{computation name: [(name, type, opcode, arguments, attributes)]}."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
    if header:
      current = computations.setdefault(
          "ENTRY" if line.startswith("ENTRY") else header.group(1), [])
    elif current is not None and (match := _INSTRUCTION.match(line)):
      name, type_text, opcode, rest = match.groups()
      arguments, _, attributes = rest.partition(")")
      current.append((name, type_text, opcode, arguments, attributes))
  return computations


def _operands(arguments):
  return re.findall(r"%([\w.\-]+)", arguments)


def _sliced_only(computation, index):
  """Whether a fused computation uses its parameter `index` only through
  slices (one example as a reference value), never reading it whole."""
  params = [name for name, _, opcode, arguments, _ in computation
            if opcode == "parameter" and arguments.strip() == str(index)]
  users = [opcode for _, _, opcode, arguments, _ in computation
           if params and params[0] in _operands(arguments)]
  return bool(users) and all(u in ("slice", "dynamic-slice") for u in users)


def count_passes(hlo_text, full_size):
  """(kernels reading, kernels writing) a tensor of `full_size` elements in
  the entry computation of compiled HLO text. A fusion that only slices a
  full-size operand (one example, as a reference value) does not read it."""
  computations = _computations(hlo_text)
  sizes, reads, writes = {}, 0, 0
  for name, type_text, opcode, arguments, attributes in computations["ENTRY"]:
    sizes[name] = _sizes(type_text)
    if opcode in _NOT_KERNELS:
      continue
    called = re.search(r"calls=%([\w.\-]+)", attributes)
    fused = computations.get(called.group(1), []) if called else []
    reads += any(full_size in sizes.get(o, ()) and not _sliced_only(fused, i)
                 for i, o in enumerate(_operands(arguments)))
    writes += full_size in sizes[name]
  return reads, writes


# ----------------------------------------------------------------------------
# Timing.


def run_case(shape, dtype, rounds, bn_options):
  kx, kdy = jax.random.split(jax.random.key(0))
  x = (3.0 + 2.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
  dy = jax.random.normal(kdy, shape, jnp.float32).astype(dtype)
  ours_params, ours_state = bn_jax.init(shape[-1])
  flax_vars = jax.jit(nn.BatchNorm(use_running_average=False).init)(
      jax.random.key(1), x)
  programs = {
      "bn_jax": (jax.jit(functools.partial(bn_jax_step, **bn_options)),
                 (ours_params, ours_state, x, dy)),
      "flax": (jax.jit(flax_step(dtype)),
               (flax_vars["params"], flax_vars["batch_stats"], x, dy)),
      "copy": (jax.jit(copy_step), (x, jnp.asarray(1, dtype))),
  }
  passes = {name: count_passes(fn.lower(*args).compile().as_text(), x.size)
            for name, (fn, args) in programs.items()}
  candidates = {name: functools.partial(fn, *args)
                for name, (fn, args) in programs.items()}
  _common.interleaved(candidates, 2)  # warm up: compile, first allocations
  wall, _ = _common.interleaved(candidates, rounds)
  return x.nbytes, {name: _common.median(t) for name, t in wall.items()}, passes


def print_table(rounds, bn_options):
  print(_common.header("bn_op: one batch-norm op, forward + backward"))
  print(f"\n{_machine()}; median of {rounds} interleaved rounds; bn_jax "
        + ", ".join(f"{k}={v!r}" for k, v in bn_options.items()) + ".\n")
  print("| x | bn_jax ms | flax ms | flax/bn_jax | bn_jax GB/s | flax GB/s "
        "| copy GB/s | bn_jax % of copy | passes r/w bn_jax, flax |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
  for shape in SHAPES:
    for dtype in DTYPES:
      nbytes, median, passes = run_case(shape, dtype, rounds, bn_options)
      gbps = lambda seconds, n: n * nbytes / seconds / 1e9
      ours, theirs = gbps(median["bn_jax"], 4), gbps(median["flax"], 4)
      copy = gbps(median["copy"], 2)  # a copy reads x and writes its result
      name = f"{shape} {jnp.dtype(dtype).name}"
      print(f"| {name} | {median['bn_jax'] * 1e3:.2f} | "
            f"{median['flax'] * 1e3:.2f} | "
            f"{median['flax'] / median['bn_jax']:.2f} | {ours:.1f} | "
            f"{theirs:.1f} | {copy:.1f} | {100 * ours / copy:.0f}% | "
            f"{'/'.join(map(str, passes['bn_jax']))}, "
            f"{'/'.join(map(str, passes['flax']))} |", flush=True)


# ----------------------------------------------------------------------------
# The normalization family: every variant as a linen module, beside flax's.

def _variants():
  """{name: module} of bn_jax's variants and flax's LayerNorm, GroupNorm and
  RMSNorm, each in training mode with its defaults except as named."""
  clipping = (("dmax", 5.0), ("rmax", 3.0))  # rmin: 1 / rmax
  return {
      "bn_jax batch": bn_nn.BatchNorm(use_running_average=False),
      "flax batch": nn.BatchNorm(use_running_average=False),
      "bn_jax renorm": bn_nn.BatchNorm(use_running_average=False,
                                       renorm=True, renorm_clipping=clipping),
      "bn_jax ghost (32)": bn_nn.BatchNorm(use_running_average=False,
                                           virtual_batch_size=32),
      "bn_jax sampled (1/4, stride)": bn_nn.BatchNorm(
          use_running_average=False, stats_fraction=0.25),
      "bn_jax sampled (1/4, random)": bn_nn.BatchNorm(
          use_running_average=False, stats_fraction=0.25,
          stats_sampling="random"),
      "bn_jax layer": bn_nn.LayerNorm(),
      "flax layer": nn.LayerNorm(),
      "bn_jax group (32)": bn_nn.GroupNorm(num_groups=32),
      "flax group (32)": nn.GroupNorm(num_groups=32),
      "bn_jax rms": bn_nn.RMSNorm(),
      "flax rms": nn.RMSNorm(),
      # Instance norm needs spatial axes: NHWC only.
      "bn_jax instance": bn_nn.InstanceNorm(),
      "flax instance": nn.InstanceNorm(),
  }


def module_step(module):
  """y, new state and (dx, dparams) of one training call of `module`."""
  def step(variables, x, dy):
    def forward(x, params):
      y, updates = module.apply({**variables, "params": params}, x,
                                mutable=["batch_stats"])
      return y, updates
    y, vjp, updates = jax.vjp(forward, x, variables["params"], has_aux=True)
    return y, updates, vjp(dy)
  return step


def print_variants_table(rounds):
  """Forward + backward of every variant, timed in the same rounds; the
  ratio is to bn_jax's plain BN (for `sampled`: to the full-batch
  statistics)."""
  print("\nThe normalization family (float32; ratio = time / bn_jax batch):"
        "\n")
  print("| x | variant | ms | vs bn_jax batch |")
  print("|---|---|---:|---:|")
  for shape in ((4096, 1024), (256, 28, 28, 64)):
    kx, kdy = jax.random.split(jax.random.key(0))
    x = 3.0 + 2.0 * jax.random.normal(kx, shape, jnp.float32)
    dy = jax.random.normal(kdy, shape, jnp.float32)
    # A copy first (and last) in every round: whatever follows the previous
    # round's last (largest) buffers pays for them (benchmarks/README.md).
    candidates = {"copy (x + 1)": functools.partial(
        jax.jit(copy_step), x, jnp.asarray(1, x.dtype))}
    for name, module in _variants().items():
      if "instance" in name and x.ndim < 3:
        continue
      variables = jax.jit(module.init)(jax.random.key(1), x)
      candidates[name] = functools.partial(jax.jit(module_step(module)),
                                           variables, x, dy)
    _common.interleaved(candidates, 2)  # compile, first allocations
    # Half the rounds in reverse order: a case measured right after a
    # large one (group norm's temporaries) is slowed by it.
    forward, _ = _common.interleaved(candidates, (rounds + 1) // 2)
    backward, _ = _common.interleaved(dict(reversed(candidates.items())),
                                      rounds // 2)
    median = {name: _common.median(forward[name] + backward[name])
              for name in candidates}
    for name, seconds in median.items():
      print(f"| {shape} | {name} | {seconds * 1e3:.2f} | "
            f"{seconds / median['bn_jax batch']:.2f} |", flush=True)


def _machine():
  try:
    with open("/proc/cpuinfo") as f:
      return re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
  except (OSError, AttributeError):
    return "unknown CPU"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="5 rounds, the allocator as this process started")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--malloc", choices=("current", "both"), default=None,
                      help="'both' (the default without --quick) repeats "
                      "the run in a child process with MALLOC_ENV set")
  parser.add_argument("--grad", choices=bn_jax.GRAD_MODES,
                      default="paper_jvp", help="bn_jax.apply's grad mode")
  parser.add_argument("--impl", choices=bn_jax.IMPLS, default="xla_cpu",
                      help="bn_jax.apply's impl")
  parser.add_argument("--variants", action="store_true",
                      help="time the normalization family (renorm, ghost, "
                      "sampled, layer, group, rms) beside flax's instead")
  args = parser.parse_args()
  rounds = args.rounds or (5 if args.quick else 50)
  if args.variants:
    print(_common.header("bn_op: the normalization family, forward + "
                         "backward"))
    print_variants_table(rounds)
  else:
    print_table(rounds, dict(grad=args.grad, impl=args.impl))
  if (args.malloc or ("current" if args.quick else "both")) == "both":
    _common.run_tuned_child(__file__)


if __name__ == "__main__":
  main()
