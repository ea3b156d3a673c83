"""Give the pages of a memory-mapped checkpoint back once a tensor has been read.

``torch.load(mmap=True)`` maps the whole file privately; every page a reader touches
stays mapped, and counted in the process's resident memory, until the mapping goes
away. Streaming a checkpoint larger than memory would then look like using all of
it. After a tensor (or a stretch of it) has been summarised, ``madvise(MADV_DONTNEED)``
drops its pages from this process: for a private file mapping the kernel reads them
again from the page cache or the file if they are touched later, so the data stays
correct; only changes written into those pages in place would be lost, and ostate
never writes to a loaded checkpoint. Only whole pages inside the range are dropped.
On systems other than Linux this does nothing (the pages are clean and the system
reclaims them under memory pressure).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Callable

import torch

_MADV_DONTNEED = 4  # Linux, every architecture


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def drop_pages(address: int, length: int) -> bool:
    """``madvise(MADV_DONTNEED)`` on the whole pages inside ``[address, address + length)``."""
    if _madvise is None or length <= 0:
        return False
    page = mmap.PAGESIZE
    start = -(-address // page) * page
    stop = ((address + length) // page) * page
    if stop <= start:
        return False
    return _madvise(start, stop - start, _MADV_DONTNEED) == 0


def page_releaser(tensor: torch.Tensor) -> Callable[[int, int | None], None] | None:
    """A ``release(start, stop)`` for a tensor that lives in a memory-mapped file (see module doc).

    Elements ``start:stop`` of the flattened tensor are released when the tensor is
    contiguous; otherwise any call releases the whole storage span it reads.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "t.pt")
        >>> torch.save({"w": torch.arange(100_000.0)}, path)
        >>> w = torch.load(path, mmap=True, weights_only=True)["w"]
        >>> before = w.clone(); release = page_releaser(w)
        >>> release(0, None); torch.equal(w, before)
        True
    """
    if _madvise is None or tensor.numel() == 0 or tensor.device.type != "cpu":
        return None
    itemsize = tensor.element_size()
    base = tensor.data_ptr()
    if tensor.is_contiguous():
        numel = tensor.numel()

        def release(start: int = 0, stop: int | None = None) -> None:
            stop = numel if stop is None else min(stop, numel)
            if stop > start:
                drop_pages(base + start * itemsize, (stop - start) * itemsize)

        return release
    storage = tensor.untyped_storage()

    def release_storage(start: int = 0, stop: int | None = None) -> None:
        drop_pages(storage.data_ptr(), storage.nbytes())

    return release_storage
