"""Find optimizer state dicts, a model state dict and LR schedulers inside a loaded checkpoint.

Checkpoints nest their parts in dicts and lists of every shape (``optimizer``,
``optim``, ``optimizer_state_dict``, Lightning's ``optimizer_states`` list, several
optimizers side by side, or a bare optimizer state dict). The walk below finds each
part by its structure, not by its key, and reports where it sits as a path such as
``optimizer_states[0]`` or ``trainer.optim``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

import torch

from ostate.state import TensorRef

ROOT = "(root)"
MAX_DEPTH = 8
# Keys that usually hold the model's weights, most likely first.
MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module", "model_state", "net", "network", "weights")


def is_optimizer_state_dict(obj: Any) -> bool:
    """True for ``{'state': {...}, 'param_groups': [{'params': [...]}, ...]}``."""
    if not isinstance(obj, Mapping):
        return False
    state, groups = obj.get("state"), obj.get("param_groups")
    return (
        isinstance(state, Mapping)
        and isinstance(groups, (list, tuple))
        and all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups)
    )


def is_scheduler_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "last_epoch" in obj and ("base_lrs" in obj or "_last_lr" in obj)


def is_tensor_dict(obj: Any) -> bool:
    """A mapping of names to tensors (or lazy :class:`TensorRef`) with at least one floating-point one."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = 0
    floating = False
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, torch.Tensor):
            tensors += 1
            floating = floating or value.is_floating_point()
        elif isinstance(value, TensorRef):  # a lazily read tensor (directory formats)
            tensors += 1
            floating = floating or value.dtype.is_floating_point
        elif not key.endswith("_extra_state"):
            return False
    return tensors > 0 and floating


def child_path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{'' if parent == ROOT else parent}[{key}]"
    text = str(key) if isinstance(key, str) and key and "." not in key and "[" not in key else repr(key)
    return text if parent == ROOT else f"{parent}.{text}"


def walk(obj: Any, path: str = ROOT, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every dict and list inside ``obj`` with its path, parents before children.

    An optimizer state dict is yielded but not entered.
    """
    for found, _route, node in walk_routes(obj, path, (), depth):
        yield found, node


def walk_routes(obj: Any, path: str = ROOT, route: tuple = (), depth: int = 0) -> Iterator[tuple[str, tuple, Any]]:
    """:func:`walk`, with each node's route: the keys and list positions that lead to it from ``obj``.

    Example:
        >>> [(p, r) for p, r, _ in walk_routes({"a": [{"b": 1}]})]
        [('(root)', ()), ('a', ('a',)), ('a[0]', ('a', 0))]
    """
    if depth > MAX_DEPTH:
        return
    if isinstance(obj, Mapping):
        yield path, route, obj
        if is_optimizer_state_dict(obj) or is_tensor_dict(obj):
            return
        for key, value in obj.items():
            if isinstance(value, (Mapping, list, tuple)):
                yield from walk_routes(value, child_path(path, key), route + (key,), depth + 1)
    elif isinstance(obj, (list, tuple)):
        yield path, route, obj
        for i, value in enumerate(obj):
            if isinstance(value, (Mapping, list, tuple)):
                yield from walk_routes(value, child_path(path, i), route + (i,), depth + 1)


def find_optimizers(obj: Any) -> list[tuple[str, Mapping]]:
    """``(location, optimizer_state_dict)`` for every optimizer state dict in ``obj``."""
    return [(path, o) for path, o in walk(obj) if is_optimizer_state_dict(o)]


def find_optimizer_routes(obj: Any) -> list[tuple[str, tuple, Mapping]]:
    """``(location, route, optimizer_state_dict)`` for every optimizer state dict in ``obj``, in
    :func:`find_optimizers`' order; :func:`replaced` puts a new one at a route."""
    return [(path, route, o) for path, route, o in walk_routes(obj) if is_optimizer_state_dict(o)]


def replaced(obj: Any, route: tuple, value: Any) -> Any:
    """A copy of ``obj`` with the entry at ``route`` replaced by ``value``.

    Only the containers along the route are copied (shallowly, keeping their type);
    everything else is shared with ``obj``, which is not modified.

    Example:
        >>> original = {"optimizer_states": [{"x": 1}], "epoch": 3}
        >>> replaced(original, ("optimizer_states", 0), {"x": 2})
        {'optimizer_states': [{'x': 2}], 'epoch': 3}
        >>> original["optimizer_states"][0]
        {'x': 1}
    """
    if not route:
        return value
    head, rest = route[0], route[1:]
    if isinstance(obj, tuple):
        items = list(obj)
        items[head] = replaced(obj[head], rest, value)
        return type(obj)(items) if type(obj) is tuple else type(obj)(*items)
    out = copy.copy(obj)
    out[head] = replaced(obj[head], rest, value)
    return out


def find_schedulers(obj: Any) -> list[tuple[str, Mapping]]:
    return [(path, o) for path, o in walk(obj) if is_scheduler_state_dict(o)]


def find_model_state_dict(obj: Any) -> tuple[str, Mapping[str, Any]] | None:
    """The model's state dict (of tensors or TensorRef): the one under a usual key, else the only one there is."""
    if is_tensor_dict(obj):
        return ROOT, obj
    found = [(path, o) for path, o in walk(obj) if path != ROOT and is_tensor_dict(o)]
    if not found:
        return None
    for key in MODEL_KEYS:
        for path, o in found:
            if path == key:
                return path, o
    return found[0] if len(found) == 1 else None


def top_level_summary(obj: Any, limit: int = 12) -> str:
    """A short description of what a loaded checkpoint holds, for error messages."""
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj.keys())[:limit]]
        more = f", ... ({len(obj)} keys)" if len(obj) > limit else ""
        return f"top-level keys: {', '.join(keys) or '(none)'}{more}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def scalar_metadata(obj: Any) -> dict[str, Any]:
    """Top-level scalar entries (epoch, global_step, versions)."""
    if not isinstance(obj, Mapping):
        return {}
    out = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, (int, float, str, bool)):
            out[key] = value
        elif (
            isinstance(key, str)
            and isinstance(value, torch.Tensor)
            and value.numel() == 1
            and not value.is_floating_point()
        ):
            out[key] = int(value)
    return out


# Keys under which training scripts keep the model's configuration (Lightning: hyper_parameters).
CONFIG_KEYS = ("config", "model_config", "model_args", "hyper_parameters", "hparams", "args")


def find_model_config(obj: Any) -> dict[str, Any] | None:
    """A model configuration stored in the checkpoint: the first mapping under a usual key
    (:data:`CONFIG_KEYS`, at the top or one level down) holding plain numbers, as a dict of them."""
    if not isinstance(obj, Mapping):
        return None
    candidates = [obj.get(k) for k in CONFIG_KEYS]
    candidates += [c.get(k) for c in list(candidates) if isinstance(c, Mapping) for k in CONFIG_KEYS]
    for candidate in candidates:
        if isinstance(candidate, Mapping):
            plain = {str(k): v for k, v in candidate.items() if isinstance(v, (int, float, str, bool))}
            if any(isinstance(v, int) and not isinstance(v, bool) for v in plain.values()):
                return plain
    return None
