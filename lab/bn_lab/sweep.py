"""What a config asks to run: study axes, runs, and their checks.

A study is the product of static axes (each combination one compiled
program) times the runs inside each program (seeds x numeric sweeps,
vmapped). Adding an axis is one entry in `AXES`: the config field that
holds its tuple of values, and the field of a run's config that each value
sets. Every metrics row carries the value of every axis.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Any, NamedTuple

from flax import traverse_util
import ml_collections
import numpy as np

from bn_lab import data as data_lib
from bn_lab import models
from bn_lab import parallel
from bn_jax import precise
from bn_lab import train

# Axis field (a tuple; () keeps the single field) -> the field it sets (a
# dotted name for a nested one, e.g. "bn.momentum").
AXES = {
    "placements": "placement",
    "batch_sizes": "batch_size",
    "models": "model",
    "activations": "activation",
    "norms": "norm",
    "virtual_batch_sizes": "bn.virtual_batch_size",  # with norm="ghost"
    # A named bundle of settings (config.variant_settings[name]), e.g. "nf":
    # no norm, Scaled WS, SkipInit and AGC at once.
    "variants": "variant",
}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


class Combination(NamedTuple):
  name: str  # e.g. "placement=none__batch_size=64": the swept axes only
  values: dict[str, Any]  # every axis' field -> its value here
  config: ml_collections.ConfigDict  # the config with those values set


def combinations(config) -> list[Combination]:
  """The product of the axes, in config order (the first axis slowest).

  An axis over a normalization option (`bn.X`) is left out of the
  combinations whose norm does not read X (bn_lab.models.NORM_FIELDS): with
  norms=("ghost", "layer") and virtual_batch_sizes=(8, 32) the study is
  ghost at 8, ghost at 32 and one layer-norm reference, not two identical
  layer-norm programs. Such a combination's row has None for that field.
  """
  swept = {field: tuple(config[axis]) for axis, field in AXES.items()
           if len(config[axis])}
  combos, names = [], set()
  for values in itertools.product(*swept.values()):
    chosen = dict(zip(swept, values))
    norm = chosen.get("norm", config.norm)
    unread = {f for f in chosen if _is_unread_norm_option(f, norm)}
    chosen = {f: v for f, v in chosen.items() if f not in unread}
    name = "__".join(f"{k}={v}" for k, v in chosen.items()) or "run"
    if name in names:
      continue
    names.add(name)
    combo_config = config.copy_and_resolve_references()
    with combo_config.unlocked():
      for field, value in chosen.items():
        set_dotted(combo_config, field, value)
      if chosen.get("variant"):
        for field, value in variant_fields(config, chosen["variant"]).items():
          set_dotted(combo_config, field, value)
    combos.append(Combination(
        name, {f: None if f in unread else get_dotted(combo_config, f)
               for f in row_axes(config)},
        combo_config))
  return combos


def row_axes(config) -> tuple[str, ...]:
  """The axis fields every row of `config`'s runs carries: all of them but
  `variant` where the study has no variants (its rows, and old workdirs'
  rows, stay as they were)."""
  return tuple(f for a, f in AXES.items()
               if a != "variants" or len(config.variants))


def _is_unread_norm_option(field: str, norm: str) -> bool:
  section, _, name = field.rpartition(".")
  return section == "bn" and name not in models.NORM_FIELDS.get(norm, ())


def get_dotted(config, dotted: str):
  """config["a.b"] for a nested field: an axis may set `bn.momentum`."""
  for name in dotted.split("."):
    config = config[name]
  return config


def set_dotted(config, dotted: str, value) -> None:
  section, _, key = dotted.rpartition(".")
  (get_dotted(config, section) if section else config)[key] = value


def variant_fields(config, name: str) -> dict[str, Any]:
  """The dotted fields and values config.variant_settings[name] sets, e.g.
  {"norm": "none", "resnet.skip_init": True}; ConfigError naming a missing
  variant, an unknown field, or a field another axis of the study sweeps."""
  settings = config.variant_settings
  if name not in settings:
    raise ConfigError(
        f"config.variants has {name!r}, which config.variant_settings does "
        f"not define (it defines {', '.join(settings) or 'none'}); add "
        f"config.variant_settings.{name} = {{field: value, ...}}.")
  fields = traverse_util.flatten_dict(
      ml_collections.ConfigDict(settings[name]).to_dict(), sep=".")
  swept = {f for axis, f in AXES.items() if len(config[axis])}
  for field in fields:
    try:
      get_dotted(config, field)
    except (KeyError, AttributeError):
      raise ConfigError(f"config.variant_settings.{name}.{field}: no such "
                        "config field; name fields of the base config "
                        "(bn_lab/config.py).") from None
    if field in swept:
      raise ConfigError(f"config.variant_settings.{name} sets {field}, "
                        "which another axis of the study also sweeps; set "
                        "it in the variants or in that axis, not both.")
  return fields


def run_grid(config) -> list[dict[str, Any]]:
  """Seeds x swept values: one dict (seed, hparams) per run of a program.

  hparams has every name of `train.SWEEPABLE`: the swept value, else the
  config's (`bn_momentum` may be None: the exact cumulative average, which
  no sweep can vary).
  """
  base = {"learning_rate": config.learning_rate,
          "bn_momentum": config.bn.momentum, "bn_epsilon": config.bn.epsilon}
  sweeps = {name: tuple(config.sweep[name]) or (base[name],)
            for name in train.SWEEPABLE}
  scale = learning_rate_scale(config)
  sweeps["learning_rate"] = tuple(lr * scale
                                  for lr in sweeps["learning_rate"])
  runs = []
  for seed, *values in itertools.product(tuple(config.seeds),
                                         *sweeps.values()):
    runs.append({"seed": seed, "hparams": {
        n: None if v is None else float(v) for n, v in zip(sweeps, values)}})
  return runs


# config.lr_scaling: how the learning rate follows the batch size, relative
# to config.lr_reference_batch_size (which trains at config.learning_rate).
LR_SCALINGS = {
    "none": lambda ratio: 1.0,
    "linear": lambda ratio: ratio,  # Goyal et al. (2017), for SGD
    "sqrt": lambda ratio: ratio ** 0.5,  # Krizhevsky (2014), Hoffer et al.
}


def learning_rate_scale(config) -> float:
  """The factor config.lr_scaling applies to this batch size's learning
  rate(s): the rows record the scaled rate."""
  return LR_SCALINGS[config.lr_scaling](
      config.batch_size / config.lr_reference_batch_size)


def precise_batches(config, num_train: int) -> int:
  """How many training batches PreciseBN recomputes over: num_batches, or
  num_examples in batches of this combination's batch size (at least one),
  so that a batch-size sweep recomputes over the same examples."""
  options = config.precise_bn
  if options.num_examples is None:
    return options.num_batches
  return max(1, min(options.num_examples, num_train) // config.batch_size)


def schedule_epochs(config) -> int:
  """The epochs the schedules are laid out over (config.schedule_epochs)."""
  return config.schedule_epochs or config.num_epochs


def make_spec(config, num_train: int,
              measurements: tuple[train.Measurement, ...] = (),
              ) -> train.TrainSpec:
  """The static part of one combination's program (`combinations`), with
  what a study measures during training."""
  steps_per_epoch = num_train // config.batch_size
  group = models.NORM_CONFIG_GROUPS.get(config.norm)
  options = ({**dict(config.bn), **dict(config[group])} if group
             else config.bn)
  bn = models.norm_options(config.norm, options) if (
      config.norm != "none") else {}
  if "renorm_schedule" in bn:  # in steps of this combination's training
    bn["renorm_schedule"] = models.renorm_schedule_steps(
        bn["renorm_schedule"], config.bn.renorm_schedule_unit,
        steps_per_epoch * schedule_epochs(config))
  return train.TrainSpec(
      model=config.model, placement=config.placement,
      activation=config.activation, widths=tuple(config.widths),
      channels=tuple(config.channels), conv=config.conv, norm=config.norm,
      init=config.init, init_std=config.init_std,
      sequence=config.sequence, hidden_size=config.lstm.hidden_size,
      permutation_seed=config.lstm.permutation_seed,
      blocks_per_stage=config.resnet.blocks_per_stage,
      skip_init=bool(config.resnet.skip_init),
      standardize=config.resnet.standardize,
      stem_stride=config.resnet.stem_stride,
      bn=tuple(sorted(bn.items())), optimizer=config.optimizer,
      schedule=config.schedule, warmup_steps=config.warmup_steps,
      schedule_epochs=config.schedule_epochs,
      weight_decay=config.weight_decay, batch_size=config.batch_size,
      grad_clip_norm=config.grad_clip_norm,
      agc_clip=(None if config.agc_clip is None
                else config.agc_clip / learning_rate_scale(config)),
      steps_per_epoch=steps_per_epoch,
      num_epochs=config.num_epochs,
      nan_guard=config.nan_guard is not False,
      freeze_diverged=config.nan_guard == "record",
      divergence_factor=config.divergence_factor or None,  # 0: off
      data_seed=config.data_seed, input_scaling=config.input_scaling,
      precise_batches=precise_batches(config, num_train),
      precise_estimator=config.precise_bn.estimator,
      precise_layerwise=config.precise_bn.layerwise,
      eval_train=config.eval_train, measurements=tuple(measurements),
      # About 50 progress reports an epoch: no cost worth measuring.
      progress_every=(max(1, steps_per_epoch // 50)
                      if config.progress_seconds else 0),
      log_every_steps=min(config.log_every_steps, steps_per_epoch))


# ----------------------------------------------------------------------------
# Checks, before anything is loaded or compiled.

_CHOICES = {
    "model": (*models.MODELS, *models.RESIDUAL_MODELS,
              *models.SEQUENCE_MODELS),
    "sequence": models.SEQUENCES, "placement": models.PLACEMENTS,
    "norm": models.NORMS, "init": models.INITS,
    "activation": tuple(models.ACTIVATIONS), "conv": ("auto", *models.CONVS),
    "optimizer": train.OPTIMIZERS, "schedule": train.SCHEDULES,
    "data_source": data_lib.SOURCES, "input_scaling": data_lib.SCALINGS,
}
_POSITIVE_INTS = ("batch_size", "num_epochs", "keep_checkpoints")
_NON_NEGATIVE_INTS = ("log_every_steps",)


def is_int(value) -> bool:
  """An int, not a bool (True is an Integral)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_float32_finite(value) -> bool:
  """A number that stays finite as a float32 (the runs' per-run values are
  float32 on the device): not NaN, not inf, not beyond float32's range."""
  return is_number(value) and math.isfinite(value) and (
      abs(value) <= FLOAT32_MAX)


