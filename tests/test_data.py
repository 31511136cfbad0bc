"""Tests for bn_lab.data: IDX parsing, validation, checksums, sources.

No test touches the network: an autouse fixture lets names resolve only to
the loopback interface, and the download tests run a local HTTP server on
127.0.0.1 that serves generated files.
"""

import contextlib
import functools
import gzip
import hashlib
import http.server
import socket
import struct
import sys
import threading
import tomllib
import types
from pathlib import Path

import jax
import numpy as np
import pooch
import pytest
import requests

from bn_lab import data

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared/data/mnist"
BUNDLED_MNIST = REPO / "lab/bn_lab/bundled/mnist"
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")

STEMS = data.IDX_FILES  # role -> standard file name

# md5 of the bundled .gz files (a recompressed copy: not the mirrors' md5s).
BUNDLED_GZ_MD5 = {
    "train-images-idx3-ubyte": "56f11203c65dcbeead45b51e76a4d637",
    "train-labels-idx1-ubyte": "e7b6794769634574359eea14a747abe8",
    "t10k-images-idx3-ubyte": "a3ecf3149c20433655c67fbfd8a8d3a4",
    "t10k-labels-idx1-ubyte": "4134d8bfaa6f217c1c831e48c83339aa",
}
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                      5949]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def idx_bytes(array: np.ndarray) -> bytes:
  """Independent IDX writer: magic 0x0000 08 ndim, big-endian dims, data."""
  array = np.asarray(array, np.uint8)
  header = struct.pack(">HBB", 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.tobytes()


def write_idx(path: Path, array, compress: bool) -> Path:
  raw = idx_bytes(array)
  path.write_bytes(gzip.compress(raw) if compress else raw)
  return path


def make_arrays(n_train=6, n_test=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), np.uint8),
      "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
      "test_images": rng.integers(0, 256, (n_test, 28, 28), np.uint8),
      "test_labels": np.arange(n_test, dtype=np.uint8)[::-1] % 10,
  }


def write_dir(directory: Path, arrays=None, compress=True, names=None):
  """Writes the four files; `names` overrides role -> file name."""
  directory.mkdir(parents=True, exist_ok=True)
  arrays = arrays or make_arrays()
  for role, array in arrays.items():
    fname = (names or {}).get(role, STEMS[role] + (".gz" if compress else ""))
    write_idx(directory / fname, array, compress)
  return arrays


def raises_naming(fragments, fn, *args, **kwargs):
  with pytest.raises(data.DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  for fragment in fragments:
    assert str(fragment) in message, message
  return message


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
  """Loopback only, no $BN_JAX_DATA_DIR, an empty default cache."""
  resolve = socket.getaddrinfo
  def loopback_only(host, *args, **kwargs):
    if host not in LOOPBACK:
      raise socket.gaierror(f"network disabled in tests ({host})")
    return resolve(host, *args, **kwargs)
  monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
  # A proxy from the environment would send loopback requests elsewhere.
  for proxy in ("http_proxy", "https_proxy", "all_proxy"):
    monkeypatch.delenv(proxy, raising=False)
    monkeypatch.delenv(proxy.upper(), raising=False)
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(data, "DEFAULT_CACHE_ROOT", tmp_path / "default-cache")


# ----------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("suffix", ["", ".gz"])  # content decides, not name
def test_read_idx_roundtrip(tmp_path, compress, suffix):
  images = make_arrays()["train_images"]
  labels = np.array([0, 9, 3], np.uint8)
  got_images = data.read_idx(write_idx(tmp_path / f"i{suffix}", images,
                                       compress))
  got_labels = data.read_idx(write_idx(tmp_path / f"l{suffix}", labels,
                                       compress))
  assert got_images.dtype == np.uint8 and got_images.flags.writeable
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated(tmp_path, compress):
  raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-100]
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(gzip.compress(raw) if compress else raw)
  raises_naming([path, "truncated", "expected 2352", "found 2252"],
                data.read_idx, path)


def test_read_idx_trailing_bytes(tmp_path):
  path = tmp_path / "labels"
  path.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\0")
  raises_naming([path, "trailing", "expected 5", "found 6"], data.read_idx,
                path)


