"""Histograms for display, re-binned from a sketch's bfloat16 buckets onto log-spaced bins.

A :class:`~ostate.analysis.Sketch` counts values exactly per bfloat16 bucket (relative
width :math:`2^{-7}`, 0.78%; 295 buckets per decade). A display bin gets the whole count
of every bucket whose midpoint lies in it, so display counts are exact at bucket
granularity: they are the counts of the values' bucket midpoints, and a value sits
within 0.39% of its midpoint. Display bins are log-spaced at ``per_decade`` bins per
decade (at most 20, so each holds at least about 15 buckets and the bucket boundaries
make at most a few percent of jitter between neighbouring bins). Zeros and negative
values have no place on a log axis; they are counted apart (:class:`Positive`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ostate.analysis.sketch import Sketch

MAX_PER_DECADE = 20
MIN_PER_DECADE = 4
TARGET_BINS = 60


@dataclass
class Positive:
    """The positive part of a sketch's histogram: bucket midpoints and counts, and what was left out."""

    values: np.ndarray
    counts: np.ndarray
    zeros: int
    negative: int
    nonfinite: int

    @classmethod
    def of(cls, sketch: Sketch) -> Positive:
        """Split ``sketch``'s histogram at zero.

        Example:
            >>> import torch
            >>> s = Sketch(); s.add(torch.tensor([0.0, 1.0, 2.0, -1.0]))
            >>> p = Positive.of(s); p.counts.tolist(), p.zeros, p.negative
            ([1, 1], 1, 1)
        """
        values, counts = sketch.histogram()
        keep = values > 0
        return cls(values[keep], counts[keep], int(sketch.zeros), int(counts[values < 0].sum()), sketch.nonfinite)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def left_out(self) -> str:
        """What a log axis cannot show, in words ('' when nothing).

        Example:
            >>> Positive(np.zeros(0), np.zeros(0, np.int64), 3, 0, 1).left_out()
            'not drawn: 3 zero, 1 NaN/inf'
        """
        parts = [
            f"{n:,} {what}"
            for n, what in ((self.zeros, "zero"), (self.negative, "negative"), (self.nonfinite, "NaN/inf"))
            if n
        ]
        return "not drawn: " + ", ".join(parts) if parts else ""


def log_edges(values: Iterable[float], *, per_decade: int | None = None) -> np.ndarray:
    """Log-spaced bin edges at ``10**(k / per_decade)`` that cover every positive value given.

    ``per_decade`` defaults to about :data:`TARGET_BINS` bins over the values' span,
    between :data:`MIN_PER_DECADE` and :data:`MAX_PER_DECADE`.

    Example:
        >>> log_edges([0.02, 0.5], per_decade=2).round(4).tolist()
        [0.01, 0.0316, 0.1, 0.3162, 1.0]
    """
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return np.array([0.1, 1.0, 10.0])
    lo, hi = math.log10(min(positive)), math.log10(max(positive))
    if per_decade is None:
        span = max(hi - lo, 1e-9)
        per_decade = int(min(MAX_PER_DECADE, max(MIN_PER_DECADE, round(TARGET_BINS / span))))
    first = math.floor(lo * per_decade)
    last = max(math.floor(hi * per_decade) + 1, first + 1)
    return 10.0 ** (np.arange(first, last + 1) / per_decade)


def rebin(values: np.ndarray, counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The total count of ``values`` (bucket midpoints) in each bin ``[edges[i], edges[i+1])``.

    Values outside the edges go to the first or last bin (:func:`log_edges` covers them,
    up to the rounding of its edges), so the counts add up to ``counts.sum()``.

    Example:
        >>> rebin(np.array([1.5, 2.5, 3.5]), np.array([2, 3, 4]), np.array([1.0, 3.0, 4.0])).tolist()
        [5, 4]
    """
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    out = np.zeros(len(edges) - 1, np.int64)
    np.add.at(out, index, np.asarray(counts, np.int64))
    return out
