"""MNIST-family data sets as NumPy arrays, read from IDX files.

    ds = load_dataset("mnist")                              # auto: see below
    ds = load_dataset("mnist", data_dir="/path/to/idx")     # local files only
    x = to_float(ds.train_images, "standardize")            # (N, 784) float32

Where `source="auto"` looks, in order:
  1. `data_dir` (the config field; `--config.data_dir=/path/to/idx`), else the
     environment variable BN_JAX_DATA_DIR;
  2. the download cache, `<cache_dir>/<name>` (default ~/.cache/bn_jax/<name>);
  3. for mnist, the copy bundled with the package (bn_lab/bundled/mnist), so
     MNIST loads with no configuration and no network;
  4. for fashion_mnist, the Debian package `dataset-fashion-mnist`
     (/usr/share/datasets/fashion-mnist);
  5. a download from the standard mirrors into the cache (pooch, checked
     against the md5 the mirrors publish). For fashion_mnist, a failed
     download ends in one line: apt-get install dataset-fashion-mnist.
`Dataset.origin` says which of these was used.

`printed_digits` is not read from files: it is generated and cached by
bn_lab.synthetic (`load_printed_digits`, default sizes and seed), which
also has the loaders of MNIST-1D and Stacked-MNIST (other shapes, so not
values of DATASETS).

Every file is checked: IDX magic number, header counts against the payload,
28x28 images, as many labels as images, labels in 0..9, and the md5 of the
uncompressed bytes where it is known. Checksums are of the *uncompressed*
bytes because redistributed copies (the bundled MNIST, the Debian
Fashion-MNIST) are often recompressed, which changes the .gz bytes but not
the data. Every problem raises `DataError` naming the file, the problem and
the fix. Nothing here imports JAX: arrays stay on the host until training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pooch

# The shared types and constants (bn_lab.synthetic reads them too).
from bn_lab.data_types import DEFAULT_CACHE_ROOT
from bn_lab.data_types import DataError
from bn_lab.data_types import Dataset
from bn_lab.data_types import IMAGE_SHAPE
from bn_lab.data_types import NUM_CLASSES

DATA_DIR_ENV = "BN_JAX_DATA_DIR"

DATASETS = ("mnist", "fashion_mnist", "kmnist", "printed_digits")
# Generated, not read from IDX files (bn_lab.synthetic).
GENERATED_DATASETS = ("printed_digits",)
SOURCES = ("auto", "idx", "download", "tfds")
SCALINGS = ("unit", "standardize", "raw")

# Pixel statistics of the MNIST training set after dividing by 255 (used by
# "standardize" for every dataset, as is customary for MNIST-style inputs).
MNIST_PIXEL_MEAN = 0.1307
MNIST_PIXEL_STD = 0.3081


IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"

# Role -> the standard file name (without .gz).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# md5 of the *uncompressed* IDX bytes. MNIST: bn_lab/bundled/mnist/README.md.
# Fashion-MNIST: computed from the Debian package dataset-fashion-mnist and
# matching independently published lists.
RAW_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

# md5 of the .gz files as the mirrors below serve them (the values in
# torchvision/datasets/mnist.py). pooch checks every download against them; a
# local .gz that differs is not an error, since recompressing changes these
# bytes but not the data.
GZ_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "kmnist": {
        "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
    },
}

# Tried in order; each serves <mirror><standard name>.gz.
MIRRORS = {
    "mnist": (
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
        "master/data/fashion/",
    ),
    "kmnist": (
        "https://codh.rois.ac.jp/kmnist/dataset/kmnist/",
        "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
    ),
}

# Copies installed with the package (package data in pyproject.toml), tried
# by source="auto" after the cache.
BUNDLED_DATA_DIRS = {
    "mnist": Path(__file__).resolve().parent / "bundled" / "mnist",
}

# Read-only copies installed by system packages, tried by source="auto".
SYSTEM_DATA_DIRS = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
}
# The Debian package of each SYSTEM_DATA_DIRS entry, named in the error
# when it is missing and the download fails.
SYSTEM_PACKAGES = {
    "fashion_mnist": "dataset-fashion-mnist",
}


# Seconds a single network operation (connect, one read) may block, so an
# offline machine fails fast instead of hanging.
DOWNLOAD_TIMEOUT_S = 10.0


def _idx_file_list(name: str = "") -> str:
  what = f"{name} " if name else ""
  return (f"the four {what}IDX files ({', '.join(IDX_FILES.values())}; each "
          "may be gzipped as .gz)")


def _local_files_hint(name: str = "") -> str:
  return (f"point the run at a directory holding {_idx_file_list(name)}: "
          "--config.data_dir=/path/to/idx (config field `data_dir`) or "
          f"export {DATA_DIR_ENV}=/path/to/idx.")


_REPLACE_HINT = ("Replace it with an intact copy (if it is in the download "
                 "cache, delete it and it is fetched again).")


# ----------------------------------------------------------------------------
# One IDX file.


def _read_bytes(path: Path) -> tuple[bytes, bytes | None]:
  """Returns (IDX bytes, compressed bytes or None if the file is raw)."""
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise DataError(f"{path}: file not found. To fix, "
                    f"{_local_files_hint()}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the file ({e}).") from e
  # Decide by content, not by name: a .gz suffix is often wrong either way.
  if not data.startswith(_GZIP_MAGIC):
    return data, None
  try:
    return gzip.decompress(data), data
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: corrupt gzip data ({e}). {_REPLACE_HINT}") from e


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
  if len(data) < 4:
    raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX "
                    f"header. {_REPLACE_HINT}")
  magic = int.from_bytes(data[:4], "big")
  ndim = data[3]
  if data[:2] != b"\0\0" or data[2] != _IDX_UBYTE or ndim not in (1, 3):
    note = (" (the name ends in .gz but the content is not gzip)"
            if path.suffix == ".gz" else "")
    raise DataError(
        f"{path}: bad IDX magic number {magic} (0x{magic:08x}){note}; expected "
        f"{IDX_LABELS_MAGIC} (labels) or {IDX_IMAGES_MAGIC} (images), i.e. "
        "unsigned bytes with 1 or 3 dimensions. This is not an MNIST-style "
        f"IDX file. {_REPLACE_HINT}")
  header_bytes = 4 + 4 * ndim
  if len(data) < header_bytes:
    raise DataError(f"{path}: truncated header: expected {header_bytes} "
                    f"bytes, found {len(data)}. {_REPLACE_HINT}")
  shape = struct.unpack(f">{ndim}I", data[4:header_bytes])
  expected = math.prod(shape)
  actual = len(data) - header_bytes
  if actual != expected:
    problem = "truncated" if actual < expected else "trailing bytes"
    raise DataError(
        f"{path}: {problem}: the header declares shape {shape}, i.e. "
        f"expected {expected} payload bytes, but found {actual} "
        f"({header_bytes + expected} vs {len(data)} bytes uncompressed in "
        f"all). {_REPLACE_HINT}")
  # frombuffer on bytes is read-only; copy so callers own ordinary arrays.
  return np.frombuffer(data, np.uint8, expected, header_bytes).reshape(
      shape).copy()


def read_idx(path) -> np.ndarray:
  """Reads one IDX file (gzip or raw, detected by content) as a uint8 array.

  Raises:
    DataError: unreadable file, corrupt gzip, bad magic number, or a header
      whose shape does not match the payload size.
  """
  path = Path(path)
  data, _ = _read_bytes(path)
  return _parse_idx(data, path)


# ----------------------------------------------------------------------------
# A directory of four IDX files.


def _candidate_names(stem: str) -> list[str]:
  dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte
  return [stem, stem + ".gz", dotted, dotted + ".gz"]


def _find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
  """Returns ({role: path} for the files found, [missing standard names])."""
  found, missing = {}, []
  for role, stem in IDX_FILES.items():
    for candidate in _candidate_names(stem):
      if (directory / candidate).is_file():
        found[role] = directory / candidate
        break
    else:
      missing.append(stem)
  return found, missing


def _check_md5(name: str, stem: str, path: Path, data: bytes,
               compressed: bytes | None) -> bool:
  """True if verified, False if no reference is known. Raises on mismatch."""
  expected = RAW_MD5.get(name, {}).get(stem)
  actual = hashlib.md5(data).hexdigest()
  other = [known for known, md5s in RAW_MD5.items()
           if name in DATASETS and known != name
           and md5s.get(stem) == actual]
  if other:  # e.g. dataset=kmnist pointed at MNIST's files
    raise DataError(
        f"{path} is {other[0]}'s {stem}, not {name}'s: config.dataset="
        f"{name!r} with config.data_dir holding {other[0]}. Set "
        f"--config.dataset={other[0]}, or point --config.data_dir at "
        f"{name}'s files.")
  if expected is not None:
    if actual != expected:
      raise DataError(
          f"{path}: md5 checksum mismatch for {name} {stem}: expected "
          f"{expected}, got {actual} (md5 of the uncompressed bytes). The "
          f"file is corrupt or not the {name} file. {_REPLACE_HINT} To load "
          "it anyway, pass verify_checksums=False.")
    return True
  published_gz = GZ_MD5.get(name, {}).get(stem)
  return (compressed is not None and published_gz is not None
          and hashlib.md5(compressed).hexdigest() == published_gz)


def _validate_split(images, labels, images_file, labels_file) -> None:
  if images.ndim != 3:
    raise DataError(f"{images_file}: holds a {images.ndim}-d array (magic "
                    f"{IDX_LABELS_MAGIC}, labels?) where images (magic "
                    f"{IDX_IMAGES_MAGIC}) are expected. {_REPLACE_HINT}")
  if images.shape[1:] != IMAGE_SHAPE:
    raise DataError(
        f"{images_file}: images are {images.shape[1]}x{images.shape[2]}, "
        f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}. {_REPLACE_HINT}")
  if labels.ndim != 1:
    raise DataError(f"{labels_file}: holds a {labels.ndim}-d array (magic "
                    f"{IDX_IMAGES_MAGIC}, images?) where labels (magic "
                    f"{IDX_LABELS_MAGIC}) are expected. {_REPLACE_HINT}")
  if len(images) != len(labels):
    raise DataError(
        f"{images_file} holds {len(images)} images but {labels_file} holds "
        f"{len(labels)} labels; the counts must be equal (files from "
        "different releases or splits?).")
  bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
  if bad.size:
    raise DataError(
        f"{labels_file}: {bad.size} label(s) out of range 0..{NUM_CLASSES - 1}"
        f", e.g. {int(labels[bad[0]])} at index {bad[0]}. {_REPLACE_HINT}")


def _make_dataset(name, arrays, files, origin) -> Dataset:
  for split in ("train", "test"):
    _validate_split(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                    files[f"{split}_images"], files[f"{split}_labels"])
  return Dataset(
      name=name,
      train_images=arrays["train_images"].astype(np.uint8, copy=False),
      train_labels=arrays["train_labels"].astype(np.int32),
      test_images=arrays["test_images"].astype(np.uint8, copy=False),
      test_labels=arrays["test_labels"].astype(np.int32),
      origin=origin)


def load_idx_dir(directory, name: str = "mnist",
                 verify_checksums: bool = True) -> Dataset:
  """Loads the four standard IDX files of `directory`.

  Accepts each of train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte raw or gzipped, also under
  the dotted names (train-images.idx3-ubyte).

  Args:
    directory: the directory holding the files.
    name: the data set, used for the checksum table and `Dataset.name`.
    verify_checksums: compare md5s with the known ones; a mismatch raises.
      With False, or for a data set without known md5s, `origin` says the
      checksums were not verified.

  Raises:
    DataError: missing directory or file, or any invalid file.
  """
  directory = Path(directory).expanduser()
  if not directory.is_dir():
    what = "is not a directory" if directory.exists() else "does not exist"
    raise DataError(f"Data directory {directory} {what}. To fix, "
                    f"{_local_files_hint(name)}")
  found, missing = _find_idx_files(directory)
  if missing:
    present = sorted(p.name for p in directory.iterdir())[:12]
    raise DataError(
        f"Data directory {directory} lacks {', '.join(missing)} (looked for "
        "each raw, .gz, and as e.g. train-images.idx3-ubyte); it holds "
        f"{present or 'nothing'}. To fix, {_local_files_hint(name)}")
  arrays, verified = {}, {}
  for role, path in found.items():
    data, compressed = _read_bytes(path)
    arrays[role] = _parse_idx(data, path)
    if verify_checksums:
      verified[role] = _check_md5(name, IDX_FILES[role], path, data,
                                  compressed)
  if not verify_checksums:
    checks = "checksums not verified: verify_checksums=False"
  elif all(verified.values()):
    checks = "md5 verified"
  else:
    unknown = [found[r].name for r, ok in verified.items() if not ok]
    checks = (f"checksums not verified: no known md5 for {name} "
              f"{', '.join(unknown)}")
  return _make_dataset(name, arrays, found, f"IDX files in {directory} "
                       f"({checks})")


# ----------------------------------------------------------------------------
# Download.


@contextlib.contextmanager
def _quiet_pooch():
  """Silences pooch's INFO lines ("Downloading data from ...") while keeping
  its warnings: pooch's logger prints through its own stderr handler, and
  `Dataset.origin` already says where the data came from."""
  logger = pooch.get_logger()
  level = logger.level
  logger.setLevel(max(level, logging.WARNING))
  try:
    yield
  finally:
    logger.setLevel(level)


def _failure(url: str, error: Exception) -> str:
  """One line per failed attempt, for the DataError."""
  if isinstance(error, ValueError):
    # pooch's hash mismatch; its first sentence names both md5s, the rest
    # says it deleted the download.
    return f"{url}: md5 mismatch ({str(error).split('. ')[0]}); not kept"
  # requests' errors (OSErrors) wrap urllib3's, whose `reason` is the part
  # that says what happened (refused, name not resolved, timed out).
  reason = getattr(error.args[0], "reason", None) if error.args else None
  return f"{url}: {type(error).__name__}: {reason or error}"


def _download_file(name: str, stem: str, directory: Path) -> str:
  """Fetches <stem>.gz into `directory` from the first mirror that serves it
  with the published md5; returns that URL.

  pooch writes to a temporary file in `directory` and moves it into place
  only once the md5 matches, so a failed or corrupt download leaves nothing.
  """
  downloader = pooch.HTTPDownloader(progressbar=False,
                                    timeout=DOWNLOAD_TIMEOUT_S)
  failures = []
  for mirror in MIRRORS[name]:
    url = mirror + stem + ".gz"
    try:
      pooch.retrieve(url, known_hash=f"md5:{GZ_MD5[name][stem]}",
                     fname=stem + ".gz", path=directory,
                     downloader=downloader)
    except (OSError, ValueError) as e:
      failures.append(_failure(url, e))
      continue
    return url
  raise DataError(
      f"Could not download {stem}.gz of {name} into {directory} (no network, "
      "or every mirror failed):\n  " + "\n  ".join(failures)
      + f"\nTo run offline, {_local_files_hint(name)}")


def _download(name: str, directory: Path) -> list[str]:
  """Downloads the files missing from `directory`; returns the URLs used."""
  if name not in MIRRORS:
    raise DataError(f"No download mirrors are known for data set {name!r} "
                    f"(known: {', '.join(MIRRORS)}). To use local files, "
                    f"{_local_files_hint(name)}")
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"Cannot create the download cache {directory} ({e}). "
                    "Pass another cache_dir, or "
                    f"{_local_files_hint(name)}") from e
  found, _ = _find_idx_files(directory)
  # Files already in the cache are kept (and verified when loaded): a
  # recompressed copy put there by hand has other .gz md5s but the same data.
  missing = [stem for role, stem in IDX_FILES.items() if role not in found]
  with _quiet_pooch():
    return [_download_file(name, stem, directory) for stem in missing]


# ----------------------------------------------------------------------------
# tensorflow-datasets.


def _load_tfds(name: str) -> Dataset:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"source='tfds' needs TensorFlow and tensorflow-datasets ({e}). "
        'Install them with `pip install -e ".[tfds]"` (tensorflow-cpu), or '
        f"{_local_files_hint(name)}") from e
  try:
    splits = tfds.load(name, split=["train", "test"], batch_size=-1,
                       as_supervised=True)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises many types (download, registration, preparation errors).
    raise DataError(
        f"tensorflow-datasets could not load {name!r} "
        f"({type(e).__name__}: {e}). To run offline, "
        f"{_local_files_hint(name)}") from e
  (train_x, train_y), (test_x, test_y) = tfds.as_numpy(splits)
  squeeze = lambda x: x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x
  arrays = dict(train_images=squeeze(train_x), train_labels=train_y,
                test_images=squeeze(test_x), test_labels=test_y)
  files = {role: f"tfds {name} {role.split('_')[0]} split" for role in arrays}
  return _make_dataset(name, arrays, files,
                       f"tensorflow-datasets {name} (TFDS-verified)")


# ----------------------------------------------------------------------------
# Entry point.


def _local_sources(name: str, cache: Path) -> list[tuple[str, Path]]:
  """(label, directory) that source="auto" tries after data_dir and the
  environment variable, in order; a directory is used if it holds all four
  files."""
  candidates = [("download cache", cache),
                ("bundled copy", BUNDLED_DATA_DIRS.get(name)),
                ("system package", SYSTEM_DATA_DIRS.get(name))]
  return [(label, d) for label, d in candidates if d is not None]


def _labelled(dataset: Dataset, label: str) -> Dataset:
  return dataclasses.replace(dataset, origin=f"{label}: {dataset.origin}")


def load_dataset(name: str = "mnist", data_dir=None, source: str = "auto",
                 cache_dir=None) -> Dataset:
  """Loads a data set; see the module docstring for where "auto" looks.

  Args:
    name: "mnist", "fashion_mnist", "kmnist" (any name for local IDX
      files), or "printed_digits" (generated: only source="auto", no
      data_dir; bn_lab.synthetic).
    data_dir: a directory of IDX files; None or "" falls back to the
      BN_JAX_DATA_DIR environment variable.
    source: "auto"; "idx" (data_dir / BN_JAX_DATA_DIR only); "download" (the
      standard mirrors, into the cache; files already there are reused;
      BN_JAX_DATA_DIR is ignored);
      "tfds" (tensorflow_datasets.load, needs TensorFlow).
    cache_dir: root of the download cache; files go to `<cache_dir>/<name>`
      (default ~/.cache/bn_jax/<name>).

  Returns:
    The Dataset; its `origin` names the source used (for "auto", which of
    the places it tried) and whether the checksums were verified.

  Raises:
    ValueError: unknown `source`.
    DataError: no usable data; the message says how to point the run at
      local files.
  """
  if source not in SOURCES:
    raise ValueError(f"source={source!r}; choose one of {SOURCES}.")
  if name in GENERATED_DATASETS:
    return _load_generated(name, data_dir, source, cache_dir)
  if source == "tfds":
    return _load_tfds(name)
  if source == "download" and data_dir:
    raise DataError(f"source='download' writes to the cache and does not "
                    f"read data_dir={str(data_dir)!r}; use source='idx' or "
                    "'auto' to read that directory.")
  if source != "download":
    # An explicit directory that is wrong is an error, not a fallback.
    if data_dir:
      return load_idx_dir(data_dir, name)
    if os.environ.get(DATA_DIR_ENV):
      return _labelled(load_idx_dir(os.environ[DATA_DIR_ENV], name),
                       f"${DATA_DIR_ENV}")
  if source == "idx":
    raise DataError(f"source='idx' needs a directory: "
                    f"{_local_files_hint(name)}")
  cache = Path(cache_dir or DEFAULT_CACHE_ROOT).expanduser() / name
  if source == "auto":
    for label, directory in _local_sources(name, cache):
      if not _find_idx_files(directory)[1]:
        return _labelled(load_idx_dir(directory, name), label)
  try:
    used = _download(name, cache)
  except DataError as e:
    if source != "auto" or name not in SYSTEM_PACKAGES:
      raise
    # One line; the mirrors' failures stay in __cause__.
    raise DataError(
        f"{name} is neither in {SYSTEM_DATA_DIRS[name]} nor in the download "
        f"cache {cache}, and the download failed; install it as root: "
        f"apt-get install {SYSTEM_PACKAGES[name]} (or point "
        "--config.data_dir at its IDX files).") from e
  dataset = load_idx_dir(cache, name)
  if not used:
    return _labelled(dataset, "download cache")
  return _labelled(dataset, f"downloaded from {os.path.dirname(used[0])}/")


def _load_generated(name: str, data_dir, source: str, cache_dir) -> Dataset:
  """A GENERATED_DATASETS value, from bn_lab.synthetic (default sizes and
  seed). $BN_JAX_DATA_DIR, which points at IDX files, is ignored."""
  if data_dir or source != "auto":
    given = (f"data_dir={str(data_dir)!r}" if data_dir
             else f"source={source!r}")
    raise DataError(
        f"{name} is generated (bn_lab.synthetic), not read from IDX files, "
        f"so {given} does not apply: leave data_dir empty and use "
        "source='auto'.")
  from bn_lab import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.load_printed_digits(cache_dir=cache_dir)


# ----------------------------------------------------------------------------
# Preprocessing.


def scale_pixels(pixels, scaling: str):
  """uint8 pixels (any shape, NumPy or JAX) -> float32, same shape.

  "unit" maps 0..255 to [0, 1]; "standardize" to
  (x / 255 - MNIST_PIXEL_MEAN) / MNIST_PIXEL_STD; "raw" keeps 0..255 as
  floats (no preprocessing: the claim that BN on the input replaces it is
  tested with it). The one definition of the
  input scalings: `to_float` runs it on the host, bn_lab.train inside the
  compiled step on pixels kept as uint8 on the device (equal to within one
  float32 ulp: XLA multiplies by 1/255 where NumPy divides).
  """
  if scaling not in SCALINGS:
    raise ValueError(f"scaling={scaling!r}; choose one of {SCALINGS}.")
  if pixels.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {pixels.dtype}.")
  if scaling == "raw":
    return pixels.astype(np.float32)
  x = pixels.astype(np.float32) / np.float32(255)
  if scaling == "standardize":
    x = (x - np.float32(MNIST_PIXEL_MEAN)) / np.float32(MNIST_PIXEL_STD)
  return x


SUBSET_SEED = 0


def train_subset(images, labels, num: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`num` training examples, a random subset fixed by SUBSET_SEED (the same
  for every run and study), in their original order; None: all."""
  if num is None:
    return images, labels
  if not 0 < num <= len(images):
    raise ValueError(f"train_examples={num!r}: give 1 to {len(images)} (the "
                     "training set's size), or None for all.")
  keep = np.sort(np.random.default_rng(SUBSET_SEED).permutation(
      len(images))[:num])
  return images[keep], labels[keep]


