"""A mergeable 2-D histogram of two non-negative quantities per coordinate, on log-like bins.

The 1-D sketches (:mod:`ostate.analysis.sketch`) hold each quantity's distribution but
not how two of them vary together; the moments plot needs the joint distribution of
(sqrt(v̂), |m̂|) per coordinate. A :class:`JointHistogram` counts
coordinates in cells whose edges are float32 values with only the top two mantissa bits:
on each axis a value ``x`` falls in the bin whose id is the top 10 bits of its float32
magnitude's bit pattern (8 exponent bits and 2 mantissa bits). For normal numbers a bin
spans ``[2**e * f, 2**e * (f + 1/4))`` with ``f`` in 1, 1.25, 1.5, 1.75: four bins per
octave, each at most 25% wide (relative), so a cell's counts are exact and a value's
position is known to within its cell. Exact zeros and values below ``2**-126`` (about
1.2e-38, float32's smallest normal number) share the lowest bin of each axis;
coordinates where either value is NaN or infinite are counted in ``nonfinite``.

While it is filled the histogram is dense (1024 x 1024 int64 counts, 8 MiB), allocated
once per histogram and filled per chunk over the chunk's bounding box of bins only;
:meth:`JointHistogram.compact` turns it into the sparse form that is kept and merged.

Example:
    >>> h = JointHistogram()
    >>> h.add(torch.tensor([1.0, 1.0, 3.0, 0.0]), torch.tensor([0.5, 0.6, 0.1, 0.0]))
    >>> h.total, h.zero_x
    (4, 1)
    >>> x_edges, y_edges, counts = h.grid()
    >>> int(counts.sum()), float(x_edges[0]), float(x_edges[-1])
    (3, 1.0, 3.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

MANTISSA_BITS = 2
BINS_PER_OCTAVE = 1 << MANTISSA_BITS
_SHIFT = 23 - MANTISSA_BITS  # float32 has 23 mantissa bits
AXIS_BINS = 1 << (8 + MANTISSA_BITS)  # every exponent (8 bits) times the kept mantissa bins
# Bins with exponent 0 (zero and subnormals) and exponent 255 (inf and NaN).
_ZERO_IDS = BINS_PER_OCTAVE
_NONFINITE_ID = 255 * BINS_PER_OCTAVE


def axis_ids(values: torch.Tensor) -> torch.Tensor:
    """The bin id (0..1023, int32) of every value's magnitude; ids below 4 are zero or subnormal.

    Example:
        >>> axis_ids(torch.tensor([1.0, 1.3, 2.0, 0.0])).tolist()
        [508, 509, 512, 0]
    """
    bits = values.float().view(torch.int32)
    return torch.bitwise_right_shift(bits, _SHIFT).bitwise_and_(AXIS_BINS - 1)


def bin_edges(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper value of each bin id (float64); the zero bin spans ``[0, 2**-126)``."""
    ids = np.asarray(ids, np.int64)
    lower = (ids.astype(np.uint32) << _SHIFT).view(np.float32).astype(np.float64)
    upper = ((ids.astype(np.uint32) + 1) << _SHIFT).view(np.float32).astype(np.float64)
    zero = ids < _ZERO_IDS
    lower[zero] = 0.0
    upper[zero] = float(np.finfo(np.float32).tiny)
    return lower, upper


