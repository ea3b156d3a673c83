"""ostate's own reader of a ``torch.save`` zip file: the pickled index read without running anything.

``torch.load(weights_only=True)`` is safe but reads the pickle with torch's pure-Python
unpickler and builds each tensor through its storage machinery: on a checkpoint of
50,000 parameters (a mixture of experts keeps every expert's matrices apart) that is
most of the time ``ostate inspect`` takes. This reader understands only what
``torch.save`` writes for tensors and plain containers, and refuses everything else
(:class:`Unsupported`, with the reason; :func:`ostate.formats.files.torchfile.load_torch_file`
then hands the file to torch's own safe reader, which accepts a few more globals or
says clearly why it refuses the file):

- opcodes: those the pickler writes with protocol 2 (torch.save's) for dicts, lists,
  tuples, strings, numbers, booleans and ``None``, memo gets and puts, ``GLOBAL``,
  ``REDUCE``, ``BINPERSID``, and ``BUILD`` only to set the plain
  attributes of an ``OrderedDict`` (a module's ``state_dict()`` carries its
  ``_metadata`` so). Any other opcode (``INST``, ``OBJ``, ``NEWOBJ``, the text forms,
  ``FRAME``, ``STACK_GLOBAL``, ...) is refused, the opcodes of later protocols
  (which torch's safe reader does not read either) included.
- globals: a name is looked up in :data:`_GLOBALS` (``collections.OrderedDict``,
  ``torch._utils._rebuild_tensor_v2`` and ``_rebuild_parameter``, the typed storage
  classes, ``_codecs.encode`` for bytes), which maps it to a function of this module;
  no module is imported and no pickled name is ever called. Any other global is
  refused.
- persistent ids: ``('storage', <storage class>, key, location, numel)`` naming a
  record of the archive that is stored uncompressed and holds ``numel`` elements.
- tensors: every size, stride and offset is checked against its storage's record
  before a view is made; nothing else is checked by trying.

Nothing is read from a tensor's data: the file is memory-mapped (privately, so a
change made in place never reaches it) and each tensor is a view of its bytes there,
exactly as ``torch.load(mmap=True)`` returns, with the same values, shapes, strides
and shared storages. The whole pickle is read into memory (it is the index, small next
to the data), and the archive's directory is parsed with :mod:`zipfile`.
"""

from __future__ import annotations

import mmap
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

# torch.save's typed storage classes, by name: the dtype their records hold.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class Unsupported(Exception):
    """The file holds something this reader does not read (the message says what); nothing was run."""


