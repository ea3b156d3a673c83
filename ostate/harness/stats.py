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
from statistics import NormalDist
from typing import Sequence

import numpy as np


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


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN ones are left out of the family).

    Example:
        >>> holm([0.01, 0.04, 0.03, math.nan])
        [0.03, 0.06, 0.06, nan]
    """
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def fisher_exact_p(failed_a: int, n_a: int, failed_b: int, n_b: int) -> float:
    """Two-sided p-value of Fisher's exact test of equal failure rates (``failed_a`` of ``n_a``
    against ``failed_b`` of ``n_b``): the tables with the same margins no more probable than
    the observed one.

    Example:
        >>> round(fisher_exact_p(3, 5, 0, 5), 4)
        0.1667
    """
    total_failed, total = failed_a + failed_b, n_a + n_b
    if total == 0:
        return 1.0

    def probability(k: int) -> float:
        return math.comb(n_a, k) * math.comb(n_b, total_failed - k) / math.comb(total, total_failed)

    observed = probability(failed_a)
    lo, hi = max(0, total_failed - n_b), min(n_a, total_failed)
    return min(1.0, sum(p for k in range(lo, hi + 1) if (p := probability(k)) <= observed * (1 + 1e-7)))


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle half (a quarter trimmed from each end, as
    ``scipy.stats.trim_mean(x, 0.25)``; Agarwal et al. 2021).

    Example:
        >>> iqm([1.0, 2.0, 3.0, 4.0, 100.0])
        3.0
    """
    xs = sorted(float(v) for v in values if not math.isnan(float(v)))
    if not xs:
        return math.nan
    cut = int(0.25 * len(xs))
    middle = xs[cut : len(xs) - cut]
    return math.fsum(middle) / len(middle)


