"""Training: a pure train step, one epoch as a `lax.scan`, vmapped sweeps.

Everything here is a function of (TrainSpec, TrainState, data): the spec is
the static, hashable part of a config (architecture, normalization options,
optimizer, batch size), the state is what changes (params, batch_stats,
opt_state, step) plus the per-run numbers a sweep may vary: the learning
rate, inside the optimizer state (`optax.inject_hyperparams`), BN momentum
and epsilon (`TrainState.bn_hparams`, handed to `models.make_norm`), and the
data-order key. K runs of one architecture are K stacked states trained by
`jax.vmap` of the same epoch function: one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bn_lab import data as data_lib
from bn_lab import models
from bn_lab import progress
from bn_jax import precise as precise_lib

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
# Per-run values a vmapped sweep may vary (config.sweep.<name>), and for
# the BN ones the bn_jax.nn.BatchNorm argument each sets.
SWEEPABLE = ("learning_rate", "bn_momentum", "bn_epsilon")
BN_SWEEPABLE = {"bn_momentum": "momentum", "bn_epsilon": "epsilon"}
# The metric of eval mode with recomputed population statistics
# (`TrainSpec.precise_batches`), and those of the training set in eval mode
# (`TrainSpec.eval_train`).
PRECISE_METRIC = "test_accuracy_precise"
PRECISE_LOSS_METRIC = "test_loss_precise"  # its test NLL
# How far the running statistics are from the recomputed ones, averaged
# over features and BN layers (`running_statistics_gaps`).
STALENESS_METRICS = ("running_mean_gap", "running_var_gap")
TRAIN_EVAL_METRICS = ("train_loss_eval", "train_accuracy_eval")
# Eval mode on the validation split (DeviceData.val_images), every epoch.
VALIDATION_METRICS = ("val_loss", "val_accuracy")
# Bit i of the NaN guard's flags: NONFINITE_QUANTITIES[i] was NaN or inf.
NONFINITE_QUANTITIES = ("loss", "parameters", "BN statistics")
# The guard's next bit: the training loss was finite but above the
# divergence threshold (`TrainSpec.divergence_factor`).
DIVERGED_FLAG = 1 << len(NONFINITE_QUANTITIES)


def significant(values, digits: int = 7):
  """An array as nested lists of floats rounded to `digits` significant
  digits (a float32's precision, without float64's noise digits)."""
  return np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[float])(
      np.asarray(values, np.float64)).tolist()


def measurement_fields(name: str, values: dict[str, Any]) -> dict[str, Any]:
  """A metrics row's fields for one run's measurement `name` (its values
  stacked over the epoch's measurements): `<name>_steps` (the steps
  measured at) and `<name>_<field>` lists for the other fields."""
  fields = {f"{name}_steps": [int(s) for s in values["step"]]}
  for field, value in values.items():
    if field != "step":
      fields[f"{name}_{field}"] = significant(value)
  return fields


# Where a measurement looks (`Measurement.on`).
MEASURED_ON = ("train_batch", "test_images")


@dataclasses.dataclass(frozen=True)
class Measurement:
  """A measurement taken inside the epoch's scan, every `every` steps.

  A study hands these to the trainer (`TrainSpec.measurements`); the
  trainer calls `fn` and returns its values stacked over the epoch's
  measurements, as metric `name`.

  Attributes:
    name: the metric's key (and the prefix of its metrics.jsonl fields).
    every: the interval in steps; it divides the steps of an epoch.
    fn: `fn(state, images, labels, *, spec, **options) -> dict` of arrays,
      a pure function of the run's `TrainState` (traced inside the scan,
      vmapped under a sweep); "step" in the dict is the step it measured
      at. `images` are raw `DeviceData` images (`model_inputs` scales them).
    on: "train_batch": the state before every k-th step's update, on that
      step's training batch (one device's: no data parallelism);
      "test_images": the state after every k-th step, on the first
      `num_images` test images.
    num_images: with on="test_images".
    options: (name, value) pairs passed to `fn` (hashable, as the spec is
      a static argument of the compiled epoch).
    row_fields: `row_fields(values, spec) -> dict`, one run's stacked
      values as metrics.jsonl fields; None: `<name>_steps` and
      `<name>_<field>` lists (`measurement_fields`).
  """
  name: str
  every: int
  fn: Callable[..., dict[str, Any]]
  on: str = "train_batch"
  num_images: int = 0
  options: tuple[tuple[str, Any], ...] = ()
  row_fields: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None

  def __post_init__(self):
    if self.on not in MEASURED_ON:
      raise ValueError(f"Measurement {self.name!r}: on={self.on!r}; choose "
                       f"one of {MEASURED_ON}.")
    if not (isinstance(self.every, int) and self.every > 0):
      raise ValueError(f"Measurement {self.name!r}: every={self.every!r} "
                       "must be a positive integer (steps).")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The static part of an experiment: everything that shapes the program."""
  model: str = "mlp"
  placement: str = "after_activation"
  activation: str = "relu"
  widths: tuple[int, ...] = (50,)
  channels: tuple[int, ...] = (32, 64)
  conv: str = "auto"  # models.CONVS key, or "auto" (by backend)
  init: str = "default"  # the Dense kernels' initializer (models.INITS)
  init_std: float = 0.01  # init="gaussian": its standard deviation
  norm: str = "batch"  # models.NORMS: the normalization layer
  # Sequence models (models.SEQUENCE_MODELS) only: how the image becomes a
  # sequence (models.SEQUENCES), the LSTM's units, the permuted order's seed.
  sequence: str = "rows"
  hidden_size: int = 100
  permutation_seed: int = 0
  # The residual CNN (models.RESIDUAL_MODELS) only: blocks per stage,
  # SkipInit, the convolutions' weight standardization (models.Conv), the
  # stem's stride.
  blocks_per_stage: int = 1
  skip_init: bool = False
  standardize: str = "none"
  stem_stride: int = 1
  # (name, value) pairs of normalization options (config.bn's fields,
  # renorm_schedule in steps); () keeps the layer's defaults. Swept values
  # override them per run (TrainState.bn_hparams).
  bn: tuple[tuple[str, Any], ...] = ()
  optimizer: str = "adam"
  schedule: str = "constant"
  warmup_steps: int = 0
  schedule_epochs: int | None = None  # the schedule's length; None: all
  weight_decay: float = 0.0
  grad_clip_norm: float | None = None  # clip the gradient's global norm
  # Adaptive Gradient Clipping's threshold (`make_optimizer`); None: off.
  agc_clip: float | None = None
  batch_size: int = 128
  steps_per_epoch: int = 468
  num_epochs: int = 10
  eval_chunk: int = 1000
  nan_guard: bool = True  # flag the first non-finite step (see train_epoch)
  # With nan_guard: also flag the first step whose training loss is finite
  # but above divergence_factor x ln(number of classes), the loss of an
  # untrained classifier (`divergence_threshold`); None: off.
  divergence_factor: float | None = None
  # With nan_guard: a run's first non-finite step is dropped and the run
  # frozen from then on (TrainState.diverged_at), the others train on.
  freeze_diverged: bool = False
  axis_name: str | None = None  # set for data-parallel (synchronized) BN
  sync_bn: bool = True  # False: per-device BN statistics, grads still
  # averaged over axis_name (bn_lab.parallel's bn_stats="per_device")
  # None: each run's data order follows its seed. An int: every run shuffles
  # with the key seed `data_seed` would give it, so all runs of a sweep see
  # the same batches, which are then gathered once for all of them (and the
  # K first-layer matmuls become one wide one: `over_runs`).
  data_seed: int | None = None
  # How uint8 pixels become the model's float32 inputs, inside the step (see
  # `model_inputs`); float images are used as given.
  input_scaling: str = "unit"
  # Exact population statistics after each epoch (`population_statistics`),
  # over this many of the epoch's batches; 0: off.
  precise_batches: int = 0
  precise_estimator: str = "mean"  # bn_jax.precise.ESTIMATORS
  precise_layerwise: bool = False
  eval_train: bool = False  # also the training set in eval mode, per epoch
  # Every this many steps the epoch's scan tells the host how far it is
  # (bn_lab.progress: a jax.debug.callback, no number changes); 0: never.
  progress_every: int = 0
  # The training loss and accuracy over each window of this many steps,
  # returned with the epoch's metrics (`step_windows`); 0: none.
  log_every_steps: int = 0
  # What the study measures during training (`Measurement`): the trainer
  # calls each inside the epoch's scan and knows none of them by name.
  measurements: tuple[Measurement, ...] = ()

  @property
  def total_steps(self) -> int:
    """The steps the schedules are laid out over."""
    return self.steps_per_epoch * (self.schedule_epochs or self.num_epochs)

  def make_model(self, bn_hparams: dict[str, Any]):
    """The model, its norm built from `self.bn` with the run's swept BN
    values (`TrainState.bn_hparams`, traced under a sweep's vmap)."""
    dense_init = models.kernel_initializer(self.init, self.init_std)
    if self.model in models.SEQUENCE_MODELS:  # the cell takes norm by name
      return models.make_sequence_model(
          self.model, {**dict(self.bn), **bn_hparams},
          norm="none" if self.placement == "none" else self.norm,
          sequence=self.sequence, hidden_size=self.hidden_size,
          permutation_seed=self.permutation_seed, dense_init=dense_init)
    common = dict(activation=self.activation, widths=self.widths,
                  channels=self.channels, conv=self.conv,
                  dense_init=dense_init, norm_name=self.norm,
                  blocks_per_stage=self.blocks_per_stage,
                  skip_init=self.skip_init, standardize=self.standardize,
                  stem_stride=self.stem_stride)
    if self.norm == "none":  # no layer to build: the placement "none"
      return models.make_model(self.model, placement="none", **common)
    norm = models.make_norm({**dict(self.bn), **bn_hparams}, norm=self.norm,
                            axis_name=self.axis_name if self.sync_bn
                            else None)
    return models.make_model(
        self.model, placement=self.placement, norm=norm,
        norm_has_bias=self.norm not in models.NORMS_WITHOUT_BIAS, **common)


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any  # holds the run's learning rate (optax.inject_hyperparams)
  # BatchNorm arguments swept per run ("momentum", "epsilon"): float32
  # scalars that override TrainSpec.bn.
  bn_hparams: dict[str, jax.Array]
  data_key: jax.Array  # uint32 key; epoch e shuffles with fold_in(key, e)
  # With TrainSpec.freeze_diverged: the global step whose update was the
  # first non-finite one (int32; -1: none), after which the run is frozen.
  # None otherwise, so the checkpoints of other runs keep their layout.
  diverged_at: jax.Array | None = None
  # With a norm that draws noise (models.NOISY_NORMS): the run's uint32
  # noise key; step t draws with fold_in(key, t) (`noise_rngs`). None
  # otherwise (the checkpoints of other runs keep their layout).
  noise_key: jax.Array | None = None


