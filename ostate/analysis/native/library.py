"""Find and open the compiled loops' shared library, without torch (``ostate --version`` asks).

:mod:`~ostate.analysis.native.kernels` uses what :func:`load` returns; this module needs
only :mod:`ctypes`, so the program can say whether the loops are usable without paying
for torch's import.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os

# The OSTATE_KERNELS_ABI this module is written for (ostate/analysis/native/_kernels.c).
ABI = 1


class SketchSums(ctypes.Structure):
    """What ``ostate_sketch_f32`` adds to (the C struct ``ostate_sketch_sums``)."""

    _fields_ = [
        ("total", ctypes.c_double),
        ("sumsq", ctypes.c_double),
        ("min", ctypes.c_double),
        ("max", ctypes.c_double),
        ("count", ctypes.c_int64),
        ("zeros", ctypes.c_int64),
        ("nan", ctypes.c_int64),
        ("posinf", ctypes.c_int64),
        ("neginf", ctypes.c_int64),
    ]

    @classmethod
    def empty(cls) -> SketchSums:
        return cls(0.0, 0.0, math.inf, -math.inf, 0, 0, 0, 0, 0)


def load() -> ctypes.CDLL | None:
    """The library built beside this file at install (``_kernels.abi3.so`` or a per-version name), if usable."""
    if os.environ.get("OSTATE_KERNELS", "1") == "0":
        return None
    spec = importlib.util.find_spec("ostate.analysis.native._kernels")
    if spec is None or spec.origin is None:
        return None
    return open_library(spec.origin)


def open_library(path: str) -> ctypes.CDLL | None:
    """The shared library at ``path`` with its functions' signatures declared, or None when it is not
    a build of this version of ``_kernels.c``."""
    try:
        lib = ctypes.CDLL(path)
        if lib.ostate_kernels_abi() != ABI:  # built from another version of _kernels.c
            return None
    except (OSError, AttributeError):  # unloadable, or a stale build without some function
        return None
    pointer, i64, f64p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)
    lib.ostate_sketch_f32.argtypes = [pointer, i64, pointer, ctypes.POINTER(SketchSums)]
    lib.ostate_sketch_f32.restype = None
    lib.ostate_sketch_rows_f32.argtypes = [pointer, i64, i64, pointer]
    lib.ostate_sketch_rows_f32.restype = None
    lib.ostate_q8_blocks.argtypes = [pointer, i64, i64, ctypes.c_int, pointer, pointer, pointer, pointer, f64p]
    lib.ostate_q8_blocks.restype = ctypes.c_int
    lib.ostate_count_at_most.argtypes = [pointer, i64, ctypes.c_float]
    lib.ostate_count_at_most.restype = ctypes.c_int64
    f64 = ctypes.c_double
    lib.ostate_shared_rows.argtypes = [pointer, pointer, pointer, i64, i64, f64, f64, pointer, f64, *[pointer] * 5]
    lib.ostate_shared_rows.restype = None
    return lib


def why_unused() -> str:
    """Why the compiled loops are not in use, in words (when :func:`load` gave None)."""
    if os.environ.get("OSTATE_KERNELS", "1") == "0":
        return "off by OSTATE_KERNELS=0, using torch ops"
    spec = importlib.util.find_spec("ostate.analysis.native._kernels")
    if spec is None or spec.origin is None:
        return "not built, using torch ops"
    return f"{os.path.basename(spec.origin)} not usable (built from another version?), using torch ops"


def status() -> str:
    """Whether the compiled loops can be used, in words (``ostate --version``): ``active``, or why not."""
    return "active" if load() is not None else why_unused()
