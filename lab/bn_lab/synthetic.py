"""Generated and derived data sets: MNIST-1D, printed digits, Stacked-MNIST.

    ds = load_printed_digits()            # Dataset, 28x28 uint8, 0..9
    ds = data.load_dataset("printed_digits")        # the same, by name
    sig = load_mnist1d()                  # Signals: (N, 40) float32, 0..9
    st = load_stacked_mnist(mnist=data.load_dataset("mnist"))  # 28x28x3, 0..999

Nothing here is downloaded and nothing imports JAX: the first two are
generated on this machine from a fixed seed and cached as .npz files under
the lab's cache directory (`<cache_dir>/<name>/`, default
~/.cache/bn_jax/<name>/, as in bn_lab.data), the third is built from the
MNIST that `data.load_dataset("mnist")` reads (the bundled copy).

Only `printed_digits` is a value of `data.DATASETS` (so
`--config.dataset=printed_digits` works wherever MNIST does): its images
have MNIST's shape. MNIST-1D (1-d signals of 40 floats) and Stacked-MNIST
(28x28x3 images, 1,000 classes) have other shapes, so they stay separate
loaders that the 28x28 classifier studies do not accept.

MNIST-1D (Greydanus & Kobak, 2020; PyPI `mnist1d`, Apache-2.0): generated
with `mnist1d.data.make_dataset` (never `get_dataset`, which downloads)
from the package's default arguments (`get_dataset_args()`: 5,000 samples,
4,000 train / 1,000 test, seed 42), which keyword arguments may override.
`make_dataset` seeds NumPy's and Python's global generators; their states
are restored afterwards. Regenerated data can differ from the pickle the
authors publish (made by an older version of the code).

Printed digits: the digits 0-9 rendered with Pillow from 78 font files of
five Debian packages, all free licences (the Debian copyright files,
/usr/share/doc/<package>/copyright):
  fonts-dejavu-core, fonts-dejavu-extra  Bitstream Vera licence (+ public
                                         domain changes)            21 files
  fonts-liberation2                      SIL Open Font Licence 1.1  12 files
  fonts-freefont-ttf                     GPL-3+ with the font exception
                                                                    12 files
  fonts-urw-base35                       AGPL-3 with the font exception
                                                                    33 files
Each image is made as MNIST's were (LeCun et al.): a glyph, drawn large,
goes through a random affine map (rotation, shear), a random stroke width
(erosion or dilation of the large glyph, on top of the fonts' own weights),
is scaled with anti-aliasing so that its larger side is 20 px times a random
scale (0.8-1 by default; MNIST's is 20 px), and is placed in a 28x28 image
with its centre of mass at pixel (14, 14) (MNIST's centre, in index
coordinates), moved by a random integer translation; its brightest pixel
is scaled to 255 (hairline fonts would stay grey); last, Gaussian pixel
noise of a random strength is added and the result rounded to uint8. White
digit on black. Labels are balanced (each digit N/10 times, shuffled).

The train and test splits use disjoint fonts, as MNIST's train and test
splits have disjoint writers: the test split is drawn from five families
(URW Bookman, URW Gothic, P052, Liberation Mono, DejaVu Serif Condensed; 20
files), the train split from the other 58 files, each split from its own
random stream of the seed. The same seed, sizes and arguments give
identical bytes with the same font files and Pillow (FreeType) version;
the cache key includes the Pillow and FreeType versions, so an upgrade
regenerates rather than reuses. Generating the default 60,000 + 10,000
takes about 40 s on one core (a 30 MB file); loading it again, 0.4 s.

Stacked-MNIST (Metz et al., 2017, as in VEEGAN and PacGAN): three MNIST
digits, each an independently and uniformly drawn MNIST image, as the
three channels of one 28x28x3 uint8 image; label = 100*d1 + 10*d2 + d3
(1,000 modes). Train images are drawn from MNIST's train split, test
images from its test split, each from its own random stream of the seed;
built in a second from MNIST, so it is not cached.

Every problem a user can fix (missing fonts or package, a corrupt cache
file) raises `DataError` (bn_lab.data_types) with one line naming the
file or package and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np

from bn_lab import data_types

# ----------------------------------------------------------------------------
# The cache.

# Bumped whenever a generator changes what it writes, so that old cache
# files are not reused.
PRINTED_DIGITS_VERSION = 1
MNIST1D_VERSION = 1


def _cache_dir(name: str, cache_dir) -> Path:
  return Path(cache_dir or data_types.DEFAULT_CACHE_ROOT).expanduser() / name


def _key(params: dict) -> str:
  text = json.dumps(params, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def _fix_cache(path: Path) -> str:
  return f"delete it (rm {path}) and it is generated again"


def _read_cache(path: Path, params: dict) -> dict[str, np.ndarray] | None:
  """The arrays of the cache file `path`, or None if there is none.

  Raises:
    data_types.DataError: the file is unreadable, or holds other parameters.
  """
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except Exception as e:  # pylint: disable=broad-except
    # np.load raises many types for a damaged file (BadZipFile, ValueError,
    # OSError, EOFError, zlib.error); the message must stay one line.
    reason = " ".join(str(e).split())[:200]
    raise data_types.DataError(
        f"{path}: corrupt cache file ({type(e).__name__}: {reason}); "
        f"{_fix_cache(path)}.") from e
  stored = arrays.pop("params", None)
  try:
    stored = json.loads(str(stored)) if stored is not None else None
  except ValueError:
    stored = None
  if stored != params:
    raise data_types.DataError(
        f"{path}: cache file made with other parameters than its name says "
        f"(a file copied or renamed by hand?); {_fix_cache(path)}.")
  return arrays


def _write_cache(path: Path, params: dict, arrays: dict) -> None:
  """Writes atomically: a reader sees the old state or the whole file."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".",
                               suffix=".tmp")
  except OSError as e:
    raise data_types.DataError(
        f"Cannot write the cache {path.parent} ({e}); pass another "
        "cache_dir.") from e
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, params=np.array(json.dumps(params,
                                                         sort_keys=True)),
                          **arrays)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _cached(name: str, cache_dir, stem: str, params: dict, generate):
  """(arrays, origin): from the cache file if there is one, else generated
  by `generate()` and written there."""
  params = json.loads(json.dumps(params))  # tuples -> lists, as stored
  path = _cache_dir(name, cache_dir) / f"{stem}-{_key(params)}.npz"
  arrays = _read_cache(path, params)
  if arrays is not None:
    return arrays, f"cache {path}"
  arrays = generate()
  _write_cache(path, params, arrays)
  return arrays, f"generated, cached in {path}"


