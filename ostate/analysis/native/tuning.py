"""Process tuning for the ``ostate`` program: one intra-op thread, freed memory kept, the collector paused.

The library leaves the process as it found it: :func:`ostate.load`, :func:`ostate.analysis.summarize`,
:func:`ostate.compare.compare` and the rest change none of these settings, because inside someone's
training process they are not ostate's to change. The ``ostate`` program owns its process, and runs
each command inside :func:`tuned_process` (``ostate_cli.common.handle_errors``); every figure in
docs/performance.md was measured that way. From Python, the same speed is one ``with`` away:

    >>> import ostate, torch
    >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> with tuned_process():
    ...     df = ostate.analyze(ostate.from_state_dict(opt.state_dict(), model=m))
    >>> len(df)
    2

Its three parts, each usable alone:

- :func:`intra_op_threads`: torch's intra-op threads. ostate runs its own worker threads across
  parameters (``--workers``); one intra-op thread each avoids oversubscribing the cores, and a fixed
  count keeps torch's float reductions in one order, so the ``ostate`` program gives the same numbers
  on every machine.
- :func:`reuse_freed_memory`: glibc's trim and mmap thresholds (Linux).
- :func:`gc_paused`: Python's cyclic garbage collector.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from typing import Iterator

import torch


@contextlib.contextmanager
def tuned_process(threads: int = 1) -> Iterator[None]:
    """Inside the block: torch uses ``threads`` intra-op threads, glibc keeps freed memory for reuse, the
    cyclic garbage collector is paused. Restored on the way out (see each part for how far).

    Example:
        >>> import gc, torch
        >>> before = torch.get_num_threads(), gc.isenabled()
        >>> with tuned_process():
        ...     torch.get_num_threads(), gc.isenabled()
        (1, False)
        >>> (torch.get_num_threads(), gc.isenabled()) == before
        True
    """
    with intra_op_threads(threads), reuse_freed_memory(), gc_paused():
        yield


# ------------------------------------------------------------------------------ torch's threads
@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (the count from before restored after).

    The analysis (:func:`ostate.analysis.summarize`) and ``compare`` run their own threads across
    parameters; with one intra-op thread per worker the cores are not oversubscribed, and a fixed
    count keeps float reductions in one order (torch splits a large reduction among its threads).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ glibc's allocator
# Keep freed memory in the process while the analysis runs (glibc on Linux).
#
# Every chunk's temporaries (a few MB) are allocated and freed thousands of times. With
# glibc's defaults, freed memory at the top of a heap goes back to the OS at once and
# comes back with page faults; mapping and unmapping it also takes a process-wide lock
# that serialises the worker threads (measured: docs/performance.md). Inside
# reuse_freed_memory the trim and mmap thresholds are raised so the same memory is
# reused; at the end the defaults are set again and malloc_trim gives the memory back.
# Elsewhere (other C libraries, other systems) this does nothing.

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

    The trim and mmap thresholds are raised on entry. glibc can neither report its thresholds
    nor turn its dynamic mmap threshold back on once one is set, so on exit its documented
    defaults are set and ``malloc_trim`` gives the memory back: not quite the state found,
    which is why only the ``ostate`` program, owner of its process, does this (:func:`tuned_process`).

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


# ------------------------------------------------------------------------------ the cyclic collector
@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Inside the block the cyclic garbage collector does not run (if it was on, it is on again after).

    Loading a checkpoint creates an object per tensor, dict and list in it, and keeps them
    all. The cyclic collector runs every few hundred new objects and, as they pile up,
    walks all of them again and again: for a checkpoint of 400,000 small tensors that is
    more than half the loading time (measured: docs/performance.md). Nothing built while
    loading forms reference cycles that need collecting, so the collector can wait until the
    block ends. Reference counting still frees everything else as usual. The analysis
    (:func:`ostate.analysis.summarize`) gains in the same way: its summaries pile up beside
    the checkpoint's objects (a third of the time for 10,000 tiny parameters).

    Example:
        >>> with gc_paused():
        ...     gc.isenabled()
        False
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
