"""The statistics behind the summaries, checked against published tables and brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ostate.harness.stats import betainc, mean_ci, paired_test, t_quantile, t_sf2, wilcoxon_p


@pytest.mark.parametrize(
    "p, df, expected",
    [
        # Student's t critical values (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 3, 3.182),
        (0.975, 5, 2.571),
        (0.975, 10, 2.228),
        (0.975, 30, 2.042),
        (0.95, 4, 2.132),
        (0.995, 3, 5.841),
        (0.999, 20, 3.552),
    ],
)
def test_t_quantiles_match_the_published_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-4)


def test_the_two_sided_tail_inverts_the_quantile():
    for df in (1, 2, 7, 40):
        assert t_sf2(t_quantile(0.975, df), df) == pytest.approx(0.05, rel=1e-9)


@pytest.mark.parametrize("a, b, x", [(1, 1, 0.3), (2.5, 1, 0.7), (0.5, 0.5, 0.2), (3, 7, 0.9), (20, 0.5, 0.95)])
def test_incomplete_beta_meets_its_closed_forms_and_symmetry(a, b, x):
    assert betainc(a, b, x) == pytest.approx(1 - betainc(b, a, 1 - x), abs=1e-12)
    if b == 1:
        assert betainc(a, b, x) == pytest.approx(x**a, rel=1e-12)
    if a == b == 0.5:  # the arcsine law
        assert betainc(a, b, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-10)


def test_a_single_value_has_no_interval_and_nan_values_are_dropped():
    one = mean_ci([2.0, float("nan")])
    assert (one.n, one.mean) == (1, 2.0) and math.isnan(one.lo)


def test_the_paired_t_test_of_identical_samples_finds_no_difference():
    r = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert r.interval.mean == 0 and r.p_t == 1.0 and r.p_wilcoxon == 1.0


def _brute_force_wilcoxon(diffs):
    d = [v for v in diffs if v != 0]
    order = sorted(abs(v) for v in d)
    ranks = [sum(i + 1 for i, o in enumerate(order) if o == abs(v)) / order.count(abs(v)) for v in d]
    total = sum(ranks)
    observed = min(sum(r for r, v in zip(ranks, d) if v > 0), total - sum(r for r, v in zip(ranks, d) if v > 0))
    extreme = sum(
        1
        for signs in itertools.product((0, 1), repeat=len(d))
        if min(s := sum(r for r, k in zip(ranks, signs) if k), total - s) <= observed + 1e-9
    )
    return extreme / 2 ** len(d)


def test_wilcoxon_exact_p_values_match_brute_force_including_ties():
    rng = random.Random(0)
    for _ in range(20):
        diffs = [rng.choice([-3, -2, -1, 0, 1, 2, 3, 4]) * 0.5 for _ in range(rng.randint(2, 9))]
        assert wilcoxon_p(diffs) == pytest.approx(_brute_force_wilcoxon(diffs))


def test_wilcoxon_with_three_pairs_can_never_reach_five_percent():
    # The smallest two-sided p with n = 3 is 2/8: three seeds cannot show significance this way.
    assert wilcoxon_p([0.1, 0.2, 0.3]) == 0.25


def test_wilcoxon_uses_the_normal_approximation_for_many_pairs():
    diffs = [0.1 * (i + 1) for i in range(25)]
    assert wilcoxon_p(diffs) < 1e-4
