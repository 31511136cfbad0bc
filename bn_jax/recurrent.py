"""Recurrent batch normalization: the BN-LSTM and its baselines.

The BN-LSTM of Cooijmans et al. (2016, "Recurrent Batch Normalization"),
their equations (6)-(8), with gates in the paper's order (f, i, o, g):

    (f, i, o, g) = BN(W_h h_{t-1}; gamma_h, 0) + BN(W_x x_t; gamma_x, 0) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

and, with the same parameters, two baselines: the plain LSTM (no
normalization: gates = W_h h + W_x x + b, h_t = sigmoid(o) * tanh(c_t)) and
the LayerNorm-LSTM of Ba et al. (2016), which puts LN (each example over its
features, `bn_jax.norms.layer_norm`) where the BN-LSTM puts BN. Each cell is
one pure function of explicit state,

    params = init_params(key, input_size, hidden_size, norm="batch")
    stats = init_stats(hidden_size, t_max)             # norm="batch" only
    hs, stats = unroll(params, stats, x, norm="batch", training=True)
    hs, _ = unroll(params, stats, x, norm="batch", training=False)

with `step` for one time step and the flax module `LSTM` over the same
functions.

Conventions, and how they map to the paper:
  * Each BN is `bn_jax.core.apply` over the batch axis of a (batch,
    features) pre-activation, so the conventions are the rest of bn_jax's:
    the paper's BN(h; gamma, beta) = beta + gamma * (h - E[h]) /
    sqrt(Var[h] + epsilon) with the batch's biased variance in training;
    epsilon 1e-5; running statistics with flax's momentum, `running =
    momentum * running + (1 - momentum) * batch` (default 0.99; PyTorch's
    momentum is 1 - momentum); the running variance biased (flax, Keras);
    momentum=None averages every update exactly, which is how the paper's
    population statistics ("estimated over the whole training set") are
    recomputed after training.
  * Statistics per time step: `LSTMStats` holds one `BNState` for each of
    the three normalizations, every field with a leading T_max axis (the
    paper's T_max, the longest training sequence). Step t reads and, in
    training, updates slot min(t, T_max - 1): steps beyond T_max use the
    last step's statistics, as the paper does at test time; a training
    sequence longer than T_max updates that last slot once per such step.
    Sequences of any length T run, longer or shorter than T_max.
  * gamma_h and gamma_x have no beta (the paper's betas are redundant with
    b); gamma_c has beta_c. All gammas start at 0.1, the paper's
    recommendation (gamma = 1 saturates the gates and the gradient through
    time vanishes), and beta_c at 0. The LN-LSTM has the same parameters,
    gammas at 1 as LN's usual initialization (Ba et al. give LN betas for
    both terms; one bias b is the same function).
  * Weights as flax's `LSTMCell`: W_x (input_size, 4H) LeCun normal, W_h
    (H, 4H) orthogonal per gate, and b zero except the forget gate's, 1.0
    (Gers et al., 2000; Jozefowicz et al., 2015), so that the cell keeps
    its memory at the start of training.
  * LN and BN statistics are float32 for float32 and narrower inputs, as
    everywhere in bn_jax; the hidden states have the dtype of x promoted with
    the params'. One epsilon (1e-5) serves the three normalizations of a cell
    for every `norm`.

At t = 0 the hidden state is 0, so W_h h_0 is 0 for every example and its
BN is 0 (variance 0, normalized by sqrt(epsilon)); its running variance
decays towards 0. This is the paper's model as it stands.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bn_jax import core
from bn_jax import norms

# How the three terms of a cell are normalized: BN per time step
# (Cooijmans et al.), LN per example (Ba et al.), or not at all.
NORMS = ("batch", "layer", "none")
# gamma's initial value by norm (see the module notes).
DEFAULT_SCALE_INIT = {"batch": 0.1, "layer": 1.0}
GATES = ("f", "i", "o", "g")  # the order of the 4H columns


class LSTMParams(NamedTuple):
  """What is differentiated; the norm fields are None for norm="none"."""
  input_kernel: jax.Array  # W_x, (input_size, 4H), gate columns (f, i, o, g)
  hidden_kernel: jax.Array  # W_h, (H, 4H)
  bias: jax.Array  # b, (4H,)
  input_scale: jax.Array | None = None  # gamma_x, (4H,)
  hidden_scale: jax.Array | None = None  # gamma_h, (4H,)
  cell_scale: jax.Array | None = None  # gamma_c, (H,)
  cell_bias: jax.Array | None = None  # beta_c, (H,)


class LSTMStats(NamedTuple):
  """The BN-LSTM's running statistics, one slot per time step < T_max.

  Each field is a `core.BNState` whose mean and var are (T_max, features)
  and whose count is (T_max,): slot t is a plain BNState for step t.
  """
  input: core.BNState  # of W_x x_t, (T_max, 4H)
  hidden: core.BNState  # of W_h h_{t-1}, (T_max, 4H)
  cell: core.BNState  # of c_t, (T_max, H)


class LSTMCarry(NamedTuple):
  """The recurrent state carried from step to step."""
  h: jax.Array  # (batch, H)
  c: jax.Array  # (batch, H)


def _check_norm(norm) -> None:
  core._check_choice("norm", norm, NORMS)  # pylint: disable=protected-access


def _is_positive_int(value) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= 1)


def init_params(key: jax.Array, input_size: int, hidden_size: int, *,
                norm: str, scale_init: float | None = None,
                forget_bias: float = 1.0, dtype: Any = jnp.float32,
                ) -> LSTMParams:
  """Fresh parameters of an LSTM cell with the given normalization.

  Args:
    key: a PRNG key for W_x and W_h.
    input_size: features of x_t.
    hidden_size: H, features of h_t and c_t.
    norm: "batch", "layer" or "none" (`NORMS`).
    scale_init: the gammas' initial value; None: 0.1 for "batch" (Cooijmans
      et al.), 1.0 for "layer" (`DEFAULT_SCALE_INIT`).
    forget_bias: the forget gate's initial bias; the other gates' are 0.
    dtype: of every parameter.
  """
  _check_norm(norm)
  for name, value in (("input_size", input_size),
                      ("hidden_size", hidden_size)):
    if not _is_positive_int(value):
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  hidden = hidden_size
  input_key, hidden_key = jax.random.split(key)
  input_kernel = nn.initializers.lecun_normal()(
      input_key, (input_size, 4 * hidden), dtype)
  # One orthogonal (H, H) block per gate, as flax's LSTMCell (a Dense per
  # gate): W_h h then neither grows nor shrinks h within each gate.
  orthogonal = nn.initializers.orthogonal()
  hidden_kernel = jnp.concatenate(
      [orthogonal(k, (hidden, hidden), dtype)
       for k in jax.random.split(hidden_key, 4)], axis=1)
  bias = jnp.zeros((4 * hidden,), dtype).at[:hidden].set(forget_bias)
  params = LSTMParams(input_kernel, hidden_kernel, bias)
  if norm == "none":
    return params
  gamma = DEFAULT_SCALE_INIT[norm] if scale_init is None else scale_init
  return params._replace(
      input_scale=jnp.full((4 * hidden,), gamma, dtype),
      hidden_scale=jnp.full((4 * hidden,), gamma, dtype),
      cell_scale=jnp.full((hidden,), gamma, dtype),
      cell_bias=jnp.zeros((hidden,), dtype))


def init_stats(hidden_size: int, t_max: int) -> LSTMStats:
  """Fresh per-step statistics (mean 0, var 1, count 0 in every slot).

  Args:
    hidden_size: H.
    t_max: the number of time steps with their own statistics, the longest
      training sequence (28 for MNIST read row by row).
  """
  if not _is_positive_int(t_max):
    raise ValueError(
        f"t_max={t_max!r} must be a positive integer: the number of time "
        "steps with their own statistics (the longest training sequence).")
  if not _is_positive_int(hidden_size):
    raise ValueError(
        f"hidden_size={hidden_size!r} must be a positive integer.")

  def per_step(features):
    _, state = core.init(features)
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (t_max,) + v.shape),
                        state)
  return LSTMStats(input=per_step(4 * hidden_size),
                   hidden=per_step(4 * hidden_size),
                   cell=per_step(hidden_size))


def init_carry(batch_size: int, hidden_size: int,
               dtype: Any = jnp.float32) -> LSTMCarry:
  """h_0 = c_0 = 0, the paper's initial state."""
  zeros = jnp.zeros((batch_size, hidden_size), dtype)
  return LSTMCarry(h=zeros, c=zeros)