@pytest.mark.parametrize("header", [
    struct.pack(">I", 2052),  # ndim 4
    struct.pack(">I", 0x0D03),  # float type
    b"\x1a\x2b\x08\x03",  # nonzero leading bytes
    b"PK\x03\x04",  # a zip file
])
def test_read_idx_wrong_magic(tmp_path, header):
  path = tmp_path / "train-images-idx3-ubyte.gz"  # .gz name, raw content
  path.write_bytes(header + bytes(32))
  raises_naming([path, "magic", "2049", "2051", "not gzip"], data.read_idx,
                path)


def test_read_idx_bad_gzip(tmp_path):
  good = gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
  truncated = tmp_path / "truncated.gz"
  truncated.write_bytes(good[:len(good) // 2])
  raises_naming([truncated, "corrupt gzip"], data.read_idx, truncated)
  garbled = tmp_path / "garbled.gz"
  garbled.write_bytes(good[:10] + b"\xff" * 40 + good[50:])
  raises_naming([garbled, "corrupt gzip"], data.read_idx, garbled)


def test_read_idx_missing_file(tmp_path):
  raises_naming([tmp_path / "nope", "not found", data.DATA_DIR_ENV],
                data.read_idx, tmp_path / "nope")


# ----------------------------------------------------------------------------
# load_idx_dir


def test_load_idx_dir_gzip_raw_and_dotted_names(tmp_path):
  arrays = make_arrays()
  names = {"train_images": "train-images.idx3-ubyte",  # dotted, raw
           "train_labels": "train-labels.idx1-ubyte.gz",  # dotted, gz
           "test_images": "t10k-images-idx3-ubyte",  # raw
           "test_labels": "t10k-labels-idx1-ubyte.gz"}
  directory = tmp_path / "d"
  directory.mkdir()
  for role, array in arrays.items():
    write_idx(directory / names[role], array, names[role].endswith(".gz"))
  ds = data.load_idx_dir(directory, name="custom")
  assert ds.name == "custom"
  for role, array in arrays.items():
    np.testing.assert_array_equal(getattr(ds, role), array)
  assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (
      6, 28, 28)
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  assert str(directory) in ds.origin and "not verified" in ds.origin


def test_label_out_of_range(tmp_path):
  arrays = make_arrays()
  arrays["test_labels"][2] = 10
  write_dir(tmp_path, arrays)
  raises_naming([STEMS["test_labels"], "out of range", "0..9", "10"],
                data.load_idx_dir, tmp_path, "custom")


def test_wrong_image_size(tmp_path):
  arrays = make_arrays()
  arrays["train_images"] = arrays["train_images"][:, 1:, :]
  write_dir(tmp_path, arrays)
  raises_naming([STEMS["train_images"], "27x28", "expected 28x28"],
                data.load_idx_dir, tmp_path, "custom")


def test_count_mismatch(tmp_path):
  arrays = make_arrays()
  arrays["train_labels"] = arrays["train_labels"][:-1]
  write_dir(tmp_path, arrays)
  raises_naming([STEMS["train_images"], STEMS["train_labels"], "6 images",
                 "5 labels"], data.load_idx_dir, tmp_path, "custom")


def test_images_and_labels_swapped(tmp_path):
  arrays = make_arrays()
  write_dir(tmp_path, arrays, names={"test_images": STEMS["test_labels"] +
                                     ".gz", "test_labels": "unused"})
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(
      arrays["test_labels"]))
  raises_naming([STEMS["test_images"], "where images"], data.load_idx_dir,
                tmp_path, "custom")


def test_missing_directory(tmp_path):
  missing = tmp_path / "no_such_dir"
  raises_naming([missing, "does not exist", "--config.data_dir=",
                 data.DATA_DIR_ENV, "train-images-idx3-ubyte"],
                data.load_idx_dir, missing)


def test_missing_file(tmp_path):
  write_dir(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  message = raises_naming([tmp_path, "t10k-labels-idx1-ubyte",
                           "--config.data_dir=", data.DATA_DIR_ENV],
                          data.load_idx_dir, tmp_path)
  assert "lacks t10k-labels-idx1-ubyte (" in message  # only the missing one


# ----------------------------------------------------------------------------
# Checksums


def test_checksum_mismatch_raises_and_can_be_skipped(tmp_path):
  write_dir(tmp_path)  # synthetic data under the name "mnist"
  raises_naming(["md5 checksum mismatch", STEMS["train_images"],
                 data.RAW_MD5["mnist"]["train-images-idx3-ubyte"],
                 "verify_checksums=False"], data.load_idx_dir, tmp_path,
                "mnist")
  ds = data.load_idx_dir(tmp_path, "mnist", verify_checksums=False)
  assert "not verified" in ds.origin and "md5 verified" not in ds.origin


def test_checksum_match_is_reported(tmp_path, monkeypatch):
  arrays = write_dir(tmp_path, compress=False)
  table = {STEMS[role]: hashlib.md5(idx_bytes(array)).hexdigest()
           for role, array in arrays.items()}
  monkeypatch.setitem(data.RAW_MD5, "mnist", table)
  assert data.load_idx_dir(tmp_path, "mnist").origin == (
      f"IDX files in {tmp_path} (md5 verified)")
  # One corrupted byte in the payload is caught.
  path = tmp_path / STEMS["test_images"]
  content = bytearray(path.read_bytes())
  content[-1] ^= 1
  path.write_bytes(bytes(content))
  raises_naming([path, "mismatch"], data.load_idx_dir, tmp_path, "mnist")


def test_published_gz_md5_verifies_when_raw_md5_unknown(tmp_path,
                                                         monkeypatch):
  write_dir(tmp_path)
  assert "kmnist" not in data.RAW_MD5
  ds = data.load_idx_dir(tmp_path, "kmnist")  # .gz md5s differ: not an error
  assert "not verified" in ds.origin
  table = {stem: hashlib.md5((tmp_path / (stem + ".gz")).read_bytes())
           .hexdigest() for stem in STEMS.values()}
  monkeypatch.setitem(data.GZ_MD5, "kmnist", table)
  assert "(md5 verified)" in data.load_idx_dir(tmp_path, "kmnist").origin


# ----------------------------------------------------------------------------
# load_dataset sources


def test_data_dir_then_env_var(tmp_path, monkeypatch):
  write_dir(tmp_path / "a", make_arrays(n_train=3))
  write_dir(tmp_path / "b", make_arrays(n_train=5))
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "b"))
  for source in ("auto", "idx"):
    assert len(data.load_dataset("custom", source=source).train_images) == 5
    ds = data.load_dataset("custom", data_dir=tmp_path / "a", source=source)
    assert len(ds.train_images) == 3
  # An explicit directory that is wrong is an error, not a fallback.
  raises_naming([tmp_path / "c", "does not exist"], data.load_dataset,
                "custom", data_dir=tmp_path / "c")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "c"))
  raises_naming([tmp_path / "c", "does not exist"], data.load_dataset,
                "custom")


