"""The sketch's statistics against exact torch computations, within its documented error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ostate.analysis.sketch import RELATIVE_ERROR, Sketch

# Every test here runs with the compiled loops and with the torch ops (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("arithmetic")

SUBNORMAL_ABS_ERROR = 2.0**-134
QS = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]


def exact_quantile(finite: torch.Tensor, q: float) -> float:
    ordered = finite.double().sort().values
    return float(ordered[math.floor(q * (finite.numel() - 1))])


def assert_quantiles_within_error(sketch: Sketch, values: torch.Tensor) -> None:
    finite = values[torch.isfinite(values)].float()
    for q in QS:
        exact = exact_quantile(finite, q)
        estimate = sketch.quantile(q)
        tolerance = abs(exact) * RELATIVE_ERROR * (1 + 1e-6) + SUBNORMAL_ABS_ERROR
        assert abs(estimate - exact) <= tolerance, (q, exact, estimate)


def test_quantiles_of_normal_values_are_within_relative_error():
    torch.manual_seed(0)
    x = torch.randn(200_000) * 1e-3
    s = Sketch()
    s.add(x)
    assert_quantiles_within_error(s, x)


def test_lognormal_values_spanning_many_decades_are_within_relative_error():
    torch.manual_seed(1)
    x = torch.exp(torch.randn(100_000) * 10)  # from about 1e-20 to 1e20
    s = Sketch()
    s.add(x)
    assert_quantiles_within_error(s, x)


def test_zeros_negatives_subnormals_inf_and_nan_are_counted_apart_and_quantiles_hold():
    torch.manual_seed(2)
    x = torch.randn(50_000)
    x[:5000] = 0.0
    x[5000:5100] = -0.0
    x[5100:5200] = 1e-42  # float32 subnormals
    x[5200:5300] = -3e-41
    x[5300:5310] = float("nan")
    x[5310:5315] = float("inf")
    x[5315:5317] = float("-inf")
    s = Sketch()
    s.add(x)
    assert (s.nan, s.posinf, s.neginf) == (10, 5, 2)
    assert s.zeros == 5100
    finite = x[torch.isfinite(x)]
    assert s.count == finite.numel()
    assert s.min == float(finite.min()) and s.max == float(finite.max())
    assert s.mean == pytest.approx(float(finite.double().mean()), rel=1e-5, abs=1e-9)
    assert s.rms == pytest.approx(float(finite.double().square().mean().sqrt()), rel=1e-5)
    assert_quantiles_within_error(s, x)


def test_quantiles_match_torch_quantile_lower_interpolation():
    torch.manual_seed(3)
    x = torch.rand(10_001) * 5 + 0.1
    s = Sketch()
    s.add(x)
    for q in (0.1, 0.5, 0.9):
        exact = float(torch.quantile(x, q, interpolation="lower"))
        assert s.quantile(q) == pytest.approx(exact, rel=RELATIVE_ERROR)


def test_bfloat16_values_land_in_their_own_bucket_exactly():
    torch.manual_seed(4)
    x = torch.randn(10_000).bfloat16()
    s = Sketch()
    s.add(x)
    for q in (0.05, 0.5, 0.95):
        exact = exact_quantile(x.float(), q)
        # The bucket of a bfloat16 value holds it and the next 2**-7 above it; the midpoint is within 2**-8.
        assert abs(s.quantile(q) - exact) <= abs(exact) * RELATIVE_ERROR


def test_merging_sketches_equals_sketching_everything_at_once():
    torch.manual_seed(5)
    parts = [torch.randn(n) * 10.0**k for k, n in enumerate([1000, 5000, 300])]
    whole = Sketch()
    whole.add(torch.cat(parts))
    pieces = [Sketch() for _ in parts]
    for p, t in zip(pieces, parts):
        p.add(t)
    merged = Sketch.merged(pieces)
    pairwise = Sketch()
    for p in pieces:
        pairwise.merge(p)
    for m in (merged, pairwise):
        assert m.count == whole.count and m.zeros == whole.zeros
        assert m.min == whole.min and m.max == whole.max
        assert m.total == pytest.approx(whole.total, rel=1e-6)
        np.testing.assert_array_equal(m.buckets, whole.buckets)
        np.testing.assert_array_equal(m.counts, whole.counts)


def test_chunked_adding_of_a_large_tensor_equals_one_pass(monkeypatch):
    import ostate.analysis.sketch as sk

    torch.manual_seed(6)
    x = torch.randn(10_000)
    one = Sketch()
    one.add(x)
    monkeypatch.setattr(sk, "SKETCH_CHUNK", 999)
    chunked = Sketch()
    chunked.add(x)
    np.testing.assert_array_equal(one.counts, chunked.counts)
    assert one.sumsq == pytest.approx(chunked.sumsq, rel=1e-6)


def test_add_constant_is_the_same_as_adding_copies():
    a, b = Sketch(), Sketch()
    a.add_constant(0.25, 1000)
    b.add(torch.full((1000,), 0.25))
    assert (a.count, a.min, a.max, a.mean) == (b.count, b.min, b.max, b.mean)
    np.testing.assert_array_equal(a.counts, b.counts)
    z = Sketch()
    z.add_constant(0.0, 7)
    assert z.zeros == 7 and z.count == 7


def test_a_kept_histogram_is_stored_in_narrow_types_and_read_back_exactly():
    s = Sketch()
    s.add(torch.randn(128))  # a tiny tensor: a few hundred bytes of histogram, not 16 bytes a bucket
    s.compact()
    assert (s._buckets.dtype, s._counts.dtype) == (np.uint16, np.uint8)
    assert (s.buckets.dtype, s.counts.dtype) == (np.int64, np.int64)
    wide = Sketch.from_dict(s.to_dict())
    assert wide.quantiles(QS) == s.quantiles(QS) and wide.histogram()[1].tolist() == s.histogram()[1].tolist()
    # Counts past what the narrow types hold: widened before they grow, by copies and by merging.
    huge = Sketch()
    huge.add_constant(0.5, 2**40)
    assert huge.counts.tolist() == [2**40] and huge._counts.dtype == np.int64
    half = Sketch()
    half.add_constant(0.5, 200)
    assert half.compact()._counts.dtype == np.uint8
    assert Sketch.merged([half, half]).counts.tolist() == [400]
    assert half.merge(Sketch().merge(half)).counts.tolist() == [400]


def test_float32_overflow_in_the_sum_of_squares_falls_back_to_float64():
    s = Sketch()
    s.add(torch.tensor([3e30, -3e30, 1.0]))
    assert math.isfinite(s.sumsq)
    assert s.rms == pytest.approx(math.sqrt(2 * 9e60 / 3), rel=1e-6)


def test_float64_input_is_summarised():
    x = torch.linspace(1, 2, 1001, dtype=torch.float64)
    s = Sketch()
    s.add(x)
    assert s.mean == pytest.approx(1.5, rel=1e-6)
    assert s.quantile(0.5) == pytest.approx(1.5, rel=RELATIVE_ERROR)


def test_empty_and_all_nan_sketches_report_nan_not_errors():
    s = Sketch()
    assert math.isnan(s.mean) and math.isnan(s.quantile(0.5))
    s.add(torch.tensor([float("nan")] * 3))
    assert s.count == 0 and s.nan == 3 and math.isnan(s.rms)


def test_round_trip_through_a_dict():
    s = Sketch()
    s.add(torch.randn(1000))
    t = Sketch.from_dict(s.to_dict())
    assert t.to_dict() == s.to_dict()
    assert t.quantile(0.3) == s.quantile(0.3)


def test_fraction_at_most_counts_values_below_a_threshold():
    s = Sketch()
    s.add(torch.arange(1, 101, dtype=torch.float32))
    assert s.fraction_at_most(50.0) == pytest.approx(0.5, abs=0.011)


def test_quantiles_match_torch_quantile_on_mixed_signs_zeros_subnormals_and_nonfinite():
    torch.manual_seed(7)
    x = torch.cat(
        [
            torch.randn(30_000) * 1e-3,
            -torch.rand(5_000) * 1e3,
            torch.zeros(4_000),
            -torch.zeros(500),
            torch.full((300,), 3e-42),
            torch.full((200,), -7e-40),
            torch.tensor([float("nan")] * 20),
            torch.tensor([float("inf")] * 3 + [float("-inf")] * 2),
        ]
    )[torch.randperm(40_025)]
    s = Sketch()
    for piece in x.split(4096):  # filled chunk by chunk, as the analysis does
        s.add(piece)
    finite = x[torch.isfinite(x)]
    assert (s.count, s.zeros, s.nan, s.posinf, s.neginf) == (finite.numel(), 4_500, 20, 3, 2)
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        exact = float(torch.quantile(finite, q, interpolation="lower"))
        assert abs(s.quantile(q) - exact) <= abs(exact) * RELATIVE_ERROR * (1 + 1e-6) + SUBNORMAL_ABS_ERROR, q


def test_a_sketch_being_filled_reads_the_same_as_a_compacted_one():
    torch.manual_seed(8)
    x = torch.randn(5000)
    filling = Sketch()
    filling.add(x[:2500])
    filling.add(x[2500:])
    assert filling.quantile(0.3) == Sketch.from_dict(filling.to_dict()).quantile(0.3)
    other = Sketch()
    other.add(x)
    np.testing.assert_array_equal(filling.counts, other.counts)
    assert filling.merge(Sketch()).count == 5000


def test_tiny_values_keep_an_exact_rms_where_float32_squares_would_underflow():
    x = torch.full((1000,), 3e-25) * torch.linspace(1, 2, 1000)  # squares ~1e-49: zero in float32
    s = Sketch()
    s.add(x)
    assert s.rms == pytest.approx(float(x.double().square().mean().sqrt()), rel=1e-6)


def test_a_sketch_without_histogram_keeps_sums_and_extremes_but_no_quantiles():
    s = Sketch(with_histogram=False)
    s.add(torch.tensor([1.0, -2.0, 3.0]))
    assert (s.count, s.min, s.max, s.total) == (3, -2.0, 3.0, 2.0)
    assert math.isnan(s.quantile(0.5))
    merged = Sketch.merged([s, Sketch()])
    assert not merged.with_histogram and merged.count == 3
    assert not Sketch.from_dict(s.to_dict()).with_histogram