def _check_step(params: LSTMParams, stats, carry: LSTMCarry, x_t, *,
                norm) -> None:
  """Shapes and the parts each norm needs, at trace time."""
  _check_norm(norm)
  if x_t.ndim != 2:
    raise ValueError(
        f"x_t has shape {tuple(x_t.shape)}; a step takes (batch, features) "
        "(unroll takes (batch, time, features)).")
  input_size, gate_size = params.input_kernel.shape
  hidden = gate_size // 4
  if x_t.shape[-1] != input_size:
    raise ValueError(
        f"x has {x_t.shape[-1]} features but params.input_kernel expects "
        f"{input_size}; create params with init_params(key, "
        f"{x_t.shape[-1]}, {hidden}, ...).")
  if tuple(carry.h.shape) != (x_t.shape[0], hidden) or tuple(
      carry.c.shape) != (x_t.shape[0], hidden):
    raise ValueError(
        f"carry has h {tuple(carry.h.shape)}, c {tuple(carry.c.shape)} but "
        f"x_t's batch and the params need ({x_t.shape[0]}, {hidden}); use "
        f"init_carry({x_t.shape[0]}, {hidden}).")
  if norm != "none" and params.input_scale is None:
    raise ValueError(
        f"params has no gammas but norm={norm!r} needs them; create params "
        f"with init_params(..., norm={norm!r}).")
  if norm == "none" and params.input_scale is not None:
    raise ValueError(
        "params has gammas but norm='none' would ignore them; pass the norm "
        "the params were made for.")
  if norm != "batch":
    if stats is not None:
      raise ValueError(
          f"stats are the BN-LSTM's per-step statistics; norm={norm!r} keeps "
          "none, pass stats=None.")
    return
  if stats is None:
    raise ValueError("norm='batch' needs stats; create them with "
                     f"init_stats({hidden}, t_max).")
  if stats.input.mean.ndim != 2 or stats.input.mean.shape[1] != gate_size:
    raise ValueError(
        f"stats.input.mean has shape {tuple(stats.input.mean.shape)} but "
        f"the params need (t_max, {gate_size}); create stats with "
        f"init_stats({hidden}, t_max).")