def test_idx_source_needs_a_directory(tmp_path):
  raises_naming(["--config.data_dir=/path/to/idx",
                 f"export {data.DATA_DIR_ENV}=/path/to/idx"],
                data.load_dataset, "mnist", source="idx", cache_dir=tmp_path)


def test_auto_order_data_dir_env_cache_bundled_system(tmp_path, monkeypatch):
  """Each source wins over the ones after it; `origin` names the winner."""
  dirs = {"data_dir": tmp_path / "d", "env": tmp_path / "e",
          "cache": tmp_path / "cache" / "custom", "bundled": tmp_path / "b",
          "system": tmp_path / "s"}
  for n_train, directory in enumerate(dirs.values(), start=1):
    write_dir(directory, make_arrays(n_train=n_train))
  monkeypatch.setitem(data.BUNDLED_DATA_DIRS, "custom", dirs["bundled"])
  monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "custom", dirs["system"])
  monkeypatch.setenv(data.DATA_DIR_ENV, str(dirs["env"]))
  load = functools.partial(data.load_dataset, "custom",
                           cache_dir=tmp_path / "cache")
  ds = load(data_dir=dirs["data_dir"])
  assert len(ds.train_images) == 1
  assert ds.origin.startswith(f"IDX files in {dirs['data_dir']} (")
  expected = [("env", f"${data.DATA_DIR_ENV}"), ("cache", "download cache"),
              ("bundled", "bundled copy"), ("system", "system package")]
  for n_train, (where, label) in enumerate(expected, start=2):
    ds = load()
    assert len(ds.train_images) == n_train, where
    assert ds.origin.startswith(f"{label}: IDX files in {dirs[where]} ("), (
        ds.origin)
    if where == "env":
      monkeypatch.delenv(data.DATA_DIR_ENV)
    else:  # an incomplete directory is passed over
      (dirs[where] / (STEMS["test_labels"] + ".gz")).unlink()


