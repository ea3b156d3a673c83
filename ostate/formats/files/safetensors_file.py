"""Safetensors files: read the header without the data, tensors one at a time, write by streaming.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte
little-endian header length N, then N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data buffer,
offsets relative to its start. Reading the header costs one small read, so shapes and
dtypes are known before any tensor is touched; a tensor's bytes are read only when a
statistic asks for them. Writing streams one tensor at a time, so a converted file
never needs all its tensors in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open

from ostate.errors import OstateError
from ostate.outputs import atomic_file
from ostate.state import TensorRef

_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: each tensor's dtype and shape, and the string metadata."""

    path: str
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    metadata: dict[str, str]


def is_safetensors(path: str) -> bool:
    """True when the file starts like a safetensors file (a plausible length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= min(_MAX_HEADER_BYTES, os.path.getsize(path) - 8)


def read_header(path: str) -> Header:
    """Parse the header of a safetensors file (no tensor data is read).

    Example:
        >>> import tempfile, os
        >>> from safetensors.torch import save_file
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_file({"w": torch.zeros(2, 3)}, p, metadata={"format": "pt"})
        >>> h = read_header(p)
        >>> h.tensors["w"], h.metadata
        ((torch.float32, (2, 3)), {'format': 'pt'})
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OstateError("not a safetensors file (shorter than its 8-byte header length)", where=path)
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
            raise OstateError(
                "not a safetensors file (implausible header length)",
                where=path,
                hint="the file may be truncated or corrupted",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OstateError(
            f"safetensors header is not valid JSON ({e})", where=path, hint="the file may be truncated or corrupted"
        ) from None
    if not isinstance(header, dict):
        raise OstateError("safetensors header is not a JSON object", where=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise OstateError("safetensors metadata is not a JSON object", where=path)
    data_size = size - 8 - length
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise OstateError(
                f"safetensors header entry '{name}' is malformed",
                where=path,
                hint="dtype must be one of " + ", ".join(DTYPES),
            ) from None
        # The size a shape claims is checked against the file before anything is allocated.
        expected = dtype.itemsize
        for d in shape:
            expected *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != expected:
            raise OstateError(
                f"tensor '{name}' lies outside the file or has the wrong size",
                where=path,
                hint="the file may be truncated or corrupted",
            )
        tensors[name] = (dtype, shape)
        spans.append((begin, end))
    # As safetensors itself requires: the tensors tile the data buffer, no gaps, no overlaps.
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise OstateError(
                "safetensors tensors overlap or leave gaps in the data",
                where=path,
                hint="the file may be truncated or corrupted",
            )
        covered = end
    if covered != data_size:
        raise OstateError(
            f"safetensors data holds {data_size} bytes, its tensors {covered}",
            where=path,
            hint="the file may be truncated or corrupted",
        )
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()})


class SafetensorsFile:
    """Lazy access to the tensors of one safetensors file (opened on the first read)."""

    def __init__(self, path: str, header: Header | None = None):
        self.path = path
        self.header = header or read_header(path)
        self._handle: Any = None

    def tensor(self, name: str) -> torch.Tensor:
        try:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            return self._handle.get_tensor(name)
        except OSError as e:
            raise OstateError(f"cannot read tensor '{name}': {e.strerror or e}", where=self.path) from None
        except Exception as e:  # safetensors' own error type: the file changed or is damaged
            raise OstateError(
                f"cannot read tensor '{name}': {e}", where=self.path, hint="the file may be truncated or corrupted"
            ) from None

    def ref(self, name: str) -> TensorRef:
        """A :class:`TensorRef` for one tensor: shape and dtype from the header, data when read."""
        dtype, shape = self.header.tensors[name]
        return TensorRef(shape, dtype, lambda: self.tensor(name))

    def refs(self, names: Iterable[str] | None = None) -> dict[str, TensorRef]:
        return {name: self.ref(name) for name in (self.header.tensors if names is None else names)}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``F32``, ``BF16``, ...)."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise OstateError(f"safetensors cannot hold tensors of dtype {dtype}") from None


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, TensorRef],
    metadata: Mapping[str, str],
    *,
    progress: Any = None,
) -> None:
    """Write a safetensors file atomically, reading one tensor at a time.

    ``progress`` (optional) has an ``update(nbytes)`` method, as a tqdm bar does.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> write_safetensors(p, {"a": TensorRef.of(torch.arange(3.0))}, {"note": "hi"})
        >>> f = SafetensorsFile(p); f.tensor("a").tolist(), f.header.metadata
        ([0.0, 1.0, 2.0], {'note': 'hi'})
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, ref in tensors.items():
        header[name] = {
            "dtype": dtype_code(ref.dtype),
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + ref.nbytes],
        }
        offset += ref.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned, as safetensors writes it
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, ref in tensors.items():
            tensor = ref.read()
            if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
                raise OstateError(
                    f"tensor '{name}' read as {tuple(tensor.shape)} {tensor.dtype}, expected {ref.shape} {ref.dtype}"
                )
            if tensor.numel():
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[call-overload]  # ndarray is a buffer
            ref.release()
            if progress is not None:
                progress.update(ref.nbytes)
