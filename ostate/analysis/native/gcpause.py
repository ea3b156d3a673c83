"""Pause Python's cyclic garbage collector while a checkpoint's objects are built.

Loading a checkpoint creates an object per tensor, dict and list in it, and keeps them
all. The cyclic collector runs every few hundred new objects and, as they pile up,
walks all of them again and again: for a checkpoint of 400,000 small tensors that is
more than half the loading time (measured: docs/performance.md). Nothing built while
loading forms reference cycles that need collecting, so the collector waits until the
block ends. Reference counting still frees everything else as usual. The analysis
(:func:`ostate.analysis.summarize`) pauses it too: its summaries pile up beside the
checkpoint's objects in the same way.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Inside the block the cyclic garbage collector does not run (if it was on, it is on again after).

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