def test_offline_with_nothing_local(tmp_path):
  """kmnist has no bundled copy: auto falls through to the real mirrors,
  which the autouse fixture makes unreachable."""
  cache = tmp_path / "cache"
  message = raises_naming(
      ["Could not download", "--config.data_dir=/path/to/idx",
       f"export {data.DATA_DIR_ENV}=/path/to/idx", "train-images-idx3-ubyte",
       "network disabled in tests", data.MIRRORS["kmnist"][0],
       data.MIRRORS["kmnist"][1]],
      data.load_dataset, "kmnist", cache_dir=cache)
  assert "no network, or every mirror failed" in message
  assert not any((cache / "kmnist").iterdir())  # no partial files left


def test_download_has_a_timeout(tmp_path, monkeypatch):
  """Every request is bounded, so an offline machine fails fast."""
  timeouts = []
  def retrieve(url, known_hash, fname, path, downloader):
    del url, known_hash, fname, path
    timeouts.append(downloader.kwargs["timeout"])
    raise requests.exceptions.ConnectTimeout("timed out")
  monkeypatch.setattr(pooch, "retrieve", retrieve)
  raises_naming(["ConnectTimeout", "--config.data_dir=/path/to/idx"],
                data.load_dataset, "kmnist", source="download",
                cache_dir=tmp_path)
  assert timeouts and all(0 < t <= 30 for t in timeouts)


def test_unknown_data_set_has_no_mirrors(tmp_path):
  raises_naming(["No download mirrors", "'custom'", "--config.data_dir="],
                data.load_dataset, "custom", cache_dir=tmp_path)


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves a directory; records each request path instead of logging."""

  def log_message(self, *args):  # no access log on stderr
    pass

  def send_head(self):
    self.server.requested.append(self.path)
    return super().send_head()


@contextlib.contextmanager
def http_server(root: Path):
  """An HTTP server on 127.0.0.1 serving `root`; yields (base URL, the
  list of requested paths)."""
  root.mkdir(parents=True, exist_ok=True)
  handler = functools.partial(_Handler, directory=str(root))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  server.requested = []
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_port}", server.requested
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
  """A loopback port with nothing listening (connections are refused)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def serve_arrays(directory: Path, arrays) -> dict[str, str]:
  """Writes gzipped IDX files to `directory`; returns stem -> .gz md5."""
  write_dir(directory, arrays)
  return {stem: hashlib.md5((directory / (stem + ".gz")).read_bytes())
          .hexdigest() for stem in STEMS.values()}


@pytest.fixture
def server(tmp_path):
  """(base URL, requested paths, served directory)."""
  with http_server(tmp_path / "served") as (base, requested):
    yield base, requested, tmp_path / "served"


def test_download_from_local_server_verifies_and_caches(
    server, tmp_path, monkeypatch, capfd):
  base, requested, root = server
  arrays = make_arrays()
  monkeypatch.setitem(data.GZ_MD5, "mnist",
                      serve_arrays(root / "mnist", arrays))
  monkeypatch.setitem(data.RAW_MD5, "mnist", {
      STEMS[r]: hashlib.md5(idx_bytes(a)).hexdigest()
      for r, a in arrays.items()})
  # The first mirror answers 404, the second serves the files.
  monkeypatch.setitem(data.MIRRORS, "mnist",
                      (f"{base}/gone/", f"{base}/mnist/"))
  level = pooch.get_logger().level
  ds = data.load_dataset("mnist", source="download", cache_dir=tmp_path)
  np.testing.assert_array_equal(ds.train_images, arrays["train_images"])
  assert ds.origin == (f"downloaded from {base}/mnist/: IDX files in "
                       f"{tmp_path / 'mnist'} (md5 verified)")
  assert len(requested) == 8  # each file: 404 on the first, then served
  assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(
      stem + ".gz" for stem in STEMS.values())  # no temporary files left
  # Quiet: pooch's INFO lines are suppressed, and its level is restored.
  assert "Downloading" not in capfd.readouterr().err
  assert pooch.get_logger().level == level
  # The cache now beats the bundled MNIST, with no further requests.
  requested.clear()
  ds = data.load_dataset("mnist", cache_dir=tmp_path)
  assert not requested and len(ds.train_images) == len(
      arrays["train_images"])
  assert ds.origin == (f"download cache: IDX files in {tmp_path / 'mnist'} "
                       "(md5 verified)")


