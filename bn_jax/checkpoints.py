"""Orbax checkpoints of a combination's stacked train states, one per epoch.

Checkpoints hold state only (params, BN statistics, optimizer state, step,
per-run hyperparameters, data keys); the history of metrics lives in the
workdir's metrics.jsonl. A checkpoint that does not load is moved aside and
the one before it used, so a corrupt file costs an epoch, never the run.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import logging
import jax

from bn_jax import workdir


def manager(directory: Path, keep: int):
  import orbax.checkpoint as ocp  # slow import; only runs need it
  return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=False,
          # Removes what a killed save left behind (orbax writes each step
          # to a temporary directory and renames it when complete).
          cleanup_tmp_directories=True))


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


def restore_newest(checkpoints, abstract_states):
  """(epoch, states) of the newest checkpoint that loads, or None.

  A checkpoint that does not load (a truncated or garbled file; orbax and
  TensorStore raise many kinds of errors) is reported, moved aside
  (`_move_aside`), and the next older one is tried.
  """
  import orbax.checkpoint as ocp
  for epoch in sorted(checkpoints.all_steps(), reverse=True):
    path = Path(checkpoints.directory) / str(epoch)
    try:
      states = checkpoints.restore(
          epoch, args=ocp.args.StandardRestore(abstract_states))
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).strip().splitlines() or [""])[0][:300]
      aside = _move_aside(path)
      logging.warning(
          "checkpoint %s is corrupt or incomplete and was not used (%s: %s). "
          "Moved it to %s; trying the previous checkpoint.", path,
          type(e).__name__, reason, aside)
      checkpoints.reload()
      continue
    return epoch, states
  return None


def restore_or_create(checkpoints, create):
  """(epoch, states) of the newest checkpoint that loads, else (0,
  create()). Both are committed to one device, so that a resumed run
  executes the very program an uninterrupted one does; a resumed run does
  not compile `create` (its shapes only)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = restore_newest(checkpoints, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(create)))
  if restored is None:
    return 0, jax.device_put(create(), device)
  return restored
