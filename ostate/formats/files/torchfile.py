"""Open a ``torch.save`` file safely: tensors and plain containers only, memory-mapped.

``torch.load(weights_only=True)`` refuses every pickled global outside torch's allow
list, so a hostile file cannot run code. When a file needs more, the error names the
globals that block it (read from the pickle's opcodes, never executed) and the opt-in
that allows them. torchao's low-bit optimizer states and GaLore's projector are admitted as
inert stand-ins (``torchao_state.py``, ``galore_state.py``). Zip-format files (every ``torch.save`` since 1.6) are memory-mapped:
a tensor's bytes are read when it is touched, not when the file is opened.

A zip file is first read by ostate's own reader (:mod:`ostate.formats.files.torch_pickle`:
tensors and plain containers only, many times faster than torch's when a file holds
tens of thousands of tensors); what it does not accept goes to ``torch.load`` as above,
which reads a few more globals or refuses the file with the reasons below.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
from mmap import MAP_SHARED
from typing import Any, BinaryIO, Callable, Sequence, cast

import torch

from ostate.errors import OstateError
from ostate.formats.files.galore_state import GALORE_GLOBALS
from ostate.formats.files.torch_pickle import Unsupported, read_torch_zip
from ostate.formats.files.torchao_state import TORCHAO_GLOBALS

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
TRUST_PICKLE_HINT = "rerun with trust_pickle=True only if you trust where the file came from"


def check_readable_file(path: str) -> None:
    """Raise a clear error unless ``path`` is an existing, readable, non-empty file."""
    if not os.path.lexists(path):
        raise OstateError("no such file or directory", where=path)
    if not os.path.exists(path):
        raise OstateError("broken symbolic link", where=path)
    if os.path.isdir(path):
        raise OstateError("is a directory, expected a checkpoint file", where=path)
    if not os.access(path, os.R_OK):
        raise OstateError("permission denied", where=path, hint="check the file's permissions")
    if os.path.getsize(path) == 0:
        raise OstateError("file is empty", where=path, hint="the checkpoint was not written completely")


def file_kind(path: str) -> str:
    """``zip`` or ``legacy`` for torch files, otherwise a word for what the file looks like."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80":
        return "legacy"
    if len(head) >= 8 and head[8:9] == b"{":
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


# A class allowed to unpickle, under the qualified name the file uses for it.
AllowedGlobal = tuple[Callable[..., Any], str]


def load_torch_file(path: str, *, trust_pickle: bool = False, allowed_globals: Sequence[AllowedGlobal] = ()) -> Any:
    """The object a ``torch.save`` file holds, with tensors memory-mapped where possible.

    ``allowed_globals`` admits a few named classes beyond torch's allow list (a format
    reader's own stand-ins for the classes a library pickles into its files); every
    other pickled global is still refused unless ``trust_pickle``.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"w": torch.ones(2)}, p)
        >>> load_torch_file(p)["w"].tolist()
        [1.0, 1.0]
    """
    check_readable_file(path)
    kind = file_kind(path)
    if kind in ("zip", "legacy"):
        return _load(path, trust_pickle=trust_pickle, mmap=kind == "zip", allowed_globals=allowed_globals)
    what = {
        "safetensors": "a safetensors file, not a torch.save checkpoint",
        "json": "a JSON file, not a torch.save checkpoint",
    }.get(kind, "not a torch.save checkpoint (neither zip nor legacy pickle format)")
    raise OstateError(what, where=path)


def load_torch_stream(stream: BinaryIO, *, where: str, trust_pickle: bool = False, warn: bool = True) -> Any:
    """The object a ``torch.save`` byte stream holds (for example a byte range of a larger file).

    Same safety rules and errors as :func:`load_torch_file`; nothing is memory-mapped.
    ``warn=False`` skips the ``trust_pickle`` warning, for callers that gave it once
    for a whole directory of blobs.

    Example:
        >>> import io
        >>> buffer = io.BytesIO(); torch.save({"lr": 0.1}, buffer); _ = buffer.seek(0)
        >>> load_torch_stream(buffer, where="<buffer>")
        {'lr': 0.1}
    """
    return _load(stream, where=where, trust_pickle=trust_pickle, mmap=False, warn=warn)


