"""A live ``torch.optim.Optimizer`` as an :class:`~ostate.state.OptimizerState`, without copying a tensor.

The record is built from the optimizer's own ``state`` and ``param_groups`` (not from
``state_dict()``, which would run the optimizer's state-dict hooks, and under FSDP
gather the shards): every state tensor is wrapped as it is, on its own device, in a
:class:`~ostate.state.TensorRef`. Parameters are named from the model
(``named_parameters()``, matched by identity, so the names are exact) and the family is
decided as :func:`ostate.load` decides it (:func:`ostate.loading.identified`).

Wrappers are looked through: accelerate's ``AcceleratedOptimizer`` (what the Hugging
Face ``Trainer`` holds; ``DeepSpeedOptimizerWrapper`` under DeepSpeed), Lightning's
``LightningOptimizer``, DeepSpeed's engine, torch's ``ZeroRedundancyOptimizer`` (whose
``optim`` holds this rank's share of the parameters) and DeepSpeed's ZeRO optimizers
(whose flat partitions :mod:`ostate.monitor.deepspeed_live` cuts into parameters). A
parameter or state tensor that is a ``DTensor`` (FSDP2, ``fully_shard``) is read as its
local shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from ostate.errors import OstateError
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.loading import IN_MEMORY, identified
from ostate.state import Checkpoint, OptimizerState, TensorRef

# Wrappers that hold the real optimizer in an attribute: (class name, attribute).
_WRAPPERS = (
    ("AcceleratedOptimizer", "optimizer"),
    ("DeepSpeedOptimizerWrapper", "optimizer"),
    ("LightningOptimizer", "_optimizer"),
    ("DeepSpeedEngine", "optimizer"),
)
# A wrapper whose inner optimizer holds only this rank's share of the parameters.
_SHARDING_WRAPPERS = (("ZeroRedundancyOptimizer", "optim"),)
# DeepSpeed's ZeRO optimizers: flat partitions of this rank's share (ostate.monitor.deepspeed_live).
ZERO_OPTIMIZERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer")


@dataclass
class LiveOptimizer:
    """The optimizer the monitor reads (wrappers looked through) and whether it holds only a share of the parameters.

    ``zero`` is DeepSpeed's ZeRO optimizer when there is one (``optimizer`` is then its
    inner torch optimizer, stepping this rank's flat partitions).
    """

    optimizer: torch.optim.Optimizer
    sharded: bool
    zero: Any = None


class StatefulOptimizer(Protocol):
    """What :func:`live_checkpoint` reads of an optimizer: its ``param_groups`` and ``state``."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    @property
    def state(self) -> Mapping[Any, Any]: ...


def unwrap(optimizer: Any) -> LiveOptimizer:
    """The ``torch.optim.Optimizer`` inside ``optimizer``'s wrappers; a clear error for what cannot be read live.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> live = unwrap(torch.optim.SGD([p], lr=0.1))
        >>> type(live.optimizer).__name__, live.sharded
        ('SGD', False)
    """
    sharded = False
    for _ in range(8):  # wrappers around wrappers, a few deep at most
        name = type(optimizer).__name__
        inner = next((getattr(optimizer, a, None) for n, a in _WRAPPERS if n == name), None)
        if inner is None:
            inner = next((getattr(optimizer, a, None) for n, a in _SHARDING_WRAPPERS if n == name), None)
            sharded = sharded or inner is not None
        if inner is None:
            break
        optimizer = inner
    if type(optimizer).__name__ in ZERO_OPTIMIZERS:
        return LiveOptimizer(optimizer.optimizer, True, zero=optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OstateError(
            f"cannot monitor a {type(optimizer).__name__}",
            hint="pass the torch.optim.Optimizer that steps the model (or accelerate's, Lightning's or DeepSpeed's wrapper of it)",
        )
    return LiveOptimizer(optimizer, sharded)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a ``DTensor``'s local shard, any other tensor itself (never a copy)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) and _is_dtensor(tensor) else tensor


def is_sharded_parameter(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` split across ranks (a ``Shard`` placement), as FSDP2 makes them."""
    if not _is_dtensor(tensor):
        return False
    return any(type(p).__name__ in ("Shard", "_StridedShard") for p in tensor.placements)  # type: ignore[attr-defined]


def _is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor"


def parameter_names(model: torch.nn.Module | None) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of ``model`` (shared parameters keep their first name)."""
    if model is None:
        return {}
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    return names


def live_checkpoint(
    optimizer: StatefulOptimizer,
    names: Mapping[int, str],
    *,
    location: str = "optimizer",
    kind: str | None = None,
    kinds: Mapping[str, str] | None = None,
) -> Checkpoint:
    """The live optimizer's state as a :class:`~ostate.state.Checkpoint` (one optimizer), its weights beside it.

    ``names`` maps ``id(parameter)`` to its name (:func:`parameter_names`; name source
    ``model-order``, as :func:`ostate.from_state_dict` names them from a module); parameters not in
    it keep the names the optimizer's groups give (``param_names``, torch >= 2.5) or
    ``param.<index>``. ``kind`` names the family instead of detecting it. ``kinds`` maps
    names to the parameter kinds the model's module types give (``ostate.formats.naming.module_kinds``), as
    :func:`ostate.from_state_dict` takes them from a module.

    Example:
        >>> m = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        >>> m(torch.randn(4, 3)).sum().backward(); opt.step()
        >>> ckpt = live_checkpoint(opt, parameter_names(m))
        >>> o = ckpt.optimizers[0]
        >>> o.kind, [p.name for p in o.params], o.params[0].state["exp_avg"].read() is opt.state[m.weight]["exp_avg"]
        ('adamw', ['weight', 'bias'], True)
    """
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    weights: dict[str, TensorRef] = {}
    index = 0
    from_model: set[int] = set()
    for group in optimizer.param_groups:
        params = group["params"]
        given = group.get("param_names")
        ids, group_names = [], []
        for j, p in enumerate(params):
            name = names.get(id(p))
            if name is not None:
                from_model.add(index)
            else:
                name = given[j] if isinstance(given, (list, tuple)) and j < len(given) else f"param.{index}"
            entry = optimizer.state.get(p)
            if entry:
                state[index] = {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            weights[name] = TensorRef.of(local(p.detach()))
            ids.append(index)
            group_names.append(name)
            index += 1
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "params": ids, "param_names": group_names})
    record: OptimizerState = read_optimizer({"state": state, "param_groups": groups}, location)
    for param in record.params:  # named by the model, as ostate.from_state_dict(..., model=module) names them
        if param.index in from_model:
            param.name_source = "model-order"
    record.model_order = list(names.values()) if names else [n for g in groups for n in g["param_names"]]
    record.param_kinds = dict(kinds or {})
    checkpoint = Checkpoint(IN_MEMORY, "live", [record], weights=weights, weights_location="model")
    return identified(checkpoint, kind)
