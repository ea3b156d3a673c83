"""The shared step of every torch-based reader: a loaded object in, a :class:`Checkpoint` out.

A reader loads what is on disk (a ``torch.save`` file, or a tree rebuilt from a
directory with lazy :class:`~ostate.state.TensorRef` leaves) and hands it here: every
optimizer state dict in it is found by its structure, named, and wrapped.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats.naming import discover
from ostate.formats.naming.model_order import ModelEntry
from ostate.formats.naming.torch_optim import read_optimizer, tensor_ref
from ostate.state import Checkpoint, TensorRef


def from_object(
    obj: Any,
    *,
    path: str,
    model: tuple[str, Mapping[str, torch.Tensor | TensorRef]] | None = None,
    format: str | None = None,
    mapped: bool = False,
) -> Checkpoint:
    """Build a :class:`Checkpoint` from a loaded object.

    ``model`` is ``(location, state_dict)`` of the model's weights when the caller
    knows them; otherwise a model state dict inside ``obj`` is used when there is one.
    ``mapped`` says the object's tensors live in a memory-mapped file, so the analysis
    can give their pages back after reading them (:mod:`ostate.formats.files.pages`).

    Example:
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> ckpt = from_object({"model": m.state_dict(), "optim": opt.state_dict()}, path="<memory>")
        >>> [(p.name, p.name_source) for p in ckpt.optimizers[0].params]
        [('weight', 'model-order'), ('bias', 'model-order')]
    """
    found = discover.find_optimizers(obj)
    if not found:
        raise OstateError(
            "no optimizer state found",
            where=path,
            hint=f"{discover.top_level_summary(obj)}; an optimizer state dict has 'state' and 'param_groups'",
        )
    if model is None:
        model = discover.find_model_state_dict(obj)
    entries = (model[0], model_entries(model[1])) if model is not None else None
    optimizers = [read_optimizer(sd, location, model=entries, mapped=mapped) for location, sd in found]
    weights = None
    if model is not None:
        weights = {k: _ref(v, mapped) for k, v in model[1].items() if _is_floating(v)}
    if format is None:
        format = "lightning" if isinstance(obj, Mapping) and "pytorch-lightning_version" in obj else "torch"
    return Checkpoint(
        path=path,
        format=format,
        optimizers=optimizers,
        weights=weights,
        weights_location=model[0] if model is not None else None,
        schedulers=[dict(s, _location=loc) for loc, s in discover.find_schedulers(obj)],
        metadata=discover.scalar_metadata(obj),
        config=discover.find_model_config(obj),
    )


def model_entries(state_dict: Mapping[str, Any]) -> list[ModelEntry]:
    """Naming records for a model state dict, with tied tensors marked as aliases.

    Lazy :class:`TensorRef` entries carry no storage, so ties among them cannot be seen.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> [(e.name, e.shape, e.alias_of) for e in model_entries({"w": lin.weight, "tied": lin.weight})]
        [('w', (2, 3), None), ('tied', (2, 3), 'w')]
    """
    seen: dict[tuple, str] = {}
    out = []
    for name, t in state_dict.items():
        if isinstance(t, TensorRef):
            out.append(ModelEntry(name, tuple(t.shape), t.dtype.is_floating_point))
            continue
        if not isinstance(t, torch.Tensor):
            continue
        alias = None
        if t.numel() > 0:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            alias = seen.get(key)
            if alias is None:
                seen[key] = name
        out.append(ModelEntry(name, tuple(t.shape), t.is_floating_point(), alias))
    return out


def _is_floating(value: Any) -> bool:
    if isinstance(value, TensorRef):
        return value.dtype.is_floating_point
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _ref(value: torch.Tensor | TensorRef, mapped: bool) -> TensorRef:
    return value if isinstance(value, TensorRef) else tensor_ref(value, mapped)