def check(condition: bool, field: str, value, requirement: str) -> None:
  """ConfigError "config.<field>=<value> <requirement>." unless `condition`
  (for the entry points with configs of their own: gan, transfer, ...)."""
  if not condition:
    raise ConfigError(f"config.{field}={value!r} {requirement}.")


def check_choices(field: str, values, choices) -> None:
  """`values`: a non-empty tuple of distinct members of `choices`."""
  check(isinstance(values, (tuple, list)) and len(values) > 0, field, values,
        f"must be a non-empty tuple of values among {choices}")
  for value in values:
    check(value in choices, field, tuple(values),
          f"has {value!r}; choose among {choices}")
  check(len(set(values)) == len(values), field, values,
        "names a value twice")


def _check_field(field: str, value, where: str) -> None:
  if field in _CHOICES and value not in _CHOICES[field]:
    raise ConfigError(f"{where}={value!r} is not valid; choose one of "
                      f"{_CHOICES[field]}.")
  if field in _POSITIVE_INTS and not (is_int(value) and value > 0):
    raise ConfigError(f"{where}={value!r} must be a positive integer.")
  if field in _NON_NEGATIVE_INTS and not (is_int(value) and value >= 0):
    raise ConfigError(f"{where}={value!r} must be an integer >= 0 (0: "
                      "off).")