def test_download_only_fetches_missing_files(server, tmp_path, monkeypatch):
  base, requested, root = server
  arrays = make_arrays()
  monkeypatch.setitem(data.GZ_MD5, "kmnist",
                      serve_arrays(root / "kmnist", arrays))
  monkeypatch.setitem(data.MIRRORS, "kmnist", (f"{base}/kmnist/",))
  write_dir(tmp_path / "kmnist", arrays)
  (tmp_path / "kmnist" / (STEMS["test_images"] + ".gz")).unlink()
  ds = data.load_dataset("kmnist", source="download", cache_dir=tmp_path)
  assert requested == [f"/kmnist/{STEMS['test_images']}.gz"]
  np.testing.assert_array_equal(ds.test_images, arrays["test_images"])


def test_download_hash_mismatch_is_rejected(server, tmp_path, monkeypatch):
  """The served files are not the real MNIST: their md5s differ from the
  published ones, and nothing is kept."""
  base, requested, root = server
  serve_arrays(root / "mnist", make_arrays())
  monkeypatch.setitem(data.MIRRORS, "mnist", (f"{base}/mnist/",))
  message = raises_naming(
      ["train-images-idx3-ubyte.gz", "md5 mismatch",
       data.GZ_MD5["mnist"]["train-images-idx3-ubyte"],
       f"{base}/mnist/train-images-idx3-ubyte.gz",
       "--config.data_dir=/path/to/idx"],
      data.load_dataset, "mnist", source="download", cache_dir=tmp_path)
  assert requested == ["/mnist/train-images-idx3-ubyte.gz"], message
  assert not any((tmp_path / "mnist").iterdir())  # nothing corrupt cached


def test_download_skips_a_mirror_with_a_wrong_file(server, tmp_path,
                                                   monkeypatch):
  base, _, root = server
  arrays = make_arrays()
  monkeypatch.setitem(data.GZ_MD5, "kmnist",
                      serve_arrays(root / "good", arrays))
  serve_arrays(root / "other", make_arrays(seed=1))
  monkeypatch.setitem(data.MIRRORS, "kmnist",
                      (f"{base}/other/", f"{base}/good/"))
  ds = data.load_dataset("kmnist", source="download", cache_dir=tmp_path)
  np.testing.assert_array_equal(ds.train_images, arrays["train_images"])
  assert f"downloaded from {base}/good/" in ds.origin


def test_all_mirrors_down_gives_the_offline_message(server, tmp_path,
                                                    monkeypatch):
  base, _, _ = server
  refused = f"http://127.0.0.1:{closed_port()}/mnist/"
  monkeypatch.setitem(data.MIRRORS, "mnist", (f"{base}/gone/", refused))
  message = raises_naming(
      ["Could not download train-images-idx3-ubyte.gz of mnist",
       "no network, or every mirror failed",
       f"{base}/gone/train-images-idx3-ubyte.gz", "404",
       f"{refused}train-images-idx3-ubyte.gz", "ConnectionError",
       "--config.data_dir=/path/to/idx",
       f"export {data.DATA_DIR_ENV}=/path/to/idx"],
      data.load_dataset, "mnist", source="download", cache_dir=tmp_path)
  assert not any((tmp_path / "mnist").iterdir()), message


