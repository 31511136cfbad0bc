"""Tests for bn_lab.synthetic (MNIST-1D, printed digits, Stacked-MNIST) and
the data sets that bn_lab.data reads from Debian packages (Fashion-MNIST).

Nothing is downloaded: the generated sets are small and cached in tmp_path;
the one download attempt (Fashion-MNIST without its package) is answered by
a stub that fails like an offline machine.
"""

from pathlib import Path

import numpy as np
import pooch
import pytest
import requests

from bn_lab import data
from bn_lab import synthetic

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
FONTS_INSTALLED = not synthetic._missing_fonts(synthetic.FONT_DIR)
needs_fonts = pytest.mark.skipif(
    not FONTS_INSTALLED, reason="fonts missing: apt-get install "
    + " ".join(synthetic.FONT_PACKAGES))

N_TRAIN, N_TEST = 300, 100  # printed digits: about 0.3 s to render


def one_line_error(function, *args, **kwargs) -> str:
  with pytest.raises(data.DataError) as info:
    function(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message, message
  return message


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
  """(dataset, cache root) of a small printed-digits set."""
  cache = tmp_path_factory.mktemp("printed")
  return synthetic.load_printed_digits(N_TRAIN, N_TEST, cache_dir=cache), cache


def npz_files(cache: Path, name: str) -> list[Path]:
  return sorted((cache / name).glob("*.npz"))


# ----------------------------------------------------------------------------
# Fashion-MNIST from the Debian package.


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
  ds = data.load_dataset("fashion_mnist", cache_dir=tmp_path)
  assert ds.origin.startswith(f"system package: IDX files in {SYSTEM_FASHION}")
  assert "md5 verified" in ds.origin
  assert ds.train_images.shape == (60000, 28, 28)
  assert ds.test_labels.shape == (10000,)


def test_fashion_mnist_without_the_package_names_it(tmp_path, monkeypatch):
  calls = []
  def offline(url, **kwargs):
    del kwargs
    calls.append(url)
    raise requests.exceptions.ConnectionError("network disabled in tests")
  monkeypatch.setattr(pooch, "retrieve", offline)
  monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion_mnist",
                      tmp_path / "absent")
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  message = one_line_error(data.load_dataset, "fashion_mnist",
                           cache_dir=tmp_path / "cache")
  assert "apt-get install dataset-fashion-mnist" in message
  assert str(tmp_path / "absent") in message
  assert calls  # it did try the mirrors (here a stub), then said what to do


# ----------------------------------------------------------------------------
# MNIST-1D.


def test_mnist1d_matches_make_dataset(tmp_path):
  import mnist1d.data  # pylint: disable=g-import-not-at-top
  args = mnist1d.data.get_dataset_args(as_dict=True)
  args.update(num_samples=200, seed=3)
  state = np.random.get_state()
  ds = synthetic.load_mnist1d(cache_dir=tmp_path, num_samples=200, seed=3)
  # make_dataset reseeds NumPy's global generator; the loader puts it back.
  np.testing.assert_array_equal(np.random.get_state()[1], state[1])
  expected = mnist1d.data.make_dataset(mnist1d.ObjectView(args))
  assert ds.train_signals.shape == (160, synthetic.MNIST1D_LENGTH)
  assert ds.test_signals.shape == (40, synthetic.MNIST1D_LENGTH)
  assert ds.train_signals.dtype == ds.test_signals.dtype == np.float32
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_signals,
                                expected["x"].astype(np.float32))
  np.testing.assert_array_equal(ds.test_signals,
                                expected["x_test"].astype(np.float32))
  np.testing.assert_array_equal(ds.train_labels, expected["y"])
  np.testing.assert_array_equal(ds.test_labels, expected["y_test"])
  assert set(np.unique(ds.train_labels)) == set(range(10))


def test_mnist1d_defaults_are_the_packages(monkeypatch, tmp_path):
  args = synthetic.mnist1d_args()
  assert args["num_samples"] == 5000 and args["seed"] == 42
  assert "url" not in args
  with pytest.raises(ValueError, match="unknown MNIST-1D argument"):
    synthetic.mnist1d_args(num_sample=10)
  # get_dataset downloads: it is never called.
  import mnist1d.data  # pylint: disable=g-import-not-at-top
  def download(*args, **kwargs):
    raise AssertionError("get_dataset called")
  monkeypatch.setattr(mnist1d.data, "get_dataset", download)
  monkeypatch.setattr(mnist1d, "get_dataset", download)
  assert len(synthetic.load_mnist1d(cache_dir=tmp_path,
                                    num_samples=50).test_labels) == 10


