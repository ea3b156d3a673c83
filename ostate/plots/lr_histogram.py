"""Histograms of the effective learning rate: the whole model, then one panel per group, layer or kind.

Each panel shows how many coordinates have each effective learning rate
η (the factor on the bias-corrected first moment, see docs/columns.md) on
a log axis, re-binned from the analysis' sketches (:mod:`ostate.plots.rebin`), with the
median (the table's ``eff_lr_p50``, dashed) and the saved ``lr`` of the panel's param
groups (dotted) marked. Several checkpoints are drawn as outlines on the same axes, one
colour and line style each; one checkpoint as a filled histogram.
"""

from __future__ import annotations

import math
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ostate.errors import OstateError
from ostate.plots.kind import PlotKind, check_plot_view
from ostate.plots.panels import group_lrs, panels
from ostate.plots.rebin import Positive, log_edges, rebin
from ostate.plots.series import PlotInput, Series, as_series
from ostate.plots.style import panel_grid, series_style

QUANTITY = "eff_lr"
XLABEL = "effective learning rate $\\eta_i$ (step per unit of $\\hat m_i$; log scale)"
# Families without m̂ (Adagrad, RMSprop, SGD, ...): eta multiplies the gradient or a momentum buffer.
XLABEL_DIRECTION = "effective learning rate $\\eta_i$ (step per unit of the gradient or momentum buffer; log scale)"


def xlabel(series: Sequence[Series]) -> str:
    """What the x axis measures: a step per unit of m̂ for Adam-style families, of the update direction otherwise."""
    return XLABEL if all(s.family.moments is not None for s in series) else XLABEL_DIRECTION


YLABEL = "coordinates per bin"


def plot_lr_histogram(
    inputs: PlotInput | Sequence[PlotInput],
    *,
    by: str = "kind",
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    per_decade: int | None = None,
    title: str | None = None,
) -> Figure:
    """Effective-learning-rate histograms of one or more checkpoints, as a matplotlib Figure.

    Args:
        inputs: one or more analyses (``ostate.analysis.summarize``) or series; several are
            overlaid. (:func:`ostate.figures.plot_lr_histogram` also takes paths, checkpoints
            and optimizers.)
        by: the small multiples after the whole-model panel: ``kind`` (parameter kind),
            ``group``, ``layer``, or ``model`` (the whole-model panel only).
        labels: legend labels, one per input (default: "checkpoint N" for several inputs).
        optimizer_index: which optimizer of an analysis that holds several.
        per_decade: display bins per decade (default: about 60 bins over the range, 4 to 20 per decade).
        title: the figure's title (default: what is drawn, and of which checkpoints).

    Example:
        >>> import ostate, torch
        >>> from ostate.analysis import summarize
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> fig = plot_lr_histogram(summarize(ostate.from_state_dict(opt.state_dict(), model=m)))
        >>> [ax.get_title() for ax in fig.axes]
        ['whole model', 'weight parameters', 'bias parameters']
    """
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index)
    return draw(series, by=by, per_decade=per_decade, title=title)


def draw(
    series: list[Series], *, by: str | None = None, per_decade: int | None = None, title: str | None = None
) -> Figure:
    """The figure for already analysed series (what ``ostate plot --kind lr-histogram`` draws)."""
    by = check_plot_view(KIND, by)
    shown, total = panels(series, by)
    sketches = [
        row.sketches[QUANTITY] for panel in shown for row in panel.rows if row is not None and QUANTITY in row.sketches
    ]
    if not sketches:
        raise OstateError(
            "no effective learning rates to plot",
            hint="the optimizer has no state yet, or its family defines no effective learning rate",
        )
    parts = [Positive.of(s) for s in sketches]
    edges = log_edges(
        [v for p in parts if len(p.values) for v in (p.values.min(), p.values.max())], per_decade=per_decade
    )
    fig, axes = panel_grid(len(shown), sharex=True, height=3.8)
    overlay = len(series) > 1
    for ax, panel in zip(axes, shown):
        notes = []
        for index, (s, row) in enumerate(zip(series, panel.rows)):
            if row is None or QUANTITY not in row.sketches:
                continue
            colour, style = series_style(index)
            sketch = row.sketches[QUANTITY]
            if not overlay and sketch.count and sketch.min == sketch.max and 0 < sketch.min < math.inf:
                # SGD: every coordinate steps at the group's lr; one flat block would say less than this
                # (all zero, lr = 0 at the end of a schedule: counted below as not drawn, as for any family)
                ax.text(0.5, 0.5, f"every coordinate is at lr = {sketch.min:.3g}", transform=ax.transAxes,
                        ha="center", va="center", fontsize=9, gid=f"constant|{s.label}")  # fmt: skip
                continue
            positive = Positive.of(sketch)
            counts = rebin(positive.values, positive.counts, edges)
            # Each series' artists carry its label in their gid: f"histogram|{label}", ...
            ax.stairs(
                counts,
                edges,
                fill=not overlay,
                color=colour,
                alpha=0.35 if not overlay else 1.0,
                linestyle=style,
                linewidth=1.4,
                label="_" if overlay else "coordinates",
                gid=f"histogram|{s.label}",
            )
            if not overlay:  # the filled histogram's outline
                ax.stairs(counts, edges, color=colour, linewidth=1.0)
            median = row.row[f"{QUANTITY}_p50"]
            ax.axvline(
                median,
                color=colour if overlay else "#000000",
                linestyle="--",
                linewidth=1.3,
                label=f"median {median:.3g}",
                gid=f"median|{s.label}",
            )
            for groups, lr in group_lrs(s, row):
                ax.axvline(
                    lr,
                    color=colour if overlay else "#555555",
                    linestyle=":",
                    linewidth=1.3,
                    label=f"lr of {groups}: {lr:.3g}",
                    gid=f"lr|{s.label}",
                )
            if positive.left_out():
                notes.append(f"{s.label}: {positive.left_out()}" if overlay else positive.left_out())
        ax.set_xscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if overlay and ax is axes[0]:  # which colour and line style is which checkpoint
            keys = [
                Line2D([], [], color=colour, linestyle=dash, linewidth=1.6)
                for colour, dash in map(series_style, range(len(series)))
            ]
            handles = keys + handles
            names = [s.label for s in series] + names
        ax.legend(handles, names, fontsize=7, loc="upper left", framealpha=0.85, edgecolor="none")
        # Head room for the legend above the tallest bar (about a tenth of the height per entry).
        ax.set_ylim(0, ax.get_ylim()[1] * (1.15 + 0.1 * len(names)))
        if notes:
            ax.text(
                0.99, 0.98, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=7, color="#444444"
            )
    fig.supxlabel(xlabel(series), fontsize=10)
    fig.supylabel(YLABEL, fontsize=10)
    what = series[0].describe() if not overlay else " vs ".join(s.label for s in series)
    shown_note = f" (first {len(shown)} of {total} panels; --by kind or group for fewer)" if total > len(shown) else ""
    fig.suptitle(title or f"Effective learning rate per coordinate: {what}{shown_note}", fontsize=11)
    return fig


KIND = PlotKind(
    name="lr-histogram",
    summary="effective-learning-rate histograms, whole model and per kind, group or layer",
    draw=draw,
    views=("kind", "group", "layer", "model"),
)
