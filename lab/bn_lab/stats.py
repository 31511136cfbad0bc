"""Statistics of the study pages: t tests, t intervals, Holm's correction.

Conventions, the same on every page (`RULE` says them in one sentence):
  * `diff` is mean(a) - mean(b), positive when a is larger; p values are
    two-sided; intervals are t intervals, 95% by default.
  * Independent runs: Welch's t test (Welch-Satterthwaite df). Runs that
    share initialization and data order (one setting changed, same seed):
    the paired t test on a - b.
  * A section's comparisons are one family, corrected by Holm-Bonferroni;
    "beyond noise" means p < ALPHA = 0.05 after the correction.
  * What cannot be judged is "undetermined" (nan p, t and interval), never an
    exception: fewer than 2 values or pairs, or no spread at all.
  * NaN or infinite values raise: what a diverged run means is the caller's
    decision (exclude it visibly, or report it), never silently dropped.

Only numpy and the standard library: Student's t distribution is computed
here in float64 (`t_cdf`, `t_ppf`, about 1e-13 relative for any df > 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np
from numpy.typing import ArrayLike

ALPHA = 0.05
RULE = (f"Beyond noise means significant at the {ALPHA:.0%} level after "
        "Holm-Bonferroni correction over the section's comparisons: Welch's "
        "t test, or the paired t test where runs share initialization and "
        "data order; intervals are 95% t intervals of the difference.")

# ----------------------------------------------------------------------------
# Student's t: P(|T| > |t|) = I_x(df/2, 1/2), the regularized incomplete beta
# function at x = df / (df + t^2).


def _log_gamma_ratio(a: float) -> float:
  """log Gamma(a + 1/2) - log Gamma(a); for a >= 10 from Stirling's series
  term by term, as the difference of two lgammas loses the digits of a log a
  (1e-9 relative in p at df = 1e6)."""
  if a < 10:
    return math.lgamma(a + 0.5) - math.lgamma(a)
  def tail(z):  # the series after its leading terms: < 2e-14 left for z >= 10
    w = 1.0 / (z * z)
    return (1/12 - w * (1/360 - w * (1/1260 - w * (1/1680 - w / 1188)))) / z
  return ((a - 0.5) * math.log1p(0.5 / a) + 0.5 * math.log(a + 0.5) - 0.5
          + tail(a + 0.5) - tail(a))


def _betacf(a: float, b: float, x: float) -> float:
  """The continued fraction of I_x(a, b) (Numerical Recipes' betacf by the
  modified Lentz method), fast for x < (a + 1) / (a + b + 2)."""
  guard = lambda v: v if abs(v) > 1e-300 else 1e-300
  c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
  h = d
  for m in range(1, 10_000):
    for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
               -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d, c = 1.0 / guard(1.0 + aa * d), guard(1.0 + aa / c)
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      return h
  raise ArithmeticError(f"betacf(a={a}, b={b}, x={x}) did not converge.")


def _bgrat_half(a: float, lnx: float) -> float:
  """I_x(a, 1/2) for a >= 15 and x near 1 by Didonato & Morris' expansion in
  incomplete gamma functions (TOMS 708's BGRAT; erfc for b = 1/2). There the
  continued fraction needs 1 - x to more digits than x holds."""
  nu = a - 0.25  # a + (b - 1) / 2
  z = -nu * lnx
  q = math.erfc(math.sqrt(z))  # Q(1/2, z), the limit for a -> inf
  if q == 0.0:
    return 0.0
  r = math.sqrt(z / math.pi) * math.exp(-z)  # z^b e^-z / Gamma(b)
  v, t2 = 0.25 / (nu * nu), 0.25 * lnx * lnx
  j = total = q / r
  t, cn, cs, ds = 1.0, 1.0, [], []
  for n in range(1, 31):
    bp2n = 2 * n - 1.5
    j = (bp2n * (bp2n + 1) * j + (z + bp2n + 1) * t) * v
    t, cn = t * t2, cn / ((2 * n) * (2 * n + 1))
    cs.append(cn)
    s = sum((0.5 * i - n) * cs[i - 1] * ds[n - 1 - i] for i in range(1, n))
    ds.append(-0.5 * cn + s / n)
    total += ds[-1] * j
    if abs(ds[-1] * j) <= 1e-16 * total:
      break
  return math.exp(_log_gamma_ratio(a) - 0.5 * math.log(nu)) * r * total


def _two_sided_p(t: float, df: float) -> float:
  """P(|T| > |t|) for T ~ Student(df); the normal for df = inf."""
  if math.isnan(t) or math.isnan(df):
    return math.nan
  if math.isinf(df):
    return math.erfc(abs(t) / math.sqrt(2))
  r, a = t * t / df, 0.5 * df
  if r == 0:
    return 1.0
  # x, y = 1 - x and their logs from r, never as 1 - x: at large df x is
  # 1 - O(1/df), and 1 - x would keep only its last digits.
  lnx = (-math.log1p(r) if math.isfinite(r)
         else math.log(df) - 2 * math.log(abs(t)))
  x, y = 1.0 / (1.0 + r), 1.0 / (1.0 + 1.0 / r)
  if a >= 15 and y < 0.1 and a * y > 0.49:
    return _bgrat_half(a, lnx)
  lny = -math.log1p(1 / r) if r > 1 else math.log(r) - math.log1p(r)
  # x^a y^(1/2) / B(a, 1/2), with log B(a, 1/2) = lgamma(1/2) - ratio.
  front = math.exp(a * lnx + 0.5 * lny - math.lgamma(0.5)
                   + _log_gamma_ratio(a))
  if x < (a + 1) / (a + 2.5):
    return front * _betacf(a, 0.5, x) / a
  return 1.0 - front * _betacf(0.5, a, y) / 0.5


def _check_df(df: float) -> float:
  if not float(df) > 0 and not math.isnan(df):
    raise ValueError(f"df={df}; Student's t needs df > 0 (inf: the normal).")
  return float(df)


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with real df > 0 (inf: the normal); the lower
  tail keeps its relative accuracy."""
  tail = 0.5 * _two_sided_p(float(t), _check_df(df))
  return tail if t < 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
  """The t with t_cdf(t, df) = q, by Newton's method on the smaller tail,
  kept inside a bracket that it bisects when a step leaves it."""
  q, df = float(q), _check_df(df)
  if not 0 <= q <= 1 and not math.isnan(q):
    raise ValueError(f"q={q} is a probability, in [0, 1].")
  if math.isnan(q) or math.isnan(df):
    return math.nan
  if q in (0.0, 0.5, 1.0):
    return 0.0 if q == 0.5 else math.copysign(math.inf, q - 0.5)
  p = min(q, 1.0 - q)  # exact: 1 - q has no rounding for q >= 0.5
  tail = lambda s: 0.5 * _two_sided_p(s, df)  # P(T > s), decreasing
  log_c = (-0.5 * math.log(2 * math.pi) if math.isinf(df) else
           _log_gamma_ratio(0.5 * df) - 0.5 * math.log(math.pi * df))
  pdf = lambda s: math.exp(log_c - (0.5 * s * s if math.isinf(df) else
                                    0.5 * (df + 1) * math.log1p(s * s / df)))
  lo, hi = 0.0, 1.0
  while tail(hi) > p:
    lo, hi = hi, 2.0 * hi
  s = 0.5 * (lo + hi)
  for _ in range(100):
    g, density = tail(s), pdf(s)
    lo, hi = (s, hi) if g > p else (lo, s)
    new = s + (g - p) / density if density > 0 else math.nan
    if not lo < new < hi:  # outside the bracket, or nan: bisect
      new = 0.5 * (lo + hi)
    s, step = new, abs(new - s)
    if step <= 1e-15 * s:
      break
  return s if q > 0.5 else -s


# ----------------------------------------------------------------------------
# Comparisons.


@dataclasses.dataclass(frozen=True)
class Comparison:
  """mean(a) - mean(b) of two sets of runs (paired: mean(a - b), the same up
  to rounding).

  [low, high] is its t interval, se its standard error with df degrees of
  freedom, t = diff / se, p two-sided. Undetermined: t, p, low, high nan
  (n < 2: se and df nan too; no spread: se 0, df nan). `p_holm` is set by
  `holm_family`.
  """
  label: str
  diff: float
  low: float
  high: float
  se: float
  df: float
  t: float
  p: float
  n_a: int
  n_b: int
  paired: bool
  p_holm: float | None = None

  @property
  def significant(self) -> bool:
    """p < ALPHA after Holm's correction (the raw p before `holm_family`);
    False when undetermined."""
    p = self.p if self.p_holm is None else self.p_holm
    return math.isfinite(p) and p < ALPHA


def _values(x: ArrayLike, label: str, name: str) -> np.ndarray:
  v, where = np.asarray(x, dtype=np.float64), f"{label}: " if label else ""
  if v.ndim > 1:
    raise ValueError(f"{where}{name} must be 1-D, one value per run; got "
                     f"shape {v.shape}.")
  if bad := int(np.count_nonzero(~np.isfinite(v))):
    raise ValueError(
        f"{where}{name} has {bad} NaN or infinite value(s) of {v.size}: "
        "decide what a diverged run means (exclude it visibly, or report "
        "it) before comparing.")
  return v.reshape(-1)


def _se(v: np.ndarray, scale: float) -> float:
  """The standard error of mean(v); nan for n < 2. A spread of a few ulps of
  the inputs (`scale`) is rounding, not data (a mean of equal values, the
  a - b of pairs that differ by a constant): 0, so that it reads "no spread"
  rather than p = 0 from a 1e-17 standard error."""
  if v.size < 2:
    return math.nan
  if np.ptp(v) <= 8 * np.finfo(np.float64).eps * scale:
    return 0.0
  return math.sqrt(np.var(v, ddof=1) / v.size)


def _result(label, diff, se, df, n_a, n_b, paired_, confidence):
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence}; choose one in (0, 1).")
  if not se > 0:  # n < 2 (se nan) or no spread (se 0): undetermined
    return Comparison(label, diff, math.nan, math.nan, se, math.nan,
                      math.nan, math.nan, n_a, n_b, paired_)
  half = -t_ppf(0.5 * (1.0 - confidence), df) * se
  return Comparison(label, diff, diff - half, diff + half, se, df, diff / se,
                    _two_sided_p(diff / se, df), n_a, n_b, paired_)