def _check_axes(config) -> None:
  for axis, field in AXES.items():
    values = config[axis]
    if not isinstance(values, (tuple, list)):
      raise ConfigError(f"config.{axis}={values!r} must be a tuple of "
                        f"{field} values, e.g. --config.{axis}='(a,b)'; () "
                        f"keeps config.{field}.")
    if len(set(values)) < len(values):
      raise ConfigError(f"config.{axis}={tuple(values)!r} repeats a value.")
    for value in values:
      if isinstance(value, str) and value[:1] in "([":
        raise ConfigError(
            f"config.{axis}={tuple(values)!r}: quote each string so that the "
            f"flag parses as a tuple, e.g. --config.{axis}=\"('a','b')\".")
      _check_field(field, value, f"config.{axis} value")
    norms = tuple(config.norms) or (config.norm,)
    if values and all(_is_unread_norm_option(field, n) for n in norms):
      readers = [n for n, fields in models.NORM_FIELDS.items()
                 if field.rpartition(".")[2] in fields]
      raise ConfigError(
          f"config.{axis} sweeps config.{field}, which no norm of the study "
          f"({', '.join(norms)}) reads: the runs would be identical copies; "
          f"add a norm that reads it ({', '.join(readers)}) or leave it ().")


def _check_numbers(config) -> None:
  if not (is_int(config.warmup_steps) and config.warmup_steps >= 0):
    raise ConfigError(f"config.warmup_steps={config.warmup_steps!r} must be "
                      "an integer >= 0.")
  if config.schedule_epochs is not None and not (
      is_int(config.schedule_epochs)
      and config.schedule_epochs >= config.num_epochs):
    raise ConfigError(
        f"config.schedule_epochs={config.schedule_epochs!r} must be an "
        f"integer >= config.num_epochs={config.num_epochs} (the schedule "
        "covers the training), or None (num_epochs).")
  for field in ("widths", "channels"):
    if not all(is_int(n) and n > 0 for n in config[field]):
      raise ConfigError(f"config.{field}={tuple(config[field])!r} must hold "
                        "positive integers (layer sizes).")
  if not (is_number(config.weight_decay) and config.weight_decay >= 0):
    raise ConfigError(f"config.weight_decay={config.weight_decay!r} must be "
                      ">= 0.")
  if not (is_number(config.progress_seconds)
          and config.progress_seconds >= 0):
    raise ConfigError(f"config.progress_seconds={config.progress_seconds!r}"
                      " must be >= 0 (0 turns the progress line off).")
  if not (is_number(config.target_accuracy)
          and 0 < config.target_accuracy <= 1):
    raise ConfigError(f"config.target_accuracy={config.target_accuracy!r} "
                      "must be in (0, 1].")
  if not (is_number(config.init_std) and config.init_std > 0):
    raise ConfigError(f"config.init_std={config.init_std!r} must be a "
                      "number > 0.")
  options = config.precise_bn
  if not (is_int(options.num_batches) and options.num_batches >= 0):
    raise ConfigError(f"config.precise_bn.num_batches={options.num_batches!r}"
                      " must be an integer >= 0 (0 turns it off).")
  if options.num_examples is not None and not (
      is_int(options.num_examples) and options.num_examples > 0
      and not options.num_batches):
    raise ConfigError(
        f"config.precise_bn.num_examples={options.num_examples!r} must be a "
        "positive integer, with config.precise_bn.num_batches=0 (give one "
        "of the two), or None.")
  if config.lr_scaling not in LR_SCALINGS:
    raise ConfigError(f"config.lr_scaling={config.lr_scaling!r} is not "
                      f"valid; choose one of {tuple(LR_SCALINGS)}.")
  if not (is_int(config.lr_reference_batch_size)
          and config.lr_reference_batch_size > 0):
    raise ConfigError(
        f"config.lr_reference_batch_size={config.lr_reference_batch_size!r}"
        " must be a positive integer.")
  if options.estimator not in precise.ESTIMATORS:
    raise ConfigError(f"config.precise_bn.estimator={options.estimator!r} is "
                      f"not valid; choose one of {precise.ESTIMATORS}.")
  if not isinstance(options.layerwise, bool):
    raise ConfigError(f"config.precise_bn.layerwise={options.layerwise!r} "
                      "must be True or False.")
  if not (isinstance(config.nan_guard, bool) or config.nan_guard == "record"):
    raise ConfigError(f"config.nan_guard={config.nan_guard!r} must be True, "
                      "False or 'record'.")
  factor = config.divergence_factor
  if factor is not None and not (is_number(factor) and (
      factor == 0 or (is_float32_finite(factor) and factor > 1))):
    raise ConfigError(
        f"config.divergence_factor={factor!r} must be a finite number > 1 "
        "(the NaN guard calls a run diverged when its training loss "
        "exceeds this many times ln(number of classes), an untrained "
        "classifier's loss), or None or 0 (off).")


