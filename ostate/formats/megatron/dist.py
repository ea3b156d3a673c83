"""Read a Megatron ``torch_dist`` checkpoint: a torch.distributed.checkpoint folder written by megatron-core.

``megatron.core.dist_checkpointing.save`` (``--ckpt-format torch_dist``) writes::

    iter_0000100/metadata.json     {"sharded_backend": "torch_dist", ...}
    iter_0000100/common.pt         everything that is not a sharded tensor (torch.save)
    iter_0000100/.metadata         the DCP metadata of the sharded tensors
    iter_0000100/__<rank>_<i>.distcp

The sharded tensors are keyed by megatron's *sharded keys*: the model's
(``decoder.layers.mlp.linear_fc1.weight``: layers stacked on a leading axis, one tensor for
all layers) and, with the distributed optimizer's ``fully_sharded_model_space`` or
``fully_reshardable`` formats (``distrib_optimizer.py::sharded_param_state_fs_model_space``,
``sharded_param_state_fully_reshardable``), ``optimizer.state.<state key>.<sharded key>``
for ``exp_avg``, ``exp_avg_sq`` and the fp32 master weight (``fp32_param`` or ``param``).
``common.pt`` holds the optimizer's param groups without their parameters
(``DistributedOptimizer.state_dict``) and, from Megatron-LM, its ``args``.

Stacked layers are shown one parameter per layer, ``decoder.layers.<i>.<rest of the key>``
(:mod:`ostate.formats.megatron.layers` says which keys, and when they stay stacked), each
a lazy row of the stored tensor that reads only that layer's chunks. Every other parameter
is one sharded key with megatron's global shape. The DCP folder is read by
:mod:`ostate.formats.dcp.read` (lazily, chunk by chunk).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats.dcp.metadata import read_metadata
from ostate.formats.dcp.read import METADATA_FILE, Storage
from ostate.formats.files.torchfile import load_torch_file
from ostate.formats.megatron.groups import MEGATRON_GLOBALS, param_groups
from ostate.formats.megatron.layers import layer_name, prepended_axes, split_layers, stacked_block
from ostate.formats.naming import discover
from ostate.formats.naming.objects import model_entries
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.state import Checkpoint, TensorRef

METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
STATE_PREFIX = "optimizer.state."
_MASTER_KEYS = ("fp32_param", "param")
_MAX_JSON_BYTES = 64 * 1024


def is_torch_dist(path: str) -> bool:
    """True for a folder that megatron's dist_checkpointing wrote with the torch_dist backend."""
    if not (os.path.isfile(os.path.join(path, METADATA_FILE)) and os.path.isfile(os.path.join(path, METADATA_JSON))):
        return False
    try:
        return _backend(path).get("sharded_backend") == "torch_dist"
    except OstateError:
        return False


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    backend = _backend(path)
    if backend.get("sharded_backend") != "torch_dist":
        raise OstateError(
            f"a Megatron checkpoint with the '{backend.get('sharded_backend')}' backend",
            where=path,
            hint="ostate reads the torch_dist format (DCP) and the older distrib_optim.pt files",
        )
    common_path = os.path.join(path, COMMON_FILE)
    common = load_torch_file(common_path, trust_pickle=trust_pickle, allowed_globals=MEGATRON_GLOBALS)
    storage = Storage(path, read_metadata(os.path.join(path, METADATA_FILE), trust_pickle=trust_pickle))
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not isinstance(common, Mapping):
        raise OstateError("common.pt does not hold a dict", where=common_path, hint=discover.top_level_summary(common))
    items = {key: item for key, item in storage.entries.items() if isinstance(item, TensorStorageMetadata)}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, item in items.items():  # a parameter's model and optimizer tensors share its sharded key and shape
        shape = tuple(int(d) for d in item.size)
        if shapes.setdefault(_sharded_key(key), shape) != shape:
            raise OstateError(
                f"'{key}' has shape {shape}, '{_sharded_key(key)}' {shapes[_sharded_key(key)]}",
                where=path,
                hint="the checkpoint is inconsistent",
            )
    per_layer, layer_warnings = split_layers(shapes, common.get("args"))
    tensors: dict[str, TensorRef] = {}
    layers: dict[str, tuple[str, int]] = {}  # per-layer name -> (its stacked key, its layer)
    for key, item in items.items():
        name = _sharded_key(key)
        if name in per_layer:
            prefix = key[: len(key) - len(name)]
            for layer, row in enumerate(storage.rows(key, item)):
                tensors[prefix + layer_name(name, layer)] = row
                layers[layer_name(name, layer)] = (name, layer)
        else:
            tensors[key] = storage.tensor(key, item)
    sharding = (common.get("optimizer") or {}).get("param_state_sharding_type")
    model = {k: t for k, t in tensors.items() if not k.startswith("optimizer.")}
    by_param = _layer_major(_optimizer_tensors(tensors, model, path, sharding), layers)
    param_shapes = [(name, by_param[name][next(iter(by_param[name]))].shape) for name in by_param]
    groups, assignment, warnings = param_groups(common, param_shapes, common_path, stacked=prepended_axes)
    step = groups[0].get("step")

    state: dict[str, dict[str, Any]] = {}
    weights: dict[str, TensorRef] = {}
    for name, entry in by_param.items():
        master = next((entry.pop(k) for k in _MASTER_KEYS if k in entry), None)
        if master is not None:
            weights[name] = master
        state[name] = {**({} if step is None else {"step": torch.tensor(float(step))}), **entry}
    names = list(by_param)
    groups_with_params = [
        dict({k: v for k, v in g.items() if k != "params"}, params=[n for n in names if assignment[n] == i])
        for i, g in enumerate(groups)
    ]
    entries = model_entries({n: model[n] for n in names if n in model})
    opt = read_optimizer(
        {"state": state, "param_groups": groups_with_params}, STATE_PREFIX + "*", model=("model", entries)
    )
    opt.warnings[:0] = warnings + layer_warnings
    for name, t in model.items():
        if name not in weights and t.dtype.is_floating_point:
            weights[name] = t
    metadata: dict[str, Any] = {"optimizer_class": "megatron DistributedOptimizer", "megatron_format": "torch_dist"}
    if sharding:
        metadata["param_state_sharding_type"] = sharding
    if isinstance(common.get("iteration"), int):
        metadata["global_step"] = common["iteration"]
    return Checkpoint(
        path=path,
        format="megatron",
        optimizers=[opt],
        weights=weights,
        weights_location="fp32 master weights (optimizer.state.*); the rest from the model's sharded tensors",
        schedulers=[dict(s, _location=loc) for loc, s in discover.find_schedulers(common)],
        metadata=metadata,
    )


