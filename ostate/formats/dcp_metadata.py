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
from ostate.formats.torchfile import TRUST_PICKLE_HINT

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING", "StorageMeta", "MetadataIndex",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
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
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            if trust_pickle:
                warnings.warn(f"{path}: loading with --trust-pickle: any code pickled in this file runs now",
                              stacklevel=2)
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
        raise OstateError(f"cannot read the DCP metadata: {type(e).__name__}: {e}"[:300], where=path,
                          hint="the file may be truncated or corrupted") from None
    if not isinstance(metadata, Metadata):
        raise OstateError(f"the DCP metadata holds a {type(metadata).__name__}, not a Metadata object", where=path)
    return metadata
