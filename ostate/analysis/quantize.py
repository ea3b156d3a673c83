r"""How much an 8-bit blockwise quantization (bitsandbytes' 8-bit optimizers) would change a moment.

bitsandbytes stores an 8-bit optimizer's moments as one byte per value plus one
float32 scale per block of 256 consecutive values (of the flattened tensor; the last
block may be shorter). Within a block :math:`b` with :math:`a_b = \max_{i\in b}|x_i|`
each value is normalised, :math:`y_i = x_i / a_b`, and stored as the index of the
nearest of 256 code values :math:`c` of the *dynamic* data type (:func:`dynamic_map`);
it reads back as :math:`c(y_i)\,a_b`. Signed moments (Adam's :math:`m`) use the
signed map, non-negative ones (:math:`v`) the unsigned map, as bitsandbytes does.

The reported figure is the relative L2 error of that round trip over the tensor,

.. math::
    \text{q8\_relerr} = \sqrt{\frac{\sum_b a_b^2 \sum_{i\in b} (y_i - c(y_i))^2}{\sum_i x_i^2}}

computed in float32 per value (the division :math:`x_i/a_b` as bitsandbytes does it)
and summed in float64 (by the compiled loop of :mod:`ostate.analysis.native.kernels`; without
it, torch sums each block in float32 and the blocks in float64). An all-zero block
round-trips exactly. A block holding NaN or infinity makes the figure NaN.

The nearest code is found without a search: every normalised value's bfloat16
bucket (the top 16 bits of its float32 pattern, as in :mod:`ostate.analysis.sketch`)
is narrower than the gap between two codes, so at most one decision boundary (the
midpoint of two neighbouring codes) falls inside a bucket, and the nearest code is
one of the two codes nearest the bucket's ends; the error is the smaller of the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache, lru_cache

import torch

from ostate.analysis.native import kernels
from ostate.analysis.sketch import bucket_ids

BLOCK = 256


@cache
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted code values of bitsandbytes' 8-bit dynamic data type (float32).

    The type of Dettmers (2016, arXiv 1511.04561) as ``bitsandbytes.functional.
    create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`` builds it: for
    each decade :math:`10^{k}`, :math:`k = -6, \\dots, 0`, the midpoints of
    :math:`2^{k+6}` (signed; :math:`2^{k+7}` unsigned) equal steps between 0.1 and 1,
    scaled by :math:`10^{k}` (mirrored to negative values for the signed map), plus 0
    and 1.

    Example:
        >>> code = dynamic_map(signed=True)
        >>> len(code), round(float(code[0]), 6), float(code[-1]), bool((code == 0).any())
        (256, -0.992969, 1.0, True)
    """
    values: list[float] = []
    for k in range(7):
        steps = 2 ** (k if signed else k + 1)
        edges = torch.linspace(0.1, 1, steps + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (k - 6)) * centres
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=8)
def _candidate_tables(code: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every bucket id, the nearest code to each end of the bucket (float32 tables)."""
    values = torch.tensor(code, dtype=torch.float64)
    boundaries = (values[:-1] + values[1:]) / 2
    ids = torch.arange(1 << 16, dtype=torch.int64)
    magnitude = ids & 0x7FFF
    low = (magnitude << 16).to(torch.int32).view(torch.float32).double()
    high = ((magnitude << 16) | 0xFFFF).to(torch.int32).view(torch.float32).double()  # largest float32 in it
    sign = torch.where(ids & 0x8000 != 0, -1.0, 1.0).double()
    ends = torch.stack([low * sign, high * sign])
    finite = torch.isfinite(ends).all(0)
    ends = torch.where(finite, ends, torch.zeros_like(ends))
    nearest = torch.searchsorted(boundaries, ends)  # index of the nearest code, ties to the lower one
    lo_index, hi_index = nearest.min(0).values, nearest.max(0).values
    if int((hi_index - lo_index).max()) > 1:
        raise ValueError("the code values are closer together than a bfloat16 bucket is wide")
    return values[lo_index].float(), values[hi_index].float()


@cache
def _dynamic_tables(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _candidate_tables(tuple(dynamic_map(signed).tolist()))


@dataclass
class BlockwiseError:
    """Accumulates the squared error of the 8-bit round trip of one tensor, chunk by chunk.

    Chunks must start at multiples of :data:`BLOCK` (only the tensor's last chunk may
    end in a partial block). ``code`` replaces the dynamic map (e.g. to compare with
    another implementation).

    Example:
        >>> acc = BlockwiseError(signed=True)
        >>> acc.add(torch.linspace(-1, 1, 1000))
        >>> 0 < acc.relative_error < 0.01
        True
    """

    signed: bool
    code: torch.Tensor | None = None
    error_sq: float = 0.0
    norm_sq: float = 0.0
    _tables: tuple[torch.Tensor, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.code is None:  # one accumulator per moment of every parameter: the tables are shared
            self._tables = _dynamic_tables(self.signed)
        else:
            self._tables = _candidate_tables(tuple(self.code.tolist()))

    def add(self, chunk: torch.Tensor) -> None:
        """Add one chunk of the flattened tensor (float32 or bfloat16)."""
        x = chunk.reshape(-1)
        if x.dtype != torch.float32:
            x = x.float()
        full = (x.numel() // BLOCK) * BLOCK
        if full:
            self._add_blocks(x[:full].view(-1, BLOCK))
        if full < x.numel():
            self._add_blocks(x[full:].view(1, -1))

    def _add_blocks(self, blocks: torch.Tensor) -> None:
        if kernels.usable(blocks):
            error_sq, norm_sq = kernels.q8_blocks(blocks, self.signed, *self._tables, per_block=False)
            self.error_sq += error_sq
            self.norm_sq += norm_sq
            return
        per_block, norms, weights = self._block_terms(blocks)
        self.error_sq += float(torch.dot(per_block, weights))
        self.norm_sq += float(torch.dot(norms, weights))

    def row_sums(self, rows: torch.Tensor) -> tuple[list[float], list[float]]:
        """``error_sq`` and ``norm_sq`` of each row of ``rows`` taken as a tensor of its own (rows at
        most :data:`BLOCK` wide: one block each), as :meth:`add` would give them, for many tiny tensors at once.

        Example:
            >>> rows = torch.linspace(-1, 1, 12).view(3, 4)
            >>> one = BlockwiseError(signed=True); one.add(rows[1])
            >>> BlockwiseError(signed=True).row_sums(rows)[0][1] == one.error_sq
            True
        """
        if rows.shape[1] > BLOCK:
            raise ValueError(f"rows of at most {BLOCK} values, got {rows.shape[1]}")
        rows = rows if rows.dtype == torch.float32 else rows.float()
        if kernels.usable(rows):
            error_sq, norm_sq = kernels.q8_blocks(rows, self.signed, *self._tables, per_block=True)
            return error_sq.tolist(), norm_sq.tolist()
        per_block, norms, weights = self._block_terms(rows)
        return per_block.mul_(weights).tolist(), norms.mul_(weights).tolist()

    def _block_terms(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per block: the squared error and squared norm in units of its maximum, and that maximum squared (float64)."""
        # A non-negative moment needs no abs() (and a negative value in it would be an error anyway).
        absmax = blocks.abs().amax(1) if self.signed else blocks.amax(1)
        scale = absmax.masked_fill(absmax == 0, 1.0)
        y = torch.div(blocks, scale[:, None]).view(-1)
        # Bucket ids; a finite y >= 0 (unsigned map) has no sign bit to mask (one pass fewer).
        # A damaged file can hold negative "non-negative" moments: their ids come out negative.
        if self.signed or not bool(torch.isfinite(absmax).all()):
            ids = bucket_ids(y)
        else:
            ids = torch.bitwise_right_shift(y.view(torch.int32), 16)
            if int(ids.min()) < 0:
                ids = bucket_ids(y)
        if self._tables[0].device != ids.device:  # a tensor on an accelerator: the tables go there, once
            self._tables = (self._tables[0].to(ids.device), self._tables[1].to(ids.device))
        near_lo, near_hi = self._tables
        lo_err = near_lo.index_select(0, ids)
        hi_err = near_hi.index_select(0, ids)
        del ids
        lo_err = torch.sub(y, lo_err, out=lo_err).square_()
        hi_err = torch.sub(y, hi_err, out=hi_err).square_()
        per_block = torch.minimum(lo_err, hi_err, out=lo_err).view(blocks.shape).sum(1)
        # Both sums in units of each block's maximum: no float32 underflow for tiny moments.
        norms = y.square().view(blocks.shape).sum(1)
        return per_block.double(), norms.double(), absmax.double().square()

    def merge(self, other: BlockwiseError) -> BlockwiseError:
        self.error_sq += other.error_sq
        self.norm_sq += other.norm_sq
        return self

    @property
    def relative_error(self) -> float:
        """:math:`\\sqrt{\\sum (x - \\hat x)^2 / \\sum x^2}` (0 for an all-zero tensor)."""
        if self.norm_sq == 0:
            return 0.0 if self.error_sq == 0 else math.nan
        return math.sqrt(self.error_sq / self.norm_sq)
