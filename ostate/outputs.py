"""Write outputs atomically: a temporary file beside the target, renamed into place when complete.

A reader of the target sees either the old file or the complete new one, never a
half-written file, and an interrupted write leaves nothing behind. The new file gets
the permissions a plain ``open()`` would give it (not ``mkstemp``'s private 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path in ``path``'s directory to write to (for writers that want a path:
    matplotlib, sqlite, ``torch.save``); it replaces ``path`` when the block ends without an
    error, and is removed otherwise (``path`` is then untouched). The temporary name keeps
    ``path``'s extension, so writers that choose a format by extension still can.

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = open(tmp, "w").write("done")
        >>> open(target).read()
        'done'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".ostate-", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, flushed to disk before it replaces ``path``.

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "out.bin")
        >>> with atomic_file(target) as f:
        ...     _ = f.write(b"done")
        >>> open(target, "rb").read()
        b'done'
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
