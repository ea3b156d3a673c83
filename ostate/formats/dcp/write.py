"""Write a torch.distributed.checkpoint directory again with its optimizer state changed, everything else kept.

The saved state dict is rebuilt from the checkpoint with ostate's own safe reader
(:class:`ostate.formats.dcp.read.Storage`: the ``.metadata`` unpickled with only DCP's
classes, every bytes entry with ``weights_only``), every optimizer in it (nested or
flattened) is offered to a transform, and the whole state dict is saved with
``torch.distributed.checkpoint.save`` without a process group. Model entries, the
scheduler, ``train_state`` and any other entry keep their keys and values exactly;
tensors that were split across ranks are written whole (one chunk each), which DCP
reshards on load to any number of ranks. Files in the directory that are not DCP's
(``.metadata``, ``*.distcp``) are copied as they are.

Everything is held in memory while it is written (DCP's writer needs the tensors).
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Callable, Mapping

from ostate.formats.dcp.metadata import read_metadata
from ostate.formats.dcp.read import (
    METADATA_FILE,
    Storage,
    flatten_optimizer,
    is_flat_optimizer,
    location_of,
    normalise,
    optimizer_paths,
    unflatten_optimizer,
)
from ostate.state import TensorRef

# location inside the checkpoint -> the new nested optimizer state dict, or None to keep it as it is.
Transform = Callable[[str, Mapping[str, Any]], "Mapping[str, Any] | None"]


def rewrite_dcp(source: str, target: str, transform: Transform, *, trust_pickle: bool = False) -> list[str]:
    """Save the DCP checkpoint at ``source`` into the (new, empty) directory ``target`` with its
    optimizers passed through ``transform``; returns the locations that changed.

    A flattened optimizer (``state.<fqn>.<key>``, ``param_groups.<fqn>.<hp>``) is handed to
    ``transform`` nested (FQN-keyed) and flattened again afterwards.

    Example:
        >>> import tempfile, os, torch, torch.distributed.checkpoint as dcp
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> from torch.distributed.checkpoint.state_dict import get_state_dict
        >>> model_sd, optim_sd = get_state_dict(m, opt)
        >>> src, dst = tempfile.mkdtemp(), os.path.join(tempfile.mkdtemp(), "out")
        >>> _ = dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=src, no_dist=True)
        >>> rewrite_dcp(src, dst, lambda location, sd: {**sd, "param_groups": [
        ...     {**g, "lr": 0.5} for g in sd["param_groups"]]})
        ['optimizer']
    """
    storage = Storage(
        source, read_metadata(os.path.join(source, METADATA_FILE), trust_pickle=trust_pickle), trust_pickle=trust_pickle
    )
    tree = storage.tree()
    routes = list(optimizer_paths(tree))
    storage.resolve(tree, required=True)
    tree = _materialise(normalise(tree, set(routes), unflatten=False))
    changed = []
    for route in routes:
        node = _get(tree, route)
        flat = is_flat_optimizer(node)
        new = transform(location_of(route), unflatten_optimizer(node) if flat else node)
        if new is None:
            continue
        new = flatten_optimizer(new) if flat else dict(new)
        if route:
            _get(tree, route[:-1])[route[-1]] = new
        else:  # the checkpoint is a bare optimizer state dict
            tree = new
        changed.append(location_of(route))
    _save(tree, target)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name != METADATA_FILE and not name.endswith(".distcp") and os.path.isfile(path):
            shutil.copy2(path, os.path.join(target, name))
    return changed


def _save(tree: dict, target: str) -> None:
    # start-up time: torch.distributed loads only for DCP checkpoints
    import torch.distributed.checkpoint as dcp

    os.makedirs(target, exist_ok=True)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming ... a single process": as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tree, storage_writer=dcp.FileSystemWriter(target), no_dist=True)


def _materialise(node: Any) -> Any:
    """Every lazy tensor read (DCP's writer needs the data)."""
    if isinstance(node, TensorRef):
        return node.read()
    if isinstance(node, dict):
        return {k: _materialise(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_materialise(v) for v in node]
    return node


def _get(tree: Any, route: tuple) -> Any:
    for part in route:
        tree = tree[part]
    return tree