# ----------------------------------------------------------------------------
# MNIST-1D.

MNIST1D_LENGTH = 40


@dataclasses.dataclass(frozen=True, eq=False)
class Signals:
  """A data set of 1-d signals (MNIST-1D). Arrays are host NumPy arrays."""
  name: str
  train_signals: np.ndarray = dataclasses.field(repr=False)  # (N, L) f32
  train_labels: np.ndarray = dataclasses.field(repr=False)  # (N,) int32
  test_signals: np.ndarray = dataclasses.field(repr=False)  # (M, L) f32
  test_labels: np.ndarray = dataclasses.field(repr=False)  # (M,) int32
  positions: np.ndarray = dataclasses.field(repr=False)  # (L,) f32: `t`
  origin: str


def _mnist1d_package():
  try:
    import mnist1d.data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise data_types.DataError(
        f"MNIST-1D needs the PyPI package mnist1d ({e}); install it: pip "
        "install mnist1d (a dependency of the lab: pip install -e ./lab)."
    ) from e
  return mnist1d.data


def mnist1d_args(**overrides) -> dict:
  """mnist1d's default arguments (`get_dataset_args()`, less `url`) with
  `overrides`; an unknown name raises ValueError."""
  args = _mnist1d_package().get_dataset_args(as_dict=True)
  args.pop("url", None)  # where get_dataset downloads from: never used here
  unknown = sorted(set(overrides) - set(args))
  if unknown:
    raise ValueError(f"unknown MNIST-1D argument(s) {unknown}; known: "
                     f"{sorted(args)}.")
  args.update(overrides)
  return args


@contextlib.contextmanager
def _global_random_state_kept():
  """make_dataset seeds NumPy's and Python's global generators: put them
  back as they were, so loading data does not change other code's draws."""
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    yield
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)


