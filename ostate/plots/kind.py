"""What a plot kind is: a drawing function, the views it splits by, and what it draws from.

Each kind's module defines one :class:`PlotKind` named ``KIND``;
:mod:`ostate.plots.registry` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from matplotlib.figure import Figure

from ostate.errors import OstateError

# What a kind's ``draw`` takes: one analysed Series per checkpoint, or a computed comparison.
SERIES = "series"
COMPARISON = "comparison"
# ... or a :class:`~ostate.plots.timeline.Timeline`: rows of a view over training steps.
TIMELINE = "timeline"


@dataclass(frozen=True)
class PlotKind:
    """One kind of figure.

    ``draw(data, by=...)`` makes the figure; ``views`` are the values ``by`` accepts (how
    the figure splits the coordinates into panels or lines), the first being the
    default; ``summary`` is one line for ``--help``. ``takes`` says what ``data`` is:
    :data:`SERIES`, a list of :class:`~ostate.plots.series.Series` (one per checkpoint),
    for which ``joint`` says whether they must be summarised with the joint histogram of
    the moments; or :data:`COMPARISON`, a :class:`~ostate.compare.compute.Comparison` of
    pairs of checkpoints (``compare``, whose views are how the pairs were made); or
    :data:`TIMELINE`, a :class:`~ostate.plots.timeline.Timeline` (``timeline``).
    """

    name: str
    summary: str
    views: tuple[str, ...]
    draw: Callable[..., Figure]
    joint: bool = False
    takes: str = SERIES


def check_plot_view(kind: PlotKind, by: str | None) -> str:
    """``by``, or the kind's default view; a clear error for a view the kind does not draw."""
    if by is None:
        return kind.views[0]
    if by not in kind.views:
        raise OstateError(
            f"the {kind.name} plot cannot be split by={by}", hint=f"choose one of: {', '.join(kind.views)}"
        )
    return by
