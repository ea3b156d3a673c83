"""Keep freed memory in the process while the analysis runs (glibc on Linux).

Every chunk's temporaries (a few MB) are allocated and freed thousands of times. With
glibc's defaults, freed memory at the top of a heap goes back to the OS at once and
comes back with page faults; mapping and unmapping it also takes a process-wide lock
that serialises the worker threads (measured: docs/performance.md). During the
analysis the trim and mmap thresholds are raised so the same memory is reused; at the
end the defaults are set again and ``malloc_trim`` gives the memory back. Elsewhere
(other C libraries, other systems) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator

# glibc's mallopt parameters and their documented defaults.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_TRIM, _DEFAULT_MMAP = 128 * 1024, 128 * 1024
_KEEP_TRIM, _KEEP_MMAP = 1 << 30, 32 << 20


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """While inside, freed memory stays in the process for reuse; given back on exit.

    Example:
        >>> with reuse_freed_memory():
        ...     pass
    """
    if _LIBC is None:
        yield
        return
    _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
        _LIBC.malloc_trim(0)
