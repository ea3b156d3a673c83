"""Model weights saved beside the optimizer in a checkpoint directory, and naming by them.

Hugging Face (``transformers/modeling_utils.py::save_pretrained``) and accelerate
(``accelerate/checkpointing.py::save_accelerator_state``) write the weights as
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), or as
``pytorch_model.bin`` when not using safetensors; accelerate numbers a second model
``model_1.safetensors``. PEFT writes ``adapter_model.safetensors``.

Safetensors files keep their keys sorted, not in the model's order, so they can name
optimizer parameters by unique shapes only (``shape-match``); ``torch.save`` files keep
the model's order, which names every parameter when the match is unique
(``model-order``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ostate.errors import OstateError
from ostate.formats.files.members import OutsideCheckpointError, member_path
from ostate.formats.files.safetensors_file import SafetensorsFile, read_header
from ostate.formats.files.torchfile import load_torch_file
from ostate.formats.naming import discover
from ostate.formats.naming.model_order import ModelEntry, Naming, match_model_order, match_shapes
from ostate.formats.naming.objects import model_entries
from ostate.formats.naming.torch_optim import apply_naming
from ostate.state import Checkpoint, OptimizerState, TensorRef


@dataclass
class Weights:
    """A model's saved tensors: where, lazily, and whether they are in the model's own order."""

    location: str
    tensors: dict[str, TensorRef]
    entries: list[ModelEntry]
    ordered: bool
    warnings: list[str] = field(default_factory=list)


def find_weights(directory: str, *, index: int = 0, trust_pickle: bool = False) -> Weights | None:
    """The weights of model ``index`` in a checkpoint directory, or ``None`` when there are none.

    A weights file that cannot be read gives a :class:`Weights` with no tensors and a
    warning: the optimizer state is still worth showing. A shard index naming a file
    outside ``directory`` is refused (:class:`OutsideCheckpointError`), never a warning.
    """
    suffix = "" if index == 0 else f"_{index}"
    names = [
        f"model{suffix}.safetensors",
        f"model{suffix}.safetensors.index.json",
        f"pytorch_model{suffix}.bin",
        f"pytorch_model{suffix}.bin.index.json",
    ]
    if index == 0:
        names += ["adapter_model.safetensors", "adapter_model.bin"]
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".index.json"):
                return _sharded(directory, name, trust_pickle)
            if name.endswith(".safetensors"):
                return _safetensors([path], name)
            return _torch([path], name, trust_pickle)
        except OutsideCheckpointError:
            raise
        except OstateError as e:
            return Weights(name, {}, [], False, [f"model weights not read: {e}"])
    return None


def read_model(path: str, *, trust_pickle: bool = False) -> Weights:
    """A model's weights from a file or a checkpoint directory, lazily: a ``.safetensors`` file (its
    header only), a ``torch.save`` file holding a model state dict, or a directory with
    ``model.safetensors`` / ``pytorch_model.bin`` (sharded too).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> torch.save({"model": torch.nn.Linear(2, 1).state_dict(), "epoch": 1}, p)
        >>> sorted(read_model(p).tensors)
        ['bias', 'weight']
    """
    if not os.path.exists(path):
        raise OstateError("no such file or directory", where=path)
    if os.path.isdir(path):
        found = find_weights(path, trust_pickle=trust_pickle)
        if found is None:
            raise OstateError(
                "no model weights in this directory",
                where=path,
                hint="expected model.safetensors, pytorch_model.bin or a shard index",
            )
        if not found.tensors:
            raise OstateError("; ".join(found.warnings) or "the model weights could not be read", where=path)
        return found
    if path.lower().endswith(".safetensors"):
        return _safetensors([path], os.path.basename(path))
    return _torch([path], os.path.basename(path), trust_pickle)


def model_indices(directory: str) -> list[int]:
    """The model numbers present (accelerate saves ``model.safetensors``, ``model_1.safetensors``, ...)."""
    found = set()
    for name in os.listdir(directory):
        for prefix in ("model", "pytorch_model"):
            for ext in (".safetensors", ".bin"):
                if name.startswith(prefix) and name.endswith(ext):
                    middle = name[len(prefix) : -len(ext)]
                    if middle == "":
                        found.add(0)
                    elif middle.startswith("_") and middle[1:].isdigit():
                        found.add(int(middle[1:]))
    return sorted(found)


def name_by_weights(optimizer: OptimizerState, weights: Weights) -> Naming:
    """Name an optimizer's parameters by the saved model: by order for ordered files, else by unique shapes.

    The names are applied when the match holds (every name for ``model-order``, the
    unambiguous ones for ``shape-match``); the returned :class:`Naming` says which.
    """
    shapes = [p.shape for p in optimizer.params]
    if weights.ordered:
        groups = max((p.group for p in optimizer.params), default=-1) + 1
        sizes = [sum(1 for p in optimizer.params if p.group == g) for g in range(groups)]
        naming = match_model_order(shapes, weights.entries, weights.location, sizes)
    else:
        naming = match_shapes(shapes, weights.entries, weights.location)
    if naming.source != "none":
        apply_naming(optimizer.params, naming)
        optimizer.model_order = [e.name for e in weights.entries]
    return naming


def name_unnamed_by(checkpoint: Checkpoint, weights: Weights) -> list[Naming]:
    """Name, by ``weights``, each optimizer of ``checkpoint`` none of whose parameters has a name
    (e.g. a bare optimizer file checked against the model it trains); returns what was tried."""
    return [
        name_by_weights(o, weights)
        for o in checkpoint.optimizers
        if o.params and all(p.name_source == "none" for p in o.params)
    ]


def _safetensors(paths: list[str], location: str) -> Weights:
    tensors: dict[str, TensorRef] = {}
    for path in paths:
        tensors.update(SafetensorsFile(path, read_header(path)).refs())
    tensors = dict(sorted(tensors.items()))
    return Weights(location, tensors, model_entries(tensors), ordered=False)


def _torch(paths: list[str], location: str, trust_pickle: bool) -> Weights:
    state: dict = {}
    for path in paths:
        obj = load_torch_file(path, trust_pickle=trust_pickle)
        found = discover.find_model_state_dict(obj)
        if found is None:
            raise OstateError("holds no model state dict", where=path, hint=discover.top_level_summary(obj))
        state.update(found[1])
    entries = model_entries(state)
    tensors = {k: TensorRef.of(v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return Weights(location, tensors, entries, ordered=True)


def _sharded(directory: str, name: str, trust_pickle: bool) -> Weights:
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        by_file = {file: tensor for tensor, file in weight_map.items()}
        files = sorted(by_file)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise OstateError(f"not a shard index with a 'weight_map' ({type(e).__name__})", where=path) from None
    shards = [member_path(directory, f, listed_in=path, entry=f"weight_map[{by_file[f]!r}]") for f in files]
    missing = [f for f, shard in zip(files, shards) if not os.path.isfile(shard)]
    if missing:
        raise OstateError(f"the shard index lists missing files: {', '.join(missing[:3])}", where=path)
    location = f"{name} ({len(files)} files)"
    if name.startswith("model"):
        return _safetensors(shards, location)
    return _torch(shards, location, trust_pickle)