class DeviceData(NamedTuple):
  """The whole data set as device arrays. Images are (N, 784) uint8 pixels
  (MNIST's train set: 47 MB, where float32 takes 188 MB), scaled to floats
  batch by batch inside the compiled step (`model_inputs`), or (N, 784)
  float32 inputs used as they are."""
  train_images: jax.Array
  train_labels: jax.Array  # (N,) int32
  test_images: jax.Array
  test_labels: jax.Array
  # Held out of the training set for selection (config.validation_examples).
  val_images: jax.Array | None = None
  val_labels: jax.Array | None = None


def model_inputs(images, spec: TrainSpec) -> jax.Array:
  """The model's float32 inputs for a batch of `DeviceData` images.

  The pixels stay uint8 on the device (a quarter of float32's memory, and
  of the bytes each step's batch gather moves) and each batch is scaled here,
  inside the compiled step, by `spec.input_scaling` with the host's
  definition (`bn_lab.data.scale_pixels`). On a 2-core CPU the epoch time
  is the same as with float32 images (benchmarks/README.md).
  """
  if images.dtype == jnp.uint8:
    return data_lib.scale_pixels(images, spec.input_scaling)
  return images


def _momentum(learning_rate):
  return optax.sgd(learning_rate, momentum=0.9, nesterov=True)


