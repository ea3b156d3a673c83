"""Optimizer state in a safetensors file: the format ``ostate convert`` writes, and its reader.

One optimizer per file. Tensors are flat, keyed ``state.<param>.<key>`` as in the
flattened form of ``torch.distributed.checkpoint`` and torchtitan, where ``<param>``
is the parameter's name, or its index when it has none. The string metadata
(``__metadata__``) holds:

- ``ostate.format``: ``optimizer-state/1`` (this layout, version 1);
- ``param_groups``: JSON list of the groups' hyperparameters, each with ``params``,
  the parameter keys of the group in optimizer order;
- ``scalars``: JSON ``{param: {key: number}}`` for state that is a Python number
  rather than a tensor (SparseAdam's, bitsandbytes' or HF Adafactor's int ``step``);
- ``name_sources``: JSON ``{param: source}``, how each name was found when the state
  was read (``param_names``, ``fqn``, ``hf-decay-rule``, ..., ``none``), so a name
  that was inferred stays marked as inferred;
- ``optimizer`` (the family ostate detected), ``source`` (what was converted) and
  ``format`` = ``pt``, informational.

Safetensors holds tensors and strings only, and no pickled objects: opening such a
file can never run code.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats.files.safetensors_file import SafetensorsFile, is_safetensors, read_header, write_safetensors
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.formats.reader import Reader
from ostate.state import NAME_SOURCES, Checkpoint, OptimizerState, ParamState, TensorRef

FORMAT_KEY = "ostate.format"
FORMAT_VALUE = "optimizer-state/1"


def sniff(path: str) -> int:
    return 3 if os.path.isfile(path) and is_safetensors(path) else 0


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    """Read an optimizer-state safetensors file (``trust_pickle`` is irrelevant: nothing is pickled)."""
    if os.path.isdir(path):
        raise OstateError("is a directory, expected a .safetensors file", where=path)
    header = read_header(path)
    meta = header.metadata
    if FORMAT_KEY not in meta:
        looks_flat = any(name.startswith("state.") for name in header.tensors)
        raise OstateError(
            f"a safetensors file with {len(header.tensors)} tensors but no optimizer state",
            where=path,
            hint=(
                "its keys look like flattened optimizer state but the param groups are missing from the metadata"
                if looks_flat
                else "model weights alone; ostate reads optimizer state written by `ostate convert`"
            ),
        )
    if meta[FORMAT_KEY] != FORMAT_VALUE:
        raise OstateError(
            f"optimizer state in layout '{meta[FORMAT_KEY]}', this ostate reads '{FORMAT_VALUE}'",
            where=path,
            hint="it was written by a newer ostate; upgrade ostate",
        )
    groups = _json(meta, "param_groups", path, list)
    scalars = _json(meta, "scalars", path, dict, default={})
    sources = _json(meta, "name_sources", path, dict, default={})
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise OstateError("'param_groups' metadata is not a list of groups with 'params'", where=path)

    keys = [str(k) for g in groups for k in g["params"]]
    state: dict[str, dict[str, Any]] = {k: {} for k in keys}
    file = SafetensorsFile(path, header)
    stray = []
    for name in header.tensors:
        split = split_state_key(name, state)
        if split is None:
            stray.append(name)
            continue
        param, key = split
        state[param][key] = file.ref(name)
    for param, values in scalars.items():
        if param in state and isinstance(values, dict):
            state[param].update(values)

    sd = {
        "state": {k: v for k, v in state.items() if v},
        "param_groups": [
            {k: _tuples(v) if k != "params" else [str(p) for p in v] for k, v in g.items()} for g in groups
        ],
    }
    result = read_optimizer(sd, os.path.basename(path))
    for p in result.params:
        source = sources.get(p.index, "fqn")
        if source == "none" or source not in NAME_SOURCES:
            p.name, p.name_source = f"param.{p.index}", "none"
        else:
            p.name_source = source
    if stray:
        result.warnings.append(
            f"{len(stray)} tensors are not state of a listed parameter and were ignored (first: {stray[0]})"
        )
    metadata = {k: meta[k] for k in ("source",) if k in meta}
    return Checkpoint(path=path, format="safetensors", optimizers=[result], metadata=metadata)


def write(optimizer: OptimizerState, path: str | os.PathLike, *, source: str = "", progress: Any = None) -> None:
    """Write one optimizer's state in this layout, atomically, one tensor at a time.

    Example:
        >>> import ostate, torch, tempfile, os
        >>> m = torch.nn.Linear(3, 2); opt = torch.optim.Adam(m.named_parameters())
        >>> m(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> o = ostate.from_state_dict(opt.state_dict()).optimizers[0]
        >>> p = os.path.join(tempfile.mkdtemp(), "opt.safetensors")
        >>> write(o, p)
        >>> sorted(SafetensorsFile(p).header.tensors)[:2]
        ['state.bias.exp_avg', 'state.bias.exp_avg_sq']
        >>> [(q.name, q.name_source) for q in ostate.load(p).optimizers[0].params]
        [('weight', 'param_names'), ('bias', 'param_names')]
    """
    keys = {id(p): param_key(p) for p in optimizer.params}
    if len(set(keys.values())) != len(keys):
        raise OstateError("two parameters have the same name; cannot key their state by name", where=optimizer.location)
    tensors: dict[str, TensorRef] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for p in optimizer.params:
        key = keys[id(p)]
        for name, value in p.state.items():
            if isinstance(value, TensorRef):
                tensors[f"state.{key}.{name}"] = value
            elif value is None or isinstance(value, (bool, int, float)):
                scalars.setdefault(key, {})[name] = value
            else:
                raise OstateError(
                    f"state '{name}' of parameter '{p.name}' is a {type(value).__name__}; safetensors holds tensors "
                    "and numbers only",
                    where=optimizer.location,
                    hint="write a .pt file instead",
                )
    groups = []
    for g, group in enumerate(optimizer.groups):
        entry = {k: _plain(v, f"param group {g}, '{k}'", optimizer.location) for k, v in group.items()}
        entry["params"] = [keys[id(p)] for p in optimizer.params if p.group == g]
        groups.append(entry)
    metadata = {
        "format": "pt",
        FORMAT_KEY: FORMAT_VALUE,
        "param_groups": json.dumps(groups),
        "scalars": json.dumps(scalars),
        "name_sources": json.dumps({keys[id(p)]: p.name_source for p in optimizer.params}),
        "optimizer": optimizer.kind,
        "source": source,
    }
    write_safetensors(path, tensors, metadata, progress=progress)


def param_key(p: ParamState) -> str:
    """The key of a parameter in this layout: its name, or its index when it has no name."""
    return p.name if p.name_source != "none" else str(p.index)


def split_state_key(name: str, params: Mapping[str, Any]) -> tuple[str, str] | None:
    """``state.<param>.<key>`` into ``(param, key)`` with ``param`` one of ``params`` (the longest that fits).

    Parameter names contain dots, so the split is found by the known names, not by counting dots.

    Example:
        >>> split_state_key("state.layers.0.w.exp_avg", {"layers.0.w": None})
        ('layers.0.w', 'exp_avg')
    """
    if not name.startswith("state."):
        return None
    rest = name[len("state.") :]
    cut = len(rest)
    while (cut := rest.rfind(".", 0, cut)) > 0:
        if rest[:cut] in params:
            return rest[:cut], rest[cut + 1 :]
    return None


def _plain(value: Any, what: str, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise OstateError(
                f"{what} is a tensor of shape {tuple(value.shape)}; cannot store it as metadata",
                where=where,
                hint="write a .pt file instead",
            )
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, what, where) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN/Infinity, which json.loads reads back
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise OstateError(
        f"{what} is a {type(value).__name__}; cannot store it as metadata", where=where, hint="write a .pt file instead"
    )


def _tuples(value: Any) -> Any:
    # JSON has no tuples; torch keeps tuple hyperparameters (betas, etas, ...) as tuples.
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _json(meta: Mapping[str, str], key: str, path: str, kind: type, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise OstateError(f"metadata '{key}' is missing", where=path)
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise OstateError(f"metadata '{key}' is not valid JSON ({e})", where=path) from None
    if not isinstance(value, kind):
        raise OstateError(f"metadata '{key}' is not a JSON {kind.__name__}", where=path)
    return value


READER = Reader("safetensors", "optimizer state in a .safetensors file, as `ostate convert` writes it", sniff, read)
