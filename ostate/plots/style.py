"""What every ostate figure shares: the colour-blind-safe palette, panel grids, and atomic saving.

Figures are built with matplotlib's object API on the Agg canvas (``Figure`` directly,
never pyplot), so nothing needs a display and no global plotting state is touched.
Lines use the Okabe-Ito palette, which stays distinguishable under every common
colour-vision deficiency, with line styles as a second cue; 2-D histograms use
viridis (perceptually uniform, readable in grey scale and with colour-vision
deficiencies). A figure is saved as PNG, SVG or PDF, chosen by the file's extension,
through a temporary file renamed into place.
"""

from __future__ import annotations

import math
import os
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ostate.errors import OstateError
from ostate.outputs import atomic_path

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442", "#999999")
LineStyle = Literal["-", "--", "-.", ":"]
LINESTYLES: tuple[LineStyle, ...] = ("-", "--", "-.", ":")
SEQUENTIAL_COLORMAP = "viridis"
FORMATS = ("png", "svg", "pdf")
DEFAULT_DPI = 130


def figure_format(path: str | os.PathLike) -> str:
    """The figure format named by ``path``'s extension; a clear error for any other.

    Example:
        >>> figure_format("plots/lr.svg")
        'svg'
    """
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if fmt not in FORMATS:
        raise OstateError(
            "unsupported figure format",
            where=os.fspath(path),
            hint=f"name the output *.png, *.svg or *.pdf (one of: {', '.join(FORMATS)})",
        )
    return fmt


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> str:
    """Save ``fig`` at ``path`` (format from the extension), atomically; returns the path."""
    path = os.fspath(path)
    fmt = figure_format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


def panel_grid(
    n: int, *, width: float = 4.6, height: float = 3.4, columns: int = 3, sharex: bool = False
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n`` panels, ``columns`` to a row; unused cells hidden.

    Example:
        >>> fig, axes = panel_grid(4)
        >>> len(axes), sum(ax.get_visible() for ax in fig.axes)
        (4, 4)
    """
    columns = max(1, min(n, columns))
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharex=sharex).flatten().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def series_style(index: int) -> tuple[str, LineStyle]:
    """The (colour, line style) of the ``index``-th series of a figure: both change, so either tells them apart.

    Example:
        >>> series_style(0), series_style(1)
        (('#0072B2', '-'), ('#D55E00', '--'))
    """
    # Blue, vermillion, bluish green, orange first: the most distinct pairs of the palette.
    order = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000")
    return order[index % len(order)], LINESTYLES[index % len(LINESTYLES)]