def load_mnist1d(cache_dir=None, **args) -> Signals:
  """MNIST-1D generated with mnist1d's `make_dataset`, cached.

  Args:
    cache_dir: root of the cache; the file goes to
      `<cache_dir>/mnist1d/mnist1d-n<num_samples>-seed<seed>-<key>.npz`
      (default root ~/.cache/bn_jax).
    **args: overrides of mnist1d's `get_dataset_args()` (num_samples,
      train_split, seed, shuffle_seq, final_seq_length, noise scales, ...).

  Returns:
    Signals: train/test signals (N, final_seq_length) float32 (standardized
    by make_dataset: mean 0, std 1 over the whole set), labels int32 0..9,
    `positions` the signal's `t` grid.

  Raises:
    data_types.DataError: mnist1d not installed, or a corrupt cache file.
    ValueError: an unknown argument.
  """
  args = mnist1d_args(**args)
  version = importlib.metadata.version("mnist1d")
  params = {"generator": MNIST1D_VERSION, "mnist1d": version, "args": args}

  def generate():
    package = _mnist1d_package()
    with _global_random_state_kept():
      made = package.make_dataset(package.ObjectView(dict(args)))
    return {"train_signals": np.asarray(made["x"], np.float32),
            "train_labels": np.asarray(made["y"], np.int32),
            "test_signals": np.asarray(made["x_test"], np.float32),
            "test_labels": np.asarray(made["y_test"], np.int32),
            "positions": np.asarray(made["t"], np.float32)}

  stem = f"mnist1d-n{args['num_samples']}-seed{args['seed']}"
  arrays, origin = _cached("mnist1d", cache_dir, stem, params, generate)
  return Signals(name="mnist1d", origin=f"MNIST-1D (mnist1d {version}), "
                 f"{origin}", **arrays)


# ----------------------------------------------------------------------------
# Printed digits.

FONT_DIR = Path("/usr/share/fonts")

# Debian package -> (licence, font files under FONT_DIR).
FONT_PACKAGES = {
    "fonts-dejavu-core": (
        "Bitstream Vera licence", tuple(
            f"truetype/dejavu/DejaVu{n}.ttf" for n in (
                "Sans", "Sans-Bold", "SansMono", "SansMono-Bold", "Serif",
                "Serif-Bold"))),
    "fonts-dejavu-extra": (
        "Bitstream Vera licence", tuple(
            f"truetype/dejavu/DejaVu{n}.ttf" for n in (
                "Sans-BoldOblique", "Sans-ExtraLight", "Sans-Oblique",
                "SansCondensed", "SansCondensed-Bold",
                "SansCondensed-BoldOblique", "SansCondensed-Oblique",
                "SansMono-BoldOblique", "SansMono-Oblique",
                "Serif-BoldItalic", "Serif-Italic", "SerifCondensed",
                "SerifCondensed-Bold", "SerifCondensed-BoldItalic",
                "SerifCondensed-Italic"))),
    "fonts-liberation2": (
        "SIL Open Font Licence 1.1", tuple(
            f"truetype/liberation2/Liberation{f}-{s}.ttf"
            for f in ("Sans", "Serif", "Mono")
            for s in ("Regular", "Bold", "Italic", "BoldItalic"))),
    "fonts-freefont-ttf": (
        "GPL-3+ with the font exception", tuple(
            f"truetype/freefont/Free{f}{s}.ttf"
            for f in ("Sans", "Serif", "Mono")
            for s in ("", "Bold", "Oblique" if f != "Serif" else "Italic",
                      "BoldOblique" if f != "Serif" else "BoldItalic"))),
    "fonts-urw-base35": (
        "AGPL-3 with the font exception", tuple(
            f"opentype/urw-base35/{n}.otf" for n in (
                "C059-Roman", "C059-Bold", "C059-Italic", "C059-BdIta",
                "NimbusMonoPS-Regular", "NimbusMonoPS-Bold",
                "NimbusMonoPS-Italic", "NimbusMonoPS-BoldItalic",
                "NimbusRoman-Regular", "NimbusRoman-Bold",
                "NimbusRoman-Italic", "NimbusRoman-BoldItalic",
                "NimbusSans-Regular", "NimbusSans-Bold", "NimbusSans-Italic",
                "NimbusSans-BoldItalic", "NimbusSansNarrow-Regular",
                "NimbusSansNarrow-Bold", "NimbusSansNarrow-Oblique",
                "NimbusSansNarrow-BoldOblique", "P052-Roman", "P052-Bold",
                "P052-Italic", "P052-BoldItalic", "URWBookman-Light",
                "URWBookman-Demi", "URWBookman-LightItalic",
                "URWBookman-DemiItalic", "URWGothic-Book", "URWGothic-Demi",
                "URWGothic-BookOblique", "URWGothic-DemiOblique",
                "Z003-MediumItalic"))),
}
FONTS = tuple(f for _, files in FONT_PACKAGES.values() for f in files)
# The test split's fonts (file name prefixes): five whole families.
TEST_FONT_FAMILIES = ("URWBookman-", "URWGothic-", "P052-", "LiberationMono-",
                      "DejaVuSerifCondensed")
