"""The plot kinds: every module of ``ostate.plots`` that defines ``KIND`` is one.

A plot kind is one module with a drawing function and a :class:`PlotKind` record named
``KIND``; ``ostate plot --kind NAME`` and :func:`ostate.plots.plot` find it here, so
adding a kind is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from matplotlib.figure import Figure

from ostate.errors import OstateError


@dataclass(frozen=True)
class PlotKind:
    """One kind of figure.

    ``draw(series, by=...)`` makes the figure from a list of
    :class:`~ostate.plots.series.Series` (one per checkpoint); ``views`` are the values
    ``by`` accepts (how the figure splits the coordinates into panels or lines), the
    first being the default; ``joint`` says whether the series must be summarised with
    the joint histogram of the moments; ``summary`` is one line for ``--help``.
    A kind drawn from something other than one summary per checkpoint (``compare``:
    pairs of checkpoints, streamed side by side) gives ``from_inputs(inputs, by=...,
    **reading_options)`` instead of ``draw``.
    """

    name: str
    summary: str
    views: tuple[str, ...]
    draw: Callable[..., Figure] | None = None
    joint: bool = False
    from_inputs: Callable[..., Figure] | None = None


@lru_cache(maxsize=1)
def plot_kinds() -> dict[str, PlotKind]:
    """Every plot kind by name, in the order of their modules' names.

    Example:
        >>> sorted(plot_kinds())
        ['compare', 'layer-profile', 'lr-histogram', 'moments']
    """
    import ostate.plots as package

    kinds: dict[str, PlotKind] = {}
    for module in sorted(info.name for info in pkgutil.iter_modules(package.__path__)):
        kind = getattr(importlib.import_module(f"{package.__name__}.{module}"), "KIND", None)
        if isinstance(kind, PlotKind):
            kinds[kind.name] = kind
    return kinds


def get_kind(name: str) -> PlotKind:
    """The plot kind called ``name``; a clear error listing the kinds otherwise."""
    kinds = plot_kinds()
    if name not in kinds:
        raise OstateError(f"unknown plot kind '{name}'", hint=f"choose one of: {', '.join(kinds)}")
    return kinds[name]


def check_view(kind: PlotKind, by: str | None) -> str:
    """``by``, or the kind's default view; a clear error for a view the kind does not draw."""
    if by is None:
        return kind.views[0]
    if by not in kind.views:
        raise OstateError(f"the {kind.name} plot cannot be split --by {by}",
                          hint=f"choose one of: {', '.join(kind.views)}")
    return by