def _check_runs(config) -> None:
  seeds = config.seeds
  if (not isinstance(seeds, (tuple, list)) or not seeds
      or not all(is_int(s) and 0 <= s < 2**31 for s in seeds)):
    raise ConfigError(f"config.seeds={seeds!r} must be a non-empty tuple of "
                      "integers in [0, 2**31), e.g. --config.seeds='(0,1)'.")
  if len(set(seeds)) < len(seeds):
    raise ConfigError(f"config.seeds={tuple(seeds)!r} repeats a seed: the "
                      "runs would be identical copies.")
  if config.data_seed is not None and not (is_int(config.data_seed)
                                           and 0 <= config.data_seed < 2**31):
    raise ConfigError(f"config.data_seed={config.data_seed!r} must be None "
                      "(each run's order follows its seed) or an integer in "
                      "[0, 2**31).")
  for name in train.SWEEPABLE:
    values = config.sweep[name]
    if not isinstance(values, (tuple, list)) or not all(
        is_number(v) for v in values):
      raise ConfigError(f"config.sweep.{name}={values!r} must be a tuple of "
                        f"numbers, e.g. --config.sweep.{name}='(0.1,0.2)'.")
  rule = (f"must be > 0 and finite as a float32 (at most {FLOAT32_MAX:.8g})"
          "; another fails only once compiled, or trains nothing")
  if not (config.learning_rate > 0
          and is_float32_finite(config.learning_rate)):
    raise ConfigError(
        f"config.learning_rate={config.learning_rate!r} {rule}.")
  for lr in config.sweep.learning_rate:
    if not (lr > 0 and is_float32_finite(lr)):
      raise ConfigError(
          f"config.sweep.learning_rate={tuple(config.sweep.learning_rate)!r}"
          f" has {lr!r}: each learning rate {rule}.")
  # The one check of BN options is the norm factory's, for config.bn and
  # for every swept value in its place.
  _check_norm(dict(config.bn), "")
  for name, option in train.BN_SWEEPABLE.items():
    for value in config.sweep[name]:
      _check_norm({**config.bn, option: value},
                  f" (a value of config.sweep.{name})")


