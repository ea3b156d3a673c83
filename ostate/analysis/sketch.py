"""A mergeable summary of a stream of numbers: counts, sums, extremes and a histogram.

Every statistic ostate reports comes from a :class:`Sketch`. A sketch is filled one
chunk of a tensor at a time and two sketches merge by adding, so the same numbers can
be computed per tensor and then per group, layer, file, shard or worker without
holding any raw data.

The histogram buckets are the values of bfloat16: a float32 value ``x`` falls in the
bucket whose id is the top 16 bits of its bit pattern (sign, 8 exponent bits, 7
mantissa bits), i.e. the bit pattern of ``x`` truncated to bfloat16. For normal
numbers (``|x| >= 2**-126``, about 1.18e-38) a bucket spans ``[a, a * (1 + 2**-7))``
in magnitude; reporting its midpoint makes every quantile exact to a relative error of
at most ``RELATIVE_ERROR = 2**-8`` (0.39%). Subnormal float32 values sit in linear
buckets of width ``2**-133`` (9.2e-41), so their quantiles are exact to an absolute
error of ``2**-134``. bfloat16 tensors land in their own value's bucket; float64
tensors are rounded to float32 first. Exact zeros, NaNs and infinities are counted
apart from the histogram; count, mean, RMS, min, max and the quantiles cover the
finite values only. Sums are float64 when ostate's compiled loops are built
(:mod:`ostate.analysis.native.kernels`), float32 per piece of :data:`SKETCH_CHUNK` values otherwise;
everything else is the same either way.

Example:
    >>> s = Sketch()
    >>> s.add(torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")]))
    >>> s.count, s.nan, s.mean, s.min, s.max
    (4, 1, 2.5, 1.0, 4.0)
    >>> abs(s.quantile(0.5) - 2.0) <= 2.0 * RELATIVE_ERROR
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ostate.analysis.native import kernels

RELATIVE_ERROR = 2.0**-8
_NBUCKETS = 1 << 16
_SIGN = 0x8000  # bucket ids with this bit hold negative values
_NONFINITE_MAG = 0x7F80  # magnitude bits at or above this are inf or NaN
_NEGATIVE_ZERO_BITS = -(1 << 31)  # the int32 bit pattern of -0.0
# Largest piece :meth:`Sketch.add` handles at once (float32 sums of this many values stay exact
# to float32 rounding; the piece also bounds the temporary memory of one call).
SKETCH_CHUNK = 1 << 22
# Outside [_TINY, _HUGE] float32 squares lose precision (subnormal) or their sum may overflow.
_TINY, _HUGE = 2.0**-40, 2.0**40


_SCALARS = ("count", "zeros", "nan", "posinf", "neginf", "total", "sumsq", "min", "max", "with_histogram")


def _bucket_bounds(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper magnitude of buckets (as float64)."""
    mag = (np.asarray(ids, np.int64) & 0x7FFF).astype(np.uint32)
    lo = (mag << 16).view(np.float32).astype(np.float64)
    hi = ((mag + 1) << 16).view(np.float32).astype(np.float64)
    return lo, hi


def bucket_values(ids: np.ndarray) -> np.ndarray:
    """The value that stands for each bucket: the midpoint of its interval, signed."""
    lo, hi = _bucket_bounds(ids)
    mid = (lo + hi) / 2.0
    return np.where(np.asarray(ids) & _SIGN, -mid, mid)