def bootstrap_interval(
    values: Sequence[float], statistic=iqm, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (resampling the seeds with replacement;
    within one cell and strategy the seeds are the stratum). Always inside the range of the
    values, so a bounded metric's interval stays in its bounds. NaN for fewer than two values.

    Example:
        >>> lo, hi = bootstrap_interval([1.0, 2.0, 3.0, 4.0]); 1.0 <= lo <= hi <= 4.0
        True
    """
    xs = np.asarray([float(v) for v in values if not math.isnan(float(v))])
    if len(xs) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    samples = xs[rng.integers(0, len(xs), size=(resamples, len(xs)))]
    stats = np.sort(samples, axis=1)
    cut = int(0.25 * len(xs))
    if statistic is iqm:  # vectorised
        estimates = stats[:, cut : len(xs) - cut].mean(axis=1)
    else:
        estimates = np.array([statistic(row) for row in samples])
    alpha = (1 - level) / 2
    return float(np.quantile(estimates, alpha)), float(np.quantile(estimates, 1 - alpha))


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> float:
    """P(X < Y) + P(X = Y)/2: how often a run of ``x`` ends lower (better, for a loss) than a run of
    ``y``, over all pairs (the Mann-Whitney U statistic over n m; Agarwal et al. 2021). A failed
    run is ``inf``: worse than every finished one.

    Example:
        >>> probability_of_improvement([1.0, 2.0], [1.5, 3.0])
        0.75
    """
    xs = [float(v) for v in x if not math.isnan(float(v))]
    ys = [float(v) for v in y if not math.isnan(float(v))]
    if not xs or not ys:
        return math.nan
    wins = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a in xs for b in ys)
    return wins / (len(xs) * len(ys))


def norm_quantile(p: float) -> float:
    """The standard normal quantile (bisection on ``erfc``)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# Beyond this many pairs, seeds_needed says inf (no study runs them).
MAX_SEEDS = 100_000


def seeds_needed(mean: float, std: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    r"""Pairs a two-sided paired t-test needs to detect a mean difference ``mean`` with
    standard deviation ``std`` at level ``alpha`` with probability ``power``: the smallest
    :math:`n \ge 2` with :math:`n \ge ((t_{1-\alpha/2,n-1} + t_{power,n-1})\,s/|\bar d|)^2`
    (the usual approximation of the noncentral t). ``inf`` for a zero effect.

    Example:
        >>> seeds_needed(1.0, 1.0)
        10
    """
    if math.isnan(mean) or math.isnan(std):
        return math.nan
    if mean == 0:
        return math.inf
    if std == 0:
        return 2
    ratio = std / abs(mean)
    # The normal quantiles are below the t ones, so the normal answer is a lower bound: start there
    # (a near-zero effect would otherwise count up through every n, evaluating t quantiles each time).
    normal = NormalDist()
    start = max(2, math.ceil(((normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)) * ratio) ** 2))
    if start > MAX_SEEDS:
        return math.inf
    for n in range(start, MAX_SEEDS + 1):
        need = ((t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * ratio) ** 2
        if n >= need:
            return n
    return math.inf


@dataclass(frozen=True)
class Survival:
    """Steps to target as censored data: Kaplan-Meier median (NaN when fewer than half reach
    it) and the restricted mean up to ``horizon`` with its 95% interval (inside [0, horizon])."""

    median: float
    rmst: float
    lo: float
    hi: float


def kaplan_meier(times: Sequence[float], reached: Sequence[bool]) -> list[tuple[float, float, float]]:
    """The Kaplan-Meier estimate: ``(time, survival, greenwood_sum)`` after each event time
    (a run that never reached the target is censored at its last step).

    Example:
        >>> kaplan_meier([20, 40, 40, 60], [True, True, False, False])
        [(20.0, 0.75, 0.08333333333333333), (40.0, 0.5, 0.25)]
    """
    data = sorted(zip((float(t) for t in times), (bool(r) for r in reached)))
    at_risk = len(data)
    survival, greenwood = 1.0, 0.0
    out = []
    i = 0
    while i < len(data):
        t = data[i][0]
        events = sum(1 for tt, r in data if tt == t and r)
        leaving = sum(1 for tt, _ in data if tt == t)
        if events:
            survival *= 1 - events / at_risk
            if at_risk > events:
                greenwood += events / (at_risk * (at_risk - events))
            out.append((t, survival, greenwood))
        at_risk -= leaving
        i += leaving
    return out


def survival_summary(times: Sequence[float], reached: Sequence[bool], horizon: float, level: float = 0.95) -> Survival:
    """Median and restricted mean (area under the Kaplan-Meier curve up to ``horizon``) of the
    steps to target; the restricted mean's variance by the usual Greenwood-based formula
    (Klein and Moeschberger 4.5), its interval clipped to [0, horizon].

    Example:
        >>> s = survival_summary([20, 40, 60], [True, True, True], horizon=100)
        >>> s.median, s.rmst
        (40.0, 40.0)
    """
    if not times:
        return Survival(math.nan, math.nan, math.nan, math.nan)
    curve = kaplan_meier(times, reached)
    median = next((t for t, s, _ in curve if s <= 0.5), math.nan)
    # area under the step function S(t) on [0, horizon]
    points = [(0.0, 1.0)] + [(t, s) for t, s, _ in curve if t <= horizon]
    edges = [t for t, _ in points[1:]] + [horizon]
    areas = [s * (b - a) for (a, s), b in zip(points, edges)]
    rmst = math.fsum(areas)
    n = len(times)
    at_risk = {t: sum(1 for tt in times if float(tt) >= t) for t, _, _ in curve}
    variance = 0.0
    for k, (t, _, _) in enumerate(curve):
        if t > horizon:
            break
        later = math.fsum(areas[k + 1 :])  # the area beyond this event time
        events = sum(1 for tt, r in zip(times, reached) if float(tt) == t and r)
        r_t = at_risk[t]
        if r_t > events:
            variance += later**2 * events / (r_t * (r_t - events))
    if n < 2:
        return Survival(median, rmst, math.nan, math.nan)
    half = norm_quantile(0.5 + level / 2) * math.sqrt(variance)
    return Survival(median, rmst, max(0.0, rmst - half), min(horizon, rmst + half))