_OPTIMIZERS = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd,
               "momentum": _momentum}
_SCHEDULES = {  # the factor the learning rate is multiplied by at step t
    "constant": lambda spec: None,
    "cosine": lambda spec: optax.cosine_decay_schedule(1.0, spec.total_steps),
    "warmup_cosine": lambda spec: optax.warmup_cosine_decay_schedule(
        0.0, 1.0, spec.warmup_steps, spec.total_steps),
}


def make_optimizer(spec: TrainSpec, learning_rate=0.0,
                   ) -> optax.GradientTransformation:
  """The optax optimizer of `spec`, its learning rate a hyperparameter of
  the optimizer state (`optax.inject_hyperparams`).

  `init` stores `learning_rate` (a per-run, possibly traced, scalar) in the
  state and `update` reads it from there, so the training step builds this
  with the default. A schedule multiplies the updates by its factor at the
  step (optax's learning rate is always the last scaling, so this is the
  scheduled learning rate). With `spec.grad_clip_norm`, the gradient is
  first scaled down to that global norm where it is longer
  (`optax.clip_by_global_norm`), as Cooijmans et al. train their LSTMs.
  With `spec.agc_clip`, Adaptive Gradient Clipping comes first
  (`optax.adaptive_grad_clip`: each unit's gradient to at most agc_clip
  times its weights' norm), on every parameter but the readout's, which
  Brock et al. (2021) leave unclipped.
  """
  if spec.optimizer not in _OPTIMIZERS:
    raise ValueError(f"optimizer={spec.optimizer!r}; choose one of "
                     f"{OPTIMIZERS}.")
  if spec.schedule not in _SCHEDULES:
    raise ValueError(f"schedule={spec.schedule!r}; choose one of "
                     f"{SCHEDULES}.")
  extra = ({"weight_decay": spec.weight_decay} if spec.optimizer == "adamw"
           else {})
  tx = optax.inject_hyperparams(_OPTIMIZERS[spec.optimizer])(
      learning_rate=learning_rate, **extra)
  factor = _SCHEDULES[spec.schedule](spec)
  if factor is not None:
    tx = optax.chain(tx, optax.scale_by_schedule(factor))
  if spec.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(spec.grad_clip_norm), tx)
  if spec.agc_clip is not None:
    tx = optax.chain(optax.masked(optax.adaptive_grad_clip(spec.agc_clip),
                                  _not_readout), tx)
  return tx


def _not_readout(params):
  """True for every parameter outside the "readout" layer (AGC's mask)."""
  return {name: jax.tree.map(lambda _: name != "readout", layer)
          for name, layer in params.items()}