def _batch_norm_at(state: core.BNState, slot, value, scale, bias, *,
                   training, momentum, epsilon, impl):
  """BN of one step's (batch, features) `value` with slot `slot`'s
  statistics; returns (y, state with that slot updated in training)."""
  step_state = jax.tree.map(
      lambda v: lax.dynamic_index_in_dim(v, slot, keepdims=False), state)
  y, new_step_state = core.apply(
      core.BNParams(scale, bias), step_state, value, training=training,
      momentum=momentum, epsilon=epsilon, impl=impl)
  if not training:
    return y, state
  # The stored dtype is kept (float32), so that a float64 step under x64
  # cannot change the type of a scan's carry.
  return y, jax.tree.map(
      lambda all_, one: lax.dynamic_update_index_in_dim(
          all_, one.astype(all_.dtype), slot, 0), state, new_step_state)


def step(params: LSTMParams, stats: LSTMStats | None, carry: LSTMCarry,
         x_t: jax.Array, t, *, norm: str, training: bool,
         momentum: float | None = 0.99, epsilon: float = 1e-5,
         impl: str = "auto") -> tuple[LSTMCarry, LSTMStats | None]:
  """One time step of the LSTM cell; returns (new_carry, new_stats).

  Args:
    params: from `init_params` with the same `norm`.
    stats: for norm="batch", the per-step statistics from `init_stats` (or
      a previous step); None for the other norms.
    carry: (h_{t-1}, c_{t-1}), e.g. `init_carry`.
    x_t: (batch, input_size).
    t: the step's index (int or traced int): which statistics slot BN uses,
      min(t, T_max - 1).
    norm: "batch", "layer" or "none".
    training: for norm="batch", True normalizes with this batch's statistics
      and updates slot t's running statistics; False uses slot t's running
      statistics and returns `stats` unchanged. The other norms ignore it.
    momentum, epsilon, impl: as in `core.apply` (epsilon also for LN).

  Returns:
    (LSTMCarry(h_t, c_t), new_stats); new_stats is None unless norm="batch".
  """
  _check_step(params, stats, carry, x_t, norm=norm)
  input_term = x_t @ params.input_kernel
  hidden_term = carry.h @ params.hidden_kernel
  if norm == "batch":
    slot = jnp.minimum(t, stats.input.mean.shape[0] - 1)
    bn = lambda state, value, scale, bias: _batch_norm_at(
        state, slot, value, scale, bias, training=training,
        momentum=momentum, epsilon=epsilon, impl=impl)
    input_term, input_stats = bn(stats.input, input_term, params.input_scale,
                                 None)
    hidden_term, hidden_stats = bn(stats.hidden, hidden_term,
                                   params.hidden_scale, None)
  elif norm == "layer":
    ln = lambda value, scale, bias: norms.layer_norm(value, scale, bias,
                                                     epsilon=epsilon)
    input_term = ln(input_term, params.input_scale, None)
    hidden_term = ln(hidden_term, params.hidden_scale, None)
  gates = hidden_term + input_term + params.bias[None, :]
  f, i, o, g = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
  if norm == "batch":
    cell, cell_stats = bn(stats.cell, c, params.cell_scale, params.cell_bias)
    stats = LSTMStats(input_stats, hidden_stats, cell_stats)
  elif norm == "layer":
    cell = ln(c, params.cell_scale, params.cell_bias)
  else:
    cell = c
  h = jax.nn.sigmoid(o) * jnp.tanh(cell)
  return LSTMCarry(h=h.astype(carry.h.dtype), c=c.astype(carry.c.dtype)), (
      stats)


