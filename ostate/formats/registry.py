"""Every checkpoint layout ostate reads, and how a path is matched to one.

To add a layout, write a module with a ``READER`` (:class:`~ostate.formats.reader.Reader`)
and list it in :data:`READERS`; ``ostate.load``, ``--format-hint`` and the error for an
unrecognised directory pick it up from here.
"""

from __future__ import annotations

import os

from ostate.errors import OstateError
from ostate.formats import accelerate, hf_trainer, safetensors_optim
from ostate.formats.dcp import read as dcp
from ostate.formats.deepspeed import read as deepspeed
from ostate.formats.megatron import read as megatron
from ostate.formats.reader import Reader
from ostate.formats.torch_save import read as torch_save
from ostate.state import Checkpoint

# Most specific first: a tie in score goes to the earlier reader.
READERS: tuple[Reader, ...] = (
    hf_trainer.READER,
    accelerate.READER,
    megatron.READER,
    dcp.READER,
    deepspeed.READER,
    safetensors_optim.READER,
    torch_save.READER,
)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def reader_names() -> list[str]:
    """The names ``--format-hint`` accepts.

    Example:
        >>> reader_names()
        ['hf-trainer', 'accelerate', 'megatron', 'dcp', 'deepspeed', 'safetensors', 'torch']
    """
    return [r.name for r in READERS]


def get_reader(name: str) -> Reader:
    for reader in READERS:
        if reader.name == name:
            return reader
    raise OstateError(f"unknown format '{name}'", hint=f"choose one of: {', '.join(reader_names())}")


def read(path: str, *, trust_pickle: bool = False, format_hint: str | None = None) -> Checkpoint:
    """Read ``path`` with its reader (:func:`choose`).

    A file that the fallback ``torch`` reader read on its own, whose parameters stay
    unnamed, gets a warning when its folder is a checkpoint in another layout: read as
    a whole, the folder names them from the model saved beside the file.
    """
    reader = choose(path, format_hint)
    checkpoint = reader.read(path, trust_pickle=trust_pickle)
    if reader is torch_save.READER and any(p.name_source == "none" for o in checkpoint.optimizers for p in o.params):
        parent = os.path.dirname(os.path.abspath(path))
        layout = _directory_layout(parent)
        if layout is not None:
            checkpoint.warnings.append(
                f"this file is part of a {layout} checkpoint directory; inspect the directory "
                f"({parent}) to get parameter names from the model saved beside it"
            )
    return checkpoint


def _directory_layout(directory: str) -> str | None:
    scored = [(_score(r, directory), r.name) for r in READERS if r is not torch_save.READER]
    score, name = max(scored)
    return name if score > 1 else None


def choose(path: str, format_hint: str | None = None) -> Reader:
    """The reader for ``path``: the one named by ``format_hint``, else the best-scoring one."""
    if format_hint is not None:
        return get_reader(format_hint)
    if not os.path.lexists(path):
        raise OstateError("no such file or directory", where=path)
    if not os.path.exists(path):
        raise OstateError("broken symbolic link", where=path)
    scored = [(_score(reader, path), -i, reader) for i, reader in enumerate(READERS)]
    score, _, best = max(scored, key=lambda s: s[:2])
    if score > 0:
        return best
    raise unrecognised(path)


def unrecognised(path: str) -> OstateError:
    """The error for a directory in no known layout: what it holds, and where to look instead."""
    if not os.access(path, os.R_OK | os.X_OK):
        return OstateError("permission denied", where=path, hint="check the directory's permissions")
    names = _names(path)
    hints = [f"found: {listing(names)}"]
    inner = [n for n in names if os.path.isdir(os.path.join(path, n)) and _recognised(os.path.join(path, n))]
    if inner:
        hints.append(f"these subdirectories are checkpoints: {listing(inner, limit=6)}; pass one of them")
    files = [n for n in names if n.endswith(_CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(path, n))]
    if files and not inner:
        hints.append(f"to read one file, pass it: {listing(files, limit=6)}")
    hints.append(f"readers: {', '.join(reader_names())} (format_hint=NAME forces one; see docs/formats.md)")
    return OstateError("no checkpoint layout recognised in this directory", where=path, hint="; ".join(hints))


def listing(names: list[str], limit: int = 12) -> str:
    """A short, sorted list of names for messages."""
    if not names:
        return "(empty)"
    names = sorted(names)
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _score(reader: Reader, path: str) -> int:
    try:
        return reader.sniff(path)
    except OSError:  # an unreadable directory: the error for it says so
        return 0


def _recognised(path: str) -> bool:
    return any(_score(r, path) > 1 for r in READERS)
