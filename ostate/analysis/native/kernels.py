"""The compiled loops behind :class:`~ostate.analysis.sketch.Sketch` and the 8-bit error, when built.

Two passes over every coordinate cost the most when written as torch ops: filling a
sketch (sum, sum of squares, extremes, zeros, a 65,536-bucket histogram: about eight
passes and a ``bincount``) and the 8-bit round trip of a moment (a dozen passes and two
table look-ups). ``ostate/analysis/native/_kernels.c`` does each in one or two passes; it is
compiled when ostate is installed (``pip install`` needs a C compiler for it) and
reached through :mod:`ctypes`, which releases the GIL, so the analysis threads run it
in parallel.

Without it (no compiler at install time, or ``OSTATE_KERNELS=0`` in the environment)
ostate computes the same statistics with torch ops. Both ways give the same counts,
histograms, extremes and 8-bit codes; sums differ in rounding only: the compiled loops
add in float64, the torch ops in float32 per chunk (tests/test_kernels.py checks the
two against each other, and each against exact float64 sums).

Example:
    >>> import torch
    >>> from ostate.analysis.sketch import Sketch
    >>> s = Sketch(); s.add(torch.tensor([0.0, -2.0, 3.0]))
    >>> (s.count, s.zeros, s.total, s.min, s.max)  # the same with or without the kernels
    (3, 1, 1.0, -2.0, 3.0)
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Literal, overload

import numpy as np
import torch

from ostate.analysis.native import library
from ostate.analysis.native.library import SketchSums

_LIB = library.load()


def available() -> bool:
    """Whether the compiled loops are in use (built, and not switched off by ``OSTATE_KERNELS=0``)."""
    return _LIB is not None


def on_host(x: Any) -> bool:
    """Whether ``x`` (a tensor, or a :class:`~ostate.state.TensorRef`) is in host memory, where these loops
    and numpy reach it; a GPU tensor is summarised with torch ops on its device instead."""
    device = x.device
    return getattr(device, "type", device) == "cpu"


def usable(*tensors: Any) -> bool:
    """Whether the compiled loops are in use and every one of ``tensors`` is in host memory."""
    return _LIB is not None and all(on_host(t) for t in tensors)


def status() -> str:
    """Whether the compiled loops are in use, in words: ``active``, or why not."""
    return "active" if _LIB is not None else library.why_unused()


def load_library(path: str | os.PathLike) -> bool:
    """Use the compiled loops in the shared library at ``path`` from now on; whether they are.

    For the tests of a checkout where ``pip install`` has not built the library: they build
    ``_kernels.c`` into a temporary directory and load it here (tests/conftest.py). False, and
    nothing changed, when ``OSTATE_KERNELS=0`` is set or the file is not a build of this version
    of ``_kernels.c``.
    """
    global _LIB
    lib = None if os.environ.get("OSTATE_KERNELS", "1") == "0" else library.open_library(os.fspath(path))
    if lib is not None:
        _LIB = lib
    return lib is not None


def _float32(values: torch.Tensor) -> torch.Tensor:
    """The values as one contiguous float32 run in CPU memory (the C code reads the pointer)."""
    flat = values.reshape(-1)
    if flat.device.type != "cpu":  # e.g. a live optimizer's state given to ostate.from_state_dict
        flat = flat.cpu()
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat if flat.is_contiguous() else flat.contiguous()


def sketch_add(values: torch.Tensor, hist: np.ndarray | None, sums: SketchSums) -> None:
    """Add every value to ``sums`` and (unless ``hist`` is None) count the finite non-zero ones in
    ``hist``, a C-contiguous int64 array of 65,536 bucket counts (see :mod:`ostate.analysis.sketch`)."""
    flat = _float32(values)
    assert _LIB is not None  # callers check available()
    _LIB.ostate_sketch_f32(
        flat.data_ptr(), flat.numel(), None if hist is None else hist.ctypes.data, ctypes.byref(sums)
    )


def row_sums(rows: torch.Tensor) -> list[SketchSums]:
    """:func:`sketch_add` without a histogram of each row of the 2-D ``rows`` on its own (the same bits)."""
    flat = _float32(rows)
    k, n = rows.shape
    out = (SketchSums * k)(*(SketchSums.empty() for _ in range(k)))
    assert _LIB is not None  # callers check available()
    _LIB.ostate_sketch_rows_f32(flat.data_ptr(), k, n, ctypes.addressof(out))
    return list(out)


@overload
def q8_blocks(
    blocks: torch.Tensor, signed: bool, lo: torch.Tensor, hi: torch.Tensor, *, per_block: Literal[True]
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def q8_blocks(
    blocks: torch.Tensor, signed: bool, lo: torch.Tensor, hi: torch.Tensor, *, per_block: Literal[False]
) -> tuple[float, float]: ...
def q8_blocks(
    blocks: torch.Tensor, signed: bool, lo: torch.Tensor, hi: torch.Tensor, *, per_block: bool
) -> tuple[np.ndarray, np.ndarray] | tuple[float, float]:
    """The 8-bit round trip of each row of ``blocks`` (float32, one block per row) with the nearest-code
    tables ``lo`` and ``hi`` (:func:`ostate.analysis.quantize._candidate_tables`): per block (arrays) or
    summed (two floats), each block's squared error and squared norm in true units."""
    flat = _float32(blocks)
    count, length = blocks.shape
    err, norm = (np.empty(count), np.empty(count)) if per_block else (None, None)
    totals = (ctypes.c_double * 2)(0.0, 0.0)
    assert _LIB is not None  # callers check available()
    refused = _LIB.ostate_q8_blocks(
        flat.data_ptr(),
        count,
        length,
        int(signed),
        lo.data_ptr(),
        hi.data_ptr(),
        None if err is None else err.ctypes.data,
        None if norm is None else norm.ctypes.data,
        totals,
    )
    if refused:
        raise ValueError(f"blocks of at most 256 values, got {length}")
    if per_block:
        assert err is not None and norm is not None
        return err, norm
    return totals[0], totals[1]