@dataclass(frozen=True)
class _Global:
    """What a ``GLOBAL`` opcode pushes: a name of :data:`_GLOBALS`, never the object it names in Python."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """A storage record of the archive: its elements as a 1-D tensor (a view of the mapped file)."""

    data: torch.Tensor
    location: str


class TorchArchive:
    """The records of a memory-mapped zip archive, each a view of the file's bytes."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            try:
                self.zip = zipfile.ZipFile(f)
                infos = self.zip.infolist()
            except Exception as e:  # a damaged directory fails in zipfile with many types (NotImplementedError too)
                raise Unsupported(f"not a readable zip archive ({type(e).__name__}: {e})") from None
            try:
                # Private and writable: a tensor changed in place never changes the file. A mapping
                # larger than memory + swap is refused by Linux; torch's reader then maps it shared.
                self.map = map_privately(f.fileno())
            except (OSError, ValueError) as e:
                raise Unsupported(f"cannot memory-map the file ({e})") from None
        pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise Unsupported("no single <archive>/data.pkl record")
        self.prefix = pickles[0].filename[: -len("data.pkl")]
        self.records = {i.filename: i for i in infos}
        self.storages: dict[str, torch.Tensor] = {}  # by key: tensors that share a storage share it here too
        order = self.records.get(self.prefix + "byteorder")
        if order is not None and self.read(order) != sys.byteorder.encode():
            raise Unsupported("written with the other byte order")

    def span(self, info: zipfile.ZipInfo) -> tuple[int, int]:
        """Where a record's bytes are in the file: (start, length)."""
        if info.compress_type != zipfile.ZIP_STORED:
            raise Unsupported(f"record {info.filename} is compressed")
        start = info.header_offset
        header = self.map[start : start + 30]
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise Unsupported(f"record {info.filename}: no local header where the directory says")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        begin = start + 30 + name_length + extra_length
        if begin + info.file_size > len(self.map):
            raise Unsupported(f"record {info.filename} runs past the end of the file")
        return begin, info.file_size

    def read(self, info: zipfile.ZipInfo) -> bytes:
        begin, length = self.span(info)
        return self.map[begin : begin + length]

    def pickle(self) -> bytes:
        return self.read(self.records[self.prefix + "data.pkl"])

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A storage record as a 1-D tensor of ``numel`` elements, a view of the mapped file (its own storage)."""
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.numel() != numel:
                raise Unsupported(f"storage {key!r} named with two types or sizes")
            return known
        info = self.records.get(f"{self.prefix}data/{key}")
        if info is None:
            raise Unsupported(f"storage {key!r} has no record in the archive")
        begin, length = self.span(info)
        if numel < 0 or numel * dtype.itemsize > length:
            raise Unsupported(f"storage {key!r} claims {numel} elements; its record holds {length} bytes")
        data = (
            torch.frombuffer(self.map, dtype=dtype, count=numel, offset=begin) if numel else torch.empty(0, dtype=dtype)
        )
        self.storages[key] = data
        return data


def map_privately(fileno: int) -> mmap.mmap:
    """The whole file, mapped private and writable (copy on write: never written back)."""
    return mmap.mmap(fileno, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def read_torch_zip(path: str) -> Any:
    """The object a zip-format ``torch.save`` file holds, its tensors memory-mapped views.

    Raises :class:`Unsupported` for anything outside what this reader accepts (module
    doc); nothing in the file is ever run.

    Example:
        >>> import os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"w": torch.arange(4.0), "lr": 0.1}, p)
        >>> loaded = read_torch_zip(p)
        >>> loaded["w"].tolist(), loaded["lr"]
        ([0.0, 1.0, 2.0, 3.0], 0.1)
    """
    archive = TorchArchive(path)
    return unpickle(archive.pickle(), archive.storage)


# ------------------------------------------------------------------------------ the unpickler
def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, *rest: Any):
    if type(storage) is not _Storage or type(offset) is not int or offset < 0 or requires_grad not in (True, False):
        raise Unsupported("_rebuild_tensor_v2 with arguments torch.save does not write")
    if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride):
        raise Unsupported("_rebuild_tensor_v2 with a size or stride that is not a tuple")
    if hooks != _NO_HOOKS or len(rest) > 1 or (rest and rest[0] not in (None, {})):
        raise Unsupported("a tensor with backward hooks or metadata")
    data = storage.data
    last = offset
    empty = False
    for d, s in zip(size, stride):
        if type(d) is not int or type(s) is not int or d < 0 or s < 0:
            raise Unsupported("a tensor whose size or stride is not a tuple of non-negative integers")
        empty = empty or d == 0
        last += (d - 1) * s
    if not empty and last >= data.numel():
        raise Unsupported(
            f"a tensor of size {size} at offset {offset} reaches element {last}; its storage holds {data.numel()}"
        )
    tensor = torch.as_strided(data, size, stride, offset)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


_NO_HOOKS: OrderedDict = OrderedDict()


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or requires_grad not in (True, False) or hooks != _NO_HOOKS:
        raise Unsupported("_rebuild_parameter with arguments torch.save does not write")
    return torch.nn.Parameter(data, requires_grad)


def _ordered_dict(*args: Any) -> OrderedDict:
    if args:
        raise Unsupported("OrderedDict built from arguments (torch.save writes its items after it)")
    return OrderedDict()


def _encode(text: Any, encoding: Any = None) -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding != "latin1":
        raise Unsupported("_codecs.encode with arguments other than (str, 'latin1')")
    return text.encode("latin1")


def _storage_class(*_args: Any) -> Any:
    raise Unsupported("a storage class called outside a persistent id")


_GLOBALS: dict[str, Callable[..., Any]] = {
    "collections.OrderedDict": _ordered_dict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "_codecs.encode": _encode,
    **{f"torch.{name}": _storage_class for name in _STORAGE_DTYPES},
}


def _global(module: str, name: str) -> _Global:
    qualified = f"{module}.{name}"
    if qualified not in _GLOBALS:
        raise Unsupported(f"global {qualified} is not one torch.save writes for tensors and plain containers")
    return _Global(qualified)


# Opcodes, by byte value (pickletools' names).
_PROTO, _STOP = 0x80, ord(".")
_MARK, _EMPTY_DICT, _EMPTY_LIST, _EMPTY_TUPLE = ord("("), ord("}"), ord("]"), ord(")")
_TUPLE, _TUPLE1, _TUPLE2, _TUPLE3 = ord("t"), 0x85, 0x86, 0x87
_SETITEM, _SETITEMS, _APPEND, _APPENDS = ord("s"), ord("u"), ord("a"), ord("e")
_BINPUT, _LONG_BINPUT, _BINGET, _LONG_BINGET = ord("q"), ord("r"), ord("h"), ord("j")
_BININT, _BININT1, _BININT2, _LONG1, _LONG4 = ord("J"), ord("K"), ord("M"), 0x8A, 0x8B
_BINFLOAT, _NONE, _NEWTRUE, _NEWFALSE = ord("G"), ord("N"), 0x88, 0x89
_BINUNICODE, _GLOBAL, _REDUCE, _BINPERSID, _BUILD = ord("X"), ord("c"), ord("R"), ord("Q"), ord("b")

_unpack_int = struct.Struct("<i").unpack_from
_unpack_uint = struct.Struct("<I").unpack_from
_unpack_short = struct.Struct("<H").unpack_from
_unpack_double = struct.Struct(">d").unpack_from


def unpickle(data: bytes, storage: Callable[[str, torch.dtype, int], torch.Tensor]) -> Any:
    """The object pickled in ``data`` (the opcodes and globals of the module doc only).

    ``storage(key, dtype, numel)`` gives a persistent id's storage as a 1-D tensor.
    Raises :class:`Unsupported` for anything else, a damaged or truncated stream included.

    Example:
        >>> import pickle
        >>> unpickle(pickle.dumps({"a": [1, 2.5, None, (True, "x")]}, protocol=2), lambda *a: None)
        {'a': [1, 2.5, None, (True, 'x')]}
        >>> unpickle(pickle.dumps(print, protocol=2), lambda *a: None)
        Traceback (most recent call last):
        ...
        ostate.formats.files.torch_pickle.Unsupported: global __builtin__.print is not one torch.save writes for tensors and plain containers
    """
    try:
        return _unpickle(data, storage)
    except Unsupported:
        raise
    except (IndexError, KeyError, TypeError, ValueError, struct.error, UnicodeDecodeError, RecursionError) as e:
        raise Unsupported(f"a damaged pickle ({type(e).__name__}: {e})") from None


def _unpickle(data: bytes, storage: Callable[[str, torch.dtype, int], torch.Tensor]) -> Any:  # noqa: C901
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    push = stack.append
    end = len(data)
    pos = 0
    while pos < end:
        op = data[pos]
        pos += 1
        if op == _BINPUT:
            memo[data[pos]] = stack[-1]
            pos += 1
        elif op == _BINGET:
            push(memo[data[pos]])
            pos += 1
        elif op == _BININT1:
            push(data[pos])
            pos += 1
        elif op == _BINUNICODE:
            (n,) = _unpack_uint(data, pos)
            pos += 4
            if pos + n > end:
                raise Unsupported(f"a string of {n} bytes runs past the end of the pickle")
            push(data[pos : pos + n].decode("utf-8", "surrogatepass"))
            pos += n
        elif op == _MARK:
            marks.append(len(stack))
        elif op == _TUPLE:
            k = marks.pop()
            items = tuple(stack[k:])
            del stack[k:]
            push(items)
        elif op == _TUPLE2:
            b = stack.pop()
            stack[-1] = (stack[-1], b)
        elif op == _TUPLE1:
            stack[-1] = (stack[-1],)
        elif op == _TUPLE3:
            c = stack.pop()
            b = stack.pop()
            stack[-1] = (stack[-1], b, c)
        elif op == _EMPTY_TUPLE:
            push(())
        elif op == _REDUCE:
            args = stack.pop()
            function = stack[-1]
            if type(function) is not _Global or type(args) is not tuple:
                raise Unsupported("REDUCE of something that is not an allowed global")
            stack[-1] = _GLOBALS[function.name](*args)
        elif op == _BINPERSID:
            stack[-1] = _persistent(stack[-1], storage)
        elif op == _NEWFALSE:
            push(False)
        elif op == _NEWTRUE:
            push(True)
        elif op == _NONE:
            push(None)
        elif op == _SETITEMS:
            k = marks.pop()
            target = stack[k - 1]
            if type(target) is not dict and type(target) is not OrderedDict:
                raise Unsupported("SETITEMS on something that is not a dict")
            pairs = stack[k:]
            del stack[k:]
            if len(pairs) % 2:
                raise Unsupported("SETITEMS with a key without a value")
            for i in range(0, len(pairs), 2):
                target[pairs[i]] = pairs[i + 1]
        elif op == _SETITEM:
            value = stack.pop()
            key = stack.pop()
            target = stack[-1]
            if type(target) is not dict and type(target) is not OrderedDict:
                raise Unsupported("SETITEM on something that is not a dict")
            target[key] = value
        elif op == _EMPTY_DICT:
            push({})
        elif op == _EMPTY_LIST:
            push([])
        elif op == _APPENDS:
            k = marks.pop()
            target = stack[k - 1]
            if type(target) is not list:
                raise Unsupported("APPENDS on something that is not a list")
            target.extend(stack[k:])
            del stack[k:]
        elif op == _APPEND:
            value = stack.pop()
            if type(stack[-1]) is not list:
                raise Unsupported("APPEND on something that is not a list")
            stack[-1].append(value)
        elif op == _BININT:
            push(_unpack_int(data, pos)[0])
            pos += 4
        elif op == _BININT2:
            push(_unpack_short(data, pos)[0])
            pos += 2
        elif op == _BINFLOAT:
            push(_unpack_double(data, pos)[0])
            pos += 8
        elif op == _LONG1 or op == _LONG4:
            if op == _LONG1:
                n = data[pos]
                pos += 1
            else:
                (n,) = _unpack_int(data, pos)
                pos += 4
            if n < 0 or n > 64 or pos + n > end:  # torch.save's integers fit in far fewer bytes
                raise Unsupported(f"an integer of {n} bytes")
            push(int.from_bytes(data[pos : pos + n], "little", signed=True))
            pos += n
        elif op == _LONG_BINPUT:
            memo[_unpack_uint(data, pos)[0]] = stack[-1]
            pos += 4
        elif op == _LONG_BINGET:
            push(memo[_unpack_uint(data, pos)[0]])
            pos += 4
        elif op == _BUILD:
            # Only what a module's state dict carries: its OrderedDict's ``_metadata`` attribute.
            state = stack.pop()
            target = stack[-1]
            if type(target) is not OrderedDict or type(state) is not dict:
                raise Unsupported("BUILD of something other than an OrderedDict's attributes")
            if any(type(k) is not str or k.startswith("__") for k in state):
                raise Unsupported("BUILD setting an attribute that is not a plain name")
            target.__dict__.update(state)
        elif op == _GLOBAL:
            stop = data.index(b"\n", pos)
            module = data[pos:stop].decode("ascii")
            after = data.index(b"\n", stop + 1)
            name = data[stop + 1 : after].decode("ascii")
            pos = after + 1
            push(_global(module, name))
        elif op == _PROTO:
            if not 2 <= data[pos] <= 4:
                raise Unsupported(f"pickle protocol {data[pos]}")
            pos += 1
        elif op == _STOP:
            if len(stack) != 1 or marks:
                raise Unsupported("a pickle that does not end with one object")
            return stack[0]
        else:
            raise Unsupported(f"opcode {_opcode_name(op)} at byte {pos - 1}")
    raise Unsupported("the pickle ends without STOP (truncated)")


def _persistent(pid: Any, storage: Callable[[str, torch.dtype, int], torch.Tensor]) -> _Storage:
    if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
        raise Unsupported("a persistent id that is not a storage")
    _kind, cls, key, location, numel = pid
    if type(cls) is not _Global or not cls.name.startswith("torch.") or cls.name[6:] not in _STORAGE_DTYPES:
        raise Unsupported("a storage of a class torch.save does not write")
    if type(key) is not str or type(location) is not str or type(numel) is not int:
        raise Unsupported("a storage id with a key, location or size of the wrong type")
    if not location.startswith("cpu") and not location.startswith("cuda"):
        raise Unsupported(f"a storage on {location!r}")
    return _Storage(storage(key, _STORAGE_DTYPES[cls.name[6:]], numel), location)


def _opcode_name(op: int) -> str:
    import pickletools

    for code in pickletools.opcodes:
        if ord(code.code) == op:
            return code.name
    return f"0x{op:02x}"
