"""Orbax checkpoints of a combination's stacked train states, one per epoch.

Checkpoints hold state only (params, BN statistics, optimizer state, step,
per-run hyperparameters, data keys); the history of metrics lives in the
workdir's metrics.jsonl. A checkpoint that does not load is moved aside and
the one before it used, so a corrupt file costs an epoch, never the run.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from absl import logging
import jax

from bn_lab import workdir


def manager(directory: Path, keep: int, read_only: bool = False):
  """A run's checkpoint manager; `read_only` for readers (reports), which
  must not clean up or move what a run that may still be going wrote."""
  import orbax.checkpoint as ocp  # slow import; only runs need it
  return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=not read_only, read_only=read_only,
          enable_async_checkpointing=False,
          # Removes what a killed save left behind (orbax writes each step
          # to a temporary directory and renames it when complete).
          cleanup_tmp_directories=not read_only))


def save(checkpoints, epoch: int, states) -> None:
  """Saves `states` as step `epoch`; a failed save (a full disk: orbax and
  TensorStore raise many kinds of errors) is a one-line WriteError, the
  checkpoints before it intact (orbax renames a step only when complete)."""
  import orbax.checkpoint as ocp
  try:
    checkpoints.save(epoch, args=ocp.args.StandardSave(states))
    checkpoints.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise workdir.write_error(Path(checkpoints.directory) / str(epoch),
                              e) from e


def _move_aside(path: Path) -> Path:
  """Renames a step directory to `<manager dir>.corrupt/<step>[-n]`, outside
  the manager's directory, where a later save of the step cannot meet it."""
  corrupt = path.parent.with_name(f"{path.parent.name}.corrupt")
  corrupt.mkdir(parents=True, exist_ok=True)
  dest, n = corrupt / path.name, 0
  while dest.exists():
    n += 1
    dest = corrupt / f"{path.name}-{n}"
  os.replace(path, dest)
  return dest


def restore_newest(checkpoints, abstract_states, at_most: int | None = None,
                   move_aside: bool = True):
  """(epoch, states) of the newest checkpoint that loads, of an epoch up to
  `at_most` (None: any), or None.

  A checkpoint that does not load (a truncated or garbled file; orbax and
  TensorStore raise many kinds of errors) is reported, moved aside
  (`_move_aside`; not with move_aside=False, for readers), and the next
  older one is tried.
  """
  for epoch in sorted(checkpoints.all_steps(), reverse=True):
    if at_most is not None and epoch > at_most:
      continue
    path = Path(checkpoints.directory) / str(epoch)
    try:
      states = _restore_any_layout(checkpoints, epoch, abstract_states)
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).strip().splitlines() or [""])[0][:300]
      if not move_aside:
        logging.warning("checkpoint %s does not load (%s: %s); trying the "
                        "previous one.", path, type(e).__name__, reason)
        continue
      aside = _move_aside(path)
      logging.warning(
          "checkpoint %s is corrupt or incomplete and was not used (%s: %s). "
          "Moved it to %s; trying the previous checkpoint.", path,
          type(e).__name__, reason, aside)
      checkpoints.reload()
      continue
    return epoch, states
  return None


def _layouts(abstract_states):
  """`abstract_states`, then, for a NamedTuple state, dicts of its fields
  without each combination of its None fields. Why: an optional field
  (None unless a feature uses it, e.g. train.TrainState.noise_key) that was
  added after a checkpoint was written is missing from it, and orbax
  matches tree structures exactly."""
  yield abstract_states
  if not hasattr(abstract_states, "_asdict"):
    return
  fields = abstract_states._asdict()
  optional = [name for name, value in fields.items() if value is None]
  for r in range(1, len(optional) + 1):
    for missing in itertools.combinations(optional, r):
      yield {k: v for k, v in fields.items() if k not in missing}


def _restore_any_layout(checkpoints, epoch, abstract_states):
  """The checkpoint of `epoch` in the first of `_layouts` that matches it,
  as `abstract_states`' type; the first layout's error if none does."""
  import orbax.checkpoint as ocp
  first_error = None
  for layout in _layouts(abstract_states):
    try:
      states = checkpoints.restore(epoch,
                                   args=ocp.args.StandardRestore(layout))
    except Exception as e:  # pylint: disable=broad-except
      first_error = first_error or e
      continue
    return type(abstract_states)(**states) if isinstance(layout, dict) and (
        not isinstance(abstract_states, dict)) else states
  raise first_error


def restore_or_create(checkpoints, create, recorded: int | None = None):
  """(epoch, states) of the newest checkpoint that loads, else (0,
  create()). Both are committed to one device, so that a resumed run
  executes the very program an uninterrupted one does; a resumed run does
  not compile `create` (its shapes only).

  `recorded`: the epochs whose metrics rows are all in the workdir
  (`workdir.recorded_epochs`). A checkpoint past them is not resumed from,
  as the report would then show an earlier epoch's numbers as final: the
  newest checkpoint up to them is, and the later ones are deleted (their
  epochs are trained again, to the same numbers)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = restore_newest(checkpoints, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(create)), at_most=recorded)
  epoch = 0 if restored is None else restored[0]
  later = [step for step in checkpoints.all_steps() if step > epoch]
  if later:
    logging.warning(
        "%s: the checkpoints of epoch(s) %s are past the metrics rows "
        "recorded (all runs' rows up to epoch %d); training again from "
        "epoch %d.", checkpoints.directory, sorted(later), recorded, epoch)
    for step in later:
      checkpoints.delete(step)
  if restored is None:
    return 0, jax.device_put(create(), device)
  return restored
