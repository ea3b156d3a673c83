r"""Small-sample statistics for trials across seeds: t intervals, a paired t-test, Wilcoxon's signed-rank test.

With :math:`n` values of mean :math:`\bar x` and sample standard deviation :math:`s`
(:math:`n-1` in the denominator), the 95% confidence interval of the mean is
:math:`\bar x \pm t_{0.975,\,n-1}\, s/\sqrt n`. Paired differences :math:`d_i = x_i - y_i`
(same seed, same settings) are tested with :math:`t = \bar d/(s_d/\sqrt n)` on
:math:`n-1` degrees of freedom (two-sided), and with Wilcoxon's signed-rank test, exact
(all :math:`2^n` sign patterns, mid-ranks for ties, zero differences dropped) up to
:math:`n = 20` and by the normal approximation beyond.

Student's t distribution comes from the regularised incomplete beta function,
:math:`P(|T| > t) = I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`, evaluated by its continued fraction
(modified Lentz); quantiles by bisection. No SciPy needed; tests check the values
against published tables.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function :math:`I_x(a, b)`.

    Example:
        >>> round(betainc(2, 3, 0.4), 6)  # 1 - sum_{k<2} C(4,k) 0.4^k 0.6^(4-k)
        0.5248
    """
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability :math:`P(|T| > |t|)` of Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``p`` in (0.5, 1)).

    Example:
        >>> round(t_quantile(0.975, 2), 4), round(t_quantile(0.975, 30), 4)
        (4.3027, 2.0423)
    """
    if not 0.5 < p < 1:
        raise ValueError("p must lie in (0.5, 1)")
    target = 2 * (1 - p)
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and the ``level`` confidence interval of ``n`` values."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """The t interval of the mean (NaN bounds for fewer than two values; NaN values are dropped).

    Example:
        >>> i = mean_ci([1.0, 2.0, 3.0])
        >>> i.mean, i.std, round(i.lo, 4), round(i.hi, 4)
        (2.0, 1.0, -0.4841, 4.4841)
    """
    xs = [float(v) for v in values if not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class PairedTest:
    """Paired differences (x - y): their interval, the t-test's and Wilcoxon's two-sided p-values."""

    interval: Interval
    t: float
    p_t: float
    p_wilcoxon: float


def paired_test(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> PairedTest:
    """Compare paired samples (same seeds): the mean difference with its CI and two tests.

    Example:
        >>> r = paired_test([2.0, 3.0, 4.5, 5.0], [1.0, 1.5, 2.5, 4.5])
        >>> round(r.interval.mean, 3), round(r.t, 3), round(r.p_t, 4), r.p_wilcoxon
        (1.25, 3.873, 0.0305, 0.125)
    """
    if len(x) != len(y):
        raise ValueError("paired samples must have the same length")
    diffs = [a - b for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    interval = mean_ci(diffs, level)
    if interval.n < 2:
        return PairedTest(interval, math.nan, math.nan, math.nan)
    if interval.std == 0:
        t = 0.0 if interval.mean == 0 else math.copysign(math.inf, interval.mean)
    else:
        t = interval.mean / (interval.std / math.sqrt(interval.n))
    return PairedTest(interval, t, t_sf2(t, interval.n - 1), wilcoxon_p(diffs))


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of Wilcoxon's signed-rank test (exact up to 20 non-zero differences).

    Example:
        >>> wilcoxon_p([1.0, 2.0, 3.0]), wilcoxon_p([0.5, -1.0, 2.0, 3.0, 4.0, 5.0])
        (0.25, 0.09375)
    """
    d = [v for v in diffs if v != 0 and not math.isnan(v)]
    n = len(d)
    if n == 0:
        return 1.0
    ranks = _mid_ranks([abs(v) for v in d])
    w_plus = sum(r for r, v in zip(ranks, d) if v > 0)
    total = sum(ranks)
    observed = min(w_plus, total - w_plus)
    if n <= 20:
        extreme = 0
        for signs in itertools.product((0, 1), repeat=n):
            w = sum(r for r, s in zip(ranks, signs) if s)
            if min(w, total - w) <= observed + 1e-9:
                extreme += 1
        return min(1.0, extreme / 2**n)
    mean = total / 2
    sd = math.sqrt(sum(r * r for r in ranks) / 4)
    z = (observed - mean + 0.5) / sd
    return min(1.0, math.erfc(-z / math.sqrt(2)))


def _mid_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