def bucket_ids(values: torch.Tensor) -> torch.Tensor:
    """The bucket id (0..65535, an int32 tensor) of every float32 or bfloat16 value."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
    return torch.bitwise_right_shift(values.view(torch.int32), 16).bitwise_and_(0xFFFF)


@dataclass(slots=True)
class Sketch:
    """Counts, sums, extremes and a bfloat16-bucket histogram of finite values.

    Fill it with :meth:`add` (a tensor of any float dtype) or :meth:`add_constant`,
    combine with :meth:`merge`, read it with :attr:`mean`, :attr:`rms`,
    :meth:`quantile` and :meth:`histogram`. While it is being filled the histogram is
    kept dense (65,536 counts, 512 KiB); :meth:`compact` (called by every reader)
    turns it into the sparse form that is kept and merged, stored in the narrowest
    integer types that hold it exactly (:func:`_narrowed`: 2-byte ids, 1-byte counts for a
    tensor of a few hundred values). ``with_histogram=False``
    keeps counts, sums and extremes only (no quantiles; zeros are not counted apart),
    for values of which only the mean and RMS are wanted.
    """

    count: int = 0
    zeros: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    total: float = 0.0
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    # Sparse histogram of finite non-zero values (bucket ids, sorted, and their counts), and
    # the dense counts of values added since the last compact().
    _buckets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _dense: np.ndarray | None = field(default=None, repr=False, compare=False)
    # False: count, sums and extremes only (no histogram, no quantiles, zeros not counted apart).
    with_histogram: bool = True

    @property
    def buckets(self) -> np.ndarray:
        """Ids of the non-empty buckets, increasing (see :func:`bucket_values`), as int64."""
        return self.compact()._buckets.astype(np.int64, copy=False)

    @property
    def counts(self) -> np.ndarray:
        """How many values each bucket in :attr:`buckets` holds, as int64."""
        return self.compact()._counts.astype(np.int64, copy=False)

    # ---------------------------------------------------------------- filling
    def add(self, values: torch.Tensor) -> None:
        """Add every element of ``values`` (any shape, any floating dtype)."""
        flat = values.detach().reshape(-1)
        if flat.dtype != torch.float32 and flat.dtype != torch.bfloat16:
            flat = flat.to(torch.float32)
        if not kernels.on_host(flat):
            self._add_on_device(flat)
            return
        if kernels.available():
            self._add_compiled(flat)
            return
        for start in range(0, flat.numel(), SKETCH_CHUNK):
            self._add_chunk(flat[start : start + SKETCH_CHUNK])

    def _add_compiled(self, flat: torch.Tensor) -> None:
        """:meth:`add` by the compiled loop (:mod:`ostate.analysis.native.kernels`): float64 sums, one pass."""
        if flat.numel() == 0:
            return
        sums = kernels.SketchSums.empty()
        if not self.with_histogram:
            kernels.sketch_add(flat, None, sums)
        elif self._dense is not None or flat.numel() > _SPARSE_LIMIT:
            if self._dense is None:
                self._dense = np.zeros(_NBUCKETS, np.int64)
            kernels.sketch_add(flat, self._dense, sums)
        else:  # a few values: their buckets sorted, not 65,536 counts
            kernels.sketch_add(flat, None, sums)
            self._merge_buckets(*_sparse_counts(flat))
        self._add_sums(sums)

    def _add_on_device(self, flat: torch.Tensor) -> None:
        """:meth:`add` for a tensor on an accelerator: counts, float64 sums, extremes and the bucket counts
        computed there by torch ops; only those (a few numbers and 65,536 counts) come back to the host."""
        values = flat.float() if flat.dtype == torch.bfloat16 else flat
        finite = torch.isfinite(values)
        nan = torch.isnan(values).sum()
        posinf = (values == math.inf).sum()
        neginf = (values == -math.inf).sum()
        kept = values[finite]
        wide = kept.double()
        count = torch.tensor(kept.numel(), device=values.device)
        nonzero = kept != 0
        extremes = torch.aminmax(kept) if kept.numel() else (wide.new_full((), math.inf), wide.new_full((), -math.inf))
        numbers = torch.stack(
            [
                count.double(),
                (~nonzero).sum().double(),
                nan.double(),
                posinf.double(),
                neginf.double(),
                wide.sum(),
                wide.square().sum(),
                extremes[0].double(),
                extremes[1].double(),
            ]
        ).cpu()
        n, zeros, nans, pos, neg, total, sumsq, lo, hi = numbers.tolist()
        self.count += int(n)
        if self.with_histogram:
            self.zeros += int(zeros)
            ids = bucket_ids(kept[nonzero] if flat.dtype != torch.bfloat16 else flat[finite][nonzero])
            counts = torch.bincount(ids, minlength=_NBUCKETS).cpu().numpy()
            if self._dense is None:
                self._dense = counts.astype(np.int64)
            else:
                np.add(self._dense, counts, out=self._dense)
        self.nan, self.posinf, self.neginf = self.nan + int(nans), self.posinf + int(pos), self.neginf + int(neg)
        self.total += total
        self.sumsq += sumsq
        if n:
            self.min = min(self.min, lo + 0.0)
            self.max = max(self.max, hi + 0.0)

    def _add_sums(self, sums: kernels.SketchSums) -> None:
        self.count += sums.count
        if self.with_histogram:
            self.zeros += sums.zeros
        self.nan, self.posinf, self.neginf = self.nan + sums.nan, self.posinf + sums.posinf, self.neginf + sums.neginf
        self.total += sums.total
        self.sumsq += sums.sumsq
        self.min = min(self.min, sums.min + 0.0)  # + 0.0: a zero extreme is +0.0 whichever zero came first
        self.max = max(self.max, sums.max + 0.0)

    def add_constant(self, value: float, n: int) -> None:
        """Add ``n`` copies of ``value`` without building a tensor."""
        if n <= 0:
            return
        one = Sketch()
        one.add(torch.tensor([value], dtype=torch.float32))
        one.compact()
        if one.count:
            one.count = n
            one.total = value * n
            one.sumsq = value * value * n
            one.zeros *= n
            one._counts = one._counts.astype(np.int64) * n  # stored narrow: widened before it grows
        else:
            one.nan, one.posinf, one.neginf = one.nan * n, one.posinf * n, one.neginf * n
        self.merge(one)

    def _add_chunk(self, chunk: torch.Tensor) -> None:
        n = chunk.numel()
        if n == 0:
            return
        histogram = _Histogram.of(chunk) if self.with_histogram else None
        values = chunk.float() if chunk.dtype == torch.bfloat16 else chunk
        total = float(values.sum())
        if not math.isfinite(total):  # NaN or inf among the values (or a float32 overflow): the slow path
            self._add_nonfinite_chunk(values, histogram)
            return
        lo, hi = (float(v) for v in torch.aminmax(values))
        largest = max(-lo, hi)
        if _TINY <= largest <= _HUGE or largest == 0:
            sumsq = float(values.square().sum())
        else:  # float32 squares would underflow or overflow; float64 ones of float32 values do not
            sumsq = float(values.double().square_().sum())
        if histogram is not None:
            if histogram.has_zero_buckets():  # exact zeros (or the tiniest subnormals) are present
                self.zeros += histogram.remove_zeros(values)
            self._accumulate(histogram)
        self.count += n
        self.total += total
        self.sumsq += sumsq
        self.min = min(self.min, lo + 0.0)
        self.max = max(self.max, hi + 0.0)

    def _add_nonfinite_chunk(self, values: torch.Tensor, histogram: _Histogram | None) -> None:
        nan = int(torch.isnan(values).sum())
        posinf = int((values == math.inf).sum())
        neginf = int((values == -math.inf).sum())
        self.nan, self.posinf, self.neginf = self.nan + nan, self.posinf + posinf, self.neginf + neginf
        finite = values[torch.isfinite(values)] if nan + posinf + neginf else values
        if histogram is not None:
            histogram.remove_nonfinite()
            if finite.numel() and histogram.has_zero_buckets():
                self.zeros += histogram.remove_zeros(finite)
            self._accumulate(histogram)
        if finite.numel() == 0:
            return
        wide = finite.double()  # float32 sums may overflow here; float64 ones do not
        lo, hi = torch.aminmax(finite)
        self.count += finite.numel()
        self.total += float(wide.sum())
        self.sumsq += float(wide.square().sum())
        self.min = min(self.min, float(lo) + 0.0)
        self.max = max(self.max, float(hi) + 0.0)

    def _accumulate(self, histogram: _Histogram) -> None:
        if histogram.dense is None:
            self._merge_buckets(histogram.buckets, histogram.counts)
        elif self._dense is None:
            self._dense = histogram.dense.numpy()  # bincount's fresh tensor: ours to keep
        else:
            np.add(self._dense, histogram.dense.numpy(), out=self._dense)

    def compact(self) -> Sketch:
        """Fold the dense histogram being filled into the sparse one (in place); returns self."""
        if self._dense is not None:
            dense, self._dense = self._dense, None
            nz = np.flatnonzero(dense)
            self._merge_buckets(nz.astype(np.int64), dense[nz].astype(np.int64))
        self._buckets, self._counts = _narrowed(self._buckets, self._counts)
        return self

    @classmethod
    def of_rows(cls, rows: torch.Tensor, *, with_histogram: bool = True) -> list[Sketch]:
        """One compact sketch per row of the 2-D tensor ``rows``, equal to ``Sketch().add(row)`` for each
        row (the same sums, bit for bit), computed in a few passes over all rows at once.

        For checkpoints of very many tiny tensors, where a sketch per tensor would cost far
        more in calls than in arithmetic. Without the compiled loops
        (:mod:`ostate.analysis.native.kernels`), rows holding NaN, infinities or values whose
        squares need rescaling take the one-row path.

        Example:
            >>> rows = torch.tensor([[1.0, 0.0, -2.0], [3.0, 3.0, float("nan")]])
            >>> [(s.count, s.zeros, s.nan, s.max) for s in Sketch.of_rows(rows)]
            [(3, 1, 0, 1.0), (2, 0, 1, 3.0)]
        """
        if rows.dtype != torch.float32 and rows.dtype != torch.bfloat16:
            rows = rows.to(torch.float32)
        k, n = rows.shape
        sketches = [cls(with_histogram=with_histogram) for _ in range(k)]
        if n == 0:
            return sketches
        values = rows.float() if rows.dtype == torch.bfloat16 else rows
        if kernels.available():  # every row's sums as its own add() gives them; non-finite values included
            for s, sums in zip(sketches, kernels.row_sums(values)):
                s._add_sums(sums)
            fast = [True] * k
            counted = torch.isfinite(values) & (values != 0) if with_histogram else None
        else:
            totals = values.sum(1)
            lo, hi = torch.aminmax(values, dim=1)
            largest = torch.maximum(-lo, hi)
            plain = torch.isfinite(totals) & (((largest >= _TINY) & (largest <= _HUGE)) | (largest == 0))
            sumsq = values.square().sum(1)
            fast = plain.tolist()
            totals_, sumsq_, lo_, hi_ = totals.tolist(), sumsq.tolist(), lo.tolist(), hi.tolist()
            nonzero = values != 0
            zeros = (n - nonzero.sum(1)).tolist()
            counted = nonzero & plain[:, None]
            for i, s in enumerate(sketches):
                if fast[i]:
                    s.count, s.total, s.sumsq, s.min, s.max = n, totals_[i], sumsq_[i], lo_[i] + 0.0, hi_[i] + 0.0
                    if with_histogram:
                        s.zeros = zeros[i]
        if with_histogram:
            tagged = (torch.arange(k, dtype=torch.int64)[:, None] << 16) | bucket_ids(rows).to(torch.int64)
            keys, counts = np.unique(tagged[counted].numpy(), return_counts=True)
            ends = np.searchsorted(keys >> 16, np.arange(k), side="right").tolist()
            ids, counts = _narrowed(keys & 0xFFFF, counts)
            begin = 0
            for i, s in enumerate(sketches):
                if fast[i]:
                    s._buckets, s._counts = ids[begin : ends[i]], counts[begin : ends[i]]
                begin = ends[i]
        for i, s in enumerate(sketches):
            if not fast[i]:  # its values were left out of the keys above
                s._add_chunk(rows[i])
                s.compact()
        return sketches

    # ---------------------------------------------------------------- merging
    def _merge_buckets(self, buckets: np.ndarray, counts: np.ndarray) -> None:
        if len(buckets) == 0:
            return
        if len(self._buckets) == 0:
            self._buckets, self._counts = buckets, counts
            return
        self._buckets, self._counts = _add_sparse([(self._buckets, self._counts), (buckets, counts)])

    def merge(self, other: Sketch) -> Sketch:
        """Add ``other`` into this sketch (in place) and return self."""
        self.compact()
        other.compact()
        self.count += other.count
        self.zeros += other.zeros
        self.nan += other.nan
        self.posinf += other.posinf
        self.neginf += other.neginf
        self.total += other.total
        self.sumsq += other.sumsq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.with_histogram = self.with_histogram and other.with_histogram
        self._merge_buckets(other._buckets, other._counts)
        return self

    @classmethod
    def merged(cls, sketches: Iterable[Sketch]) -> Sketch:
        """One sketch holding everything in ``sketches``."""
        out = cls()
        parts = []
        for s in sketches:
            s.compact()
            out.with_histogram = out.with_histogram and s.with_histogram
            out.count += s.count
            out.zeros += s.zeros
            out.nan += s.nan
            out.posinf += s.posinf
            out.neginf += s.neginf
            out.total += s.total
            out.sumsq += s.sumsq
            out.min = min(out.min, s.min)
            out.max = max(out.max, s.max)
            parts.append((s._buckets, s._counts))
        out._buckets, out._counts = _add_sparse(parts)
        return out

    # ---------------------------------------------------------------- reading
    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def values_seen(self) -> int:
        """Every value added: finite ones (``count``, zeros included) and non-finite ones."""
        return self.count + self.nonfinite

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def rms(self) -> float:
        return math.sqrt(self.sumsq / self.count) if self.count else math.nan

    def _sorted_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Bucket values (zero included) in increasing order, and their counts.

        Ids below the sign bit are positive buckets in increasing order; the negative ones
        increase in magnitude, so reversed they increase in value; zero sits between.
        """
        self.compact()
        buckets, counts = self._buckets, self._counts
        split = int(np.searchsorted(buckets, _SIGN))
        values = bucket_values(buckets)
        values = np.concatenate([values[split:][::-1], [0.0], values[:split]])
        counts = np.concatenate([counts[split:][::-1], [self.zeros], counts[:split]])
        return values, counts

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """The values at ranks ``floor(q * (count - 1))`` of the finite values, for each q.

        Exact for q=0 (min) and q=1 (max); otherwise within ``RELATIVE_ERROR`` of the
        true order statistic for normal numbers. NaN for a sketch without a histogram.
        """
        qs = np.asarray(list(qs), np.float64)
        if self.count == 0 or not self.with_histogram:
            return [math.nan] * len(qs)
        values, counts = self._sorted_values()
        ranks = np.floor(qs * (self.count - 1))
        at = np.minimum(np.searchsorted(np.cumsum(counts), ranks, side="right"), len(values) - 1)
        found = np.clip(values[at], self.min, self.max)
        return np.where(qs <= 0, self.min, np.where(qs >= 1, self.max, found)).tolist()

    def quantile(self, q: float) -> float:
        return self.quantiles([q])[0]

    def fraction_at_most(self, threshold: float) -> float:
        """Fraction of finite values ``<= threshold``, to within one bucket."""
        if self.count == 0:
            return math.nan
        values, counts = self._sorted_values()
        return float(counts[values <= threshold].sum()) / self.count

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Bucket midpoints and counts of the finite values, in increasing order (zeros included)."""
        values, counts = self._sorted_values()
        keep = counts > 0
        return values[keep], counts[keep]

    # ---------------------------------------------------------------- exchange
    def to_dict(self) -> dict:
        """A JSON-ready form; :meth:`from_dict` reads it back."""
        self.compact()
        d = {k: getattr(self, k) for k in _SCALARS}
        d["buckets"] = self.buckets.tolist()
        d["counts"] = self.counts.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Sketch:
        s = cls(**{k: d[k] for k in _SCALARS if k in d})
        s._buckets = np.asarray(d["buckets"], np.int64)
        s._counts = np.asarray(d["counts"], np.int64)
        return s


def quantiles_of(sketches: list[Sketch], qs: Iterable[float]) -> list[list[float]]:
    """``[s.quantiles(qs) for s in sketches]``, the same numbers, in a few array passes for all of them.

    Each sketch's buckets (and its zeros) are placed in value order behind the previous
    sketch's, so one cumulative sum and one search find every rank of every sketch.

    Example:
        >>> a, b = Sketch(), Sketch()
        >>> a.add(torch.tensor([1.0, 2.0, 3.0])); b.add(torch.tensor([-1.0, 0.0]))
        >>> quantiles_of([a, b], [0.0, 0.5]) == [a.quantiles([0.0, 0.5]), b.quantiles([0.0, 0.5])]
        True
    """
    qs = np.asarray(list(qs), np.float64)
    out = np.full((len(sketches), len(qs)), np.nan)
    live = [i for i, s in enumerate(sketches) if s.count and s.with_histogram]
    if live:
        chosen = [sketches[i].compact() for i in live]
        lengths = np.array([len(s._buckets) + 1 for s in chosen])  # + the zero entry
        buckets = np.concatenate([s._buckets for s in chosen] + [np.zeros(len(chosen), np.int64)])
        counts = np.concatenate([s._counts for s in chosen] + [np.array([s.zeros for s in chosen], np.int64)])
        owner = np.concatenate([np.repeat(np.arange(len(chosen)), lengths - 1), np.arange(len(chosen))])
        magnitude = buckets & 0x7FFF
        # Value order: negative buckets by decreasing magnitude, then zero, then positive buckets.
        order_in = np.where(buckets & _SIGN, 0x7FFF - magnitude, 0x8001 + magnitude)
        order_in[len(buckets) - len(chosen) :] = 0x8000
        order = np.argsort(owner * 0x10001 + order_in, kind="stable")
        values = np.where(np.arange(len(buckets)) >= len(buckets) - len(chosen), 0.0, bucket_values(buckets))[order]
        cumulative = np.cumsum(counts[order])
        ends = np.cumsum(lengths)
        bases = np.concatenate([[0], cumulative[ends[:-1] - 1]])
        count = np.array([s.count for s in chosen], np.float64)
        low = np.array([s.min for s in chosen])[:, None]
        high = np.array([s.max for s in chosen])[:, None]
        ranks = np.floor(qs[None, :] * (count[:, None] - 1))
        at = np.searchsorted(cumulative, bases[:, None] + ranks, side="right")
        at = np.minimum(at, ends[:, None] - 1)
        found = np.clip(values[at], low, high)
        out[live] = np.where(qs <= 0, low, np.where(qs >= 1, high, found))
    return out.tolist()


# Up to this many values a histogram is counted by sorting them (cost grows with the values);
# beyond, in a dense array of every bucket (a fixed cost of 65,536 counts). Checkpoints of many
# tiny tensors would otherwise pay the fixed cost once per tensor and quantity.
_SPARSE_LIMIT = 4096


@dataclass
class _Histogram:
    """The bucket counts of one chunk: dense (a bincount tensor) or sparse (sorted ids and counts)."""

    dense: torch.Tensor | None
    buckets: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, chunk: torch.Tensor) -> _Histogram:
        ids = bucket_ids(chunk)
        if chunk.numel() > _SPARSE_LIMIT:
            return cls(torch.bincount(ids, minlength=_NBUCKETS), _EMPTY, _EMPTY)
        ordered = np.sort(ids.numpy()).astype(np.int64)
        first = np.empty(len(ordered), bool)  # where a run of equal ids starts (np.unique, with less overhead)
        first[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.empty(len(starts), np.int64)
        np.subtract(starts[1:], starts[:-1], out=counts[:-1])
        counts[-1] = len(ordered) - starts[-1]
        return cls(None, ordered[starts], counts)

    def _count(self, bucket: int) -> int:
        if self.dense is not None:
            return int(self.dense[bucket])
        return int(self.counts[self.buckets == bucket].sum())

    def _subtract(self, bucket: int, k: int) -> None:
        if k == 0:
            return
        if self.dense is not None:
            self.dense[bucket] -= k
        else:
            self.counts[int(np.searchsorted(self.buckets, bucket))] -= k

    def has_zero_buckets(self) -> bool:
        return bool(self._count(0) or self._count(_SIGN))

    def remove_zeros(self, finite: torch.Tensor) -> int:
        """Move exact zeros (+0.0 and -0.0) out of the two smallest buckets; returns how many there were.

        ``finite`` is the chunk's finite values as float32.
        """
        zeros = finite.numel() - int(torch.count_nonzero(finite))
        if zeros == 0:
            return 0
        negative = (
            int(torch.count_nonzero(finite.view(torch.int32) == _NEGATIVE_ZERO_BITS)) if self._count(_SIGN) else 0
        )
        self._subtract(_SIGN, negative)
        self._subtract(0, zeros - negative)
        self._drop_empty()
        return zeros

    def remove_nonfinite(self) -> None:
        """Drop the buckets of infinities and NaNs (they are counted apart)."""
        if self.dense is not None:
            self.dense[_NONFINITE_MAG:_SIGN] = 0
            self.dense[_SIGN + _NONFINITE_MAG :] = 0
        else:
            keep = (self.buckets & 0x7FFF) < _NONFINITE_MAG
            self.buckets, self.counts = self.buckets[keep], self.counts[keep]

    def _drop_empty(self) -> None:
        if self.dense is None:
            keep = self.counts > 0
            self.buckets, self.counts = self.buckets[keep], self.counts[keep]


_EMPTY = np.zeros(0, np.int64)
_IDS = np.dtype(np.uint16)  # every bucket id (0..65535) exactly
_COUNTS = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.int64))


def _narrowed(buckets: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse histogram in the narrowest types that hold it exactly: uint16 ids, and counts in the
    smallest of uint8, uint16, uint32 and int64 that holds the largest count.

    A checkpoint of tens of thousands of tiny parameters keeps a few sketches per parameter, each
    with up to a few hundred buckets: 3 bytes a bucket instead of 16. Every reader widens them to
    int64 before any arithmetic (a concatenation with an int64 array, :attr:`Sketch.counts`, or
    ``astype``), so every statistic is the same.

    Example:
        >>> ids, counts = _narrowed(np.array([3, 65535]), np.array([1, 300]))
        >>> ids.dtype, counts.dtype, counts.tolist()
        (dtype('uint16'), dtype('uint16'), [1, 300])
    """
    if len(counts) == 0 or (buckets.dtype == _IDS and counts.dtype in _COUNTS[:-1]):
        return buckets, counts
    largest = int(counts.max())
    wanted = next(t for t in _COUNTS if largest <= np.iinfo(t).max)
    return buckets.astype(_IDS, copy=False), counts.astype(wanted, copy=False)


