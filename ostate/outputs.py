"""Write outputs atomically: a temporary file (or directory) beside the target, renamed into place when complete.

A reader of the target sees either the old file or the complete new one, never a
half-written file, and an interrupted write leaves nothing behind. The new file gets
the permissions a plain ``open()`` would give it (not ``mkstemp``'s private 0600).
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """A temporary directory beside ``path`` to fill; it becomes ``path`` when the block ends
    without an error and is removed otherwise (``path`` is then untouched).

    With ``overwrite`` an existing ``path`` is replaced: it is renamed aside, the new
    directory renamed into place, and only then the old one removed, so an interruption
    leaves either the old or the new directory (and perhaps a ``.ostate-*`` leftover).

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "out")
        >>> with atomic_directory(target) as tmp:
        ...     _ = open(os.path.join(tmp, "a.txt"), "w").write("done")
        >>> os.listdir(target)
        ['a.txt']
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ostate-", suffix=".tmp", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(path)
            aside = tempfile.mkdtemp(prefix=".ostate-old-", dir=parent)
            os.rename(path, os.path.join(aside, "old"))
            os.rename(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, overwrite: bool, out_is_directory: bool = False
) -> None:
    """Raise an :class:`~ostate.errors.OstateError` unless writing ``out`` leaves every input alone.

    Refused: ``out`` equal to an input, inside an input directory, or a directory that
    contains an input (replacing it would delete the input); an existing ``out`` unless
    ``overwrite``; an ``out`` of the other kind (a file where a directory is written, or
    the reverse); a missing parent directory for a file.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); src = os.path.join(d, "ckpt.pt"); _ = open(src, "w").write("x")
        >>> check_output(os.path.join(d, "plot.png"), [src], overwrite=False)
        >>> check_output(os.path.join(d, "inside"), [d], overwrite=True, out_is_directory=True)
        Traceback (most recent call last):
        ...
        ostate.errors.OstateError: ...: the output would be written over or into the input (...)
    """
    out_real = os.path.realpath(out)
    for source in inputs:
        source_real = os.path.realpath(source)
        if out_real == source_real or (os.path.isdir(source_real) and out_real.startswith(source_real + os.sep)):
            raise OstateError(
                "the output would be written over or into the input",
                where=os.fspath(out),
                hint="ostate never writes to its inputs; choose another output path",
            )
        if source_real.startswith(out_real + os.sep):
            raise OstateError(
                "the output directory contains the input",
                where=os.fspath(out),
                hint="ostate never writes to its inputs; choose another output path",
            )
    if os.path.exists(out_real):
        if out_is_directory and not os.path.isdir(out_real):
            raise OstateError("is a file; the output is a directory", where=os.fspath(out))
        if not out_is_directory and os.path.isdir(out_real):
            raise OstateError("is a directory; the output is one file", where=os.fspath(out))
        if not overwrite:
            raise OstateError("already exists", where=os.fspath(out), hint="pass overwrite=True to replace it")
    if not out_is_directory and not os.path.isdir(os.path.dirname(out_real)):
        raise OstateError("the output's directory does not exist", where=os.fspath(out))