def test_mnist1d_cache_is_reused_and_keyed(tmp_path, monkeypatch):
  first = synthetic.load_mnist1d(cache_dir=tmp_path, num_samples=100)
  (path,) = npz_files(tmp_path, "mnist1d")
  assert "n100-seed42" in path.name
  assert first.origin.endswith(f"generated, cached in {path}")
  mtime = path.stat().st_mtime_ns
  import mnist1d.data  # pylint: disable=g-import-not-at-top
  def fail(*args, **kwargs):
    raise AssertionError("regenerated although cached")
  monkeypatch.setattr(mnist1d.data, "make_dataset", fail)
  again = synthetic.load_mnist1d(cache_dir=tmp_path, num_samples=100)
  assert again.origin.endswith(f"cache {path}")
  assert path.stat().st_mtime_ns == mtime
  np.testing.assert_array_equal(again.train_signals, first.train_signals)
  with pytest.raises(AssertionError, match="regenerated"):  # other args
    synthetic.load_mnist1d(cache_dir=tmp_path, num_samples=100, seed=1)


def test_mnist1d_corrupt_cache(tmp_path):
  synthetic.load_mnist1d(cache_dir=tmp_path, num_samples=100)
  (path,) = npz_files(tmp_path, "mnist1d")
  path.write_bytes(path.read_bytes()[:200])
  message = one_line_error(synthetic.load_mnist1d, cache_dir=tmp_path,
                           num_samples=100)
  assert str(path) in message and "corrupt cache file" in message
  assert f"rm {path}" in message
  path.unlink()  # as the message says
  assert synthetic.load_mnist1d(cache_dir=tmp_path,
                                num_samples=100).train_signals.shape == (80, 40)


def test_mnist1d_without_the_package(monkeypatch, tmp_path):
  monkeypatch.setitem(__import__("sys").modules, "mnist1d.data", None)
  message = one_line_error(synthetic.load_mnist1d, cache_dir=tmp_path)
  assert "pip install mnist1d" in message


# ----------------------------------------------------------------------------
# Printed digits.