def _mean(v: np.ndarray) -> float:
  return float(np.mean(v)) if v.size else math.nan


def welch(a: ArrayLike, b: ArrayLike, *, label: str = "",
          confidence: float = 0.95) -> Comparison:
  """Welch's t test of mean(a) - mean(b), for independent runs.

  Undetermined, never raising: with fewer than 2 values in a group, se, df,
  t, p, low, high are nan (diff is computed, nan for an empty group); when
  both groups are constant, se is 0 and df, t, p, low, high are nan (one
  constant group is fine). NaN or infinite values raise ValueError naming
  `label`.
  """
  a, b = _values(a, label, "a"), _values(b, label, "b")
  ses = [_se(v, float(np.abs(v).max(initial=0))) for v in (a, b)]
  va, vb = ses[0] ** 2, ses[1] ** 2
  se = math.sqrt(va + vb)
  # Welch-Satterthwaite; with se nan or 0, _result ignores it.
  df = ((va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
        if se > 0 else math.nan)
  return _result(label, _mean(a) - _mean(b), se, df, a.size, b.size, False,
                 confidence)


def paired(a: ArrayLike, b: ArrayLike, *, label: str = "",
           confidence: float = 0.95) -> Comparison:
  """The paired t test on a - b (df = n - 1), for runs that share
  initialization and data order (a[i] and b[i] from the same seed).

  Undetermined as `welch` with fewer than 2 pairs, or all differences equal
  (se 0). Raises ValueError (naming `label`) when a and b differ in length
  or hold NaN or infinite values.
  """
  a, b = _values(a, label, "a"), _values(b, label, "b")
  if a.size != b.size:
    raise ValueError(f"{label + ': ' if label else ''}the paired t test "
                     f"needs one b per a, got {a.size} and {b.size} values.")
  d = a - b
  se = _se(d, float(np.abs(np.r_[a, b]).max(initial=0)))
  return _result(label, _mean(d), se, d.size - 1.0, a.size, b.size, True,
                 confidence)


_paired = paired  # `compare`'s argument `paired` hides the function


def compare(a: ArrayLike, b: ArrayLike, *, paired: bool = False,
            label: str = "", confidence: float = 0.95) -> Comparison:
  """`paired(a, b, ...)` when `paired`, else `welch(a, b, ...)`."""
  test = _paired if paired else welch
  return test(a, b, label=label, confidence=confidence)


def holm(p_values: ArrayLike) -> np.ndarray:
  """Holm-Bonferroni adjusted p values, in the order given.

  Step-down: the i-th smallest of m p values (i from 1) is multiplied by
  m - i + 1, made non-decreasing in that order and capped at 1. NaN p values
  (undetermined comparisons) stay nan and do not count in m: nothing was
  tested there, so they cost the tested ones no correction.
  """
  p = np.asarray(p_values, dtype=np.float64)
  if p.ndim != 1 or np.any(p < 0) or np.any(p > 1):
    raise ValueError(f"holm takes a 1-D array of p values in [0, 1], got {p}.")
  out, order = np.full(p.shape, np.nan), np.flatnonzero(~np.isnan(p))
  order = order[np.argsort(p[order], kind="stable")]
  scaled = (order.size - np.arange(order.size)) * p[order]
  out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
  return out


def holm_family(comparisons: Iterable[Comparison]) -> list[Comparison]:
  """Copies of `comparisons` (one family) with `p_holm` set by `holm`."""
  comparisons = list(comparisons)
  adjusted = holm([c.p for c in comparisons])
  return [dataclasses.replace(c, p_holm=float(q))
          for c, q in zip(comparisons, adjusted)]


def mean_interval(values: ArrayLike, confidence: float = 0.95,
                  ) -> tuple[float, float, float]:
  """(mean, low, high), the one-sample t interval of the mean: nan interval
  for fewer than 2 values, zero width when all values are equal."""
  v = _values(values, "", "values")
  se = _se(v, float(np.abs(v).max(initial=0)))
  c = _result("", _mean(v), se, v.size - 1.0, v.size, v.size, False,
              confidence)
  return (c.diff, c.diff, c.diff) if se == 0 else (c.diff, c.low, c.high)


def _p_text(p: float) -> str:
  if p < 0.001:
    return "< 0.001"
  # Two significant digits, more where rounding would carry p across ALPHA
  # (0.0496 must not read "0.05").
  for digits in range(2, 7):
    text = f"{p:.{digits}g}"
    if (float(text) < ALPHA) == (p < ALPHA):
      break
  return f"= {text}"


def describe(c: Comparison, unit: str = "", scale: float = 1.0,
             digits: int = 2) -> str:
  """E.g. "+0.12 [-0.05, +0.29] pp, p = 0.12 (Holm 0.36)": diff and interval
  times `scale`, in `unit`, then p (and Holm's p once set). Undetermined:
  "+0.12 pp, undetermined (n < 2)" or "... undetermined (no spread)"."""
  num = lambda v: f"{v * scale:+.{digits}f}"
  unit = f" {unit}" if unit else ""
  if math.isnan(c.p):
    why = "n < 2" if min(c.n_a, c.n_b) < 2 else "no spread"
    head = f"{num(c.diff)}{unit}, " if math.isfinite(c.diff) else ""
    return f"{head}undetermined ({why})"
  text = f"{num(c.diff)} [{num(c.low)}, {num(c.high)}]{unit}, p {_p_text(c.p)}"
  if c.p_holm is not None:
    text += f" (Holm {_p_text(c.p_holm).removeprefix('= ')})"
  return text


def verdict(c: Comparison) -> str:
  """"beyond noise" (significant), "within noise", or "undetermined"."""
  if math.isnan(c.p):
    return "undetermined"
  return "beyond noise" if c.significant else "within noise"