def _load(
    source: str | BinaryIO,
    *,
    trust_pickle: bool,
    mmap: bool,
    where: str | None = None,
    warn: bool = True,
    allowed_globals: Sequence[AllowedGlobal] = (),
) -> Any:
    where = where or str(source)
    if trust_pickle and warn:
        warnings.warn(
            f"{where}: loading with --trust-pickle: any code pickled in this file runs now",
            stacklevel=3,
        )
    # torchao's low-bit optimizer state classes and GaLore's projector, always admitted as inert stand-ins
    # (torchao_state.py, galore_state.py).
    if mmap and isinstance(source, str) and not trust_pickle and not allowed_globals:
        try:
            return read_torch_zip(source)
        except Unsupported:
            pass  # torch's own safe reader decides (with the stand-ins below), and its errors say why
    allowed_globals = (*allowed_globals, *TORCHAO_GLOBALS, *GALORE_GLOBALS)
    allowed = {name for _obj, name in allowed_globals}
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            try:
                return torch.load(source, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and _refused_for_lack_of_memory(e)):
                    raise
                # A private (copy-on-write) mapping is charged against memory + swap in full, so
                # Linux refuses one larger than that; a shared mapping of the file is not charged.
                # ostate only reads it (and never writes to an input).
                with torch.serialization.set_default_mmap_options(MAP_SHARED):
                    return torch.load(source, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        blockers = _blockers(source) if not trust_pickle and "Weights only load failed" in text else []
        blockers = [name for name in blockers if name not in allowed]
        if blockers or "Unsupported global" in text:
            listed = ", ".join(blockers) if blockers else _unsupported_global(text)
            raise OstateError(
                f"needs pickled Python objects to load ({listed}); ostate loads only tensors and plain containers by default",
                where=where,
                hint=TRUST_PICKLE_HINT,
            ) from None
        raise OstateError(
            f"cannot read as a torch checkpoint: {_unpickler_reason(text)}",
            where=where,
            hint="the file may be truncated or corrupted",
        ) from None
    except Exception as e:  # a damaged file fails anywhere in torch.load, with any exception type
        reason = _first_line(e) or type(e).__name__
        hint = "the file may be truncated or corrupted"
        if "storage that is not resizable" in reason or "does not match expected size" in reason:
            reason = "a tensor claims more data than the file holds for it"
        elif isinstance(source, str) and file_kind(source) == "zip" and not _zip_has_end(source):
            size = os.path.getsize(source)
            reason = f"the zip archive ends early ({size:,} bytes): the index that torch.save writes last is missing"
            hint = (
                "the file is truncated: an interrupted save, or an incomplete copy or download; copy or save it again"
            )
        elif "PytorchStreamReader failed" in reason:  # torch's message is cut mid-sentence in its first line
            reason = "a record inside the zip archive cannot be read"
        raise OstateError(f"cannot read as a torch checkpoint: {reason}", where=where, hint=hint) from None


def _zip_has_end(path: str) -> bool:
    """Whether the file ends with a zip archive's end record (torch.save writes it last; a cut file lacks it)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 65_557))  # the record (22 bytes) and a comment of up to 64 KiB
        return b"PK\x05\x06" in f.read()


def _blockers(source: str | BinaryIO) -> list[str]:
    if isinstance(source, str):
        return unsafe_globals(source)
    try:
        source.seek(0)
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except Exception:  # a damaged stream: nothing more to say than the load error
        return []


def _refused_for_lack_of_memory(e: RuntimeError) -> bool:
    text = str(e)
    return "unable to mmap" in text and "Cannot allocate memory" in text


def _unsupported_global(text: str) -> str:
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    return match.group(1) if match else "objects outside torch's allow list"


def _unpickler_reason(text: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = match.group(1).strip() if match else text.strip().splitlines()[0]
    return " ".join(reason.split())[:200] or "invalid pickle data"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def unsafe_globals(path: str) -> list[str]:
    """Globals a ``torch.save`` file would import when unpickled, beyond torch's allow list.

    Read from the pickle opcodes without executing anything.
    """
    if file_kind(path) == "zip":
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a damaged archive: nothing more to say than the load error
            return []
    return _legacy_globals(path)


def _legacy_globals(path: str) -> list[str]:
    # A legacy file is a chain of pickles: magic number, protocol, system info, then the object.
    found: list[str] = []
    safe = {f"{m}.{n}" for m, n in _torch_safe_globals()}
    try:
        with open(path, "rb") as f:
            for _ in range(4):
                strings: list[str] = []
                for op, arg, _pos in pickletools.genops(f):
                    if isinstance(arg, str):
                        strings.append(arg)
                    if op.name == "GLOBAL":
                        found.append(cast(str, arg).replace(" ", "."))  # GLOBAL's argument is "module name"
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    if op.name == "STOP":
                        break
    except Exception:
        pass
    out = []
    for name in found:
        if name not in safe and not name.startswith("torch.") and name not in out:
            out.append(name)
    return out


def _torch_safe_globals() -> list[tuple[str, str]]:
    names = [("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "bytes"), ("builtins", "complex")]
    for g in torch.serialization.get_safe_globals():
        if not isinstance(g, tuple):  # (callable, name) pairs are skipped
            names.append((g.__module__, g.__qualname__))
    return names