def test_tfds_without_tensorflow(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  raises_naming(['pip install -e ".[tfds]"', "tensorflow-cpu",
                 "--config.data_dir="], data.load_dataset, "mnist",
                source="tfds")


def test_tfds_conversion_with_fake_tfds(monkeypatch):
  """The (image, label) batches TFDS returns become a validated Dataset."""
  arrays = make_arrays()
  fake_tfds = types.ModuleType("tensorflow_datasets")
  def load(name, split, batch_size, as_supervised):
    assert (name, split, batch_size, as_supervised) == (
        "kmnist", ["train", "test"], -1, True)
    return [(arrays[f"{s}_images"][..., None], arrays[f"{s}_labels"]
             .astype(np.int64)) for s in ("train", "test")]
  fake_tfds.load = load
  fake_tfds.as_numpy = lambda tree: tree
  monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tf"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)
  ds = data.load_dataset("kmnist", source="tfds")
  assert ds.origin == "tensorflow-datasets kmnist (TFDS-verified)"
  assert ds.train_images.shape == (6, 28, 28)
  assert ds.train_images.dtype == np.uint8
  assert ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])


def test_unknown_source():
  with pytest.raises(ValueError, match="auto"):
    data.load_dataset("mnist", source="internet")


# ----------------------------------------------------------------------------
# to_float


def test_to_float():
  images = np.array([[[0, 255], [51, 102]]], np.uint8)
  unit = data.to_float(images, "unit")
  assert unit.dtype == np.float32 and unit.shape == (1, 4)
  np.testing.assert_allclose(unit, [[0.0, 1.0, 0.2, 0.4]], rtol=1e-6)
  standardized = data.to_float(images, "standardize")
  assert standardized.dtype == np.float32
  np.testing.assert_allclose(
      standardized, (np.array([[0.0, 1.0, 0.2, 0.4]]) - 0.1307) / 0.3081,
      rtol=1e-5)
  with pytest.raises(ValueError, match="unit.*standardize"):
    data.to_float(images, "minmax")
  with pytest.raises(ValueError, match="uint8"):
    data.to_float(images.astype(np.float32), "unit")


@pytest.mark.parametrize("scaling", data.SCALINGS)
def test_scale_pixels_on_the_device_matches_the_host(scaling):
  """The compiled step scales uint8 batches with the same definition as the
  host's to_float (the literal formula is checked above)."""
  pixels = np.arange(256, dtype=np.uint8).reshape(2, 128)
  on_device = jax.jit(lambda p: data.scale_pixels(p, scaling))(pixels)
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(on_device, data.to_float(pixels, scaling),
                             rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Real data: the bundled MNIST; Fashion-MNIST where installed


def test_bundled_mnist_is_the_default(bundled_mnist):
  """No data_dir, no $BN_JAX_DATA_DIR, an empty cache, no mirrors: the
  bundled copy, with every checksum verified."""
  assert bundled_mnist.origin == (
      f"bundled copy: IDX files in {BUNDLED_MNIST} (md5 verified)")
  assert bundled_mnist.name == "mnist"


def test_bundled_mnist_contents(bundled_mnist):
  mnist = bundled_mnist
  assert mnist.train_images.shape == (60000, 28, 28)
  assert mnist.test_images.shape == (10000, 28, 28)
  assert mnist.train_labels.shape == (60000,)
  assert mnist.test_labels.shape == (10000,)
  assert mnist.train_images.dtype == np.uint8
  assert mnist.train_labels.dtype == np.int32
  np.testing.assert_array_equal(
      np.bincount(mnist.train_labels, minlength=10), MNIST_TRAIN_COUNTS)
  assert np.bincount(mnist.test_labels, minlength=10).sum() == 10000
  # Pixel statistics from the histogram (exact, no float copy of 47M values).
  counts = np.bincount(mnist.train_images.ravel(), minlength=256)
  values = np.arange(256) / 255.0
  mean = (counts * values).sum() / counts.sum()
  std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
  assert abs(mean - data.MNIST_PIXEL_MEAN) < 5e-5
  assert abs(std - data.MNIST_PIXEL_STD) < 5e-5


def test_bundled_files_and_their_readme():
  """The .gz and uncompressed md5s, and that the README lists both."""
  assert data.BUNDLED_DATA_DIRS["mnist"] == BUNDLED_MNIST
  readme = (BUNDLED_MNIST / "README.md").read_text()
  for stem, gz_md5 in BUNDLED_GZ_MD5.items():
    content = (BUNDLED_MNIST / (stem + ".gz")).read_bytes()
    assert hashlib.md5(content).hexdigest() == gz_md5, stem
    raw_md5 = hashlib.md5(gzip.decompress(content)).hexdigest()
    assert raw_md5 == data.RAW_MD5["mnist"][stem], stem
    assert f"| {stem}.gz |" in readme and gz_md5 in readme, stem
    assert raw_md5 in readme, stem
  assert "CC BY-SA 3.0" in readme and "86(11)" in readme


def test_bundled_files_are_package_data():
  """lab/pyproject.toml installs every bundled file with the lab."""
  config = tomllib.loads((REPO / "lab" / "pyproject.toml").read_text())
  assert "bn_lab.bundled.mnist" in config["tool"]["setuptools"]["packages"]
  patterns = config["tool"]["setuptools"]["package-data"][
      "bn_lab.bundled.mnist"]
  package = BUNDLED_MNIST
  files = sorted(BUNDLED_MNIST.iterdir())
  assert len(files) == 5  # four .gz and the README
  for path in files:
    assert any(path.relative_to(package).match(p) for p in patterns), path


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"no {SHARED_MNIST}")
def test_bundled_mnist_is_byte_identical_to_the_shared_copy():
  for stem in STEMS.values():
    name = stem + ".gz"
    assert (BUNDLED_MNIST / name).read_bytes() == (
        SHARED_MNIST / name).read_bytes(), name


