"""Write outputs atomically: a temporary file beside the target, renamed into place when complete.

A reader of the target sees either the old file or the complete new one, never a
half-written file, and an interrupted write leaves nothing behind. The new file gets
the permissions a plain ``open()`` would give it (not ``mkstemp``'s private 0600).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator, Sequence

from ostate.errors import OstateError


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


def check_output(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, overwrite: bool) -> None:
    """Refuse an output path that would write over or into an input, or that cannot be one file.

    Refused: ``out`` is one of ``inputs`` or inside an input directory (ostate never
    writes to its inputs), ``out`` is a directory, ``out`` exists and ``overwrite`` is
    false, or ``out``'s directory does not exist.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); src = os.path.join(d, "ckpt.pt"); _ = open(src, "w").write("x")
        >>> check_output(os.path.join(d, "plot.png"), [src], overwrite=False)
        >>> check_output(src, [src], overwrite=True)
        Traceback (most recent call last):
        ...
        ostate.errors.OstateError: ...: the output would be written over or into the input (...)
    """
    out_real = os.path.realpath(out)
    for source in inputs:
        source_real = os.path.realpath(source)
        if out_real == source_real or (os.path.isdir(source_real) and out_real.startswith(source_real + os.sep)):
            raise OstateError("the output would be written over or into the input", where=os.fspath(out),
                              hint="ostate never writes to its inputs; choose another output path")
    if os.path.isdir(out_real):
        raise OstateError("is a directory; the output is one file", where=os.fspath(out))
    if os.path.exists(out_real) and not overwrite:
        raise OstateError("already exists", where=os.fspath(out), hint="pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(out_real)):
        raise OstateError("the output's directory does not exist", where=os.fspath(out))
