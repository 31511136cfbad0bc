"""bn_lab.stats against scipy.stats, on hand-built numbers.

scipy is only a test dependency here (it comes with jax); the module computes
Student's t itself. Tolerances are 1e-9 relative where scipy is the
reference, tighter against closed forms.
"""

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats as sps

from bn_lab import page
from bn_lab import stats

RTOL = 1e-9

# (a, b): unequal sizes, unequal variances, n = 2, one constant group, large
# and negative differences, a difference well inside the noise.
INDEPENDENT = {
    "unequal_sizes": ([0.912, 0.918, 0.905, 0.921], [0.897, 0.901, 0.893]),
    "unequal_variances": ([1.0, 5.0, 9.0, 2.0, 7.5],
                          [3.1, 3.2, 3.0, 3.15, 3.05, 3.12]),
    "n_2": ([0.5, 0.7], [0.1, 0.4]),
    "n_2_vs_5": ([1.0, 2.0], [3.0, 4.5, 5.0, 6.0, 7.25]),
    "one_constant": ([2.0, 2.0, 2.0], [1.0, 1.5, 0.5, 1.25]),
    "large_difference": ([100.1, 100.3, 99.8], [1.2, 0.9, 1.1, 1.0]),
    "negative": ([-2.5, -3.1, -2.8], [0.4, 0.2, 0.9, 0.1, 0.5]),
    "noise": ([0.52, 0.47, 0.55, 0.49, 0.51], [0.50, 0.53, 0.46, 0.54]),
}
# (a, b) of the same seeds: a constant shift plus noise, n = 2, a negative
# difference, pairs whose own spread dwarfs the difference.
PAIRED = {
    "shift": ([0.912, 0.918, 0.905, 0.921, 0.915],
              [0.907, 0.915, 0.898, 0.917, 0.913]),
    "n_2": ([1.0, 2.0], [0.5, 1.8]),
    "negative": ([3.0, 5.0, 4.0, 6.5], [3.4, 5.9, 4.2, 7.6]),
    "wide": ([10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
             [9.0, 21.0, 29.5, 40.2, 49.0, 61.0]),
}


def check_against_scipy(c, res, a, b, confidence):
  np.testing.assert_allclose(c.t, res.statistic, rtol=RTOL)
  np.testing.assert_allclose(c.p, res.pvalue, rtol=RTOL)
  np.testing.assert_allclose(c.df, res.df, rtol=RTOL)
  interval = res.confidence_interval(confidence)
  np.testing.assert_allclose([c.low, c.high],
                             [interval.low, interval.high], rtol=RTOL)
  np.testing.assert_allclose(c.diff, np.mean(a) - np.mean(b), rtol=RTOL)
  np.testing.assert_allclose(c.se, c.diff / c.t, rtol=RTOL)
  assert (c.n_a, c.n_b) == (len(a), len(b))


# scipy warns about the constant group's variance; its numbers are right.
@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
@pytest.mark.parametrize("confidence", [0.95, 0.9])
@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_welch_matches_scipy(name, confidence):
  a, b = INDEPENDENT[name]
  c = stats.welch(a, b, label=name, confidence=confidence)
  res = sps.ttest_ind(a, b, equal_var=False)
  check_against_scipy(c, res, a, b, confidence)
  assert c.label == name and not c.paired and c.p_holm is None


@pytest.mark.parametrize("confidence", [0.95, 0.99])
@pytest.mark.parametrize("name", sorted(PAIRED))
def test_paired_matches_scipy(name, confidence):
  a, b = PAIRED[name]
  c = stats.paired(a, b, label=name, confidence=confidence)
  check_against_scipy(c, sps.ttest_rel(a, b), a, b, confidence)
  assert c.paired and c.df == len(a) - 1


def test_compare_dispatches():
  a, b = PAIRED["shift"]
  assert stats.compare(a, b, label="x") == stats.welch(a, b, label="x")
  assert stats.compare(a, b, paired=True) == stats.paired(a, b)
  assert stats.compare(a, b, paired=True) != stats.welch(a, b)


def test_large_difference_is_significant_and_noise_is_not():
  big = stats.welch(*INDEPENDENT["large_difference"])
  assert big.p < 1e-6 and big.significant and big.low > 0
  noise = stats.welch(*INDEPENDENT["noise"])
  assert noise.p > 0.5 and not noise.significant
  assert noise.low < 0 < noise.high
  negative = stats.welch(*INDEPENDENT["negative"])
  assert negative.diff < 0 and negative.high < 0


# Non-integer df as Welch gives; past 1e6 the continued fraction alone would
# lose ~1e-9 (1e8) and more, where stats switches to an expansion.
DFS = [0.5, 1, 2, 2.3, 3.7, 10, 29.5, 30, 57.3, 1000, 1e5, 1e6, 1e8, 1e10]


@pytest.mark.parametrize("df", DFS)
def test_t_cdf_matches_scipy(df):
  ts = [-200.0, -30.0, -8.0, -3.0, -2.1, -1.0, -0.3, 0.0, 0.5, 1.7, 4.0,
        12.0, 100.0]
  mine = [stats.t_cdf(t, df) for t in ts]
  np.testing.assert_allclose(mine, sps.t.cdf(ts, df), rtol=RTOL, atol=0)


@pytest.mark.parametrize("df", DFS + [math.inf])
def test_t_ppf_matches_scipy(df):
  qs = [1e-12, 1e-6, 0.001, 0.025, 0.1, 0.3, 0.7, 0.9, 0.975, 0.999,
        1 - 1e-6]
  mine = np.array([stats.t_ppf(q, df) for q in qs])
  reference = sps.norm.ppf(qs) if math.isinf(df) else sps.t.ppf(qs, df)
  np.testing.assert_allclose(mine, reference, rtol=RTOL)
  # and the inverse of t_cdf to its own precision, in the smaller tail
  back = [stats.t_cdf(t, df) for t in mine]
  tails = np.minimum(qs, 1 - np.array(qs))
  np.testing.assert_allclose(np.minimum(back, 1 - np.array(back)), tails,
                             rtol=1e-11)


def test_t_closed_forms_and_normal_limit():
  # df = 1 is Cauchy and df = 2 has a closed form: references exact to ulps
  # (scipy's t.cdf(1e-6, 1) is off by 3e-11 relative).
  for t in [-1e6, -40.0, -3.0, -1e-6, 1e-6, 0.7, 25.0]:
    u, root = abs(t), math.sqrt(2 + t * t)
    cauchy = math.atan2(1, u) / math.pi  # the lower tail at -|t|
    df2 = 1 / (root * (root + u))  # 1/2 - u / (2 root), without cancelling
    assert stats.t_cdf(t, 1) == pytest.approx(
        cauchy if t < 0 else 1 - cauchy, rel=1e-13, abs=0)
    assert stats.t_cdf(t, 2) == pytest.approx(
        df2 if t < 0 else 1 - df2, rel=1e-13, abs=0)
  for t in [-30.0, -9.0, -2.0, 0.3, 3.0]:
    # (1e-13 at t = -30 from rounding t / sqrt(2), in scipy or here)
    assert stats.t_cdf(t, math.inf) == pytest.approx(sps.norm.cdf(t),
                                                     rel=1e-12, abs=0)
    # df = 1e12 is still a t: 1.7e-9 above the normal at t = -9
    assert stats.t_cdf(t, 1e12) == pytest.approx(sps.t.cdf(t, 1e12),
                                                 rel=1e-12, abs=0)
  assert stats.t_ppf(0.5, 3) == 0.0
  assert stats.t_ppf(0.0, 3) == -math.inf and stats.t_ppf(1.0, 3) == math.inf
  with pytest.raises(ValueError, match="df"):
    stats.t_cdf(1.0, 0)
  with pytest.raises(ValueError, match="probability"):
    stats.t_ppf(1.5, 3)


@pytest.mark.parametrize("values", [[0.91, 0.93, 0.92, 0.95],
                                    [1.0, 3.0], [-2.0, 5.0, 1.5]])
def test_mean_interval_matches_scipy(values):
  mean, low, high = stats.mean_interval(values)
  expected = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                            scale=sps.sem(values))
  np.testing.assert_allclose([mean, low, high], [np.mean(values), *expected],
                             rtol=RTOL)