def _check_grad_clip(config) -> None:
  value = config.grad_clip_norm
  if value is not None and not (is_number(value) and value > 0):
    raise ConfigError(f"config.grad_clip_norm={value!r} must be a number > 0"
                      " (the largest global norm of a step's gradient) or "
                      "None (no clipping).")


def _check_agc(config, where: str) -> None:
  value = config.agc_clip
  if value is not None and not (is_float32_finite(value) and value > 0):
    raise ConfigError(f"config.agc_clip={value!r}{where} must be a number > "
                      "0 (Adaptive Gradient Clipping's threshold, e.g. 0.01)"
                      " or None (no AGC).")


def _check_train_examples(config) -> None:
  value = config.train_examples
  if value is not None and not (is_int(value) and value > 0):
    raise ConfigError(f"config.train_examples={value!r} must be a positive "
                      "integer (a subset of the training set) or None (all).")


def _check_residual_model(config) -> None:
  """model=resnet against the rest of one combination's config."""
  resnet = config.resnet
  if not (is_int(resnet.blocks_per_stage) and resnet.blocks_per_stage > 0):
    raise ConfigError(
        f"config.resnet.blocks_per_stage={resnet.blocks_per_stage!r} must be "
        "a positive integer (depth 6 * blocks_per_stage + 2).")
  if resnet.standardize not in models.STANDARDIZATIONS:
    raise ConfigError(
        f"config.resnet.standardize={resnet.standardize!r} is not valid; "
        f"choose one of {models.STANDARDIZATIONS}.")
  if not isinstance(resnet.skip_init, bool):
    raise ConfigError(f"config.resnet.skip_init={resnet.skip_init!r} must "
                      "be True or False.")
  if resnet.stem_stride not in (1, 2) or isinstance(resnet.stem_stride, bool):
    raise ConfigError(f"config.resnet.stem_stride={resnet.stem_stride!r} "
                      "must be 1 or 2.")
  if config.model not in models.RESIDUAL_MODELS:
    return
  if config.placement not in ("before_activation", "none"):
    raise ConfigError(
        f"config.placement={config.placement!r} does not fit "
        f"model={config.model!r}: its norm follows every convolution "
        "(before_activation) or there is none (none).")
  if not config.channels:
    raise ConfigError(f"config.channels=() gives model={config.model!r} no "
                      "stage; give its stage widths, e.g. (16, 32, 64).")


