"""Tests for bn_lab.data.shift_images: exact values, determinism, errors.

The expected values are written out here from the documented table (in
float64), not read from data.SHIFT_PARAMETERS.
"""

import numpy as np
import pytest

from bn_lab import data

BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
GREY = 0.1307  # contrast scales around MNIST's mean pixel
# float32 results against float64 formulas on values of order 1.
ATOL = 1e-6


def pixels(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 784), np.uint8)


def unit(p):
  return np.asarray(p, np.float64) / 255


def test_table_is_the_documented_one():
  assert data.SHIFT_PARAMETERS == {
      "brightness": BRIGHTNESS, "contrast": CONTRAST, "noise": NOISE_STD,
      "translation": (1, 2, 3, 4, 5)}


@pytest.mark.parametrize("severity", data.SHIFT_SEVERITIES)
def test_brightness_and_contrast_are_affine_and_not_clipped(severity):
  p = pixels()
  p[0, :2] = (0, 255)  # both ends of the range
  x = unit(p)
  brightness = data.shift_images(p, "brightness", severity)
  contrast = data.shift_images(p, "contrast", severity)
  assert brightness.dtype == contrast.dtype == np.float32
  np.testing.assert_allclose(brightness, x + BRIGHTNESS[severity - 1],
                             rtol=0, atol=ATOL)
  a = CONTRAST[severity - 1]
  np.testing.assert_allclose(contrast, a * (x - GREY) + GREY, rtol=0,
                             atol=ATOL)
  # The brightest pixel leaves [0, 1]: no clipping by default.
  assert brightness[0, 1] == pytest.approx(1 + BRIGHTNESS[severity - 1])


def test_noise_is_a_fixed_gaussian_draw():
  p = pixels(2)
  for severity in data.SHIFT_SEVERITIES:
    z = np.random.default_rng(0).standard_normal((2, 784), np.float32)
    np.testing.assert_allclose(
        data.shift_images(p, "noise", severity),
        unit(p) + NOISE_STD[severity - 1] * z, rtol=0, atol=ATOL)
  np.testing.assert_array_equal(data.shift_images(p, "noise", 3),
                                data.shift_images(p, "noise", 3))
  assert not np.allclose(data.shift_images(p, "noise", 3),
                         data.shift_images(p, "noise", 3, seed=1))
  # A large draw has the table's standard deviation.
  zeros = np.zeros((500, 784), np.uint8)
  assert np.std(data.shift_images(zeros, "noise", 5)) == pytest.approx(
      0.38, rel=0.01)


@pytest.mark.parametrize("severity", data.SHIFT_SEVERITIES)
def test_translation_moves_down_and_right_with_zero_fill(severity):
  grid = np.arange(1, 28 * 28 + 1).reshape(1, 28, 28) % 250 + 1  # no zeros
  p = grid.astype(np.uint8)
  moved = data.shift_images(p, "translation", severity)
  assert moved.shape == (1, 28, 28)
  s = severity
  expected = np.zeros((1, 28, 28))
  for r in range(28 - s):
    for c in range(28 - s):
      expected[0, r + s, c + s] = unit(p)[0, r, c]
  np.testing.assert_allclose(moved, expected, rtol=0, atol=ATOL)
  # The flat layout moves the same pixels.
  np.testing.assert_array_equal(
      data.shift_images(p.reshape(1, 784), "translation", s),
      moved.reshape(1, 784))


def test_combinations_apply_left_to_right():
  p = pixels()
  x = unit(p)
  np.testing.assert_allclose(
      data.shift_images(p, "contrast+brightness", 2),
      0.3 * (x - GREY) + GREY + 0.2, rtol=0, atol=ATOL)
  np.testing.assert_allclose(
      data.shift_images(p, "brightness+contrast", 2),
      0.3 * (x + 0.2 - GREY) + GREY, rtol=0, atol=ATOL)
  z = np.random.default_rng(0).standard_normal((3, 784), np.float32)
  np.testing.assert_allclose(
      data.shift_images(p, "brightness+noise", 1), x + 0.1 + 0.08 * z,
      rtol=0, atol=ATOL)
  # Brightness then translation: the pixels moved in are 0; translation
  # then brightness: they are 0 + b.
  after = data.shift_images(p, "brightness+translation", 1).reshape(3, 28, 28)
  before = data.shift_images(p, "translation+brightness", 1).reshape(3, 28,
                                                                      28)
  np.testing.assert_array_equal(after[:, 0], 0)
  np.testing.assert_allclose(before[:, 0], 0.1, rtol=0, atol=ATOL)


def test_inputs_and_outputs():
  p = pixels()
  from_pixels = data.shift_images(p, "contrast+noise", 4)
  assert from_pixels.shape == (3, 784) and from_pixels.dtype == np.float32
  # Unit-scale floats of any precision give the same result.
  np.testing.assert_allclose(
      data.shift_images(unit(p), "contrast+noise", 4), from_pixels, rtol=0,
      atol=ATOL)
  images = data.shift_images(p.reshape(3, 28, 28), "contrast+noise", 4)
  assert images.shape == (3, 28, 28)
  np.testing.assert_array_equal(images.reshape(3, 784), from_pixels)
  # The input is not modified.
  np.testing.assert_array_equal(p, pixels())


def test_clip_option():
  p = pixels()
  unclipped = data.shift_images(p, "brightness+noise", 5)
  assert unclipped.max() > 1 and unclipped.min() < 0
  clipped = data.shift_images(p, "brightness+noise", 5, clip=True)
  np.testing.assert_array_equal(clipped, np.clip(unclipped, 0, 1))


def test_errors_name_the_choices():
  p = pixels()
  with pytest.raises(ValueError, match=r"kind='blur'.*'brightness', "
                     r"'contrast', 'noise', 'translation'.*'\+'"):
    data.shift_images(p, "blur", 1)
  for kind in ("", "brightness+", "Brightness", None):
    with pytest.raises(ValueError, match="choose one of"):
      data.shift_images(p, kind, 1)
  with pytest.raises(ValueError, match="names a shift twice"):
    data.shift_images(p, "noise+noise", 1)
  for severity in (0, 6, 2.0, True, "3"):
    with pytest.raises(ValueError, match=r"severity=.*\(1, 2, 3, 4, 5\)"):
      data.shift_images(p, "brightness", severity)
  with pytest.raises(ValueError, match=r"unit scale \[0, 1\].*"
                     "scale_pixels"):
    data.shift_images(p / 255 * 2, "brightness", 1)
  with pytest.raises(ValueError, match="unit scale"):
    data.shift_images(np.full((1, 784), np.nan), "brightness", 1)
  with pytest.raises(ValueError, match=r"\(N, 784\) or \(N, 28, 28\)"):
    data.shift_images(p.reshape(3, 28, 28, 1), "brightness", 1)
  with pytest.raises(ValueError, match="dtype int64"):
    data.shift_images(p.astype(np.int64), "brightness", 1)