@needs_fonts
def test_printed_digits_shapes_and_labels(printed):
  ds, _ = printed
  assert ds.name == "printed_digits"
  assert ds.train_images.shape == (N_TRAIN, 28, 28)
  assert ds.test_images.shape == (N_TEST, 28, 28)
  assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train_labels),
                                [N_TRAIN // 10] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels),
                                [N_TEST // 10] * 10)
  # White digits on a (noisy) black background, with full-strength strokes.
  images = ds.train_images.astype(np.float32)
  assert np.median(images) < 20
  assert (images.max((1, 2)) > 200).all()


@needs_fonts
def test_printed_digits_are_centred_like_mnist(printed):
  """Centre of mass at (14, 14) moved by at most `translation` px (plus
  rounding and the noise); bounding boxes within MNIST's 20 px."""
  ds, _ = printed
  config = synthetic.PrintedDigitsConfig()
  for images in (ds.train_images, ds.test_images):
    x = images.astype(np.float64)
    x = np.where(x > 100, x, 0)  # the digit, without the noise
    grid = np.arange(28)
    mass = x.sum((1, 2))
    rows = (x.sum(2) @ grid) / mass
    cols = (x.sum(1) @ grid) / mass
    for com in (rows, cols):
      assert abs(com.mean() - synthetic.CENTRE) < 0.5
      assert (np.abs(com - synthetic.CENTRE) < config.translation + 1.5).all()
    ink = x > 0
    height = ink.any(2).sum(1)
    width = ink.any(1).sum(1)
    assert (np.maximum(height, width) <= synthetic.BOX + 1).all()
    assert np.median(np.maximum(height, width)) >= 16


@needs_fonts
def test_printed_digit_classes_differ(printed):
  ds, _ = printed
  means = np.stack([ds.train_images[ds.train_labels == d].mean(0)
                    for d in range(10)]) / 255
  distances = np.linalg.norm(
      (means[:, None] - means[None]).reshape(10, 10, -1), axis=-1)
  off_diagonal = distances[~np.eye(10, dtype=bool)]
  assert off_diagonal.min() > 1.0, distances.round(2)


@needs_fonts
def test_printed_digits_deterministic(printed, tmp_path):
  ds, _ = printed
  same = synthetic.load_printed_digits(N_TRAIN, N_TEST, cache_dir=tmp_path)
  assert same.origin.startswith("printed digits") and "generated" in (
      same.origin)  # a fresh cache: rendered again, to the same bytes
  assert same.train_images.tobytes() == ds.train_images.tobytes()
  assert same.test_images.tobytes() == ds.test_images.tobytes()
  np.testing.assert_array_equal(same.train_labels, ds.train_labels)
  other = synthetic.load_printed_digits(N_TRAIN, N_TEST, seed=1,
                                        cache_dir=tmp_path)
  assert other.train_images.tobytes() != ds.train_images.tobytes()
  assert other.test_images.tobytes() != ds.test_images.tobytes()
  assert len(npz_files(tmp_path, "printed_digits")) == 2


def test_printed_digits_fonts_are_split_disjoint():
  train, test = (set(synthetic.FONT_SPLITS[s]) for s in ("train", "test"))
  assert not train & test
  assert train | test == set(synthetic.FONTS)
  assert len(synthetic.FONTS) == len(set(synthetic.FONTS)) >= 20
  assert len(test) >= 10 and len(train) >= 20


@needs_fonts
def test_printed_digits_fonts_recorded_per_split(printed):
  ds, cache = printed
  (path,) = npz_files(cache, "printed_digits")
  with np.load(path) as npz:
    train_fonts = synthetic.printed_digits_fonts("train", npz["train_fonts"])
    test_fonts = synthetic.printed_digits_fonts("test", npz["test_fonts"])
  assert not set(train_fonts) & set(test_fonts)
  assert len(set(train_fonts)) > 40  # 300 draws from 58 fonts


@needs_fonts
def test_printed_digits_cache_is_reused(printed, monkeypatch):
  ds, cache = printed
  (path,) = npz_files(cache, "printed_digits")
  mtime = path.stat().st_mtime_ns
  def fail(*args, **kwargs):
    raise AssertionError("rendered although cached")
  monkeypatch.setattr(synthetic, "_render_split", fail)
  again = synthetic.load_printed_digits(N_TRAIN, N_TEST, cache_dir=cache)
  assert again.origin.endswith(f"cache {path}")
  assert path.stat().st_mtime_ns == mtime
  assert again.train_images.tobytes() == ds.train_images.tobytes()


def test_printed_digits_corrupt_cache(tmp_path, monkeypatch):
  # A tiny set, without fonts: the renderer is a stub.
  monkeypatch.setattr(synthetic, "_check_fonts", lambda font_dir: None)
  monkeypatch.setattr(synthetic, "_glyphs", lambda font_dir, fonts: None)
  def render(glyphs, num, rng, config):
    del glyphs, config
    return (rng.integers(0, 256, (num, 28, 28), dtype=np.uint8),
            np.arange(num, dtype=np.int32) % 10, np.zeros(num, np.int16))
  monkeypatch.setattr(synthetic, "_render_split", render)
  synthetic.load_printed_digits(10, 10, cache_dir=tmp_path)
  (path,) = npz_files(tmp_path, "printed_digits")
  path.write_bytes(b"not a zip file")
  message = one_line_error(synthetic.load_printed_digits, 10, 10,
                           cache_dir=tmp_path)
  assert str(path) in message and f"rm {path}" in message
  # A file whose stored parameters are not those of its name.
  path.unlink()
  synthetic.load_printed_digits(10, 10, seed=5, cache_dir=tmp_path)
  (other,) = npz_files(tmp_path, "printed_digits")
  other.rename(path)
  message = one_line_error(synthetic.load_printed_digits, 10, 10,
                           cache_dir=tmp_path)
  assert "other parameters" in message and f"rm {path}" in message


def test_printed_digits_missing_fonts(tmp_path, monkeypatch):
  installed = synthetic.FONT_DIR
  monkeypatch.setattr(synthetic, "FONT_DIR", tmp_path / "fonts")
  message = one_line_error(synthetic.load_printed_digits, 10, 10,
                           cache_dir=tmp_path / "cache")
  assert ("apt-get install fonts-dejavu-core fonts-dejavu-extra "
          "fonts-liberation2 fonts-freefont-ttf fonts-urw-base35") in message
  assert str(tmp_path / "fonts") in message
  assert not npz_files(tmp_path / "cache", "printed_digits")
  # Only one package's files missing: only that package is named.
  if FONTS_INSTALLED:
    fonts = tmp_path / "some"
    for f in synthetic.FONTS:
      if "freefont" not in f:
        (fonts / f).parent.mkdir(parents=True, exist_ok=True)
        (fonts / f).symlink_to(installed / f)
    monkeypatch.setattr(synthetic, "FONT_DIR", fonts)
    message = one_line_error(synthetic.load_printed_digits, 10, 10,
                             cache_dir=tmp_path / "cache")
    assert message.endswith("apt-get install fonts-freefont-ttf"), message


def test_printed_digits_by_name_in_load_dataset(monkeypatch, tmp_path):
  assert "printed_digits" in data.DATASETS
  calls = []
  def load(cache_dir=None):
    calls.append(cache_dir)
    return "the dataset"
  monkeypatch.setattr(synthetic, "load_printed_digits", load)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "idx"))  # ignored
  assert data.load_dataset("printed_digits", cache_dir=tmp_path) == (
      "the dataset")
  assert calls == [tmp_path]
  message = one_line_error(data.load_dataset, "printed_digits",
                           data_dir=tmp_path)
  assert "is generated" in message and "data_dir" in message
  message = one_line_error(data.load_dataset, "printed_digits",
                           source="download")
  assert "source='download'" in message