def _check_sequence_model(config) -> None:
  """model=lstm against the rest of one combination's config: the fields
  the LSTM cannot honour, each rejected in one line."""
  if config.model not in models.SEQUENCE_MODELS:
    return
  where = f"model={config.model!r}"
  if config.norm not in models.LSTM_NORM_FIELDS:
    raise ConfigError(
        f"config.norm={config.norm!r} does not fit {where}: the LSTM cell "
        "takes batch (BN-LSTM), layer (LN-LSTM) or none (plain LSTM).")
  if config.placement not in ("before_activation", "none"):
    raise ConfigError(
        f"config.placement={config.placement!r} does not fit {where}: the "
        "cell normalizes its gates' pre-activations and its cell state "
        "before their nonlinearities (Cooijmans et al.); set "
        "placement='before_activation', or 'none' for the plain LSTM.")
  hidden = config.lstm.hidden_size
  if not (is_int(hidden) and hidden > 0):
    raise ConfigError(f"config.lstm.hidden_size={hidden!r} must be a "
                      "positive integer.")
  seed = config.lstm.permutation_seed
  if not (is_int(seed) and 0 <= seed < 2**32):
    raise ConfigError(f"config.lstm.permutation_seed={seed!r} must be an "
                      "integer in [0, 2**32).")
  if config.precise_bn.num_batches or config.precise_bn.num_examples:
    raise ConfigError(
        f"config.precise_bn does not fit {where}: PreciseBN recomputes the "
        "statistics of bn_jax.nn.BatchNorm layers, and the LSTM keeps its "
        "own per time step; set precise_bn.num_batches=0.")
  if config.norm != "batch" or config.placement == "none":
    return
  for field, value in models.LSTM_FIXED_BN.items():
    if config.bn[field] != value:
      raise ConfigError(
          f"config.bn.{field}={config.bn[field]!r} does not fit {where}: "
          "the BN-LSTM reads only bn.momentum, bn.epsilon and bn.impl "
          f"(its {field} is {value!r}).")
  if config.mesh_devices != 1:
    raise ConfigError(
        f"config.mesh_devices={config.mesh_devices!r} does not fit {where} "
        "with norm='batch': the BN-LSTM's per-step statistics are not "
        "synchronized over devices; train it on one (mesh_devices=1).")


def _check_norm_fits(config) -> None:
  """The chosen normalization against one combination's model and batch:
  what would otherwise fail only once traced."""
  norm, bn = config.norm, config.bn
  layers = models.normalized_layers(config.model, config.placement,
                                    config.widths, config.channels,
                                    config.resnet.blocks_per_stage)
  # Ghost batches are chunks of each device's share of the batch (with
  # mesh_devices="auto" the share is known, and checked, once traced).
  devices = (config.mesh_devices if is_int(config.mesh_devices)
             and config.mesh_devices > 0 else 1)
  share = config.batch_size // devices
  if norm == "ghost" and share % bn.virtual_batch_size:
    raise ConfigError(
        f"config.bn.virtual_batch_size={bn.virtual_batch_size} does not "
        f"divide the batch size {config.batch_size}"
        + (f" ({share} per device over {devices} devices)"
           if devices > 1 else "")
        + ": ghost batches split it into equal chunks; choose a divisor.")
  if norm in ("layer", "rms"):
    for name, features, spatial in layers:
      if features == 1:
        raise ConfigError(
            f"config.norm={norm!r} normalizes each example over a layer's "
            f"features, and layer {name} has 1 (it would output a "
            "constant); use another norm or placement.")
  if norm in ("frn", "evonorm_b0"):
    for name, _, spatial in layers:
      if not spatial:
        raise ConfigError(
            f"config.norm={norm!r} takes its statistics over a layer's "
            f"spatial positions, and layer {name} has none; use it on the "
            "CNN's conv layers only (config.widths=()) or another norm.")
  for sweep, field in (("bn_momentum", "momentum"),
                       ("bn_epsilon", "epsilon")):
    if len(config.sweep[sweep]) > 1 and field not in models.NORM_FIELDS.get(
        norm, ()):
      raise ConfigError(
          f"config.sweep.{sweep} sweeps config.bn.{field}, which "
          f"norm={norm!r} does not read: the runs would be identical "
          "copies; sweep it with a norm that has it, or leave it ().")
  if norm == "sampled" and bn.stats_examples is None and round(
      bn.stats_fraction * share) < 2:  # as core rounds it
    raise ConfigError(
        f"config.bn.stats_fraction={bn.stats_fraction} of a batch of "
        f"{share}" + (" per device" if devices > 1 else "") + " leaves "
        "fewer than 2 examples for the statistics; raise the fraction or "
        "the batch size.")
  if norm == "sampled" and bn.stats_examples is not None and not (
      is_int(bn.stats_examples) and 2 <= bn.stats_examples <= share):
    raise ConfigError(
        f"config.bn.stats_examples={bn.stats_examples!r} must be an integer "
        f"from 2 to the batch size ({share}"
        + (" per device)" if devices > 1 else ")") + ".")
  for name, features, spatial in layers:
    if norm == "group" and features % bn.num_groups:
      raise ConfigError(
          f"config.bn.num_groups={bn.num_groups} does not divide the "
          f"{features} features of layer {name} (norm=group); choose a "
          "common divisor of the normalized layers' sizes.")
    if norm == "instance" and not spatial:
      raise ConfigError(
          f"config.norm='instance' needs spatial axes, but layer {name} "
          f"of the {config.model} normalizes {features} features without "
          "any: instance norm is for conv features (model=cnn with "
          "placement before_activation or after_activation and widths=()).")