def test_mean_interval_degenerate():
  mean, low, high = stats.mean_interval([0.25])
  assert mean == 0.25 and math.isnan(low) and math.isnan(high)
  mean, low, high = stats.mean_interval([0.1, 0.1, 0.1])
  assert mean == low == high == pytest.approx(0.1)  # zero width, not nan
  assert math.isnan(stats.mean_interval([])[0])
  with pytest.raises(ValueError, match="values"):
    stats.mean_interval([0.9, math.nan])


def test_page_interval_text_is_the_t_interval_in_the_given_unit():
  values = [0.91, 0.93, 0.92, 0.95]
  low, high = sps.t.interval(0.95, 3, loc=np.mean(values),
                             scale=sps.sem(values))
  assert page.interval(values, 100.0, 1) == (
      f"{100 * np.mean(values):.1f} [{100 * low:.1f}, {100 * high:.1f}]")
  assert page.interval([0.25], 100.0) == "25.00"  # one value: no interval
  assert page.interval([]) == "-"


def assert_undetermined(c):
  for field in ("t", "p", "low", "high", "df"):
    assert math.isnan(getattr(c, field)), field
  assert not c.significant and stats.verdict(c) == "undetermined"


def test_fewer_than_two_values_is_undetermined():
  c = stats.welch([0.9], [0.8, 0.85, 0.82], label="n1")
  assert_undetermined(c)
  assert math.isnan(c.se)
  assert c.diff == pytest.approx(0.9 - (0.8 + 0.85 + 0.82) / 3, rel=1e-12)
  assert (c.n_a, c.n_b) == (1, 3)
  c = stats.paired([0.9], [0.8])
  assert_undetermined(c)
  assert c.diff == pytest.approx(0.1)
  c = stats.welch([], [1.0, 2.0])
  assert_undetermined(c)
  assert math.isnan(c.diff)