def test_env_var_is_not_overridden_by_the_bundled_copy(monkeypatch,
                                                        tmp_path):
  """Synthetic files under the name "mnist" fail its checksums: the error
  shows the env var's directory was read, with no fallback to the bundled
  copy."""
  write_dir(tmp_path / "env", make_arrays(n_train=3))
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  raises_naming([tmp_path / "env", "md5 checksum mismatch"],
                data.load_dataset, "mnist", cache_dir=tmp_path / "cache")


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_system_package(tmp_path):
  ds = data.load_dataset("fashion_mnist", cache_dir=tmp_path)
  assert ds.origin == (
      f"system package: IDX files in {SYSTEM_FASHION} (md5 verified)")
  assert ds.train_images.shape == (60000, 28, 28)
  assert ds.test_images.shape == (10000, 28, 28)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)


def test_validation_split_is_fixed_disjoint_and_checked():
  images = np.arange(100, dtype=np.uint8).reshape(100, 1).repeat(3, 1)
  labels = np.arange(100) % 10
  train_x, train_y, val_x, val_y = data.validation_split(images, labels, 20)
  rows, val_rows = train_x[:, 0].astype(int), val_x[:, 0].astype(int)
  assert len(rows) == 80 and len(val_rows) == 20
  np.testing.assert_array_equal(np.sort(np.r_[rows, val_rows]),
                                np.arange(100))  # a partition
  assert np.all(np.diff(rows) > 0) and np.all(np.diff(val_rows) > 0)
  np.testing.assert_array_equal(val_y, val_rows % 10)  # pairs kept
  expected = np.sort(np.random.default_rng(data.VALIDATION_SEED).permutation(
      100)[:20])
  np.testing.assert_array_equal(val_rows, expected)
  np.testing.assert_array_equal(
      data.validation_split(images, labels, 20)[2], val_x)  # every run
  assert data.validation_split(images, labels, 0)[2:] == (None, None)
  for bad in (-1, 100):
    with pytest.raises(ValueError, match=f"validation_examples={bad}"):
      data.validation_split(images, labels, bad)


def test_train_subset_is_fixed_sorted_and_checked():
  images = np.arange(100, dtype=np.uint8).reshape(100, 1).repeat(3, 1)
  labels = np.arange(100) % 10
  kept, kept_labels = data.train_subset(images, labels, 30)
  again, _ = data.train_subset(images, labels, 30)
  np.testing.assert_array_equal(kept, again)  # the same for every run
  rows = kept[:, 0].astype(int)
  assert len(set(rows)) == 30 and np.all(np.diff(rows) > 0)
  np.testing.assert_array_equal(kept_labels, rows % 10)  # pairs kept
  expected = np.sort(np.random.default_rng(data.SUBSET_SEED).permutation(
      100)[:30])
  np.testing.assert_array_equal(rows, expected)
  assert data.train_subset(images, labels, None)[0] is images
  for bad in (0, 101):
    with pytest.raises(ValueError, match=f"train_examples={bad}"):
      data.train_subset(images, labels, bad)