def _check_norm(options, where: str) -> None:
  try:
    models.check_norm_options(options)
  except ValueError as e:
    raise ConfigError(f"{e}{where}") from None


def validate_config(config) -> None:
  """Rejects bad values, naming the field and what it accepts."""
  for field in ("learning_rate", "weight_decay", "progress_seconds",
                "target_accuracy"):
    if not is_number(config[field]):
      raise ConfigError(f"config.{field}={config[field]!r} must be a number.")
  for field in (*_CHOICES, *_POSITIVE_INTS, *_NON_NEGATIVE_INTS):
    _check_field(field, config[field], f"config.{field}")
  _check_axes(config)
  _check_numbers(config)
  _check_grad_clip(config)
  _check_train_examples(config)
  _check_runs(config)
  try:
    parallel.check_config(config)
    for combo in combinations(config):
      parallel.check_config(combo.config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  combos = combinations(config)
  shapes = {}  # model spec -> its variables' shapes, across combinations
  for combo in combos:
    where = f" (combination {combo.name})" if len(combos) > 1 else ""
    _check_norm(dict(combo.config.bn), f" (combination {combo.name})")
    _check_sequence_model(combo.config)
    _check_residual_model(combo.config)
    _check_agc(combo.config, where)
    _check_norm_fits(combo.config)
    _check_noise_fits(combo.config)
    _check_scaled_learning_rates(combo.config, where)
    _check_placement_normalizes(combo.config, where, shapes)


def _check_scaled_learning_rates(config, where: str) -> None:
  """The learning rates config.lr_scaling gives this combination's batch
  size: still finite as float32s."""
  for run in run_grid(config):
    lr = run["hparams"]["learning_rate"]
    if not is_float32_finite(lr):
      raise ConfigError(
          f"config.lr_scaling={config.lr_scaling!r} turns a learning rate "
          f"into {lr!r} at batch size {config.batch_size}{where}, which is "
          "not finite as a float32; lower the learning rate or use "
          "lr_scaling='none'.")


# The TrainSpec fields the model is built from (TrainSpec.make_model).
_MODEL_FIELDS = ("model", "placement", "activation", "widths", "channels",
                 "conv", "init", "init_std", "norm", "sequence",
                 "hidden_size", "permutation_seed", "blocks_per_stage",
                 "skip_init", "standardize", "stem_stride", "bn")


def _check_placement_normalizes(config, where: str,
                                shapes: dict[train.TrainSpec, Any]) -> None:
  """A placement other than "none", with a norm, puts at least one
  normalization layer in this combination's model: read from the model
  itself (the variables of the model built as the trainer builds it,
  against those of the same model with placement "none"; traced, not
  compiled), not from a copy of the placement rules. With norm="none" the
  model has none by its norm, which the rows name. `shapes` memoizes the
  models' shapes (batch sizes share a model, placements its bare twin)."""
  if config.placement == "none" or config.norm == "none":
    return
  spec = make_spec(config, config.batch_size)
  spec = train.TrainSpec(**{f: getattr(spec, f) for f in _MODEL_FIELDS})
  bare = dataclasses.replace(spec, placement="none")
  for model in (spec, bare):
    if model not in shapes:
      shapes[model] = models.variable_shapes(model.make_model({}))
  if shapes[spec] != shapes[bare]:
    return
  layers = ((f"channels={tuple(config.channels)!r}, "
             if config.model == "cnn" else "")
            + f"widths={tuple(config.widths)!r}")
  fields = ("config.channels or config.widths" if config.model == "cnn"
            else "config.widths")
  raise ConfigError(
      f"config.placement={config.placement!r} puts no normalization layer "
      f"in the model (model={config.model!r}, {layers}){where}: it has no "
      "layer there to normalize, so the run would be placement 'none' "
      f"reported as {config.placement!r}; give it hidden layers ({fields})"
      ", or use placement 'input' or 'none'.")


def _check_noise_fits(config) -> None:
  """A norm that draws noise against one combination's setup."""
  if config.norm in models.NOISY_NORMS and (config.precise_bn.num_batches
                                            or config.precise_bn.num_examples):
    raise ConfigError(
        f"config.precise_bn does not fit norm={config.norm!r}: recomputing "
        "the statistics runs the model in training mode, which would draw "
        "noise; set precise_bn.num_batches=0.")


def check_measurements(config, measurements) -> None:
  """What the trainer's measurements need of any config: one device for
  those on the training batch (they measure one device's step)."""
  for m in measurements:
    if m.on == "train_batch" and config.mesh_devices != 1:
      raise ConfigError(
          f"the measurement {m.name!r} measures one device's training: set "
          "config.mesh_devices=1, or turn the measurement off.")


def validate_data_size(config, num_train: int, num_test: int,
                       measurements=()) -> None:
  """Rejects a batch larger than the data, a warmup longer than the
  training, and measurements that do not fit an epoch or the test set
  (all known once the data are loaded, still before anything is
  compiled)."""
  for combo in combinations(config):
    batch_size, c = combo.config.batch_size, combo.config
    total_steps = num_train // batch_size * schedule_epochs(c)
    if c.schedule == "warmup_cosine" and c.warmup_steps >= total_steps:
      raise ConfigError(
          f"config.warmup_steps={c.warmup_steps} is not shorter than "
          f"the training ({total_steps} steps at batch size {batch_size}); "
          "give fewer warmup steps or more epochs.")
    steps_per_epoch = num_train // batch_size
    for m in measurements:
      if steps_per_epoch % m.every:
        raise ConfigError(
            f"the measurement {m.name!r} every {m.every} steps does not "
            f"divide the {steps_per_epoch} steps of an epoch (batch size "
            f"{batch_size}); choose a divisor (config.{m.name}.every_steps)"
            ", so that every epoch measures at the same steps.")
      if m.on == "test_images" and m.num_images > num_test:
        raise ConfigError(
            f"the measurement {m.name!r} reads {m.num_images} test images, "
            f"more than the {num_test} there are (config.{m.name}."
            "num_images).")
    if c.precise_bn.num_examples is not None and (
        c.precise_bn.num_examples > num_train):
      raise ConfigError(
          f"config.precise_bn.num_examples={c.precise_bn.num_examples} is "
          f"more than the {num_train} training examples; give fewer.")
    if c.precise_bn.num_batches * batch_size > num_train:
      raise ConfigError(
          f"config.precise_bn.num_batches={c.precise_bn.num_batches} batches "
          f"of {batch_size} need more than the {num_train} training "
          "examples; give fewer batches.")
    if batch_size > num_train:
      raise ConfigError(f"batch size {batch_size} (config.batch_size or "
                        "config.batch_sizes) is larger than the training set "
                        f"({num_train} examples).")
    if batch_size > num_test:
      raise ConfigError(
          f"batch size {batch_size} (config.batch_size or config.batch_sizes)"
          f" is larger than the test set ({num_test} examples); the "
          "batch-statistics evaluation needs at least one full batch.")