def test_no_spread_is_undetermined():
  c = stats.welch([2.0, 2.0, 2.0], [1.0, 1.0])
  assert_undetermined(c)
  assert c.se == 0 and c.diff == 1.0
  # 0.1 three times has a float variance of ~1e-34, not 0: still no spread,
  # not p = 0 from a 1e-17 standard error.
  assert np.var([0.1] * 3, ddof=1) > 0
  c = stats.welch([0.1] * 3, [0.3] * 3)
  assert_undetermined(c)
  assert c.diff == pytest.approx(-0.2)
  # pairs shifted by 0.1, whose differences differ in the last bits
  a, b = np.array([0.3, 0.7, 1.1]), np.array([0.2, 0.6, 1.0])
  assert np.ptp(a - b) > 0
  c = stats.paired(a, b)
  assert_undetermined(c)
  assert c.se == 0 and c.diff == pytest.approx(0.1)


def test_nan_and_inf_raise_with_the_label():
  with pytest.raises(ValueError, match=r"lr=0\.1: b has 1 NaN"):
    stats.welch([0.9, 0.91], [0.5, math.nan], label="lr=0.1")
  with pytest.raises(ValueError, match="bn_after: a has 1 NaN or infinite"):
    stats.paired([math.inf, 0.9], [0.5, 0.6], label="bn_after")
  with pytest.raises(ValueError, match="momentum"):
    stats.compare([math.nan] * 3, [0.5] * 3, paired=True, label="momentum")


def test_paired_length_mismatch_raises():
  with pytest.raises(ValueError, match="seed pairs: .* got 3 and 2") as info:
    stats.paired([1.0, 2.0, 3.0], [1.0, 2.0], label="seed pairs")
  assert "\n" not in str(info.value)