def _sparse_counts(flat: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ids (sorted) and counts of the finite non-zero values of a float32 or bfloat16 tensor."""
    bits = (flat.float() if flat.dtype == torch.bfloat16 else flat).view(torch.int32).numpy()
    magnitude = bits & 0x7FFFFFFF
    ids = (bits[(magnitude != 0) & (magnitude < 0x7F800000)] >> 16) & 0xFFFF
    buckets, counts = np.unique(ids, return_counts=True)
    return buckets.astype(np.int64), counts.astype(np.int64)


# Sparse histograms added into the dense counts at once by _add_sparse (bounds its temporary arrays).
_PARTS_AT_ONCE = 1024


def _add_sparse(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The bucket-wise sum of sparse histograms (sorted ids, counts): by sorting when they are small."""
    parts = [(b, c) for b, c in parts if len(b)]
    if not parts:
        return _EMPTY, _EMPTY
    if len(parts) == 1:
        return parts[0]
    total = sum(len(b) for b, _ in parts)
    if total <= _SPARSE_LIMIT:
        ids, where = np.unique(np.concatenate([b for b, _ in parts]), return_inverse=True)
        counts = np.zeros(len(ids), np.int64)
        np.add.at(counts, where, np.concatenate([c for _, c in parts]))
        return ids, counts
    dense = np.zeros(_NBUCKETS, np.int64)
    for start in range(0, len(parts), _PARTS_AT_ONCE):  # narrow parts widened together: fewer, cheaper calls
        group = parts[start : start + _PARTS_AT_ONCE]
        ids = np.concatenate([b for b, _ in group]).astype(np.intp, copy=False)
        np.add.at(dense, ids, np.concatenate([c for _, c in group]).astype(np.int64, copy=False))
    nz = np.flatnonzero(dense)
    return nz.astype(np.int64), dense[nz]
