"""``ostate.load``: turn what is on disk into a :class:`~ostate.state.Checkpoint`.

``load(path)`` takes a file or a directory, recognises its layout from its contents
(:mod:`ostate.formats.registry`: a ``torch.save`` file, a Hugging Face Trainer
``checkpoint-N/``, an accelerate ``save_state`` folder, a torch.distributed.checkpoint
folder, optimizer state in safetensors), finds every optimizer in it and names the
parameters from the checkpoint's own evidence; then it decides each optimizer's family
from its state and group keys (:mod:`ostate.optimizers.identify`: readers know nothing of
optimizer families). Tensors stay on disk until a statistic reads them.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats import hf_trainer, registry
from ostate.formats.naming.module_kinds import module_kinds
from ostate.formats.naming.objects import from_object
from ostate.formats.naming.prefixes import drop_wrapper_prefixes
from ostate.optimizers.identify import identify
from ostate.state import Checkpoint, OptimizerState

__all__ = ["as_checkpoint", "load", "from_state_dict"]


def load(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    optimizer: str | None = None,
    format_hint: str | None = None,
    base_config: str | os.PathLike | None = None,
) -> Checkpoint:
    """Read the optimizer state (and what else is there) from a checkpoint file or directory.

    Args:
        path: a ``torch.save`` file (a bare optimizer state dict, a training
            checkpoint holding one or more, a Lightning ``.ckpt``), a Hugging Face
            Trainer ``checkpoint-N/`` directory, an accelerate ``save_state``
            directory, a torch.distributed.checkpoint directory, a DeepSpeed
            checkpoint folder, or a ``.safetensors`` file of optimizer state
            (see docs/formats.md).
        trust_pickle: allow pickled Python objects beyond tensors and plain
            containers. Off by default: a hostile file could run code when unpickled.
        optimizer: the optimizer family (``adamw``, ``sgd``, ...) instead of detecting it.
        format_hint: the layout's reader (``hf-trainer``, ``accelerate``, ``dcp``,
            ``safetensors``, ``torch``) instead of recognising it.
        base_config: for a Trainer checkpoint of a PEFT (LoRA) model, the folder holding
            the base model's ``config.json``, to name the adapter's parameters (by default
            looked for locally from ``adapter_config.json``; never downloaded).

    Example:
        >>> import ostate, torch, tempfile, os
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        >>> ckpt = ostate.load(path)
        >>> o = ckpt.optimizers[0]
        >>> ckpt.format, o.location, o.kind, [p.name for p in o.params]
        ('torch', 'optimizer', 'adamw', ['weight', 'bias'])
    """
    path = os.fspath(path)
    if base_config is not None and format_hint in (None, hf_trainer.READER.name):
        checkpoint = hf_trainer.read(path, trust_pickle=trust_pickle, base_config=base_config)
    else:
        checkpoint = registry.read(path, trust_pickle=trust_pickle, format_hint=format_hint)
    return identified(drop_wrapper_prefixes(checkpoint), optimizer)


def as_checkpoint(target: Checkpoint | str | os.PathLike, **options: Any) -> Checkpoint:
    """``target`` itself when already loaded, else :func:`load` of the path (``options`` go to it).

    For the public functions that take a checkpoint (``ostate.report.inspect``,
    ``ostate.doctor.diagnose``): a path works as well as what ``load`` returns.
    """
    if isinstance(target, (str, os.PathLike)):
        return load(target, **options)
    if not isinstance(target, Checkpoint):
        raise OstateError(
            f"expected a checkpoint or its path, not a {type(target).__name__}",
            hint="pass a path or what ostate.load(path) returns",
        )
    return target


# The path of a checkpoint made by from_state_dict, which has no file.
IN_MEMORY = "<memory>"


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
        checkpoint = from_object(obj, path=IN_MEMORY, model=("model", weights))
        kinds = module_kinds(model)  # the model at hand: its module types say which parameters are norms
        for o in checkpoint.optimizers:
            o.param_kinds = dict(kinds)
    elif model is not None:
        checkpoint = from_object(obj, path=IN_MEMORY, model=("model", dict(model)))
    else:
        checkpoint = from_object(obj, path=IN_MEMORY)
    return identified(drop_wrapper_prefixes(checkpoint), optimizer)


def identified(checkpoint: Checkpoint, optimizer: str | None = None) -> Checkpoint:
    """``checkpoint`` with the family of every optimizer in it decided (``optimizer``: the family the user named).

    Readers leave the family open; this is the one place it is decided
    (:func:`ostate.optimizers.identify.identify`).
    """
    for o in checkpoint.optimizers:
        identify(o, optimizer)
    return checkpoint


def selected_optimizers(checkpoint: Checkpoint, index: int | None) -> list[OptimizerState]:
    """Every optimizer of ``checkpoint``, or only the one at ``index``; an error naming them all for a wrong index."""
    if index is None:
        return list(checkpoint.optimizers)
    if not 0 <= index < len(checkpoint.optimizers):
        raise OstateError(
            f"no optimizer with index {index}", where=checkpoint.path, hint=f"found {_listing(checkpoint)}"
        )
    return [checkpoint.optimizers[index]]


def pick_optimizer(checkpoint: Checkpoint, index: int | None) -> OptimizerState:
    """The optimizer at ``index``, or the only one; an error naming them all otherwise."""
    if index is None and len(checkpoint.optimizers) != 1:
        raise OstateError(
            f"holds {len(checkpoint.optimizers)} optimizers",
            where=checkpoint.path,
            hint=f"choose one with optimizer_index=K ({_listing(checkpoint)})",
        )
    return selected_optimizers(checkpoint, index)[0]


def _listing(checkpoint: Checkpoint) -> str:
    return ", ".join(f"{i}: {o.location}" for i, o in enumerate(checkpoint.optimizers))