FONT_SPLITS = {
    "test": tuple(f for f in FONTS
                  if Path(f).name.startswith(TEST_FONT_FAMILIES)),
    "train": tuple(f for f in FONTS
                   if not Path(f).name.startswith(TEST_FONT_FAMILIES)),
}
_INSTALL_FONTS = "apt-get install " + " ".join(FONT_PACKAGES)

IMAGE_SIZE = data_types.IMAGE_SHAPE[0]  # 28
BOX = 20  # MNIST's: the larger side of the digit, before centring
CENTRE = 14  # MNIST's centre of mass, in index coordinates (row, column)
_GLYPH_SIZE = 96  # font size (px) of the large glyphs


@dataclasses.dataclass(frozen=True)
class PrintedDigitsConfig:
  """The random draws of `load_printed_digits`, each uniform in its range."""
  rotation: float = 15.0  # degrees, +-
  shear: float = 0.3  # x += shear * y, +-
  scale: tuple[float, float] = (0.8, 1.0)  # of the 20 px box
  translation: int = 2  # px, +-, each axis, after centring
  stroke: tuple[int, ...] = (-1, 0, 0, 1, 2)  # px at _GLYPH_SIZE, one drawn
  noise: float = 0.05  # the largest std of Gaussian noise, unit scale


def _missing_fonts(font_dir: Path) -> list[str]:
  return [f for f in FONTS if not (font_dir / f).is_file()]


def _check_fonts(font_dir: Path) -> None:
  missing = _missing_fonts(font_dir)
  if missing:
    packages = [p for p, (_, files) in FONT_PACKAGES.items()
                if set(files) & set(missing)]
    raise data_types.DataError(
        f"printed_digits: {len(missing)} of its {len(FONTS)} font files are "
        f"missing under {font_dir} (e.g. {missing[0]}); install them as "
        f"root: apt-get install {' '.join(packages)}")


def _glyphs(font_dir: Path, fonts) -> list[list]:
  """[font][digit] -> the large glyph (PIL 'L' image cropped to its ink)."""
  # pylint: disable-next=g-import-not-at-top
  from PIL import Image, ImageDraw, ImageFont
  glyphs = []
  canvas_size = 2 * _GLYPH_SIZE
  for f in fonts:
    try:
      font = ImageFont.truetype(str(font_dir / f), _GLYPH_SIZE)
    except OSError as e:
      raise data_types.DataError(
          f"{font_dir / f}: cannot read the font ({e}); reinstall it as "
          f"root: {_INSTALL_FONTS}") from e
    row = []
    for digit in range(10):
      canvas = Image.new("L", (canvas_size, canvas_size), 0)
      ImageDraw.Draw(canvas).text((canvas_size // 2, canvas_size // 2),
                                  str(digit), fill=255, font=font,
                                  anchor="mm")
      box = canvas.getbbox()
      if box is None:
        raise data_types.DataError(
            f"{font_dir / f}: draws no digit {digit}; reinstall it as root: "
            f"{_INSTALL_FONTS}")
      row.append(canvas.crop(box))
    glyphs.append(row)
  return glyphs


def _affine(glyph, rotation_deg: float, shear: float, stroke: int):
  """The glyph rotated, sheared and with its strokes thinned or thickened,
  cropped to its ink."""
  from PIL import Image, ImageFilter  # pylint: disable=g-import-not-at-top
  pad = 4 + abs(stroke)
  w, h = glyph.size
  padded = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
  padded.paste(glyph, (pad, pad))
  if stroke:
    size = 2 * abs(stroke) + 1
    morph = (ImageFilter.MaxFilter(size) if stroke > 0
             else ImageFilter.MinFilter(size))
    changed = padded.filter(morph)
    # Erosion must not wipe a thin font's strokes out.
    if stroke > 0 or np.asarray(changed).sum() > 0.5 * np.asarray(
        padded).sum():
      padded = changed
  # Forward map A = R(theta) @ S (shear along x), about the image centre;
  # PIL wants the inverse, from output to input coordinates.
  theta = np.deg2rad(rotation_deg)
  c, s = np.cos(theta), np.sin(theta)
  forward = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0, 1]])
  w, h = padded.size
  corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], float) - [w / 2, h / 2]
  mapped = corners @ forward.T
  low, high = mapped.min(0), mapped.max(0)
  out_w, out_h = (int(np.ceil(v)) for v in high - low)
  inverse = np.linalg.inv(forward)
  # input = inverse @ (output + low) + centre
  offset = inverse @ low + [w / 2, h / 2]
  coefficients = (inverse[0, 0], inverse[0, 1], offset[0],
                  inverse[1, 0], inverse[1, 1], offset[1])
  out = padded.transform((out_w, out_h), Image.Transform.AFFINE,
                         coefficients, resample=Image.Resampling.BILINEAR)
  box = out.getbbox()
  return out.crop(box) if box else out


