"""Read a torch.distributed.checkpoint ``.metadata`` file without running arbitrary code.

torch writes ``.metadata`` with ``pickle.dump`` and reads it with a plain
``pickle.load`` (``torch/distributed/checkpoint/filesystem.py``,
``FileSystemReader.read_metadata``), so a hostile file could run code there. This
unpickler resolves only the classes that file is made of (the dataclasses of
``torch/distributed/checkpoint/metadata.py``, ``filesystem._StorageInfo``,
``torch.Size``, dtypes, layouts and ``pathlib`` paths) and refuses every other global, naming it.
"""

from __future__ import annotations

import importlib
import pathlib
import pickle
import warnings
from typing import Any

import torch

from ostate.errors import OstateError
from ostate.formats.files.torchfile import TRUST_PICKLE_HINT

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
            "StorageMeta",
            "MetadataIndex",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    # megatron-core's planner keeps every rank's save plan in Metadata.all_local_plans (inert dataclasses).
    "torch.distributed.checkpoint.planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    # torch < 2.2 kept these two in the sharded-tensor package.
    "torch.distributed._shard.sharded_tensor.metadata": frozenset({"TensorProperties", "MEM_FORMAT_ENCODING"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),  # maps "torch.strided" to the layout object
    "collections": frozenset({"OrderedDict"}),
    # StorageMeta.checkpoint_id is the save path, pickled as a pathlib object.
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "PureWindowsPath"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "pathlib" and name == "WindowsPath":  # saved on Windows: keep the path text only
            return pathlib.PureWindowsPath
        if name in _ALLOWED.get(module, ()):
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


class _Refused(pickle.UnpicklingError):
    pass


def read_metadata(path: str, *, trust_pickle: bool = False) -> Any:
    """The ``Metadata`` object of a DCP ``.metadata`` file, unpickled with only DCP's own classes allowed.

    Example:
        >>> import tempfile, os, torch
        >>> import torch.distributed.checkpoint as dcp
        >>> d = tempfile.mkdtemp()
        >>> dcp.save({"w": torch.zeros(2, 3)}, checkpoint_id=d, no_dist=True)  # doctest: +ELLIPSIS
        Metadata(...)
        >>> md = read_metadata(os.path.join(d, ".metadata"))
        >>> tuple(md.state_dict_metadata["w"].size)
        (2, 3)
    """
    # start-up time: torch.distributed loads only for DCP checkpoints
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            if trust_pickle:
                warnings.warn(
                    f"{path}: loading with --trust-pickle: any code pickled in this file runs now", stacklevel=2
                )
                metadata = pickle.load(f)
            else:
                metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise OstateError(
            f"the DCP metadata needs Python objects beyond DCP's own classes to load ({e})",
            where=path,
            hint=TRUST_PICKLE_HINT,
        ) from None
    except OSError as e:
        raise OstateError(f"cannot read: {e.strerror}", where=path) from None
    except Exception as e:  # any malformed pickle: truncated, wrong protocol, wrong state
        raise OstateError(
            f"cannot read the DCP metadata: {type(e).__name__}: {e}"[:300],
            where=path,
            hint="the file may be truncated or corrupted",
        ) from None
    if not isinstance(metadata, Metadata):
        raise OstateError(f"the DCP metadata holds a {type(metadata).__name__}, not a Metadata object", where=path)
    problem = _malformed(metadata)
    if problem:
        raise OstateError(f"the DCP metadata is malformed: {problem}", where=path, hint="the file may be corrupted")
    return metadata


def _malformed(metadata: Any) -> str | None:
    """What is wrong with an unpickled ``Metadata``'s fields, if anything.

    Unpickling sets dataclass fields to whatever the file holds; a damaged file can put
    a string where a size belongs. Every field the reader uses is checked here, so that
    the reader can trust the types.
    """
    # start-up time: torch.distributed loads only for DCP checkpoints
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        return "state_dict_metadata is not a dict"
    for key, item in entries.items():
        if not isinstance(key, str):
            return f"an entry's key is a {type(key).__name__}"
        if isinstance(item, BytesStorageMetadata):
            continue
        if not isinstance(item, TensorStorageMetadata):
            return f"entry '{key}' is a {type(item).__name__}"
        properties = getattr(item, "properties", None)
        if not isinstance(properties, TensorProperties) or not isinstance(
            getattr(properties, "dtype", None), torch.dtype
        ):
            return f"entry '{key}' has no dtype"
        chunks = getattr(item, "chunks", None)
        if not _sizes(getattr(item, "size", None)) or not isinstance(chunks, list):
            return f"entry '{key}' has no valid size or chunk list"
        for chunk in chunks:
            if not isinstance(chunk, ChunkStorageMetadata) or not (
                _sizes(getattr(chunk, "offsets", None)) and _sizes(getattr(chunk, "sizes", None))
            ):
                return f"a chunk of '{key}' has no valid offsets or sizes"
    storage = getattr(metadata, "storage_data", None)
    if storage is not None and not isinstance(storage, dict):
        return "storage_data is not a dict"
    for info in (storage or {}).values():
        if not (
            isinstance(getattr(info, "relative_path", None), str)
            and _count(getattr(info, "offset", None))
            and _count(getattr(info, "length", None))
        ):
            return "a storage record has no valid file, offset or length"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sizes(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(_count(d) for d in value)