def test_holm_by_hand():
  # p = [0.01, 0.04, 0.03, 0.005], m = 4; sorted: 0.005, 0.01, 0.03, 0.04
  # times m - i + 1 = 4, 3, 2, 1:          0.02,  0.03, 0.06, 0.04
  # running maximum (step-down monotone):  0.02,  0.03, 0.06, 0.06
  # back in the given order: [0.03, 0.06, 0.06, 0.02]
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]),
                             [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
  # capped at 1: 2 * 0.6 = 1.2 -> 1, then max(1, 0.7) = 1
  np.testing.assert_array_equal(stats.holm([0.7, 0.6]), [1.0, 1.0])
  # nan stays nan and is not counted: m = 2, [0.01 * 2, 0.04 * 1]
  np.testing.assert_allclose(stats.holm([0.04, math.nan, 0.01]),
                             [0.04, math.nan, 0.02], rtol=1e-12)
  assert stats.holm([]).shape == (0,)
  with pytest.raises(ValueError, match="p values"):
    stats.holm([0.2, 1.5])


def test_holm_matches_statsmodels():
  multitest = pytest.importorskip("statsmodels.stats.multitest")
  p = np.array([0.001, 0.2, 0.012, 0.049, 0.03, 0.5, 0.0004])
  np.testing.assert_allclose(stats.holm(p),
                             multitest.multipletests(p, method="holm")[1],
                             rtol=RTOL)


def comparison(p, p_holm=None):
  return stats.Comparison(label="x", diff=0.1234, low=-0.05, high=0.2912,
                          se=0.08, df=4.0, t=1.5, p=p, n_a=3, n_b=3,
                          paired=False, p_holm=p_holm)


def test_significance_flips_after_holm():
  family = [comparison(0.03), comparison(0.04), comparison(0.2)]
  assert all(c.significant for c in family[:2])  # raw p < 0.05
  corrected = stats.holm_family(family)
  # 3 * 0.03 = 0.09, max(0.09, 2 * 0.04) = 0.09, max(0.09, 0.2) = 0.2
  np.testing.assert_allclose([c.p_holm for c in corrected], [0.09, 0.09, 0.2])
  assert not any(c.significant for c in corrected)
  assert [stats.verdict(c) for c in family] == ["beyond noise"] * 2 + [
      "within noise"]
  assert {stats.verdict(c) for c in corrected} == {"within noise"}
  # copies: the originals keep p_holm None, everything else is the same
  assert all(c.p_holm is None for c in family)
  assert [dataclasses.replace(c, p_holm=None) for c in corrected] == family
  survivor = stats.holm_family([comparison(0.001), comparison(0.2)])[0]
  assert survivor.p_holm == pytest.approx(0.002) and survivor.significant


def test_significant_threshold():
  assert comparison(0.0499).significant
  assert not comparison(0.05).significant  # strictly below ALPHA
  assert not comparison(math.nan).significant
  assert not comparison(0.01, p_holm=math.nan).significant
  assert comparison(0.2, p_holm=0.01).significant  # p_holm decides once set
  with pytest.raises(dataclasses.FrozenInstanceError):
    comparison(0.01).p = 0.5


def test_holm_family_keeps_undetermined_out_of_m():
  family = stats.holm_family([comparison(0.02), comparison(math.nan)])
  assert family[0].p_holm == pytest.approx(0.02) and family[0].significant
  assert math.isnan(family[1].p_holm) and not family[1].significant


def test_describe_and_verdict():
  c = comparison(0.1234, p_holm=0.3702)
  assert stats.describe(c) == "+0.12 [-0.05, +0.29], p = 0.12 (Holm 0.37)"
  assert stats.describe(c, unit="pp", scale=100, digits=1) == (
      "+12.3 [-5.0, +29.1] pp, p = 0.12 (Holm 0.37)")
  assert stats.describe(comparison(0.0004)) == (
      "+0.12 [-0.05, +0.29], p < 0.001")
  # rounding never carries p across ALPHA
  assert stats.describe(comparison(0.0496)).endswith("p = 0.0496")
  assert stats.describe(comparison(0.05)).endswith("p = 0.05")
  assert stats.describe(comparison(0.5, p_holm=1.0)).endswith(
      "p = 0.5 (Holm 1)")
  assert stats.describe(stats.welch([1.0], [2.0, 3.0])) == (
      "-1.50, undetermined (n < 2)")
  assert stats.describe(stats.welch([1.0, 1.0], [2.0, 2.0]), unit="pp",
                        scale=100) == "-100.00 pp, undetermined (no spread)"
  assert stats.describe(stats.welch([], [2.0])) == "undetermined (n < 2)"
  assert stats.verdict(comparison(0.01)) == "beyond noise"
  assert stats.verdict(comparison(0.01, p_holm=0.06)) == "within noise"
  assert stats.verdict(stats.welch([1.0, 1.0], [2.0, 2.0])) == "undetermined"


def test_rule_names_the_conventions():
  for words in ("5%", "Holm-Bonferroni", "Welch", "paired", "95%"):
    assert words in stats.RULE
  assert stats.ALPHA == 0.05


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="confidence"):
    stats.welch([1.0, 2.0], [3.0, 4.0], confidence=95)
  with pytest.raises(ValueError, match="1-D"):
    stats.welch([[1.0, 2.0]], [3.0, 4.0])