def _place(glyph, scale: float, shift) -> np.ndarray:
  """The glyph fitted to scale * BOX px on its larger side, then placed in a
  28x28 float image with its centre of mass at CENTRE + shift."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = glyph.size
  side = scale * BOX
  factor = side / max(w, h)
  size = (max(1, round(w * factor)), max(1, round(h * factor)))
  small = np.asarray(glyph.resize(size, Image.Resampling.LANCZOS),
                     np.float32)
  small = np.clip(small, 0, 255)
  mass = small.sum()
  rows = np.arange(small.shape[0], dtype=np.float32)
  cols = np.arange(small.shape[1], dtype=np.float32)
  com = ((small.sum(1) @ rows) / mass, (small.sum(0) @ cols) / mass)
  image = np.zeros(data_types.IMAGE_SHAPE, np.float32)
  top = int(np.round(CENTRE - com[0])) + int(shift[0])
  left = int(np.round(CENTRE - com[1])) + int(shift[1])
  # Paste, clipping whatever falls outside (only with large translations).
  r0, c0 = max(top, 0), max(left, 0)
  r1 = min(top + small.shape[0], IMAGE_SIZE)
  c1 = min(left + small.shape[1], IMAGE_SIZE)
  if r1 > r0 and c1 > c0:
    image[r0:r1, c0:c1] = small[r0 - top:r1 - top, c0 - left:c1 - left]
  # Full-strength strokes, as in MNIST, also for hairline fonts whose
  # strokes come out grey once scaled down.
  peak = image.max()
  return image * (np.float32(255) / peak) if peak > 0 else image


def _render_split(glyphs, num: int, rng: np.random.Generator,
                  config: PrintedDigitsConfig):
  """(images (num, 28, 28) uint8, labels (num,) int32, fonts (num,) int16:
  index into the split's font list)."""
  labels = rng.permutation(np.arange(num) % 10).astype(np.int32)
  fonts = rng.integers(0, len(glyphs), num).astype(np.int16)
  rotation = rng.uniform(-config.rotation, config.rotation, num)
  shear = rng.uniform(-config.shear, config.shear, num)
  scale = rng.uniform(*config.scale, num)
  shift = rng.integers(-config.translation, config.translation + 1, (num, 2))
  stroke = rng.choice(np.asarray(config.stroke), num)
  sigma = rng.uniform(0, config.noise, num).astype(np.float32)
  images = np.empty((num, *data_types.IMAGE_SHAPE), np.uint8)
  for i in range(num):
    glyph = _affine(glyphs[fonts[i]][labels[i]], float(rotation[i]),
                    float(shear[i]), int(stroke[i]))
    image = _place(glyph, float(scale[i]), shift[i])
    noise = rng.standard_normal(data_types.IMAGE_SHAPE, dtype=np.float32)
    image = image + (np.float32(255) * sigma[i]) * noise
    images[i] = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return images, labels, fonts


def _check_sizes(num_train, num_test) -> None:
  for value, what in ((num_train, "num_train"), (num_test, "num_test")):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 0):
      raise ValueError(f"{what}={value!r}; expected an integer >= 0.")


def _pillow_versions() -> dict:
  import PIL  # pylint: disable=g-import-not-at-top
  from PIL import features  # pylint: disable=g-import-not-at-top
  return {"pillow": PIL.__version__,
          "freetype": features.version("freetype2")}


def _pillow() -> None:
  try:
    from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise data_types.DataError(
        f"printed_digits needs Pillow ({e}); install it: pip install pillow "
        "(it comes with matplotlib, a dependency of the lab).") from e
  del ImageFont  # only checked here; _glyphs imports what it uses


