"""studies.sentiment: BN's statistics with and without the padding mask
against NumPy on the real model's first norm input, padding invariance of
the masked model, the fixed-shape emulation of shorter test batches, the
shared initialization, the claims' numbers against SciPy, and the config
checks. The entry point's short run is tests/test_config_commands.py's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from bn_lab import page
from bn_lab import sweep
from bn_lab import text
from studies.sentiment import config as sentiment_config
from studies.sentiment import page as sentiment_page
from studies.sentiment import textcnn

MOMENTUM = 0.9


@pytest.fixture(scope="module")
def real_batch():
  """16 real training reviews of different lengths, padded 9 past the
  longest; their vocabulary."""
  corpus = text.load_sentiment()
  texts = sorted(corpus.train.texts[:200], key=len)[::12][:16]
  vocab = text.build_vocabulary(texts)
  seqs = vocab.encode_all(texts)
  tokens, mask = text.pad_batch(seqs, max(map(len, seqs)) + 9)
  assert 0.2 < 1 - mask.mean() < 0.95, "the batch should hold padding"
  return vocab, tokens, mask


def tiny_model(vocab_size: int, norm: str = "batch", **kw):
  return textcnn.TextCNN(vocab_size=vocab_size, embed_dim=6, width=5,
                         kernel_size=3, num_layers=2, norm=norm,
                         momentum=MOMENTUM, **kw)


def _init(model, key=0):
  return model.init(jax.random.key(key), jnp.zeros((2, 4), jnp.int32),
                    jnp.ones((2, 4), bool), train=False)


def test_bn_statistics_with_and_without_the_mask_against_numpy(real_batch):
  """(a) The first norm's batch statistics: with the mask, the mean and
  (biased) variance of the real tokens' features by NumPy; without it,
  those of every position, padding included, which differ."""
  vocab, tokens, mask = real_batch
  model = tiny_model(vocab.size)
  variables = _init(model)
  moments = {}
  for name, stats_mask in (("masked", mask), ("unmasked", None)):
    _, out = model.apply(variables, tokens, mask, train=True,
                         stats_mask=stats_mask,
                         mutable=["batch_stats", "batch_moments",
                                  "intermediates"])
    x = np.asarray(out["intermediates"]["norm_input0"][0], np.float64)
    assert x.shape == tokens.shape + (5,)
    values = x[mask] if name == "masked" else x.reshape(-1, 5)
    got = out["batch_moments"]["norm0"]
    np.testing.assert_allclose(got["mean"], values.mean(axis=0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["var"], values.var(axis=0),
                               rtol=1e-5, atol=1e-6)
    # The running mean moved from 0 towards the same statistics.
    np.testing.assert_allclose(out["batch_stats"]["norm0"]["mean"],
                               (1 - MOMENTUM) * values.mean(axis=0),
                               rtol=1e-5, atol=1e-7)
    moments[name] = got
  # The padding's features (the conv's bias and edges) pull the unmasked
  # statistics away from the real tokens'.
  assert not np.allclose(moments["masked"]["mean"],
                         moments["unmasked"]["mean"], atol=1e-3)
  assert not np.allclose(moments["masked"]["var"],
                         moments["unmasked"]["var"], rtol=1e-2)


@pytest.mark.parametrize("pool", textcnn.POOLS)
def test_masked_model_ignores_the_padding(real_batch, pool):
  """(b) Eval mode, and masked BN in training mode: the padding's content
  and length change no logit. Unmasked BN in training mode: they do."""
  vocab, tokens, mask = real_batch
  model = tiny_model(vocab.size, pool=pool)
  variables = _init(model)
  # Running statistics away from their initial 0 and 1.
  _, updates = model.apply(variables, tokens, mask, train=True,
                           stats_mask=mask, mutable=["batch_stats"])
  variables = {**variables, **updates}
  rng = np.random.default_rng(0)
  longer = np.pad(tokens, ((0, 0), (0, 37)))
  longer_mask = np.pad(mask, ((0, 0), (0, 37)))
  longer = np.where(longer_mask, longer,
                    rng.integers(0, vocab.size, longer.shape))
  run = lambda t, m, **kw: np.asarray(model.apply(variables, t, m, **kw))
  for kw in ({"train": False}, {"train": True, "stats_mask": "mask"}):
    with_mask = lambda m: {**kw, "stats_mask": m} if "stats_mask" in kw \
        else kw
    np.testing.assert_allclose(run(tokens, mask, **with_mask(mask)),
                               run(longer, longer_mask,
                                   **with_mask(longer_mask)),
                               rtol=1e-5, atol=1e-6)
  assert not np.allclose(run(tokens, mask, train=True),
                         run(longer, longer_mask, train=True), atol=1e-4)


def test_fixed_shape_batches_match_batches_at_their_own_length(real_batch):
  """The composition part's emulation: a batch of length T_b inside a
  tensor of max_length, its positions past T_b left out of BN's
  statistics, gives unmasked BN the logits of the (B, T_b) tensor."""
  vocab, tokens, mask = real_batch
  model = tiny_model(vocab.size)
  variables = _init(model)
  config = sentiment_config.get_config("short")
  config.max_length = tokens.shape[1] + 20
  seqs = [t[m] for t, m in zip(tokens, mask)]
  labels = np.zeros(len(seqs), np.int32)
  batches = textcnn.fixed_batches(config, seqs, labels, 16,
                                  composition="random")
  assert batches["tokens"].shape == (1, 16, config.max_length)
  extent = batches["extent"][0]
  length = int(extent[0].sum())
  # The longest text rounded up to length_multiple, at most the split's
  # longest (pad_to_max's length).
  longest = max(map(len, seqs))
  assert length == min(-(-longest // config.length_multiple)
                       * config.length_multiple, longest)
  own_tokens, own_mask = text.pad_batch(seqs, length)
  order = [next(i for i, s in enumerate(seqs)
                if np.array_equal(s, batch_row[:len(s)])
                and len(s) == m.sum())
           for batch_row, m in zip(batches["tokens"][0],
                                   batches["mask"][0])]
  own = np.asarray(model.apply(variables, own_tokens, own_mask, train=True))
  fixed = np.asarray(model.apply(variables, batches["tokens"][0],
                                 batches["mask"][0], train=True,
                                 stats_mask=extent))
  np.testing.assert_allclose(fixed, own[order], rtol=1e-5, atol=1e-5)
  # A partial batch: the filler rows count nowhere.
  partial = textcnn.fixed_batches(config, seqs[:5], labels[:5], 8,
                                  composition="pad_to_max")
  assert partial["weights"][0].tolist() == [True] * 5 + [False] * 3
  assert not partial["extent"][0, 5:].any()


def test_max_over_time_is_jnp_max_with_its_gradient():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 4)),
                  jnp.float32)
  np.testing.assert_array_equal(textcnn.max_over_time(x), jnp.max(x, axis=1))
  weights = jnp.arange(12.0).reshape(3, 4)
  grad = lambda f: jax.grad(lambda x: jnp.sum(weights * f(x)))(x)
  np.testing.assert_array_equal(grad(textcnn.max_over_time),
                                grad(lambda x: jnp.max(x, axis=1)))


def test_seed_i_of_every_norm_starts_from_the_same_weights():
  shared = ("embed", "conv0", "conv1", "readout")
  params = {norm: _init(tiny_model(50, norm), key=3)["params"]
            for norm in ("batch", "layer", "rms", "none")}
  for norm in ("layer", "rms", "none"):
    for name in shared:
      jax.tree.map(np.testing.assert_array_equal, params[norm][name],
                   params["batch"][name])
  other = _init(tiny_model(50, "batch"), key=4)["params"]
  assert not np.allclose(other["embed"]["embedding"],
                         params["batch"]["embed"]["embedding"])


# ----------------------------------------------------------------------------
# The page.

SEEDS = 5


def synthetic_results() -> dict:
  """Every variant, with accuracies and NLLs drawn around chosen means."""
  rng = np.random.default_rng(7)
  base = {"bn_masked": 0.86, "bn_unmasked": 0.84, "layer": 0.85,
          "rms": 0.85, "none": 0.83}
  variants = []
  for batching, gap in (("bucket", 0.0), ("pad_to_max", 0.01)):
    for norm, mean in base.items():
      acc = mean - (gap if norm == "bn_unmasked" else 0) + rng.normal(
          0, 0.004, SEEDS)
      v = {"name": f"{norm}-{batching}", "norm": norm,
           "batching": batching, "best_epoch": [2] * SEEDS,
           "test_accuracy": acc.tolist(),
           "test_nll": (1.2 - acc + rng.normal(0, 0.01, SEEDS)).tolist()}
      if norm.startswith("bn_"):
        v["composition"] = {
            f"{mode}/{size}": {
                "composition": mode, "batch_size": size,
                "padding_share": 0.3,
                "accuracy": (acc - rng.uniform(0, 0.03, SEEDS)).tolist(),
                "nll": [0.4] * SEEDS}
            for size in (8, 64) for mode in textcnn.COMPOSITIONS}
      variants.append(v)
  counts = {"lines_read": {"neg": 10, "pos": 9},
            "empty_lines": {"neg": 1, "pos": 0},
            "duplicates_removed": {"neg": 2, "pos": 1},
            "unique_texts": {"neg": 7, "pos": 8}, "conflicting_texts": 1,
            "split_sizes": {s: {"neg": 2, "pos": 2}
                            for s in text.SPLITS}}
  return {"corpus": "synthetic", "corpus_counts": counts, "vocab_size": 9,
          "examples": {s: 4 for s in text.SPLITS},
          "train_lengths": {"median": 40, "p90": 170, "max": 300,
                            "truncated_share": 0.2},
          "padding_share": {"bucket": 0.19, "pad_to_max": 0.53},
          "padding_share_per_batch": {
              b: {"min": lo, "p10": lo, "median": 0.3, "p90": hi, "max": hi,
                  "sd": sd}
              for b, lo, hi, sd in (("bucket", 0.0, 0.85, 0.21),
                                    ("pad_to_max", 0.42, 0.63, 0.04))},
          "seeds": list(range(SEEDS)), "variants": variants}


def test_claims_match_scipy():
  """(c) Each claim's difference, interval and p by scipy.stats.ttest_rel
  and Student's t, Holm's correction over the family by hand; the table
  prints them."""
  results = synthetic_results()
  specs = sentiment_page.claim_specs(results)
  assert len(specs) == 11
  family = []
  rows = page.in_one_family(
      lambda f: (family.clear(), family.append(f),
                 sentiment_page.claims(results, f))[-1])
  comparisons = family[0].comparisons
  assert len(rows) == len(specs) == len(comparisons)
  p_values = []
  for spec, c, row in zip(specs, comparisons, rows):
    a, b = np.asarray(spec.a, float), np.asarray(spec.b, float)
    test = scipy_stats.ttest_rel(a, b)
    d = a - b
    half = scipy_stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(
        d.size)
    assert c.paired and c.diff == pytest.approx(d.mean(), abs=1e-15)
    assert c.t == pytest.approx(test.statistic, rel=1e-9)
    assert c.p == pytest.approx(test.pvalue, rel=1e-9)
    assert (c.low, c.high) == pytest.approx((d.mean() - half,
                                             d.mean() + half), rel=1e-9)
    scale, digits = ((100, 2) if spec.unit == "points" else (1, 4))
    assert f"{d.mean() * scale:+.{digits}f} [{(d.mean() - half) * scale:+.{digits}f}" in row[2]
    p_values.append(test.pvalue)
  order = np.argsort(p_values)
  holm = np.empty(len(p_values))
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, (len(p_values) - rank) * p_values[i])
    holm[i] = min(1.0, running)
  for c, expected, spec, row in zip(comparisons, holm, specs, rows):
    assert c.p_holm == pytest.approx(expected, rel=1e-9)
    verdict = ("not resolved at this power" if expected >= 0.05 else
               "supported" if np.sign(c.diff) == spec.expected
               else "contradicted")
    assert row[3] == verdict


def test_section_renders(tmp_path):
  results = synthetic_results()
  config = sentiment_config.get_config().to_dict()
  studies = [{"path": tmp_path, "label": "sentiment", "results": results,
              "config": config, "benchmark": None}]
  section = sentiment_page.section(studies, tmp_path)
  assert (tmp_path / "sentiment.png").is_file()
  assert (tmp_path / "sentiment_composition.png").is_file()
  for phrase in ("duplicates within a class removed: 2 neg + 1 pos",
                 "dropped from both: 1", "| BN, masked |", "53% padding",
                 "19% padding; per batch 0-85%, sd 21 points",
                 "paper's claim", "random, padded to max, 64"):
    assert phrase in section, phrase


# ----------------------------------------------------------------------------
# The config.


@pytest.mark.parametrize("field, value, words", [
    ("norms", ("bn_masked", "batch"), "choose among"),
    ("batchings", ("bucket", "bucket"), "names a value twice"),
    ("kernel_size", 4, "must be odd"),
    ("epochs", 0, "must be a positive integer"),
    ("pool", "sum", "is not one of"),
    ("seeds", (0, 0), "must be distinct"),
    ("learning_rate", -1.0, "must be positive"),
    ("train_examples", 3, "must be None (all) or an integer >= batch_size"),
    ("composition.batch_sizes", (1, 8), "integers >= 2"),
    ("composition.modes", ("sorted",), "choose among"),
    ("bn.momentum", 1.0, "must be in [0, 1)"),
])
def test_config_errors_are_one_line(field, value, words):
  """(d)"""
  config = sentiment_config.get_config()
  textcnn.validate_config(config)
  textcnn.validate_config(sentiment_config.get_config("short"))
  parent, _, name = field.rpartition(".")
  (config[parent] if parent else config)[name] = value
  with pytest.raises(sweep.ConfigError) as e:
    textcnn.validate_config(config)
  message = str(e.value)
  assert "\n" not in message and f"config.{field}=" in message
  assert words in message


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="use '' or 'short'"):
    sentiment_config.get_config("long")
