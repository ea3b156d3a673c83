"""The plot kinds: each kind's module defines a :class:`~ostate.plots.kind.PlotKind` named
``KIND``, listed in :data:`KINDS`.

``ostate plot --kind NAME``, :func:`ostate.plots.plot` and :func:`ostate.figures.plot` find
a kind here, so adding a kind is adding a module and listing its ``KIND``.
"""

from __future__ import annotations

from ostate.errors import OstateError
from ostate.plots import compare, layer_profile, lr_histogram, moments, timeline
from ostate.plots.kind import PlotKind

# By name: the order --help, errors and plot_kinds() list them in.
KINDS: tuple[PlotKind, ...] = (
    compare.KIND,
    layer_profile.KIND,
    lr_histogram.KIND,
    moments.KIND,
    timeline.KIND,
)


def plot_kinds() -> dict[str, PlotKind]:
    """Every plot kind by name.

    Example:
        >>> sorted(plot_kinds())
        ['compare', 'layer-profile', 'lr-histogram', 'moments', 'timeline']
    """
    return {kind.name: kind for kind in KINDS}


def get_kind(name: str) -> PlotKind:
    """The plot kind called ``name``; a clear error listing the kinds otherwise."""
    kinds = plot_kinds()
    if name not in kinds:
        raise OstateError(f"unknown plot kind '{name}'", hint=f"choose one of: {', '.join(kinds)}")
    return kinds[name]
