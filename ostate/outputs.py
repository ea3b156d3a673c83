"""Write outputs atomically: a temporary file (or directory) beside the target, renamed into place when complete.

A reader of the target sees either the old file or the complete new one, never a
half-written file, and an interrupted write leaves nothing behind. The new file gets
the permissions a plain ``open()`` would give it (not ``mkstemp``'s private 0600).

When the environment refuses the write (no space left, a quota, a read-only file
system, no permission, a directory in the way: :func:`write_refusal` says which), the
temporary file is removed and a :class:`WriteRefused` names the output, what happened
and what to do; the command line prints it as one line and exits with code 2. Every
writer that goes through :func:`atomic_path`, :func:`atomic_file` or
:func:`atomic_directory` gets this. A writer that cannot write atomically (an SQLite
store, a log appended while training runs) wraps its writes in :func:`refused_writes`
for the same message, and cleans up itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import tempfile
from typing import BinaryIO, Iterator, Sequence

from ostate.errors import OstateError

_SPACE_HINT = "free space on that file system, or choose an output path on another one"
_PERMISSION_HINT = "choose an output path in a folder you may write to, or change that folder's permissions"
# errno -> (what happened, what to do)
_REFUSALS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _SPACE_HINT),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or choose an output path elsewhere"),
    errno.EFBIG: (
        "the file grew past the largest file this file system or process allows",
        "choose an output path on another file system, or raise the file size limit (ulimit -f)",
    ),
    errno.EROFS: ("the file system is read-only", "choose an output path on a writable file system"),
    errno.EACCES: ("permission denied", _PERMISSION_HINT),
    errno.EPERM: ("operation not permitted", _PERMISSION_HINT),
    errno.EISDIR: ("a directory is in the way", "name a file, not a directory, or remove that directory"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose an output path whose folders are folders"),
}
# torch.save's zip writer checks its position after each record; a short write (its file object's
# OSError swallowed, or a path written through C++) ends as "[enforce fail at inline_container.cc...]
# unexpected pos N vs M" or "PytorchStreamWriter failed writing file".
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")
_SQLITE = {
    "SQLITE_FULL": ("the disk is full (or a quota is reached)", _SPACE_HINT),
    "SQLITE_READONLY": ("the file or its file system is read-only", _PERMISSION_HINT),
    "SQLITE_CANTOPEN": ("the file cannot be created or opened for writing", _PERMISSION_HINT),
}
_SQLITE_TEXT = {
    "database or disk is full": "SQLITE_FULL",
    "attempt to write a readonly database": "SQLITE_READONLY",
    "unable to open database file": "SQLITE_CANTOPEN",
}


class WriteRefused(OstateError):
    """The environment refused to write an output: ``where`` is the output, ``what`` what happened.

    Example:
        >>> str(WriteRefused("out/r.pt", "no space left on the device", "free space"))
        'out/r.pt: cannot write: no space left on the device (free space)'
    """

    def __init__(self, path: str | os.PathLike, what: str, hint: str):
        self.path = os.fspath(path)
        super().__init__(f"cannot write: {what}", where=self.path, hint=hint)


def write_refusal(error: BaseException, *, inside: Sequence[str | os.PathLike] = ()) -> tuple[str, str] | None:
    """``(what happened, what to do)`` when ``error`` (or an error it wraps) is the environment
    refusing a write, else ``None``.

    Refusals: no space (``ENOSPC``, and torch's ``unexpected pos`` from a short write),
    ``EDQUOT``, ``EFBIG``, ``EROFS``, ``EACCES``, ``EPERM``, ``EISDIR``, ``ENOTDIR``, and
    SQLite's full, read-only and cannot-open errors. An ``OSError`` naming a file counts
    only when that file is one of ``inside`` or under one of them (the output and its
    temporary files; empty: any file), so that an input that cannot be read is not
    mistaken for an output.

    Example:
        >>> write_refusal(OSError(28, "No space left on device"))
        ('no space left on the device', 'free space on that file system, or choose an output path on another one')
        >>> write_refusal(PermissionError(13, "Permission denied", "/data/in.pt"), inside=["/out"]) is None
        True
    """
    short_write = False
    for cause in _causes(error):  # the errno itself when torch's message hides it (its __context__)
        if isinstance(cause, OSError) and cause.errno in _REFUSALS:
            if cause.filename is None or not inside or _under(cause.filename, inside):
                return _REFUSALS[cause.errno]
        elif isinstance(cause, sqlite3.Error):
            name = getattr(cause, "sqlite_errorname", None) or _SQLITE_TEXT.get(str(cause), "")
            for prefix, refusal in _SQLITE.items():
                if name.startswith(prefix):
                    return refusal
        elif isinstance(cause, RuntimeError) and any(text in str(cause) for text in _SHORT_WRITE):
            short_write = True
    if short_write:
        return ("the write stopped short (the file system is full or a quota is reached)", _SPACE_HINT)
    return None


@contextlib.contextmanager
def refused_writes(path: str | os.PathLike, *, inside: Sequence[str | os.PathLike] | None = None) -> Iterator[None]:
    """Turn the environment refusing a write inside the block into a :class:`WriteRefused` naming ``path``.

    ``inside``: the files and folders the block writes (default: ``path``); an ``OSError``
    about another file passes through unchanged (see :func:`write_refusal`). Nothing is
    removed: a writer that is not atomic cleans up itself.

    Example:
        >>> with refused_writes("/full/log.csv"):
        ...     raise OSError(28, "No space left on device")
        Traceback (most recent call last):
        ...
        ostate.outputs.WriteRefused: /full/log.csv: cannot write: no space left on the device (free space ...)
    """
    try:
        yield
    except (OstateError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        refusal = write_refusal(e, inside=[path] if inside is None else inside)
        if refusal is None:
            raise
        raise WriteRefused(path, *refusal) from e


def folder_refusal(directory: str | os.PathLike) -> tuple[str, str] | None:
    """``(what happened, what to do)`` when a new file cannot be made in ``directory`` (tried and
    removed at once), else ``None``: the precise reason behind a library's vaguer message
    (SQLite's "unable to open database file").

    Example:
        >>> import tempfile
        >>> folder_refusal(tempfile.mkdtemp()) is None
        True
    """
    try:
        with tempfile.TemporaryFile(prefix=".ostate-", dir=os.fspath(directory)):
            pass
    except OSError as e:
        return _REFUSALS.get(e.errno or 0)
    return None


def unattributed_refusal(error: BaseException) -> WriteRefused | None:
    """A :class:`WriteRefused` for a refusal that only a write can cause (no space, a quota, the file
    size limit, a read-only file system, a short write, SQLite's full or read-only database), from a
    write that did not go through this module; it names the file the error names, else "an output".
    The command line's last resort: permission and path errors are left alone, since reading can
    cause them too.

    Example:
        >>> str(unattributed_refusal(OSError(30, "Read-only file system", "/ro/x.csv")))
        '/ro/x.csv: cannot write: the file system is read-only (choose an output path on a writable file system)'
    """
    refusal = write_refusal(error)
    reading_too = [_REFUSALS[e] for e in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR)]
    if refusal is None or refusal in reading_too or refusal == _SQLITE["SQLITE_CANTOPEN"]:
        return None
    named = [c.filename for c in _causes(error) if isinstance(c, OSError) and c.filename is not None]
    return WriteRefused(os.fsdecode(named[0]) if named else "an output", *refusal)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, what it was raised from or during, and what a DCP ``CheckpointException`` wraps."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                wrapped = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(wrapped, BaseException):
                    stack.append(wrapped)
        stack += [c for c in (e.__cause__, e.__context__) if c is not None]


def _under(filename: str | bytes | os.PathLike, places: Sequence[str | os.PathLike]) -> bool:
    name = os.path.abspath(os.fsdecode(filename))
    for place in places:
        place = os.path.abspath(os.fspath(place))
        if name == place or name.startswith(place.rstrip(os.sep) + os.sep):
            return True
    return False


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
    suffix = os.path.splitext(path)[1]
    with refused_writes(path, inside=[directory]):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ostate-", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        with refused_writes(path, inside=[tmp, path]):
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
    shown = os.fspath(path)
    path = os.path.abspath(shown)
    parent = os.path.dirname(path)
    with refused_writes(shown, inside=[parent]):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ostate-", suffix=".tmp", dir=parent)
    try:
        with refused_writes(shown, inside=[tmp, path]):
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