def count_at_most(values: torch.Tensor, threshold: float) -> int:
    """How many of ``values`` are ``<= threshold`` (compared in float32; NaN never is)."""
    flat = _float32(values)
    assert _LIB is not None  # callers check available()
    return int(_LIB.ostate_count_at_most(flat.data_ptr(), flat.numel(), threshold))


def shared_rows(
    second_moment: torch.Tensor,
    numerator: torch.Tensor,
    inverse: torch.Tensor,
    n_scales: np.ndarray,
    *,
    s_scale: float,
    eps: float,
    i_scale: float,
    reference: np.ndarray,
    moment: np.ndarray,
    squares: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
) -> None:
    """Add Adam-mini's per-row sums of ``rows`` rows (the tensors viewed as ``rows x length``) to the
    float64 arrays ``moment``, ``squares``, ``first``, ``second`` and fill the NaN entries of
    ``reference`` (see :class:`ostate.analysis.compress.SharedSecondMoment`). ``n_scales``: a
    float32 factor per row for the numerator."""
    rows = len(reference)
    s, n, inv = _float32(second_moment), _float32(numerator), _float32(inverse)
    length = s.numel() // rows if rows else 0
    if not (s.numel() == n.numel() == inv.numel() == rows * length and len(n_scales) == rows):
        raise ValueError("second moment, numerator, inverse denominator and row arrays disagree in size")
    arrays = (reference, moment, squares, first, second)
    if any(a.dtype != np.float64 or len(a) != rows or not a.flags.c_contiguous for a in arrays):
        raise ValueError(f"row arrays must be {rows} contiguous float64 values")
    scales = np.ascontiguousarray(n_scales, np.float32)
    assert _LIB is not None  # callers check available()
    _LIB.ostate_shared_rows(
        s.data_ptr(),
        n.data_ptr(),
        inv.data_ptr(),
        rows,
        length,
        s_scale,
        eps,
        scales.ctypes.data,
        i_scale,
        *(a.ctypes.data for a in arrays),
    )