VALIDATION_SEED = 1  # not SUBSET_SEED: the split is not the subset's head


def validation_split(images, labels, num: int):
  """(train images, train labels, validation images, validation labels):
  `num` training examples held out for selection (rates, epochs, variants),
  a random subset fixed by VALIDATION_SEED (the same for every run and
  study), each part in its original order; num 0: validation None."""
  if not num:
    return images, labels, None, None
  if not 0 < num < len(images):
    raise ValueError(f"validation_examples={num!r}: give 0 (none) to "
                     f"{len(images) - 1} (fewer than the training set's "
                     f"{len(images)}).")
  held_out = np.zeros(len(images), bool)
  held_out[np.random.default_rng(VALIDATION_SEED).permutation(
      len(images))[:num]] = True
  return (images[~held_out], labels[~held_out], images[held_out],
          labels[held_out])


def flatten_pixels(images) -> np.ndarray:
  """uint8 images (N, 28, 28) -> uint8 (N, 784), checked."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels, got {images.dtype}.")
  return images.reshape(len(images), -1)


def to_float(images: np.ndarray, scaling: str) -> np.ndarray:
  """uint8 images (N, 28, 28) -> float32 (N, 784), on the host.

  Args:
    images: uint8 pixel values in 0..255.
    scaling: one of SCALINGS (see `scale_pixels`, which checks it).
  """
  return scale_pixels(flatten_pixels(images), scaling)


# ----------------------------------------------------------------------------
# Input shifts: deterministic corruptions of the test inputs, for studies of
# shifted data (AdaBN: BN statistics recomputed on the shifted inputs).

SHIFT_KINDS = ("brightness", "contrast", "noise", "translation")
SHIFT_SEVERITIES = (1, 2, 3, 4, 5)
# Kind -> its parameter at severities 1..5, in the unit scale (pixels / 255).
# brightness, contrast and noise take the values of ImageNet-C (Hendrycks &
# Dietterich, 2019); contrast there scales around each image's own mean,
# which is not one affine map of the data set, so here it scales around a
# fixed grey level, MNIST_PIXEL_MEAN.
SHIFT_PARAMETERS = {
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # b in x + b
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # a in a * (x - m) + m
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # sigma in x + sigma * z
    "translation": (1, 2, 3, 4, 5),  # pixels moved down and right
}
# The noise is a fixed draw, so that shifted data sets are reproducible.
SHIFT_NOISE_SEED = 0


def _parse_shift_kind(kind) -> tuple[str, ...]:
  parts = tuple(kind.split("+")) if isinstance(kind, str) else ()
  if not parts or any(p not in SHIFT_KINDS for p in parts):
    raise ValueError(
        f"kind={kind!r}; choose one of {SHIFT_KINDS} or several joined by "
        "'+' (applied left to right), e.g. 'brightness+noise'.")
  if len(set(parts)) != len(parts):
    raise ValueError(f"kind={kind!r} names a shift twice; name each once.")
  return parts


def shift_images(images, kind: str, severity: int, *, clip: bool = False,
                 seed: int = SHIFT_NOISE_SEED) -> np.ndarray:
  """Shifted copies of images: a deterministic corruption at a severity.

  In the unit scale (pixels / 255), with the parameter p of
  `SHIFT_PARAMETERS[kind][severity - 1]`:

    kind         x' =                     severity 1..5
    brightness   x + p                    p = 0.1, 0.2, 0.3, 0.4, 0.5
    contrast     p * (x - m) + m          p = 0.4, 0.3, 0.2, 0.1, 0.05
                 (m = MNIST_PIXEL_MEAN)
    noise        x + p * z, z ~ N(0, 1)   p = 0.08, 0.12, 0.18, 0.26, 0.38
    translation  x moved p pixels down    p = 1, 2, 3, 4, 5
                 and p right; the pixels
                 moved in are 0 (black)

  Kinds joined by "+" ("brightness+noise", "contrast+translation") are
  applied left to right, each at `severity`. The noise z is drawn from
  `np.random.default_rng(seed)` with the shape of `images`, so the same
  call always gives the same array.

  Values are not clipped to [0, 1] by default: brightness and contrast stay
  exactly the affine map a * x + b (a > 0) of every input, the shift that
  batch norm's statistics undo (recomputed on the shifted data, as AdaBN
  does); clipping would saturate the brightest pixels and break that.
  `clip=True` clips the result once, at the end, to the range a stored
  image could hold (ImageNet-C clips after each corruption).

  Args:
    images: uint8 pixels 0..255 or floats in [0, 1] (unit scale), of shape
      (N, 784) or (N, 28, 28).
    kind: one of SHIFT_KINDS, or several joined by "+".
    severity: one of SHIFT_SEVERITIES.
    clip: clip the result to [0, 1].
    seed: the seed of the noise.

  Returns:
    float32 array of the shape of `images`, unit scale.
  """
  parts = _parse_shift_kind(kind)
  if (isinstance(severity, bool)
      or not isinstance(severity, (int, np.integer))
      or severity not in SHIFT_SEVERITIES):
    raise ValueError(f"severity={severity!r}; choose one of "
                     f"{SHIFT_SEVERITIES}.")
  images = np.asarray(images)
  if images.shape[1:] not in ((IMAGE_SHAPE[0] * IMAGE_SHAPE[1],),
                              IMAGE_SHAPE):
    raise ValueError(f"images of shape {images.shape}; expected (N, 784) or "
                     "(N, 28, 28).")
  if images.dtype == np.uint8:
    x = scale_pixels(images, "unit")
  elif np.issubdtype(images.dtype, np.floating):
    # Standardized inputs would pass silently and be shifted by the wrong
    # amounts; NaN fails this test too.
    if images.size and not (np.min(images) >= 0 and np.max(images) <= 1):
      raise ValueError(
          f"float images must be in the unit scale [0, 1], got values in "
          f"[{np.min(images)}, {np.max(images)}]; pass uint8 pixels or "
          "scale_pixels(pixels, 'unit').")
    x = images.astype(np.float32)
  else:
    raise ValueError(f"images of dtype {images.dtype}; expected uint8 "
                     "pixels or floats in [0, 1].")
  for part in parts:
    p = SHIFT_PARAMETERS[part][severity - 1]
    if part == "brightness":
      x = x + np.float32(p)
    elif part == "contrast":
      m = np.float32(MNIST_PIXEL_MEAN)
      x = np.float32(p) * (x - m) + m
    elif part == "noise":
      z = np.random.default_rng(seed).standard_normal(x.shape,
                                                         dtype=np.float32)
      x = x + np.float32(p) * z
    else:
      grid = x.reshape(len(x), *IMAGE_SHAPE)
      moved = np.zeros_like(grid)
      moved[:, p:, p:] = grid[:, :-p, :-p]
      x = moved.reshape(x.shape)
  return np.clip(x, 0, 1) if clip else x
