"""Reader for torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``__<rank>_<i>.distcp`` files.

No process group is needed, and nothing is read before it is used:

- ``.metadata`` (a pickle, read with only DCP's own classes allowed,
  :mod:`ostate.formats.dcp.metadata`) lists every entry of the saved state dict:
  tensors with their global shape, dtype and chunks (offsets and sizes), and
  "bytes" entries (everything else, ``torch.save``-d). ``planner_data`` gives each
  entry's path as a tuple, e.g. ``('optimizer', 'state', 'layers.0.w', 'exp_avg')``,
  so names with dots are never split by guesswork.
- ``storage_data`` says where each chunk lives: file, byte offset, length. Each
  chunk is a complete ``torch.save`` blob at that offset
  (``filesystem.py::_write_item``). A tensor is read by loading only its chunks'
  byte ranges and copying each into place at its offsets; sharded tensors (FSDP2,
  DTensor) are reassembled this way, one tensor at a time.

Two optimizer layouts are recognised: the nested one (``{'state': {fqn: {key: ...}},
'param_groups': [...]}``, from ``get_optimizer_state_dict``) and the flattened one
(``state.<fqn>.<key>`` / ``param_groups.<fqn>.<hp>``, from
``StateDictOptions(flatten_optimizer_state_dict=True)`` and torchtitan, which also
puts the model's FQNs at the top level and its step under ``train_state``).
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Mapping, cast

import torch

from ostate.errors import OstateError
from ostate.formats.dcp.metadata import read_metadata
from ostate.formats.files.members import member_path
from ostate.formats.files.torchfile import load_torch_stream
from ostate.formats.naming import discover
from ostate.formats.naming.objects import from_object
from ostate.formats.reader import Reader
from ostate.state import Checkpoint, TensorRef

METADATA_FILE = ".metadata"
_ZIP_MAGIC = b"PK\x03\x04"
# Bytes entries outside the optimizer are read only when this small (schedulers, step counters).
_SMALL_BYTES = 64 * 1024


def sniff(path: str) -> int:
    return 3 if os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE)) else 0


@dataclass(frozen=True)
class Unread:
    """A bytes entry that was not needed, so not read."""

    key: str
    length: int


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a DCP directory (see the module docstring for what is read, and when)."""
    if not os.path.isdir(path):
        raise OstateError(
            "not a directory; a torch.distributed.checkpoint is a directory with a .metadata file", where=path
        )
    metadata_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(metadata_path):
        raise OstateError("no .metadata file, so not a torch.distributed.checkpoint directory", where=path)
    storage = Storage(path, read_metadata(metadata_path, trust_pickle=trust_pickle), trust_pickle=trust_pickle)
    tree = storage.tree()

    paths = list(optimizer_paths(tree))
    if not paths:
        raise OstateError(
            "no optimizer state found",
            where=path,
            hint=f"{discover.top_level_summary(tree)}; DCP entries: {len(storage.entries)}",
        )
    for route in paths:
        storage.resolve(_get(tree, route), required=True)
    storage.resolve(tree, required=False)
    flattened = {location_of(route) for route in paths if is_flat_optimizer(_get(tree, route))}
    tree = normalise(tree, set(paths))

    checkpoint = from_object(tree, path=path, model=_model(tree), format="dcp")
    for o in checkpoint.optimizers:
        if o.location in flattened:
            o.warnings.append(
                "flattened optimizer state keeps each parameter's hyperparameters but not its param group; "
                "parameters with equal hyperparameters are shown as one group"
            )
    checkpoint.metadata.update(_train_state(tree))
    return checkpoint


