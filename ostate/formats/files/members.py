"""File names that a checkpoint's own metadata supplies, checked to stay inside the checkpoint's folder.

A checkpoint made of several files names them inside its own files: DCP's
``.metadata`` gives each storage record a ``relative_path``, a Hugging Face shard
index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) maps
tensors to shard files in its ``weight_map``, DeepSpeed's ``latest`` names the tag
folder. Those names are input like any other: a hostile or damaged file could name
``../../elsewhere`` or ``/etc/passwd`` and make ostate read (or, when the name builds
an output path, write) outside the checkpoint. Every such name goes through
:func:`member_path` before it is joined to the folder.

The rule is lexical, on the name as written: a relative path, no ``..`` component, no
drive letter, no NUL (``/`` and ``\\`` both count as separators). Symlinks that are
part of the folder itself are the user's own file system and are followed as usual
(the Hugging Face cache links each file to ``../../blobs/<hash>``).
"""

from __future__ import annotations

import os
import re

from ostate.errors import OstateError

_DRIVE = re.compile(r"^[A-Za-z]:")


class OutsideCheckpointError(OstateError):
    """A file name from a checkpoint's metadata that would leave the checkpoint's folder.

    Raised as an :class:`~ostate.errors.OstateError` like every bad input; its own class
    lets a reader that turns other problems of an optional file into a warning (model
    weights beside the optimizer) still refuse this one.
    """


def unsafe_reason(name: object) -> str | None:
    """Why ``name`` is not a relative path inside a folder, or ``None`` when it is.

    Example:
        >>> [unsafe_reason(n) for n in ("__0_0.distcp", "shards/a.bin", "../x", "/etc/passwd", "C:x", "a\\x00")]
        [None, None, "a path with a '..' component", 'an absolute path', 'a path with a drive letter', 'a name with a NUL character']
    """
    if not isinstance(name, str):
        return f"not a file name but {type(name).__name__}"
    if not name:
        return "an empty name"
    if "\x00" in name:
        return "a name with a NUL character"
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        return "an absolute path"
    if _DRIVE.match(name):
        return "a path with a drive letter"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "a path with a '..' component"
    if all(part in ("", ".") for part in parts):
        return "the folder itself, not a file in it"
    return None


def member_path(directory: str, name: object, *, listed_in: str, entry: str) -> str:
    """``directory`` joined with ``name``, a file name read from the checkpoint's metadata;
    an :class:`OutsideCheckpointError` naming ``entry`` when ``name`` would leave ``directory``.

    ``listed_in`` is the metadata file the name came from, ``entry`` what named it there
    (a tensor key, a storage record).

    Example:
        >>> member_path("ckpt", "__0_0.distcp", listed_in="ckpt/.metadata", entry="w")
        'ckpt/__0_0.distcp'
        >>> member_path("ckpt", "../secret.distcp", listed_in="ckpt/.metadata", entry="w")
        Traceback (most recent call last):
        ...
        ostate.formats.files.members.OutsideCheckpointError: ckpt/.metadata: entry 'w' names the file '../secret.distcp' (a path with a '..' component), which is outside the checkpoint's folder (...)
    """
    reason = unsafe_reason(name)
    if reason is not None:
        raise OutsideCheckpointError(
            f"entry {entry!r} names the file {name!r} ({reason}), which is outside the checkpoint's folder",
            where=listed_in,
            hint="a checkpoint names its own files by relative paths inside its folder; "
            "this metadata is damaged or hostile, so nothing outside the folder was read",
        )
    assert isinstance(name, str)
    return os.path.join(directory, name)