# ----------------------------------------------------------------------------
# Stacked-MNIST.


@pytest.fixture(scope="module")
def mnist_by_image(bundled_mnist):
  """{image bytes: set of labels} of every bundled MNIST image."""
  table = {}
  for images, labels in ((bundled_mnist.train_images,
                          bundled_mnist.train_labels),
                         (bundled_mnist.test_images,
                          bundled_mnist.test_labels)):
    for image, label in zip(images, labels):
      table.setdefault(image.tobytes(), set()).add(int(label))
  return table


def test_stacked_mnist_channels_are_the_labelled_digits(bundled_mnist,
                                                        mnist_by_image):
  ds = synthetic.load_stacked_mnist(500, 200, seed=0, mnist=bundled_mnist)
  assert ds.train_images.shape == (500, 28, 28, 3)
  assert ds.test_images.shape == (200, 28, 28, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  train = {bundled_mnist.train_images[i].tobytes() for i in range(60000)}
  for split in ("train", "test"):
    images = getattr(ds, f"{split}_images")
    labels = getattr(ds, f"{split}_labels")
    assert ((labels >= 0) & (labels < synthetic.STACKED_MODES)).all()
    digits = np.stack([labels // 100, labels // 10 % 10, labels % 10], -1)
    for image, image_digits in zip(images, digits):
      for k in range(3):
        channel = image[..., k].tobytes()
        assert int(image_digits[k]) in mnist_by_image[channel]
        # Train stacks come from MNIST's train split, test from its test.
        assert (channel in train) == (split == "train")


def test_stacked_mnist_modes_and_determinism(bundled_mnist):
  ds = synthetic.load_stacked_mnist(100_000, 10, seed=0, mnist=bundled_mnist)
  counts = np.bincount(ds.train_labels, minlength=synthetic.STACKED_MODES)
  assert len(counts) == synthetic.STACKED_MODES
  assert counts.min() > 0  # all 1,000 modes
  # Each channel is a uniform draw of MNIST's train images, so mode
  # (d1, d2, d3) has probability p(d1) p(d2) p(d3), p MNIST's class shares.
  p = np.bincount(bundled_mnist.train_labels) / 60000
  expected = 100_000 * np.einsum("i,j,k->ijk", p, p, p).reshape(-1)
  assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all()
  same = synthetic.load_stacked_mnist(1000, 10, seed=0, mnist=bundled_mnist)
  again = synthetic.load_stacked_mnist(1000, 10, seed=0, mnist=bundled_mnist)
  other = synthetic.load_stacked_mnist(1000, 10, seed=1, mnist=bundled_mnist)
  assert again.train_images.tobytes() == same.train_images.tobytes()
  assert again.test_images.tobytes() == same.test_images.tobytes()
  np.testing.assert_array_equal(again.train_labels, same.train_labels)
  assert other.train_images.tobytes() != same.train_images.tobytes()
  assert other.test_images.tobytes() != same.test_images.tobytes()
