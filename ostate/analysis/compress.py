r"""Adam-mini's question: how much would the update change if the second moment were shared?

Adam-mini (Zhang et al. 2024, arXiv 2406.16793) replaces the second moment of every
coordinate in a block :math:`B` by its mean over the block. Since the second moment
is an average of squared gradients, the block mean is exactly what such an optimizer
would have kept. For an adaptive family whose update is
:math:`u_i = n_i / (\sqrt{\hat s_i} + \epsilon)` (Adam: :math:`n = \hat m`,
:math:`\hat s = \hat v`), write :math:`a_i = 1/(\sqrt{\hat s_i} + \epsilon)` and
:math:`a_B = 1/(\sqrt{\bar s_B} + \epsilon)` with :math:`\bar s_B` the block mean. The
relative change of the update is

.. math::
    \text{vmean\_relchange} = \frac{\lVert u - u' \rVert}{\lVert u \rVert}
    = \sqrt{\frac{\sum_B \sum_{i \in B} n_i^2 (a_i - a_B)^2}{\sum_i n_i^2 a_i^2}}

for three choices of blocks: the whole tensor, each row (the first dimension: an
output neuron of a ``Linear``, a token of an ``Embedding``; a 1-D tensor is one row)
and each attention head (:mod:`ostate.analysis.heads`). A constant factor on
:math:`n` cancels.

It is computed in one pass, from per-row sums. For each row :math:`r` the pass keeps
:math:`\sum \hat s`, :math:`S = \sum n^2`, :math:`P = \sum n^2 (a - a^0_r)` and
:math:`Q = \sum n^2 (a - a^0_r)^2` around a reference :math:`a^0_r` (the value of
:math:`a` at the mean of :math:`\hat s` over the first piece of the row seen: the
row's own mean whenever a row fits in one chunk), and for any block then

.. math::
    \sum_{i\in B} n_i^2 (a_i - a_B)^2 = \sum_{r \in B} Q_r - 2 (a_B - a^0_r) P_r + (a_B - a^0_r)^2 S_r ,

which is exact algebra; the shift keeps float32 round-off well below the reported
precision even when the change is small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ostate.analysis.native import kernels
from ostate.optimizers.family import Preconditioned


@dataclass
class SharedSecondMoment:
    """Per-row sums for :math:`\\lVert u - u' \\rVert` of one tensor, filled chunk by chunk.

    ``rows`` and ``row_length`` describe the tensor as a matrix (a 1-D tensor is one row).
    """

    rows: int
    row_length: int
    eps: float = 0.0
    second_moment: np.ndarray = field(init=False, repr=False)
    squares: np.ndarray = field(init=False, repr=False)
    first: np.ndarray = field(init=False, repr=False)
    second: np.ndarray = field(init=False, repr=False)
    reference: np.ndarray = field(init=False, repr=False)
    # A power of two the numerator is multiplied by before squaring (float32 squares of tiny
    # moments would underflow); it cancels in every ratio.
    numerator_scale: float | None = None

    def __post_init__(self) -> None:
        self.second_moment = np.zeros(self.rows)
        self.squares = np.zeros(self.rows)
        self.first = np.zeros(self.rows)
        self.second = np.zeros(self.rows)
        self.reference = np.full(self.rows, np.nan)

    @classmethod
    def for_shape(cls, shape: tuple[int, ...]) -> SharedSecondMoment:
        numel = math.prod(shape)
        rows = shape[0] if len(shape) >= 2 and shape[0] > 0 else 1
        return cls(rows=rows, row_length=max(numel // rows, 1))

    def add(self, start: int, chunk: Preconditioned) -> None:
        """Add the chunk of the flattened tensor that begins at element ``start``."""
        assert chunk.numerator is not None  # callers add only chunks whose numerator the state holds
        self.eps = chunk.eps
        if self.numerator_scale is None:
            largest = float(chunk.numerator.abs().max()) if chunk.numerator.numel() else 0.0
            if largest > 0 and math.isfinite(largest):
                # At most 2**127, which float32 holds (a numerator below 2**-128 is scaled less).
                self.numerator_scale = math.ldexp(1.0, min(-math.frexp(largest)[1], 127))
        length = chunk.second_moment.numel()
        offset = 0
        while offset < length:  # a partial first row, whole rows, a partial last row
            row, within = divmod(start + offset, self.row_length)
            if within:
                take = min(self.row_length - within, length - offset)
                count = 1
            else:
                count = max((length - offset) // self.row_length, 1)
                take = min(count * self.row_length, length - offset)
            piece = slice(offset, offset + take)
            self._add_rows(row, count, chunk, piece)
            offset += take

    def _add_rows(self, row: int, count: int, chunk: Preconditioned, piece: slice) -> None:
        # Sums are kept in true units: s_hat = s * s_scale, a = i * i_scale (i: the family's tensor).
        s_scale, i_scale = chunk.second_moment_scale, chunk.inverse_denominator_scale
        assert chunk.numerator is not None
        rows = slice(row, row + count)
        if kernels.usable(chunk.second_moment, chunk.numerator, chunk.inverse_denominator):
            kernels.shared_rows(
                chunk.second_moment[piece],
                chunk.numerator[piece],
                chunk.inverse_denominator[piece],
                np.full(count, self.numerator_scale or 1.0, np.float32),
                s_scale=s_scale,
                eps=self.eps,
                i_scale=i_scale,
                reference=self.reference[rows],
                moment=self.second_moment[rows],
                squares=self.squares[rows],
                first=self.first[rows],
                second=self.second[rows],
            )
            return
        # Per-row sums come to the host (.cpu(): nothing to do for host tensors); the rows stay where they are.
        moment_sums = chunk.second_moment[piece].reshape(count, -1).sum(1).double().cpu().numpy() * s_scale
        self.second_moment[rows] += moment_sums
        reference = self.reference[rows]
        unset = np.isnan(reference)
        if unset.any():
            mean = moment_sums[unset] / (piece.stop - piece.start) * count
            reference[unset] = 1.0 / (np.sqrt(np.maximum(mean, 0.0)) + self.eps)
            self.reference[rows] = reference
        numerator = chunk.numerator[piece].reshape(count, -1).float()
        n2 = numerator.mul(self.numerator_scale or 1.0).square_()
        # a - a0 = i_scale * (i - a0 / i_scale): one pass, rescaled in the sums below.
        deviation = (
            chunk.inverse_denominator[piece].reshape(count, -1)
            - torch.from_numpy(reference / i_scale).float().to(numerator.device)[:, None]
        )
        weighted = n2 * deviation
        self.squares[rows] += n2.sum(1).double().cpu().numpy()
        self.first[rows] += weighted.sum(1).double().cpu().numpy() * i_scale
        self.second[rows] += weighted.mul_(deviation).sum(1).double().cpu().numpy() * (i_scale * i_scale)

    # ------------------------------------------------------------------ results
    def _block_error(self, block_rows: int) -> float:
        """:math:`\\sum_B \\sum_{i\\in B} n_i^2 (a_i - a_B)^2` for blocks of ``block_rows`` rows."""
        blocks = self.rows // block_rows
        mean = self.second_moment.reshape(blocks, block_rows).sum(1) / (block_rows * self.row_length)
        shared = 1.0 / (np.sqrt(np.maximum(mean, 0.0)) + self.eps)
        shift = np.repeat(shared, block_rows) - self.reference
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite state gives NaN, reported as such
            return float(np.sum(self.second - 2.0 * shift * self.first + shift * shift * self.squares))

    def update_norm_sq(self) -> float:
        """:math:`\\sum_i n_i^2 a_i^2`."""
        r = self.reference
        with np.errstate(invalid="ignore", over="ignore"):
            return float(np.sum(self.second + 2.0 * r * self.first + r * r * self.squares))

    def sums(self, rows_per_head: int | None) -> dict[str, float]:
        """The additive sums behind the ``vmean_*_relchange`` columns (merge by adding)."""
        norm = self.update_norm_sq()
        out = {
            "vmean_update_sq": norm,
            "vmean_tensor_err_sq": self._block_error(self.rows),
            "vmean_row_err_sq": self._block_error(1),
        }
        if rows_per_head and self.rows % rows_per_head == 0:
            out["vmean_head_update_sq"] = norm
            out["vmean_head_err_sq"] = self._block_error(rows_per_head)
        return out


def shared_sums_of(count: int, shape: tuple[int, ...], chunk: Preconditioned) -> list[dict[str, float]]:
    """:meth:`SharedSecondMoment.sums` (no heads) of ``count`` tensors of shape ``shape`` laid end to end
    in ``chunk``, each as if it were the only tensor added: the same numbers, in one pass for all of them.

    Example:
        >>> from ostate.optimizers.family import plain_preconditioned
        >>> v, m = torch.rand(3, 2, 4), torch.randn(3, 2, 4)
        >>> pre = lambda i: plain_preconditioned(m[i].reshape(-1), v[i].reshape(-1), eps=1e-8)
        >>> alone = SharedSecondMoment.for_shape((2, 4)); alone.add(0, pre(1))
        >>> shared_sums_of(3, (2, 4), plain_preconditioned(m.reshape(-1), v.reshape(-1), eps=1e-8))[1] == alone.sums(None)
        True
    """
    one = SharedSecondMoment.for_shape(shape)
    rows, length, eps = one.rows, one.row_length, chunk.eps
    s_scale, i_scale = chunk.second_moment_scale, chunk.inverse_denominator_scale
    assert chunk.numerator is not None  # callers pass only chunks whose numerator the state holds
    numerator = chunk.numerator.reshape(count, -1).float()
    largest = numerator.abs().amax(1).double().numpy()
    usable = (largest > 0) & np.isfinite(largest)
    scale = np.where(usable, np.ldexp(1.0, np.minimum(-np.frexp(np.where(usable, largest, 1.0))[1], 127)), 1.0)
    # flat per row, then (count, rows)
    moment_sums: np.ndarray
    squares: np.ndarray
    first: np.ndarray
    second: np.ndarray
    reference: np.ndarray
    if kernels.available():  # what SharedSecondMoment.add computes for each tensor, in one call
        moment_sums, squares, first, second = (np.zeros(count * rows) for _ in range(4))
        reference = np.full(count * rows, np.nan)
        kernels.shared_rows(
            chunk.second_moment,
            numerator,
            chunk.inverse_denominator,
            np.repeat(scale, rows).astype(np.float32),
            s_scale=s_scale,
            eps=eps,
            i_scale=i_scale,
            reference=reference,
            moment=moment_sums,
            squares=squares,
            first=first,
            second=second,
        )
        squares, first, second = (a.reshape(count, rows) for a in (squares, first, second))
    else:
        moment_sums = chunk.second_moment.reshape(count * rows, -1).sum(1).double().numpy() * s_scale
        mean = moment_sums / (rows * length) * rows
        reference = 1.0 / (np.sqrt(np.maximum(mean, 0.0)) + eps)
        n2 = numerator.mul(torch.from_numpy(scale).float()[:, None]).square_().reshape(count * rows, -1)
        deviation = (
            chunk.inverse_denominator.reshape(count * rows, -1) - torch.from_numpy(reference / i_scale).float()[:, None]
        )
        weighted = n2 * deviation
        squares = n2.sum(1).double().numpy().reshape(count, rows)
        first = (weighted.sum(1).double().numpy() * i_scale).reshape(count, rows)
        second = (weighted.mul_(deviation).sum(1).double().numpy() * (i_scale * i_scale)).reshape(count, rows)
    reference = reference.reshape(count, rows)
    moment_sums = moment_sums.reshape(count, rows)

    def block_error(block_rows: int) -> np.ndarray:
        blocks = rows // block_rows
        mean = moment_sums.reshape(count, blocks, block_rows).sum(2) / (block_rows * length)
        shared = 1.0 / (np.sqrt(np.maximum(mean, 0.0)) + eps)
        shift = np.repeat(shared, block_rows, axis=1) - reference
        return np.sum(second - 2.0 * shift * first + shift * shift * squares, axis=1)

    with np.errstate(invalid="ignore", over="ignore"):  # non-finite state gives NaN, reported as such
        norm = np.sum(second + 2.0 * reference * first + reference * reference * squares, axis=1)
        tensor, row = block_error(rows), block_error(1)
    return [
        {"vmean_update_sq": a, "vmean_tensor_err_sq": b, "vmean_row_err_sq": c}
        for a, b, c in zip(norm.tolist(), tensor.tolist(), row.tolist())
    ]


def relative_change(err_sq: float, norm_sq: float) -> float:
    """:math:`\\sqrt{err/norm}`; 0 when the update is zero everywhere."""
    if norm_sq == 0:
        return 0.0 if err_sq == 0 else math.nan
    return math.sqrt(max(err_sq, 0.0) / norm_sq)
