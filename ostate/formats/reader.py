"""What every format reader provides: a name, a way to recognise its layout, and a way to read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ostate.state import Checkpoint


class ReadFunction(Protocol):
    def __call__(self, path: str, *, trust_pickle: bool = False) -> Checkpoint: ...


@dataclass(frozen=True)
class Reader:
    """One checkpoint layout.

    ``sniff(path)`` looks at names and headers only (never tensor data) and returns 0
    when the path is not in this layout, or a score: 1 for a fallback that accepts
    anything of the right kind, 2 for a layout recognised by its files, 3 for one
    recognised by files only it writes. The highest score wins; ties go to the reader
    listed first in :data:`ostate.formats.registry.READERS`. ``read`` builds the
    :class:`~ostate.state.Checkpoint` with lazy tensors.
    """

    name: str
    summary: str
    sniff: Callable[[str], int]
    read: ReadFunction