def _optimizer_tensors(
    tensors: Mapping[str, TensorRef], model: Mapping[str, TensorRef], where: str, sharding: Any
) -> dict[str, dict[str, TensorRef]]:
    """``{sharded key: {state key: tensor}}`` from the ``optimizer.state.<state key>.<sharded key>`` entries."""
    out: dict[str, dict[str, TensorRef]] = {}
    for key, t in tensors.items():
        if not key.startswith(STATE_PREFIX):
            continue
        rest = key[len(STATE_PREFIX) :]
        state_key, _, name = rest.partition(".")  # state keys (exp_avg, fp32_param) have no dots
        if not name:
            raise OstateError(f"the optimizer entry '{key}' names no parameter", where=where)
        out.setdefault(name, {})[state_key] = t
    if not out:
        raise OstateError(
            "no optimizer state (optimizer.state.*) in this Megatron checkpoint",
            where=where,
            hint=(
                f"its distributed optimizer was saved as '{sharding}', which keeps bucket buffers; ostate reads "
                "'fully_sharded_model_space' and 'fully_reshardable'"
                if sharding
                else "it was saved without the optimizer"
            ),
        )
    for name, entry in out.items():
        model_t = model.get(name)
        for k, t in entry.items():
            if model_t is not None and tuple(t.shape) != tuple(model_t.shape):
                raise OstateError(
                    f"'{STATE_PREFIX}{k}.{name}' has shape {tuple(t.shape)}, the parameter {tuple(model_t.shape)}",
                    where=where,
                    hint="the checkpoint is inconsistent",
                )
    return out


def _layer_major(by_param: dict[str, Any], layers: Mapping[str, tuple[str, int]]) -> dict[str, Any]:
    """The parameters in the model's order: a block's layers one after the other, each with all its parameters."""
    position = {name: i for i, name in enumerate(by_param)}
    block_start: dict[str | None, int] = {}
    for name in by_param:
        if name in layers:
            block = stacked_block(layers[name][0])
            block_start[block] = min(block_start.get(block, position[name]), position[name])

    def order(name: str) -> tuple[int, int, int]:
        if name not in layers:
            return position[name], 0, 0
        return block_start[stacked_block(layers[name][0])], layers[name][1], position[name]

    return {name: by_param[name] for name in sorted(by_param, key=order)}


def _sharded_key(key: str) -> str:
    """The model's sharded key of a DCP key: ``optimizer.state.<state key>.<sharded key>`` or the key itself."""
    if key.startswith(STATE_PREFIX):
        return key[len(STATE_PREFIX) :].partition(".")[2]  # state keys (exp_avg, fp32_param) have no dots
    return key


def _backend(path: str) -> dict[str, Any]:
    where = os.path.join(path, METADATA_JSON)
    try:
        with open(where, "rb") as f:
            data = json.loads(f.read(_MAX_JSON_BYTES))
    except (OSError, ValueError) as e:
        raise OstateError(f"cannot read megatron's metadata.json ({e})", where=where) from None
    if not isinstance(data, dict):
        raise OstateError("metadata.json does not hold an object", where=where)
    return data
