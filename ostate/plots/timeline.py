"""The optimizer state over training steps: what the monitor logged, or what a series of checkpoints holds.

Three panels share the step axis, one line per row of a view (per parameter kind by
default; per layer, group, parameter, or the whole model):

- the median effective learning rate (log axis) with a band from its 25th to its 75th
  percentile (``eff_lr_p50``, ``eff_lr_p25``, ``eff_lr_p75``);
- the update-to-weight RMS ratio (``update_to_weight_rms``, log axis): how far the next
  step moves the weights relative to their size;
- the fraction of coordinates where eps dominates the denominator (``eps_dominated_frac``).

A panel whose column the timeline does not have (an optimizer without eps, a log
without weights) says so instead of a line. The input is a :class:`Timeline`: one row
per step and view row, with the columns of ``ostate inspect``'s table
(:func:`ostate.monitor.read_log` reads the monitor's log into one; :func:`ostate.figures.plot`
builds one from checkpoint paths too). The lines carry ``gid`` ``"median|KEY"``,
``"ratio|KEY"`` and ``"eps|KEY"``, so the plotted values can be read back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ostate.errors import OstateError
from ostate.plots.kind import TIMELINE, PlotKind
from ostate.plots.style import OKABE_ITO, series_style

# The columns that name a row in each view's table.
KEY_COLUMNS = {"param": "name", "group": "group", "layer": "layer", "kind": "param_kind", "model": None}
BAND = ("eff_lr_p25", "eff_lr_p75")
# More rows than this: only the ones with the most coordinates get a line (the legend stays readable).
MAX_LINES = 12


@dataclass
class Timeline:
    """Rows of one view over steps: ``frame`` has ``step``, ``key`` and the table's columns; ``view`` names the rows."""

    frame: pd.DataFrame
    view: str
    source: str = ""

    @classmethod
    def of_tables(cls, tables: list[tuple[float, pd.DataFrame]], view: str, source: str = "") -> Timeline:
        """A timeline from ``(step, table of view)`` pairs (tables as ``ostate.analyze(..., by=view)`` gives them).

        Example:
            >>> t = pd.DataFrame([{"param_kind": "weight", "eff_lr_p50": 1e-3}])
            >>> Timeline.of_tables([(10, t), (20, t)], "kind").frame[["step", "key"]].values.tolist()
            [[10, 'weight'], [20, 'weight']]
        """
        column = KEY_COLUMNS[view]
        frames = []
        for step, table in tables:
            frame = table.copy()
            frame.insert(0, "key", frame[column].astype(str) if column else "model")
            frame.insert(0, "step", step)
            frames.append(frame)
        return cls(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), view, source)


def draw(timeline: Timeline, by: str | None = None, title: str | None = None) -> Figure:
    """The timeline figure (``by``: the timeline's own view; another view is refused, naming it)."""
    if by is not None and by != timeline.view:
        raise OstateError(
            f"the timeline holds the {timeline.view} view, not {by}",
            where=timeline.source or None,
            hint=f"pass --by {timeline.view} (the monitor logs the view it was made with: Monitor(by=...))",
        )
    frame = timeline.frame
    if frame.empty:
        raise OstateError("nothing to draw: the timeline has no rows", where=timeline.source or None)
    keys = _chosen_keys(frame)
    fig = Figure(figsize=(9.0, 9.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True).tolist()
    for i, key in enumerate(keys):
        rows = frame[frame["key"] == key].sort_values("step")
        colour, style = series_style(i) if len(keys) <= 7 else (OKABE_ITO[i % len(OKABE_ITO)], "-")
        steps = rows["step"].to_numpy(dtype=float)
        _line(axes[0], rows, steps, "eff_lr_p50", f"median|{key}", key, colour, style, band=BAND)
        _line(axes[1], rows, steps, "update_to_weight_rms", f"ratio|{key}", key, colour, style)
        _line(axes[2], rows, steps, "eps_dominated_frac", f"eps|{key}", key, colour, style)
    labels = (
        ("effective LR (median, p25-p75 band)", "log"),
        ("update / weight RMS", "log"),
        ("eps-dominated fraction", "linear"),
    )
    for ax, (label, scale) in zip(axes, labels):
        ax.set_ylabel(label)
        if ax.lines:
            ax.set_yscale(scale)
        else:
            ax.text(0.5, 0.5, "not in this timeline", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.grid(True, which="major", alpha=0.3)
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_xlabel("step")
    if axes[0].lines:
        axes[0].legend(title=timeline.view, fontsize="small", ncols=2 if len(keys) > 6 else 1)
    fig.suptitle(title or f"optimizer state over training, by {timeline.view}")
    return fig


def _chosen_keys(frame: pd.DataFrame) -> list[str]:
    keys = list(dict.fromkeys(frame["key"].astype(str)))
    if len(keys) <= MAX_LINES or "numel" not in frame:
        return keys[:MAX_LINES]
    size = frame.groupby("key")["numel"].max()
    largest = set(size.sort_values(ascending=False).index[:MAX_LINES])
    return [k for k in keys if k in largest]


def _line(
    ax: Axes,
    rows: pd.DataFrame,
    steps: np.ndarray,
    column: str,
    gid: str,
    label: str,
    colour: str,
    style: str,
    band: tuple[str, str] | None = None,
) -> None:
    if column not in rows:
        return
    values = rows[column].to_numpy(dtype=float)
    if ax.get_yscale() == "log" or column != "eps_dominated_frac":
        values = np.where(values > 0, values, math.nan)  # no place on a log axis
    if not np.isfinite(values).any():
        return
    ax.plot(steps, values, color=colour, linestyle=style, marker="." if len(steps) < 30 else None, label=label, gid=gid)
    if band is not None and all(c in rows for c in band):
        lo, hi = (rows[c].to_numpy(dtype=float) for c in band)
        ok = np.isfinite(lo) & np.isfinite(hi) & (lo > 0)
        if ok.any():
            ax.fill_between(steps[ok], lo[ok], hi[ok], color=colour, alpha=0.15, linewidth=0)


KIND = PlotKind(
    "timeline",
    "the state over training steps, from a monitor log or several checkpoints: median effective LR per row "
    "with its p25-p75 band, update/weight RMS, eps-dominated fraction",
    ("kind", "layer", "group", "param", "model"),
    draw,
    takes=TIMELINE,
)