def split_hparams(hparams: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """A run's swept values ({"learning_rate", "bn_momentum", "bn_epsilon"};
  the BN ones may be absent or None: the spec's value) -> (learning rate,
  BatchNorm arguments for `TrainState.bn_hparams`)."""
  bn = {BN_SWEEPABLE[k]: jnp.asarray(v, jnp.float32)
        for k, v in hparams.items() if k in BN_SWEEPABLE and v is not None}
  return jnp.asarray(hparams["learning_rate"], jnp.float32), bn


def create_train_state(spec: TrainSpec, seed, hparams: dict[str, Any],
                       ) -> TrainState:
  """Initializes one run. `seed` and `hparams` (see `split_hparams`) may be
  traced (vmap)."""
  lr, bn_hparams = split_hparams(hparams)
  init_key, data_key = jax.random.split(jax.random.key(seed))
  # Apart from the split above, so that every other run keeps its keys.
  noise_key = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
  if spec.data_seed is not None:  # the order run `data_seed` would have
    data_key = jax.random.split(jax.random.key(spec.data_seed))[1]
  model = spec.make_model(bn_hparams)
  variables = model.init(init_key, jnp.zeros((1, 784), jnp.float32),
                         train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=make_optimizer(spec, lr).init(params),
      bn_hparams=bn_hparams, data_key=jax.random.key_data(data_key),
      diverged_at=(jnp.asarray(-1, jnp.int32) if spec.freeze_diverged
                   else None),
      noise_key=(jax.random.key_data(noise_key)
                 if spec.norm in models.NOISY_NORMS else None))


_NOISE_STREAM = 0x6E6F6973  # "nois": the noise key's fold-in constant


def noise_rngs(state: TrainState, spec: TrainSpec) -> dict[str, Any] | None:
  """The rng streams of step `state.step` in training mode: {"noise":
  fold_in(noise key, step)} for a norm that draws noise (a new draw, and
  a new noise distribution, every step), else None (no stream)."""
  if spec.norm not in models.NOISY_NORMS:
    return None
  key = jax.random.wrap_key_data(state.noise_key)
  return {"noise": jax.random.fold_in(key, state.step)}


def _pmean(value, axis_name):
  return value if axis_name is None else jax.lax.pmean(value, axis_name)


def device_share(x, axis_name, axis: int = 0):
  """This device's contiguous 1/N of `x` along `axis` (N devices on the
  named axis): how a data-parallel step splits a replicated global batch."""
  size = x.shape[axis] // jax.lax.axis_size(axis_name)
  return jax.lax.dynamic_slice_in_dim(
      x, jax.lax.axis_index(axis_name) * size, size, axis=axis)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def nonfinite_flags(loss=None, params=None, batch_stats=None,
                    axis_name=None) -> jax.Array:
  """int32 bit set: bit i is set when NONFINITE_QUANTITIES[i] is NaN or inf
  (the loss, any parameter, any BN statistic; None: not checked).

  Scalar all-finite reductions on device; nothing goes to the host. With
  `axis_name`, a quantity counts as bad when it is bad on any device.
  """
  bad = jnp.stack([~_all_finite(x) if x is not None else jnp.bool_(False)
                   for x in (loss, params, batch_stats)]).astype(jnp.int32)
  if axis_name is not None:
    bad = jax.lax.pmax(bad, axis_name)
  return jnp.sum(bad << jnp.arange(len(NONFINITE_QUANTITIES), dtype=jnp.int32))


def describe_nonfinite(flags: int) -> str:
  """The names of the quantities set in `nonfinite_flags`' bit set."""
  return ", ".join(name for i, name in enumerate(NONFINITE_QUANTITIES)
                   if int(flags) >> i & 1)


def divergence_threshold(factor: float,
                         num_classes: int = models.NUM_CLASSES) -> float:
  """The training loss above which the NaN guard calls a run diverged:
  `factor` x ln(num_classes). ln(C) is the cross-entropy of an untrained
  classifier (uniform predictions over C classes): a reference every run
  shares, known before it starts, so that nothing is added to the
  training state or its checkpoints (a run's own first loss would be)."""
  return factor * math.log(num_classes)


def diverged_flag(loss, factor: float | None, num_classes: int):
  """DIVERGED_FLAG where the loss is finite and above the divergence
  threshold (`divergence_threshold`), else 0 (int32; a NaN or inf loss is
  `nonfinite_flags`' business)."""
  if not factor:
    return jnp.zeros((), jnp.int32)
  above = jnp.isfinite(loss) & (loss > divergence_threshold(factor,
                                                            num_classes))
  return jnp.where(above, DIVERGED_FLAG, 0).astype(jnp.int32)


class NonFiniteError(FloatingPointError):
  """A run's loss, parameters or BN statistics became NaN or inf, or its
  loss passed the divergence threshold (the NaN guard, `config.nan_guard`
  and `config.divergence_factor`); nothing of that epoch was written."""


def describe_divergence(loss, factor: float) -> str:
  """The guard's one-line explanation of a finite divergence (DIVERGED_FLAG)
  at training loss `loss`."""
  return (f"training loss {float(loss):.4g} above the divergence threshold "
          f"{divergence_threshold(factor):.4g} (config.divergence_factor="
          f"{factor:g} x ln({models.NUM_CLASSES}), an untrained classifier's "
          "loss)")


def nonfinite_error(combo: str, runs: list[dict], epoch: int,
                     spec: TrainSpec, first_step, flags,
                     checkpoint_dir, losses=None) -> NonFiniteError | None:
  """The NaN guard's error for an epoch's per-run flags, or None if all runs
  stayed finite (and below the divergence threshold). `first_step[i]` is
  run i's first bad global step or -1; `losses[i]` its training loss there
  (the metric "guard_loss", with `spec.divergence_factor`)."""
  bad = [i for i, step in enumerate(first_step) if step >= 0]
  if not bad:
    return None
  lines = []
  diverged = False
  for i in bad:
    step = int(first_step[i])
    hparams = ", ".join(f"{k}={v}" for k, v in runs[i]["hparams"].items())
    what = []
    if int(flags[i]) & (DIVERGED_FLAG - 1):
      what.append(f"non-finite {describe_nonfinite(flags[i])}")
    if int(flags[i]) & DIVERGED_FLAG:
      diverged = True
      what.append(describe_divergence(
          float("nan") if losses is None else losses[i],
          spec.divergence_factor))
    lines.append(
        f"  run {i} (seed {runs[i]['seed']}, {hparams}): {'; '.join(what)} "
        f"at global step {step} (step "
        f"{step - (epoch - 1) * spec.steps_per_epoch} of "
        f"{spec.steps_per_epoch} in epoch {epoch})")
  kept = (f"the last good checkpoint (epoch {epoch - 1}) is in "
          f"{checkpoint_dir} and metrics.jsonl holds the epochs before"
          if epoch > 1 else "nothing of this combination was written")
  return NonFiniteError(
      f"[{combo}] NaN guard: training diverged in epoch {epoch}:\n"
      + "\n".join(lines) + "\n"
      "(A non-finite loss can come from the update of the step before: the "
      "guard checks losses and BN statistics every step, parameters after "
      "the epoch's last step.) "
      f"Nothing of epoch {epoch} was saved; {kept}. To fix: lower the "
      "learning rate (config.learning_rate / config.sweep.learning_rate), "
      "raise BN epsilon (config.bn.epsilon), or check the input data for "
      "NaN/inf, and rerun in a new --workdir"
      + ("; a loss above the divergence threshold is divergence too: to "
         "allow it, raise --config.divergence_factor or set it to None"
         if diverged else "") + ". To freeze the diverging runs "
      "and train the others on (a learning-rate range), set "
      "--config.nan_guard=record; to train on regardless (no checks, a "
      "little faster), --config.nan_guard=False.")


def train_step(state: TrainState, images, labels, *, spec: TrainSpec,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a batch, BN in training mode.

  With `spec.axis_name` set, this is the per-device body of a data-parallel
  step: BN statistics are synchronized by bn_jax's `axis_name` and the loss
  and gradients are averaged over the same axis; the metrics are sums over
  the global batch. With `spec.sync_bn=False` each device normalizes with its
  own batch's statistics and the mean of the devices' new running statistics
  is kept (bn_lab.parallel's "per_device").
  """
  model = spec.make_model(state.bn_hparams)
  inputs = model_inputs(images, spec)
  rngs = noise_rngs(state, spec)

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, inputs,
        train=True, mutable=["batch_stats"], rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    # Averaged inside the differentiated function: under shard_map the
    # transpose already sums replicated params' gradients over devices, so
    # only a global-mean loss gives the mean gradient there (the pmean of
    # grads below is then a no-op; under pmap it does the averaging).
    loss = _pmean(loss, spec.axis_name)
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = _pmean(grads, spec.axis_name)
  if not spec.sync_bn or spec.norm not in models.SYNCED_NORMS:
    # One copy of the per-device statistics (bn_stats="per_device", ghost
    # batches): their mean, as the chunks' of one device.
    # Integer leaves (update counts) are the same on every device.
    batch_stats = jax.tree.map(
        lambda v: _pmean(v, spec.axis_name)
        if jnp.issubdtype(v.dtype, jnp.floating) else v, batch_stats)
  updates, opt_state = make_optimizer(spec).update(grads, state.opt_state,
                                                   state.params)
  new_state = state._replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state)
  metrics = {"loss_sum": loss * labels.shape[0],
             "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
             "count": jnp.asarray(labels.shape[0], jnp.int32)}
  if spec.axis_name is not None:  # sums over the global batch
    metrics = jax.lax.psum(metrics, spec.axis_name)
  if spec.nan_guard:
    # Not the gradient: checking it costs 15% of an Ioffe-net step, and a
    # non-finite gradient makes the parameters, then the next step's loss,
    # non-finite (train_epoch checks the parameters after the last step).
    metrics["nonfinite"] = nonfinite_flags(loss, batch_stats=batch_stats,
                                           axis_name=spec.axis_name)
    if spec.divergence_factor:
      # The global batch's loss (pmean above): the same on every device.
      metrics["nonfinite"] |= diverged_flag(loss, spec.divergence_factor,
                                            logits.shape[-1])
      metrics["guard_loss"] = loss  # for the guard's message
  return new_state, metrics


FEISTEL_ROUNDS = 8  # 3 already fail tests/test_train.py's uniformity checks


def _feistel_round(half, round_key):
  """A keyed 32-bit mix (multiply-xorshift, as in murmur3's finalizer)."""
  h = (half ^ round_key) * jnp.uint32(0x9E3779B1)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x85EBCA77)
  return h ^ (h >> 13)


def random_permutation(key, n: int) -> jax.Array:
  """A random permutation of 0..n-1 (int32) without sorting.

  `jax.random.permutation` sorts n random keys, twice for MNIST's 60000:
  ~30 ms on a CPU, 15% of the reference model's epoch. Here each index is
  encrypted instead: a balanced Feistel network with FEISTEL_ROUNDS keyed
  rounds is a bijection of [0, 4^h) (h bits per half, 4^h >= n), and
  re-encrypting the values that land outside [0, n) until they land inside
  ("cycle walking", as in format-preserving encryption) restricts it to a
  bijection of [0, n). All elementwise: under 1 ms for 60000. The order is a
  deterministic function of `key`; tests/test_train.py checks that it is a
  permutation and that positions and neighbours look uniform.
  """
  if not 1 <= n <= 2**31:
    raise ValueError(f"random_permutation: n={n}; it permutes 1 to 2**31 "
                     "indices (int32).")
  half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = jnp.uint32((1 << half_bits) - 1)
  round_keys = jax.random.bits(key, (FEISTEL_ROUNDS,), jnp.uint32)

  def encrypt(x):
    left, right = x >> half_bits, x & mask
    for round_key in round_keys:
      left, right = right, left ^ (_feistel_round(right, round_key) & mask)
    return (left << half_bits) | right

  outside = lambda x: x >= n
  x = encrypt(jnp.arange(n, dtype=jnp.uint32))
  x = jax.lax.while_loop(lambda x: jnp.any(outside(x)),
                         lambda x: jnp.where(outside(x), encrypt(x), x), x)
  return x.astype(jnp.int32)


def epoch_batches(data_key, epoch, num_examples: int, spec: TrainSpec):
  """(steps, batch) example indices for an epoch: a permutation that depends
  only on the run's key and the epoch number (so a resumed run sees the same
  order), with the last partial batch dropped."""
  key = jax.random.fold_in(jax.random.wrap_key_data(data_key), epoch)
  order = random_permutation(key, num_examples)
  used = spec.steps_per_epoch * spec.batch_size
  return order[:used].reshape(spec.steps_per_epoch, spec.batch_size)


def train_epoch(state: TrainState, data: DeviceData, *, spec: TrainSpec,
                batches=None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One epoch as a single `lax.scan`; metrics are summed on device.

  `batches` ((steps, batch) global example indices) defaults to the run's
  own `epoch_batches`; `over_runs` passes them in for runs that share one
  data order.

  With `spec.nan_guard`, the scan also carries the NaN guard: the global
  step (1-based) of the epoch's first step whose loss or new BN statistics
  were not finite, and which of them (`nonfinite_flags`), returned as metrics
  "first_nonfinite_step" (-1: none) and "nonfinite". A step that makes the
  parameters non-finite (a NaN or inf gradient or update) is caught by the
  next step's loss, computed with them; after the epoch's last step the
  parameters themselves are checked. With `spec.divergence_factor`, a step
  whose loss is finite but above `divergence_threshold` is flagged too
  (DIVERGED_FLAG), and "guard_loss" is the first flagged step's loss. The
  host reads these once, with the epoch's other metrics.

  With `spec.measurements`, the epoch is a scan over chunks of steps (the
  greatest common divisor of their intervals): before a chunk, the
  "train_batch" measurements due, at the state before its first update and
  on its batch; after it, the "test_images" ones, at the state it leaves.
  Metric `m.name` holds each measurement's dict of (steps_per_epoch /
  m.every, ...) arrays. A measurement due on fewer chunks runs under a
  `lax.cond` on the chunk's index (not per run, so a vmap keeps it a
  branch). Without measurements, nothing of them is traced.
  """
  if spec.freeze_diverged and not spec.nan_guard:
    raise ValueError("freeze_diverged needs nan_guard: the guard's flags "
                     "decide which steps to drop.")
  if spec.axis_name is not None and any(
      m.on == "train_batch" for m in spec.measurements):
    raise ValueError("measurements on the training batch measure one "
                     "device's training; train on one (no axis_name).")
  if batches is None:
    batches = epoch_batches(state.data_key, state.step // spec.steps_per_epoch,
                            data.train_images.shape[0], spec)
  if spec.axis_name is not None:  # data parallel: this device's examples
    batches = device_share(batches, spec.axis_name, axis=1)
  no_step = jnp.asarray(-1, jnp.int32)
  # (first bad step, its flags, its training loss)
  guard = ((no_step, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
           if spec.nan_guard else ())

  def body(carry, xs):
    (carry, guard), (indices, step) = carry, xs
    if spec.progress_every:
      jax.lax.cond((step + 1) % spec.progress_every == 0,
                   lambda: jax.debug.callback(progress.step_done, step),
                   lambda: None)
    before = carry
    carry, metrics = train_step(carry, data.train_images[indices],
                                data.train_labels[indices], spec=spec)
    if spec.freeze_diverged:
      carry, metrics = _freeze_if_diverged(before, carry, metrics, spec)
    if spec.nan_guard:
      first_step, first_flags, first_loss = guard
      flags = metrics.pop("nonfinite")
      loss = metrics.pop("guard_loss", first_loss)
      is_first = (first_step < 0) & (flags != 0)
      guard = (jnp.where(is_first, carry.step, first_step),
               jnp.where(is_first, flags, first_flags),
               jnp.where(is_first, loss, first_loss))
    return (carry, guard), metrics

  steps = jnp.arange(batches.shape[0])  # within the epoch
  if not spec.measurements:
    (state, guard), metrics = jax.lax.scan(body, (state, guard),
                                           (batches, steps))
  else:  # scans of `chunk` steps, measured before and probed after
    chunk = math.gcd(*(m.every for m in spec.measurements))
    num_chunks = batches.shape[0] // chunk
    (state, guard), (metrics, measured) = jax.lax.scan(
        functools.partial(_measured_steps, body, data, spec, chunk),
        (state, guard), (batches.reshape(num_chunks, chunk,
                                         batches.shape[-1]),
                         steps.reshape(num_chunks, chunk),
                         jnp.arange(num_chunks)))
  windows = (step_windows(metrics, spec.log_every_steps)
             if spec.log_every_steps else {})
  metrics = {**jax.tree.map(jnp.sum, metrics), **windows}
  for m in spec.measurements:  # only the chunks each one ran on
    per = m.every // chunk
    first = per - 1 if m.on == "test_images" else 0
    metrics[m.name] = jax.tree.map(lambda x: x[first::per], measured[m.name])
  if spec.nan_guard:
    first_step, first_flags, first_loss = guard
    # The last step's update has no next loss to show it.
    last = nonfinite_flags(params=state.params)
    is_first = (first_step < 0) & (last != 0)
    metrics["first_nonfinite_step"] = jnp.where(is_first, state.step,
                                                first_step)
    metrics["nonfinite"] = jnp.where(is_first, last, first_flags)
    if spec.divergence_factor:
      metrics["guard_loss"] = first_loss
  return state, metrics


def _measured_steps(body, data: DeviceData, spec: TrainSpec, chunk: int,
                    carry, xs):
  """One chunk of `chunk` training steps (the epoch scan's `body`), with
  the measurements due before it (on its first batch, at the state before
  that batch's update) and after it (at the state it leaves, on the test
  images). Each runs on every (interval / chunk)-th chunk: the others
  return zeros, which `train_epoch` drops."""
  batches, steps, index = xs
  state = carry[0]

  def on_chunks(k, first, measure):
    per = k // chunk
    if per == 1:
      return measure()
    zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                 jax.eval_shape(measure))
    return jax.lax.cond(index % per == first, measure, zeros)

  def measure(m, at, images, labels):
    return lambda: m.fn(at, images, labels, spec=spec, **dict(m.options))

  measured = {}
  for m in spec.measurements:
    if m.on == "train_batch":
      measured[m.name] = on_chunks(m.every, 0, measure(
          m, state, data.train_images[batches[0]],
          data.train_labels[batches[0]]))
  carry, metrics = jax.lax.scan(body, carry, (batches, steps))
  for m in spec.measurements:
    if m.on == "test_images":
      measured[m.name] = on_chunks(m.every, m.every // chunk - 1, measure(
          m, carry[0], data.test_images[:m.num_images],
          data.test_labels[:m.num_images]))
  return carry, (metrics, measured)


# The training metrics over each window of `TrainSpec.log_every_steps` steps
# (keys of `train_epoch`'s and `epoch_and_eval`'s metrics).
WINDOW_METRICS = ("window_train_loss", "window_train_accuracy")


def window_ends(steps_per_epoch: int, every: int) -> list[int]:
  """The step (1-based, within the epoch) each window ends at: every
  `every` steps, and the epoch's last step."""
  return sorted({*range(every, steps_per_epoch + 1, every), steps_per_epoch})


def step_windows(metrics: dict[str, jax.Array], every: int,
                 ) -> dict[str, jax.Array]:
  """The loss and accuracy of each window of `every` steps of an epoch's
  per-step sums ("loss_sum", "correct", "count"; (steps,) or (chunks,
  chunk) arrays), the last window shorter if `every` does not divide."""
  sums = {k: metrics[k].reshape(-1) for k in ("loss_sum", "correct", "count")}
  steps = sums["count"].shape[0]
  window = jnp.arange(steps) // every
  total = {k: jax.ops.segment_sum(v, window, -(-steps // every))
           for k, v in sums.items()}
  return {"window_train_loss": total["loss_sum"] / total["count"],
          "window_train_accuracy": total["correct"] / total["count"]}


def _freeze_if_diverged(before: TrainState, after: TrainState, metrics,
                        spec: TrainSpec):
  """nan_guard="record": keeps `before` (the step counter moves on) when the
  run is already frozen or this step made anything non-finite (the
  parameters are checked every step here, so that no NaN is kept), and
  counts only the steps kept in the metrics. The first bad step is
  recorded in `diverged_at` and reported in the guard's flags; a frozen
  run's later steps are not news. The frozen state is finite, but its loss
  need not be: a loss turns non-finite one step after the update that
  caused it, which may have left huge finite weights. (A loss above the
  divergence threshold, `diverged_flag`, is likewise seen at the step
  after the update that raised it, so the frozen state has that loss.)"""
  flags = metrics["nonfinite"] | nonfinite_flags(params=after.params,
                                                 axis_name=spec.axis_name)
  frozen = before.diverged_at >= 0
  rejected = frozen | (flags != 0)
  kept = jax.tree.map(lambda old, new: jnp.where(rejected, old, new),
                      before, after)
  kept = kept._replace(step=after.step, diverged_at=jnp.where(
      ~frozen & (flags != 0), after.step, before.diverged_at))
  metrics = {k: v if k == "guard_loss" else jnp.where(rejected,
                                                      jnp.zeros_like(v), v)
             for k, v in metrics.items() if k != "nonfinite"}
  metrics["nonfinite"] = jnp.where(frozen, 0, flags)
  return kept, metrics


def _padded_chunks(x, size: int):
  """Splits the leading axis into (n, size, ...) chunks, zero-padding."""
  pad = (-x.shape[0]) % size
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(-1, size, *x.shape[1:])


def evaluate(state: TrainState, images, labels, *, spec: TrainSpec,
             use_batch_stats: bool = False) -> dict[str, jax.Array]:
  """Loss and accuracy sums on a test set.

  Default: eval mode, BN with the running statistics (what deployment sees),
  every example counted. `use_batch_stats=True` normalizes each test batch of
  `spec.batch_size` with its own statistics, as in training; the last partial
  batch is dropped. The gap between the two exposes train/test inconsistency.
  """
  model = spec.make_model(state.bn_hparams)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  if use_batch_stats:
    usable = images.shape[0] // spec.batch_size * spec.batch_size
    image_chunks = images[:usable].reshape(-1, spec.batch_size,
                                           images.shape[-1])
    label_chunks = labels[:usable].reshape(-1, spec.batch_size)
    valid_chunks = jnp.ones(label_chunks.shape, bool)
  else:
    size = min(spec.eval_chunk, images.shape[0])
    image_chunks = _padded_chunks(images, size)
    label_chunks = _padded_chunks(labels, size)
    valid_chunks = _padded_chunks(jnp.ones(labels.shape, bool), size)

  def chunk_metrics(chunk):
    x, y, valid = chunk
    x = model_inputs(x, spec)
    if use_batch_stats:  # noise (if any) drawn as at the state's step
      logits, _ = model.apply(variables, x, train=True,
                              mutable=["batch_stats"],
                              rngs=noise_rngs(state, spec))
    else:
      logits = model.apply(variables, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return {"loss_sum": jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": jnp.sum((jnp.argmax(logits, -1) == y) & valid),
            "count": jnp.sum(valid.astype(jnp.int32))}

  per_chunk = jax.lax.map(chunk_metrics,
                          (image_chunks, label_chunks, valid_chunks))
  return jax.tree.map(jnp.sum, per_chunk)


def epoch_and_eval(state: TrainState, data: DeviceData, *, spec: TrainSpec,
                   evaluate_fn=evaluate, batches=None,
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
  """Train one epoch, then evaluate both ways; returns per-epoch summaries.

  `evaluate_fn` replaces `evaluate` (bn_lab.parallel splits the test set
  over devices); `batches` as in `train_epoch`. With
  `spec.precise_batches`, also eval mode with the population statistics
  recomputed over the epoch's first batches (`population_statistics`).
  """
  if batches is None and spec.precise_batches:
    batches = epoch_batches(state.data_key, state.step // spec.steps_per_epoch,
                            data.train_images.shape[0], spec)
  state, train = train_epoch(state, data, spec=spec, batches=batches)
  test = evaluate_fn(state, data.test_images, data.test_labels, spec=spec)
  test_bs = evaluate_fn(state, data.test_images, data.test_labels, spec=spec,
                        use_batch_stats=True)
  metrics = {
      "train_loss": train["loss_sum"] / train["count"],
      "train_accuracy": train["correct"] / train["count"],
      "test_loss": test["loss_sum"] / test["count"],
      "test_accuracy": test["correct"] / test["count"],
      "test_accuracy_batch_stats": test_bs["correct"] / test_bs["count"],
  }
  if data.val_images is not None:
    val = evaluate_fn(state, data.val_images, data.val_labels, spec=spec)
    metrics["val_loss"] = val["loss_sum"] / val["count"]
    metrics["val_accuracy"] = val["correct"] / val["count"]
  if spec.eval_train:
    train_eval = evaluate_fn(state, data.train_images, data.train_labels,
                             spec=spec)
    metrics["train_loss_eval"] = train_eval["loss_sum"] / train_eval["count"]
    metrics["train_accuracy_eval"] = (train_eval["correct"]
                                      / train_eval["count"])
  if spec.precise_batches:
    precise = test  # a model without running statistics: nothing to redo
    gaps = (jnp.zeros(()), jnp.zeros(()))
    if jax.tree.leaves(state.batch_stats):
      recomputed = population_statistics(
          state, data, batches[:spec.precise_batches], spec=spec)
      precise = evaluate_fn(state._replace(batch_stats=recomputed),
                            data.test_images, data.test_labels, spec=spec)
      gaps = running_statistics_gaps(state.batch_stats, recomputed)
    metrics[PRECISE_METRIC] = precise["correct"] / precise["count"]
    metrics[PRECISE_LOSS_METRIC] = precise["loss_sum"] / precise["count"]
    metrics.update(zip(STALENESS_METRICS, gaps))
  if spec.freeze_diverged:
    metrics["diverged_at"] = state.diverged_at
  for name in (WINDOW_METRICS if spec.log_every_steps else ()):
    metrics[name] = train[name]
  for m in spec.measurements:
    metrics[m.name] = train[m.name]
  if spec.nan_guard:
    metrics["first_nonfinite_step"] = train["first_nonfinite_step"]
    metrics["nonfinite"] = train["nonfinite"]
    if spec.divergence_factor:
      metrics["guard_loss"] = train["guard_loss"]
  return state, metrics


def population_statistics(state: TrainState, data: DeviceData, batches, *,
                          spec: TrainSpec):
  """Every BN layer's statistics recomputed over the training examples of
  `batches` ((N, batch) indices) with the weights frozen ("PreciseBN";
  `spec.precise_estimator` and `precise_layerwise`, see bn_jax.precise).
  The state is not changed: the statistics are returned.

  Data parallel (`spec.axis_name`): every device recomputes over the whole
  batches on its own (no synchronization: pooling the devices' identical
  copies would count each value once per device in Bessel's correction),
  so all devices compute what one device would.
  """
  inputs = model_inputs(data.train_images[batches], spec)
  return precise_lib.recompute_statistics(
      dataclasses.replace(spec, axis_name=None).make_model(state.bn_hparams),
      {"params": state.params, "batch_stats": state.batch_stats}, inputs,
      estimator=spec.precise_estimator, layerwise=spec.precise_layerwise)


def running_statistics_gaps(running, recomputed, epsilon: float = 1e-5):
  """(mean gap, var gap) between two batch_stats trees: over every BN layer
  and feature, the mean of |mu_run - mu| / sqrt(var + eps) (the running
  mean's error in the population's standard deviations) and of
  |log((var_run + eps) / (var + eps))| (the running variance's error as a
  log ratio). How stale the moving averages are (compare like with like:
  the "pooled" estimator stores the biased variance, as BN does)."""
  run = traverse_util.flatten_dict(flax.core.unfreeze(running))
  pop = traverse_util.flatten_dict(flax.core.unfreeze(recomputed))
  layers = [k[:-1] for k in pop if k[-1] == "mean"]
  mean_gaps = [jnp.mean(jnp.abs(run[l + ("mean",)] - pop[l + ("mean",)])
                        * jax.lax.rsqrt(pop[l + ("var",)] + epsilon))
               for l in layers]
  var_gaps = [jnp.mean(jnp.abs(jnp.log((run[l + ("var",)] + epsilon)
                                       / (pop[l + ("var",)] + epsilon))))
              for l in layers]
  return jnp.mean(jnp.stack(mean_gaps)), jnp.mean(jnp.stack(var_gaps))


# Compiled entry points. `spec` is static (hashable); the state is donated so
# XLA updates params and optimizer state in place.
jit_train_step = jax.jit(train_step, static_argnames="spec",
                         donate_argnames="state")
jit_train_epoch = jax.jit(train_epoch, static_argnames="spec",
                          donate_argnames="state")


@functools.partial(jax.jit, static_argnames="spec", donate_argnames="states")
def sweep_epoch(states: TrainState, data: DeviceData, *, spec: TrainSpec):
  """K stacked runs of one architecture: one epoch and evaluation, vmapped.

  The data are shared (not copied per run); each run keeps its own params,
  BN statistics, optimizer state, hyperparameters and data order (one order
  for all with `spec.data_seed`).
  """
  return over_runs(epoch_and_eval, spec)(states, data)


def over_runs(fn, spec: TrainSpec):
  """fn(state, data, *, spec, batches=None) -> (state, out) (`train_epoch`,
  `epoch_and_eval`), applied to K stacked runs sharing the data: vmapped, or
  for K=1 on the unstacked run. With a batch axis of 1, XLA:CPU lays the
  weight gradients out transposed and transposes them back every step (25%
  slower on the Ioffe net; benchmarks/README.md).

  With `spec.data_seed` set, every run has the same data key (states made
  by `create_train_state` with that spec), so the epoch's batches are
  computed once, from run 0's key and step (a sweep's runs are always at the
  same step), and passed to every run unbatched: the K runs then gather each
  batch once and XLA turns the K first-layer matmuls `x @ W_k` into one
  `x @ [W_1 ... W_K]` (benchmarks/README.md, sweeps).
  """
  def run(states: TrainState, data):
    if spec.data_seed is not None:
      batches = epoch_batches(states.data_key[0],
                              states.step[0] // spec.steps_per_epoch,
                              data.train_images.shape[0], spec)
      run_one = functools.partial(fn, spec=spec, batches=batches)
    else:
      run_one = functools.partial(fn, spec=spec)
    if states.step.shape[0] == 1:
      out = run_one(jax.tree.map(lambda x: x[0], states), data)
      return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(run_one, in_axes=(0, None))(states, data)
  return run


# Module level, so compiled once per spec and shapes (a fresh jax.jit per call
# would recompile the initialization every time: seconds on CPU).
@functools.partial(jax.jit, static_argnames="spec")
def _init_sweep(seeds, hparams, *, spec: TrainSpec) -> TrainState:
  return jax.vmap(functools.partial(create_train_state, spec))(seeds, hparams)


def create_sweep_states(spec: TrainSpec, seeds, hparams: dict[str, Any],
                        ) -> TrainState:
  """Stacked states for K runs: `seeds` (K,) and each hparam a (K,) array
  (a BN one may be absent: the spec's value for every run)."""
  seeds = jnp.asarray(seeds, jnp.int32)
  hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()
             if v is not None}
  return _init_sweep(seeds, hparams, spec=init_spec(spec))


# TrainSpec fields that shape training or evaluation but that a fresh state
# (`create_train_state`) never reads.
_NOT_READ_BY_INIT = (
    "batch_size", "steps_per_epoch", "num_epochs", "eval_chunk",
    "warmup_steps", "schedule_epochs", "nan_guard", "divergence_factor",
    "input_scaling", "precise_batches", "precise_estimator",
    "precise_layerwise", "eval_train", "progress_every", "log_every_steps",
    "measurements")


def init_spec(spec: TrainSpec) -> TrainSpec:
  """`spec` with the fields initialization does not read at their defaults,
  so that combinations differing only there (a batch-size axis) share one
  compiled initialization: compiling it takes seconds on a CPU."""
  defaults = TrainSpec()
  return dataclasses.replace(spec, **{f: getattr(defaults, f)
                                      for f in _NOT_READ_BY_INIT})


def to_device(train_images, train_labels, test_images, test_labels,
              validation=None) -> DeviceData:
  """Puts the data set on the default device once: (N, 784) images as uint8
  pixels (kept as they are; see `DeviceData`) or as float32 inputs;
  `validation`: None or (images, labels) held out of the training set."""
  def images(x):
    x = np.asarray(x)
    if x.dtype == np.uint8:
      return jax.device_put(x)
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"images of dtype {x.dtype}: give uint8 pixels "
                       "(scaled in the step) or float inputs.")
    return jax.device_put(x.astype(np.float32))
  return DeviceData(
      train_images=images(train_images),
      train_labels=jax.device_put(np.asarray(train_labels, np.int32)),
      test_images=images(test_images),
      test_labels=jax.device_put(np.asarray(test_labels, np.int32)),
      **({} if validation is None else dict(
          val_images=images(validation[0]),
          val_labels=jax.device_put(np.asarray(validation[1], np.int32)))))
