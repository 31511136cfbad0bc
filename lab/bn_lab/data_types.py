"""What bn_lab.data and bn_lab.synthetic share: the in-memory data set, its
error and constants. Its own module so that data (which dispatches
generated data sets to synthetic) and synthetic (which returns these) import
it without importing each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
DEFAULT_CACHE_ROOT = Path("~/.cache/bn_jax")


class DataError(Exception):
  """A data set could not be found, read or verified; the message says how
  to fix it."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One data set in memory. Arrays are host NumPy arrays.

  `eq=False`: comparing datasets field by field would compare arrays
  element-wise, which has no single truth value.
  """
  name: str  # "mnist", "fashion_mnist", "kmnist"
  train_images: np.ndarray = dataclasses.field(repr=False)  # (N, 28, 28) u8
  train_labels: np.ndarray = dataclasses.field(repr=False)  # (N,) int32
  test_images: np.ndarray = dataclasses.field(repr=False)  # (M, 28, 28) u8
  test_labels: np.ndarray = dataclasses.field(repr=False)  # (M,) int32
  origin: str  # where the data came from; whether checksums were verified