def unroll(params: LSTMParams, stats: LSTMStats | None, x: jax.Array, *,
           norm: str, training: bool, momentum: float | None = 0.99,
           epsilon: float = 1e-5, impl: str = "auto",
           ) -> tuple[jax.Array, LSTMStats | None]:
  """Runs `step` over time with `lax.scan`, from h_0 = c_0 = 0.

  Args:
    params, stats, norm, training, momentum, epsilon, impl: as in `step`.
    x: (batch, T, input_size), any T (steps t >= T_max use the last slot).

  Returns:
    (hs, new_stats): hs is (batch, T, H), h_1 .. h_T (`hs[:, -1]` is the
    last); new_stats is `stats` after every step's update (training), or
    `stats` itself (evaluation, or None for the other norms).
  """
  if x.ndim != 3:
    raise ValueError(
        f"x has shape {tuple(x.shape)}; unroll takes (batch, time, "
        "features), e.g. (N, 28, 28) for MNIST read row by row.")
  hidden = params.hidden_kernel.shape[0]
  dtype = jnp.result_type(x, params.input_kernel)
  carry = init_carry(x.shape[0], hidden, dtype)

  def body(loop, inputs):
    carry, stats = loop
    x_t, t = inputs
    carry, stats = step(params, stats, carry, x_t, t, norm=norm,
                        training=training, momentum=momentum,
                        epsilon=epsilon, impl=impl)
    return (carry, stats), carry.h

  (_, new_stats), hs = lax.scan(
      body, (carry, stats),
      (jnp.swapaxes(x, 0, 1), jnp.arange(x.shape[1], dtype=jnp.int32)))
  return jnp.swapaxes(hs, 0, 1), new_stats


class LSTM(nn.Module):
  """An LSTM layer over (batch, T, features), returning (batch, T, H).

  `norm` chooses the cell: "batch" the BN-LSTM (Cooijmans et al., 2016),
  "layer" the LN-LSTM (Ba et al., 2016), "none" the plain LSTM. It computes
  `unroll`, with its params created by `init_params` (params `input_kernel`,
  `hidden_kernel`, `bias` and, with a norm, `input_scale`, `hidden_scale`,
  `cell_scale`, `cell_bias`).

  With norm="batch" the `batch_stats` collection holds `input`, `hidden`
  and `cell`, each {"mean", "var"} of shape (t_max, features), plus
  "count" (t_max,) where momentum=None reads it. As `bn_jax.nn.BatchNorm`:
  training outside `init` updates them where batch_stats is mutable (and
  otherwise normalizes with the batch's statistics and changes nothing);
  `init` leaves them at their initial values; evaluation reads them.
  """
  hidden_size: int
  norm: str
  t_max: int | None = None  # required for norm="batch"
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  scale_init: float | None = None  # None: DEFAULT_SCALE_INIT[norm]
  forget_bias: float = 1.0
  impl: str = "auto"  # as core.apply's: by the backend

  @nn.compact
  def __call__(self, x, *, train: bool):
    _check_norm(self.norm)
    if x.ndim != 3:
      raise ValueError(
          f"x has shape {tuple(x.shape)}; LSTM takes (batch, time, "
          "features), e.g. (N, 28, 28) for MNIST read row by row.")
    make = lambda key: init_params(
        key, x.shape[-1], self.hidden_size, norm=self.norm,
        scale_init=self.scale_init, forget_bias=self.forget_bias)
    shapes = jax.eval_shape(make, jax.random.key(0))
    params = LSTMParams(*(
        None if shape is None else self.param(
            name, lambda key, name=name: getattr(make(key), name))
        for name, shape in zip(LSTMParams._fields, shapes)))

    stats = variables = None
    if self.norm == "batch":
      if self.t_max is None:
        raise ValueError(
            "norm='batch' keeps statistics per time step and needs t_max, "
            "the longest training sequence (28 for MNIST row by row).")
      fresh = init_stats(self.hidden_size, self.t_max)
      kept = ("mean", "var") + (
          ("count",) if core.reads_count(self.momentum, None) else ())
      variables = {
          name: self.variable("batch_stats", name, lambda state=state: {
              field: getattr(state, field) for field in kept})
          for name, state in zip(LSTMStats._fields, fresh)}
      stats = LSTMStats(*(
          state._replace(**variables[name].value)
          for name, state in zip(LSTMStats._fields, fresh)))

    hs, new_stats = unroll(params, stats, x, norm=self.norm, training=train,
                           momentum=self.momentum, epsilon=self.epsilon,
                           impl=self.impl)
    if (variables and train and not self.is_initializing()
        and self.is_mutable_collection("batch_stats")):
      for name, state in zip(LSTMStats._fields, new_stats):
        variables[name].value = {field: getattr(state, field)
                                 for field in variables[name].value}
    return hs
