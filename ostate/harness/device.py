"""Where a trial computes: the GPU when there is one, else the CPU; and moving its data there.

``auto`` (the default) is CUDA's first GPU when torch sees one, else the CPU. The
harness builds each trial's model on the CPU, loads the source's weights there, then
moves the model to the device before the optimizer is made (so torch places the
loaded optimizer state beside the parameters); every batch a task yields is moved with
:func:`to_device`, and the built-in tasks evaluate on :func:`model_device`. A task of
one's own whose ``evaluate`` makes its own tensors moves them to
``next(model.parameters()).device`` (or runs with ``device="cpu"``).

A trial on a GPU rounds differently from one on the CPU, so the device type enters its
id (:func:`device_key`), except the CPU's, which keeps the ids of earlier runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ostate.errors import OstateError

AUTO = "auto"


def resolve_device(name: str | torch.device | None = AUTO) -> torch.device:
    """The device ``name`` means: ``auto`` (or ``None``) is ``cuda`` when torch sees a GPU, else ``cpu``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type in ("cpu", "cuda")
        True
        >>> resolve_device("abacus")
        Traceback (most recent call last):
        ...
        ostate.errors.OstateError: unknown device 'abacus' (auto, cpu, cuda or cuda:N)
    """
    if name is None or name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OstateError(
            f"device '{name}' asked for, but torch sees no CUDA GPU (torch {torch.__version__})",
            hint="run with --device cpu (or auto), or install a CUDA build of torch",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OstateError(
            f"device '{name}' asked for, but torch sees {torch.cuda.device_count()} GPU(s)",
            hint=f"cuda:0 to cuda:{torch.cuda.device_count() - 1}",
        )
    return device


def parse_device(name: str | torch.device) -> torch.device:
    """The device ``name`` names (``cpu``, ``cuda``, ``cuda:N``, ...), whether or not this machine has it.

    Example:
        >>> parse_device("cuda:1")
        device(type='cuda', index=1)
    """
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise OstateError(f"unknown device '{name}'", hint="auto, cpu, cuda or cuda:N") from None


def device_key(device: torch.device) -> dict[str, str]:
    """What a trial's id takes from its device: nothing on the CPU (the ids of earlier runs
    stay), the device type elsewhere.

    Example:
        >>> device_key(torch.device("cpu")), device_key(torch.device("cuda", 1))
        ({}, {'device': 'cuda'})
    """
    return {} if device.type == "cpu" else {"device": device.type}


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device`` (tensors, and dicts, lists and tuples of them).

    Example:
        >>> b = to_device({"x": torch.ones(2), "pair": (torch.zeros(1), 3)}, torch.device("cpu"))
        >>> b["x"].device.type, b["pair"][1]
        ('cpu', 3)
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return type(batch)((k, to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