def load_printed_digits(num_train: int = 60_000, num_test: int = 10_000,
                        seed: int = 0, cache_dir=None,
                        config: PrintedDigitsConfig | None = None
                        ) -> data_types.Dataset:
  """Printed digits, 28x28 uint8 like MNIST (see the module docstring).

  Args:
    num_train, num_test: sizes of the splits.
    seed: the seed; train and test draw from two streams of it.
    cache_dir: root of the cache; the file goes to `<cache_dir>/
      printed_digits/printed_digits-<num_train>-<num_test>-seed<seed>-<key>
      .npz` (default root ~/.cache/bn_jax).
    config: the ranges of the random transforms.

  Returns:
    data_types.Dataset: images (N, 28, 28) uint8, labels int32 0..9.

  Raises:
    data_types.DataError: fonts or Pillow missing, or a corrupt cache file.
  """
  config = config or PrintedDigitsConfig()
  _check_sizes(num_train, num_test)
  _pillow()
  font_dir = FONT_DIR
  params = {"generator": PRINTED_DIGITS_VERSION, "num_train": int(num_train),
            "num_test": int(num_test), "seed": int(seed),
            "config": dataclasses.asdict(config), "fonts": FONT_SPLITS,
            **_pillow_versions()}

  def generate():
    _check_fonts(font_dir)
    train_stream, test_stream = np.random.SeedSequence(seed).spawn(2)
    arrays = {}
    for split, num, stream in (("train", num_train, train_stream),
                               ("test", num_test, test_stream)):
      glyphs = _glyphs(font_dir, FONT_SPLITS[split])
      images, labels, fonts = _render_split(
          glyphs, num, np.random.default_rng(stream), config)
      arrays.update({f"{split}_images": images, f"{split}_labels": labels,
                     f"{split}_fonts": fonts})
    return arrays

  stem = f"printed_digits-{num_train}-{num_test}-seed{seed}"
  arrays, origin = _cached("printed_digits", cache_dir, stem, params,
                           generate)
  return data_types.Dataset(
      name="printed_digits",
      train_images=arrays["train_images"],
      train_labels=arrays["train_labels"],
      test_images=arrays["test_images"],
      test_labels=arrays["test_labels"],
      origin=f"printed digits ({len(FONTS)} fonts, seed {seed}), {origin}")


def printed_digits_fonts(split: str, indices) -> list[str]:
  """The font files (relative to FONT_DIR) of `split`'s font indices, as
  `_render_split` stores them (`<split>_fonts` in the cache file)."""
  return [FONT_SPLITS[split][i] for i in np.asarray(indices)]


# ----------------------------------------------------------------------------
# Stacked-MNIST.

STACKED_MODES = 1000


def stacked_mnist_indices(num: int, pool_size: int, rng: np.random.Generator
                          ) -> np.ndarray:
  """(num, 3) indices into an MNIST split, each drawn independently and
  uniformly: the source image of each channel."""
  return rng.integers(0, pool_size, (num, 3))


def load_stacked_mnist(num_train: int = 60_000, num_test: int = 10_000,
                       seed: int = 0, *, mnist: data_types.Dataset
                       ) -> data_types.Dataset:
  """Stacked-MNIST: images (N, 28, 28, 3) uint8, labels int32 0..999.

  Channel k of an image is an MNIST image of digit d_k; the label is
  100*d1 + 10*d2 + d3. Train images come from MNIST's train split, test
  images from its test split, from two streams of `seed`.

  Args:
    num_train, num_test: sizes of the splits.
    seed: the seed.
    mnist: the MNIST to draw from, e.g. `data.load_dataset("mnist")` (the
      bundled copy unless data_dir or the cache say otherwise).
  """
  _check_sizes(num_train, num_test)
  arrays = {}
  streams = np.random.SeedSequence(seed).spawn(2)
  for split, num, stream in (("train", num_train, streams[0]),
                             ("test", num_test, streams[1])):
    images = getattr(mnist, f"{split}_images")
    labels = getattr(mnist, f"{split}_labels")
    index = stacked_mnist_indices(num, len(images),
                                  np.random.default_rng(stream))
    # (num, 3, 28, 28) -> (num, 28, 28, 3): channel k is the k-th digit.
    arrays[f"{split}_images"] = np.ascontiguousarray(
        np.moveaxis(images[index], 1, -1))
    digits = labels[index].astype(np.int32)
    arrays[f"{split}_labels"] = digits @ np.array([100, 10, 1], np.int32)
  return data_types.Dataset(name="stacked_mnist",
                      origin=f"Stacked-MNIST (seed {seed}) from "
                      f"{mnist.name}: {mnist.origin}", **arrays)
