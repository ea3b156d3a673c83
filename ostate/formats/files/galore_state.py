"""GaLore's projector (``galore_torch.GaLoreProjector``), read without galore-torch and without running its code.

GaLore's optimizers keep, per projected parameter, a ``GaLoreProjector`` object in the
state (``state["projector"]``), which ``torch.save`` pickles as the class and its
attributes (source: galore-torch 1.0, ``galore_torch/galore_projector.py``): ``rank``,
``update_proj_gap``, ``scale``, ``proj_type`` (``std``, ``reverse_std``, ``right``,
``left``, ``full``), ``verbose`` and ``ortho_matrix`` (the projection: a tensor, or the
pair ``[A, B]`` for ``full``). ostate admits exactly that class name, as the stand-in
below (unpickling sets its attributes; no galore-torch code runs), and :func:`unwrap`
turns it into plain state entries: ``projector_ortho`` (``projector_ortho_left`` and
``projector_ortho_right`` for ``full``), ``projector_rank``, ``projector_scale``,
``projector_type``, ``projector_update_proj_gap``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ostate.errors import OstateError

_QUALIFIED = "galore_torch.galore_projector.GaLoreProjector"


class GaLoreProjector:
    """Stand-in for ``galore_torch.galore_projector.GaLoreProjector``: its attributes, nothing else."""


GALORE_GLOBALS: tuple[tuple[Callable[..., Any], str], ...] = ((GaLoreProjector, _QUALIFIED),)


def is_projector(value: Any) -> bool:
    """Whether ``value`` is a GaLore projector (the stand-in, or the real class after ``trust_pickle``)."""
    cls = type(value)
    return isinstance(value, GaLoreProjector) or f"{cls.__module__}.{cls.__qualname__}" == _QUALIFIED


def unwrap(key: str, value: Any) -> dict[str, Any]:
    """The plain state entries of one projector saved under ``key`` (see the module docstring)."""
    attributes = vars(value)
    ortho = attributes.get("ortho_matrix")
    out: dict[str, Any] = {
        f"{key}_rank": attributes.get("rank"),
        f"{key}_scale": attributes.get("scale", 1.0),
        f"{key}_type": attributes.get("proj_type", "std"),
        f"{key}_update_proj_gap": attributes.get("update_proj_gap"),
    }
    if isinstance(ortho, torch.Tensor):
        out[f"{key}_ortho"] = ortho
    elif isinstance(ortho, (list, tuple)) and len(ortho) == 2 and all(isinstance(t, torch.Tensor) for t in ortho):
        out[f"{key}_ortho_left"], out[f"{key}_ortho_right"] = ortho
    elif ortho is not None:
        raise OstateError(f"GaLore projector '{key}' has no projection matrix", hint="the file is damaged")
    return out