class Storage:
    """The entries of one DCP directory, read lazily from their byte ranges."""

    def __init__(self, directory: str, metadata: Any, *, trust_pickle: bool = False):
        self.directory = directory
        self.metadata = metadata
        self.trust_pickle = trust_pickle
        self.entries: Mapping[str, Any] = metadata.state_dict_metadata
        self.storage_data: Mapping[Any, Any] = metadata.storage_data or {}
        planner = metadata.planner_data
        self.routes: Mapping[str, Any] = planner if isinstance(planner, Mapping) else {}
        self._file_sizes: dict[str, int] = {}
        # Every file the metadata names, checked to lie inside the directory before anything is read.
        self._paths: dict[str, str] = {}
        listed_in = os.path.join(directory, METADATA_FILE)
        for index, info in self.storage_data.items():
            if info.relative_path not in self._paths:
                entry = f"{getattr(index, 'fqn', index)}"
                self._paths[info.relative_path] = member_path(
                    directory, info.relative_path, listed_in=listed_in, entry=entry
                )

    def route(self, key: str) -> tuple:
        """The entry's path in the saved (nested) state dict; a key without planner data stays whole."""
        route = self.routes.get(key)
        return tuple(route) if isinstance(route, (tuple, list)) and route else (key,)

    def tree(self) -> dict:
        """The saved state dict rebuilt from the metadata: lazy tensors, unread bytes entries."""
        # start-up time: torch.distributed loads only for DCP checkpoints
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        tree: dict = {}
        for key, item in self.entries.items():
            if isinstance(item, TensorStorageMetadata):
                leaf: Any = self.tensor(key, item)
            else:
                leaf = Unread(key, self._info(key, None).length)
            node = tree
            route = self.route(key)
            for part in route[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise OstateError(f"entry '{key}' nests under another entry", where=self.directory)
                node = child
            node[route[-1]] = leaf
        return tree

    def tensor(self, key: str, item: Any) -> TensorRef:
        """A lazy tensor: its chunks are located now, their bytes read on ``read()``."""
        shape, dtype, chunks = self._chunks(key, item)

        def read() -> torch.Tensor:
            return self._assemble(key, shape, dtype, chunks)

        return TensorRef(shape, dtype, read)

    def rows(self, key: str, item: Any) -> list[TensorRef]:
        """The tensor's rows (``tensor[i]`` for each index ``i`` of its first axis), each lazy.

        A row reads only the chunks that hold part of it: where the tensor was saved
        chunk by chunk along its first axis (megatron saves each layer of stacked layers
        as its own chunk), each row reads its own bytes and nothing else. A chunk that
        spans several rows is read again for each of them.
        """
        shape, dtype, chunks = self._chunks(key, item)
        if not shape:
            raise OstateError(f"'{key}' is a scalar, it has no rows", where=self.directory)

        def reader(i: int) -> Callable[[], torch.Tensor]:
            mine = [(o, s, info) for o, s, info in chunks if o[0] <= i < o[0] + s[0]]
            return lambda: self._assemble_row(key, i, shape, dtype, mine)

        return [TensorRef(shape[1:], dtype, reader(i)) for i in range(shape[0])]

    def _chunks(self, key: str, item: Any) -> tuple[tuple[int, ...], torch.dtype, list]:
        """The tensor's global shape, dtype and chunks (offsets, sizes, storage), checked to cover it exactly."""
        shape = tuple(int(d) for d in item.size)
        dtype = item.properties.dtype
        chunks = [(tuple(c.offsets), tuple(c.sizes), self._info(key, c.offsets)) for c in item.chunks]
        total = 1
        for d in shape:
            total *= d
        covered = 0
        for offsets, sizes, _ in chunks:
            n = 1
            for o, s, d in zip(offsets, sizes, shape):
                if o < 0 or o + s > d:
                    raise OstateError(f"a chunk of '{key}' lies outside its shape {shape}", where=self.directory)
                n *= s
            covered += n
        if covered != total or any(len(o) != len(shape) for o, _, _ in chunks):
            raise OstateError(
                f"the chunks of '{key}' cover {covered} of its {total} elements",
                where=self.directory,
                hint="the checkpoint is incomplete (a rank's file missing?)",
            )
        for _offsets, sizes, info in chunks:
            self._check_range(key, info, math.prod(sizes) * dtype.itemsize)
        return shape, dtype, chunks

    def _assemble(self, key: str, shape: tuple, dtype: torch.dtype, chunks: list) -> torch.Tensor:
        if len(chunks) == 1 and chunks[0][1] == shape:
            return self._chunk(key, chunks[0][2], shape, dtype)
        out = torch.empty(shape, dtype=dtype)
        for offsets, sizes, info in chunks:
            view = out
            for dim, (o, s) in enumerate(zip(offsets, sizes)):
                view = view.narrow(dim, o, s)
            view.copy_(self._chunk(key, info, sizes, dtype))
        return out

    def _assemble_row(self, key: str, row: int, shape: tuple, dtype: torch.dtype, chunks: list) -> torch.Tensor:
        """``tensor[row]`` from the chunks that hold part of that row."""
        if len(chunks) == 1 and chunks[0][1] == (1, *shape[1:]):
            return self._chunk(key, chunks[0][2], chunks[0][1], dtype)[0]
        out = torch.empty(shape[1:], dtype=dtype)
        for offsets, sizes, info in chunks:
            view = out
            for dim, (o, s) in enumerate(zip(offsets[1:], sizes[1:])):
                view = view.narrow(dim, o, s)
            view.copy_(self._chunk(key, info, sizes, dtype)[row - offsets[0]])
        return out

    def _chunk(self, key: str, info: Any, sizes: tuple, dtype: torch.dtype) -> torch.Tensor:
        with self._open(info) as (window, where):
            tensor = load_torch_stream(window, where=where, trust_pickle=self.trust_pickle, warn=False)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(sizes) or tensor.dtype != dtype:
            found = (
                f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            )
            raise OstateError(
                f"a chunk of '{key}' holds {found}, the metadata says {tuple(sizes)} {dtype}",
                where=self.directory,
                hint="the checkpoint is inconsistent",
            )
        return tensor

    def resolve(self, node: Any, *, required: bool) -> None:
        """Read the bytes entries inside ``node`` (all of them when ``required``, else the small ones)."""
        places = [(parent, k, leaf) for parent, k, leaf in _unread(node) if required or leaf.length <= _SMALL_BYTES]
        by_file: dict[str, list] = defaultdict(list)
        for place in places:
            info = self._info(place[2].key, None)
            by_file[info.relative_path].append((info, place))
        for _, items in sorted(by_file.items()):
            items.sort(key=lambda item: item[0].offset)
            for info, (parent, k, _leaf) in items:
                try:
                    with self._open(info) as (window, where):
                        parent[k] = load_torch_stream(window, where=where, trust_pickle=self.trust_pickle, warn=False)
                except OstateError:
                    if required:
                        raise

    def _check_range(self, key: str, info: Any, nbytes: int) -> None:
        """A chunk's byte range must lie in its file and hold its elements: checked before anything is allocated."""
        path = self._paths[info.relative_path]
        size = self._file_sizes.get(path)
        if size is None:
            try:
                size = self._file_sizes[path] = os.path.getsize(path)
            except OSError as e:
                raise OstateError(
                    f"cannot read: {e.strerror}",
                    where=path,
                    hint="a .distcp file listed in .metadata is missing or unreadable",
                ) from None
        if info.offset + info.length > size:
            raise OstateError(
                f"the data of '{key}' lies beyond the end of the file ({size} bytes)",
                where=path,
                hint="the file may be truncated",
            )
        if info.length < nbytes:
            raise OstateError(
                f"a chunk of '{key}' claims {nbytes} bytes, its file range holds {info.length}",
                where=path,
                hint="the metadata is corrupted",
            )

    def _info(self, key: str, offsets: Any) -> Any:
        # start-up time: torch.distributed loads only for DCP checkpoints
        from torch.distributed.checkpoint.metadata import MetadataIndex

        index = MetadataIndex(key, offsets)
        info = self.storage_data.get(index)
        if info is None:
            raise OstateError(
                f"the metadata lists '{key}' but says nowhere where its data is",
                where=self.directory,
                hint="the checkpoint is incomplete",
            )
        return info

    def _open(self, info: Any) -> _OpenRange:
        return _OpenRange(self._paths[info.relative_path], info)


class _OpenRange:
    """``with`` a byte range of a ``.distcp`` file as a seekable stream, checked to be a torch.save blob."""

    def __init__(self, path: str, info: Any):
        self.info = info
        self.path = path
        self.file: io.BufferedReader | None = None

    def __enter__(self) -> tuple[BinaryIO, str]:
        info = self.info
        where = f"{self.path} (bytes {info.offset}-{info.offset + info.length})"
        if getattr(info, "transform_descriptors", None):
            raise OstateError(
                f"data stored through DCP extensions ({', '.join(info.transform_descriptors)})",
                where=where,
                hint="ostate reads uncompressed DCP checkpoints only",
            )
        try:
            self.file = open(self.path, "rb")
        except OSError as e:
            raise OstateError(
                f"cannot read: {e.strerror}",
                where=self.path,
                hint="a .distcp file listed in .metadata is missing or unreadable",
            ) from None
        window = _Window(self.file, info.offset, info.length)
        if window.read(4) != _ZIP_MAGIC:
            raise OstateError(
                "the data is not a torch.save blob",
                where=where,
                hint="DCP written with serialization_format=SAFETENSORS is not supported",
            )
        window.seek(0)
        return cast(BinaryIO, window), where  # a binary stream to torch.load: read, readinto, seek, tell

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes of a file starting at ``offset``."""

    def __init__(self, file: io.BufferedReader, offset: int, length: int):
        super().__init__()
        self._file, self._start, self._length, self._pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n]) or 0
        self._pos += got
        return got


def unflatten_optimizer(flat: Mapping[str, Any]) -> dict:
    """The nested optimizer state dict of a flattened one.

    The flattened form (``torch/distributed/checkpoint/state_dict.py::_flatten_optim_state_dict``)
    keeps ``param_groups.<fqn>.<hp>`` per parameter but drops the groups themselves;
    they are rebuilt here from equal hyperparameters, in order of first appearance.

    Example:
        >>> flat = {"state.a.b.step": 1, "param_groups.a.b.lr": 0.1, "param_groups.c.lr": 0.1}
        >>> unflatten_optimizer(flat)
        {'state': {'a.b': {'step': 1}}, 'param_groups': [{'lr': 0.1, 'params': ['a.b', 'c']}]}
    """
    hyper: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith("param_groups."):
            fqn, _, name = key[len("param_groups.") :].rpartition(".")
            hyper.setdefault(fqn, {})[name] = value
    state: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith("state."):
            rest = key[len("state.") :]
            found = max((f for f in hyper if rest.startswith(f + ".")), key=len, default=None)
            # state of a parameter without hyperparameters: state keys have no dots
            fqn = found if found is not None else rest.rpartition(".")[0]
            state.setdefault(fqn, {})[rest[len(fqn) + 1 :]] = value
    groups: list[dict[str, Any]] = []
    for fqn, values in hyper.items():
        for group in groups:
            if _same_hyperparameters(group, values):
                group["params"].append(fqn)
                break
        else:
            groups.append({**values, "params": [fqn]})
    return {"state": state, "param_groups": groups}


def flatten_optimizer(nested: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened form of a nested, FQN-keyed optimizer state dict (the inverse of :func:`unflatten_optimizer`).

    Every parameter gets ``param_groups.<fqn>.<hp>`` for each hyperparameter of its group
    and ``state.<fqn>.<key>`` for each state entry, as
    ``torch/distributed/checkpoint/state_dict.py::_flatten_optim_state_dict`` writes them.

    Example:
        >>> nested = {"state": {"a.b": {"step": 1}}, "param_groups": [{"lr": 0.1, "params": ["a.b", "c"]}]}
        >>> flatten_optimizer(nested)
        {'state.a.b.step': 1, 'param_groups.a.b.lr': 0.1, 'param_groups.c.lr': 0.1}
        >>> unflatten_optimizer(flatten_optimizer(nested)) == nested
        True
    """
    flat: dict[str, Any] = {}
    for fqn, entry in nested["state"].items():
        for key, value in entry.items():
            flat[f"state.{fqn}.{key}"] = value
    for group in nested["param_groups"]:
        for fqn in group["params"]:
            for key, value in group.items():
                if key != "params":
                    flat[f"param_groups.{fqn}.{key}"] = value
    return flat


def _same_hyperparameters(group: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    if set(group) - {"params"} != set(values):
        return False
    for k, v in values.items():
        a, b = group[k], v
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
                return False
        elif a != b and not (a != a and b != b):  # NaN equals NaN here
            return False
    return True


def _unread(node: Any, parent: Any = None, key: Any = None) -> Iterable[tuple[Any, Any, Unread]]:
    if isinstance(node, Unread):
        yield parent, key, node
    elif isinstance(node, dict):
        for k, v in list(node.items()):
            yield from _unread(v, node, k)


def optimizer_paths(node: Any, route: tuple = ()) -> Iterable[tuple]:
    """The path of each optimizer in the tree, nested or flattened (before its bytes entries are read)."""
    if not isinstance(node, dict):
        return
    if _is_optimizer_node(node):
        yield route
        return
    for key, child in node.items():
        yield from optimizer_paths(child, route + (key,))


def _is_optimizer_node(node: Any) -> bool:
    if is_flat_optimizer(node):
        return True
    return (
        isinstance(node, dict)
        and isinstance(node.get("param_groups"), (dict, list, Unread))
        and isinstance(node.get("state", {}), dict)
    )


def is_flat_optimizer(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and any(isinstance(k, str) and k.startswith("param_groups.") for k in node)
        and all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in node)
    )


def normalise(node: Any, optimizers: set[tuple], route: tuple = (), *, unflatten: bool = True) -> Any:
    """Lists back from DCP's integer path parts, and flattened optimizers nested again
    (kept flat with ``unflatten=False``, as a writer that saves them back needs)."""
    if not isinstance(node, dict):
        return node
    if route in optimizers and is_flat_optimizer(node):
        return unflatten_optimizer(node) if unflatten else node
    out = {k: normalise(v, optimizers, route + (k,), unflatten=unflatten) for k, v in node.items()}
    # An optimizer's `state` keyed by integer index stays a dict.
    if route[-1:] != ("state",) and out and all(isinstance(k, int) for k in out) and set(out) == set(range(len(out))):
        return [out[i] for i in range(len(out))]
    if route in optimizers:
        out.setdefault("state", {})  # an optimizer that never stepped saves no state entries at all
        out["state"] = _state_keys_as_listed(out)
    return out


def _state_keys_as_listed(optimizer: dict) -> dict:
    """State keyed as the param groups list the parameters: DCP turns a raw state dict's int keys into strings."""
    groups = optimizer.get("param_groups")
    listed = (
        [pid for g in groups if isinstance(g, dict) for pid in g.get("params", ())] if isinstance(groups, list) else []
    )
    by_text = {str(pid): pid for pid in listed if not isinstance(pid, str)}
    return {by_text.get(k, k): v for k, v in optimizer["state"].items()}


def _get(tree: dict, route: tuple) -> Any:
    for part in route:
        tree = tree[part]
    return tree


def location_of(route: tuple) -> str:
    location = discover.ROOT
    for part in route:
        location = discover.child_path(location, part)
    return location


def _model(tree: dict) -> tuple[str, Mapping[str, TensorRef]] | None:
    found = discover.find_model_state_dict(tree)
    if found is not None:
        return found
    top = {k: v for k, v in tree.items() if isinstance(k, str) and isinstance(v, TensorRef)}
    if any(v.dtype.is_floating_point for v in top.values()):
        return "(top level)", top  # torchtitan flattens the model's FQNs to the top level
    return None


def _train_state(tree: dict) -> dict[str, Any]:
    # torchtitan (torchtitan/components/checkpoint.py, TrainState.state_dict) saves
    # {"train_state": {"step": tensor(int32), ...}}.
    state = tree.get("train_state")
    out: dict[str, Any] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            if isinstance(v, TensorRef) and v.numel == 1 and not v.dtype.is_floating_point:
                out[k] = int(v.read().reshape(-1)[0])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = v
    return out


READER = Reader("dcp", "a torch.distributed.checkpoint directory (.metadata + .distcp; torchtitan too)", sniff, read)