@dataclass
class JointHistogram:
    """Counts of coordinates per (x bin, y bin), with zeros and non-finite values apart.

    ``total`` counts every coordinate added; ``nonfinite`` those with NaN or inf in either
    value (not in the cells); ``zero_x`` / ``zero_y`` those whose x / y is zero (or below
    ``2**-126``), which are in the cells of each axis' lowest bin.
    """

    total: int = 0
    nonfinite: int = 0
    # Sparse cells: ids x * AXIS_BINS + y, increasing, and their counts.
    _cells: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _dense: torch.Tensor | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- filling
    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Count each coordinate ``(x[i], y[i])`` (magnitudes are taken; same number of elements)."""
        xs, ys = axis_ids(x.reshape(-1)), axis_ids(y.reshape(-1))
        if xs.numel() != ys.numel():
            raise ValueError(f"x has {xs.numel()} values and y {ys.numel()}")
        if xs.numel() == 0:
            return
        self.total += xs.numel()
        x0, x1 = (int(v) for v in torch.aminmax(xs))
        y0, y1 = (int(v) for v in torch.aminmax(ys))
        height = y1 - y0 + 1
        # Count over the chunk's bounding box of bins only, then add that box into place
        # (int32 arithmetic: the cell index stays below 2**20).
        local = torch.add(ys, xs, alpha=height).sub_(x0 * height + y0)
        counts = torch.bincount(local, minlength=(x1 - x0 + 1) * height).view(x1 - x0 + 1, height)
        if self._dense is None:
            self._dense = torch.zeros(AXIS_BINS, AXIS_BINS, dtype=torch.int64)
        self._dense[x0 : x1 + 1, y0 : y1 + 1] += counts

    def compact(self) -> JointHistogram:
        """Fold the dense counts being filled into the sparse cells (in place); returns self."""
        if self._dense is not None:
            dense, self._dense = self._dense, None
            # NaN and inf on either axis: counted apart, not drawn.
            self.nonfinite += int(dense[_NONFINITE_ID:, :].sum()) + int(dense[:_NONFINITE_ID, _NONFINITE_ID:].sum())
            dense[_NONFINITE_ID:, :] = 0
            dense[:, _NONFINITE_ID:] = 0
            flat = dense.view(-1).numpy()
            cells = np.flatnonzero(flat)
            self._merge_cells(cells.astype(np.int64), flat[cells].astype(np.int64))
        return self

    # ---------------------------------------------------------------- merging
    def _merge_cells(self, cells: np.ndarray, counts: np.ndarray) -> None:
        if len(cells) == 0:
            return
        if len(self._cells) == 0:
            self._cells, self._counts = cells, counts
            return
        self._cells, self._counts = _sum_by_cell(
            np.concatenate([self._cells, cells]), np.concatenate([self._counts, counts])
        )

    def merge(self, other: JointHistogram) -> JointHistogram:
        """Add ``other`` into this histogram (in place) and return self."""
        self.compact()
        other.compact()
        self.total += other.total
        self.nonfinite += other.nonfinite
        self._merge_cells(other._cells, other._counts)
        return self

    @classmethod
    def merged(cls, histograms: Iterable[JointHistogram]) -> JointHistogram:
        """One histogram holding everything in ``histograms``."""
        parts = [h.compact() for h in histograms]
        out = cls(total=sum(h.total for h in parts), nonfinite=sum(h.nonfinite for h in parts))
        if parts:
            out._cells, out._counts = _sum_by_cell(
                np.concatenate([h._cells for h in parts]), np.concatenate([h._counts for h in parts])
            )
        return out

    # ---------------------------------------------------------------- reading
    @property
    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x ids, y ids, counts)`` of the non-empty cells."""
        self.compact()
        return self._cells // AXIS_BINS, self._cells % AXIS_BINS, self._counts

    @property
    def counted(self) -> int:
        """Coordinates in the cells (every finite one)."""
        return int(self.compact()._counts.sum())

    @property
    def zero_x(self) -> int:
        """Coordinates whose x is zero (or below ``2**-126``)."""
        x, _y, counts = self.cells
        return int(counts[x < _ZERO_IDS].sum())

    @property
    def zero_y(self) -> int:
        """Coordinates whose y is zero (or below ``2**-126``)."""
        _x, y, counts = self.cells
        return int(counts[y < _ZERO_IDS].sum())

    @property
    def zero_y_only(self) -> int:
        """Coordinates whose y is zero (or below ``2**-126``) while x is not."""
        x, y, counts = self.cells
        return int(counts[(y < _ZERO_IDS) & (x >= _ZERO_IDS)].sum())

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bin edges and a dense count matrix over the non-empty cells where both values are positive.

        Returns ``(x_edges, y_edges, counts)``: ``counts[i, j]`` coordinates have x in
        ``[x_edges[i], x_edges[i+1])`` and y in ``[y_edges[j], y_edges[j+1])``. Cells with a
        zero on either axis are left out (see :attr:`zero_x`, :attr:`zero_y`). Empty when
        there are no such cells.
        """
        x, y, counts = self.cells
        positive = (x >= _ZERO_IDS) & (y >= _ZERO_IDS)
        x, y, counts = x[positive], y[positive], counts[positive]
        if len(counts) == 0:
            return np.zeros(0), np.zeros(0), np.zeros((0, 0), np.int64)
        xs = np.arange(x.min(), x.max() + 1)
        ys = np.arange(y.min(), y.max() + 1)
        dense = np.zeros((len(xs), len(ys)), np.int64)
        np.add.at(dense, (x - xs[0], y - ys[0]), counts)
        x_lower, x_upper = bin_edges(xs)
        y_lower, y_upper = bin_edges(ys)
        return np.append(x_lower, x_upper[-1]), np.append(y_lower, y_upper[-1]), dense

    # ---------------------------------------------------------------- exchange
    def to_dict(self) -> dict:
        """A JSON-ready form; :meth:`from_dict` reads it back."""
        self.compact()
        return {
            "total": self.total,
            "nonfinite": self.nonfinite,
            "cells": self._cells.tolist(),
            "counts": self._counts.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> JointHistogram:
        h = cls(total=d["total"], nonfinite=d["nonfinite"])
        h._cells = np.asarray(d["cells"], np.int64)
        h._counts = np.asarray(d["counts"], np.int64)
        return h


def _sum_by_cell(cells: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, where = np.unique(cells, return_inverse=True)
    summed = np.zeros(len(unique), np.int64)
    np.add.at(summed, where, counts)
    return unique, summed
