"""Checkpoint readers: turn what is on disk into a :class:`~ostate.state.Checkpoint`.

``load(path)`` opens a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``)
safely and memory-mapped, finds every optimizer state dict in it, and names the
parameters from the checkpoint's own evidence.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats import discover
from ostate.formats.naming import ModelEntry
from ostate.formats.torch_optim import read_optimizer, tensor_ref
from ostate.formats.torchfile import check_readable_file, load_torch_file, sniff
from ostate.state import Checkpoint

__all__ = ["load", "from_state_dict"]


def load(path: str | os.PathLike, *, trust_pickle: bool = False, optimizer: str | None = None) -> Checkpoint:
    """Read the optimizer state (and what else is there) from a checkpoint.

    Args:
        path: a ``torch.save`` file: a bare optimizer state dict, a training
            checkpoint holding one or more, or a Lightning ``.ckpt``.
        trust_pickle: allow pickled Python objects beyond tensors and plain
            containers. Off by default: a hostile file could run code when unpickled.
        optimizer: the optimizer family (``adamw``, ``sgd``, ...) instead of detecting it.

    Example:
        >>> import ostate, torch, tempfile, os
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        >>> ckpt = ostate.load(path)
        >>> o = ckpt.optimizers[0]
        >>> o.location, o.kind, [p.name for p in o.params]
        ('optimizer', 'adamw', ['weight', 'bias'])
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OstateError(
            "is a directory; ostate reads checkpoint files (.pt, .pth, .bin, .ckpt)",
            where=path,
            hint=f"found: {_listing(path)}",
        )
    check_readable_file(path)
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    checkpoint = from_object(obj, path=path, optimizer=optimizer, mapped=sniff(path) == "zip")
    if checkpoint.config is None:
        checkpoint.config = sibling_config(path)
    return checkpoint


def sibling_config(path: str) -> dict[str, Any] | None:
    """The model's ``config.json`` in the checkpoint's folder (Hugging Face layout), if it reads as a dict."""
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(candidate, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def from_state_dict(
    obj: Any, *, model: torch.nn.Module | Mapping[str, torch.Tensor] | None = None, optimizer: str | None = None
) -> Checkpoint:
    """Wrap an in-memory optimizer state dict (or a whole checkpoint dict) without saving it.

    ``model`` names the parameters: a module (its ``named_parameters()`` order, exact)
    or a state dict (matched by order and shape like a saved checkpoint's).

    Example:
        >>> import ostate, torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> ckpt = ostate.from_state_dict(opt.state_dict(), model=model)
        >>> [(p.name, p.name_source) for p in ckpt.optimizers[0].params]
        [('weight', 'model-order'), ('bias', 'model-order')]
    """
    if isinstance(model, torch.nn.Module):
        weights = {name: p.detach() for name, p in model.named_parameters()}
        return from_object(obj, path="<memory>", optimizer=optimizer, model=("model", weights))
    if model is not None:
        return from_object(obj, path="<memory>", optimizer=optimizer, model=("model", dict(model)))
    return from_object(obj, path="<memory>", optimizer=optimizer)


def from_object(
    obj: Any,
    *,
    path: str,
    optimizer: str | None = None,
    model: tuple[str, Mapping[str, torch.Tensor]] | None = None,
    format: str | None = None,
    mapped: bool = False,
) -> Checkpoint:
    """Build a :class:`Checkpoint` from a loaded object (the shared step of every torch-based reader).

    ``mapped`` says the object's tensors live in a memory-mapped file, so the analysis
    can give their pages back after reading them (:mod:`ostate.formats.pages`).
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
    optimizers = [read_optimizer(sd, location, model=entries, kind=optimizer, mapped=mapped) for location, sd in found]
    weights = None
    if model is not None:
        weights = {k: tensor_ref(v, mapped) for k, v in model[1].items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point()}
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
    """Naming records for a model state dict, with tied tensors marked as aliases."""
    seen: dict[tuple, str] = {}
    out = []
    for name, t in state_dict.items():
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


def _listing(path: str, limit: int = 12) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return f"(cannot list: {e.strerror})"
    if not names:
        return "(empty)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
