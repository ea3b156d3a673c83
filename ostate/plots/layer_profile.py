"""The effective learning rate layer by layer: the median and the p5-p95 band, in model order.

Layers (a parameter's name without its last component) are on the x axis in the
model's order; for each, the median effective learning rate (log axis) with a band
from the 5th to the 95th percentile. The coordinates of a layer are split into one
line per parameter kind (embedding, weight, norm, bias, other; ``by="kind"``, the
default), per param group (``by="group"``), or not split (``by="layer"``: the layer
view's own ``eff_lr_p50``, ``eff_lr_p5`` and ``eff_lr_p95``). Every number is a
quantile of merged sketches, exactly as the tables compute it. The saved ``lr`` of each
param group is a dotted horizontal line. Several checkpoints share the axes: layers
are matched by name, colour says the kind (or group) and line style the checkpoint.
A line joins the layers that have parameters of its kind (or group); zero effective
learning rates (``lr = 0``) have no place on the log axis and are left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ostate.analysis import Sketch
from ostate.analysis.params import PARAM_KINDS
from ostate.errors import OstateError
from ostate.plots.kind import PlotKind, check_plot_view
from ostate.plots.panels import group_lrs
from ostate.plots.series import PlotInput, Series, as_series
from ostate.plots.style import OKABE_ITO, series_style

QUANTITY = "eff_lr"
BAND = (0.05, 0.95)
# A fixed colour per parameter kind, so the same kind looks the same in every figure.
KIND_COLOURS = dict(zip(PARAM_KINDS, ("#CC79A7", "#0072B2", "#009E73", "#D55E00", "#999999")))
# Layer names on the x axis: at most this many labels, evenly spaced.
MAX_TICK_LABELS = 40


def plot_layer_profile(
    inputs: PlotInput | Sequence[PlotInput],
    *,
    by: str = "kind",
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    title: str | None = None,
) -> Figure:
    """The median effective learning rate per layer with its p5-p95 band, as a matplotlib Figure.

    Args:
        inputs: one or more analyses or series; several are overlaid.
            (:func:`ostate.figures.plot_layer_profile` also takes paths, checkpoints and optimizers.)
        by: one line per parameter ``kind`` (default), per param ``group``, or one line for
            the whole ``layer``.
        labels: legend labels, one per input (default: "checkpoint N" for several inputs).
        optimizer_index: which optimizer of an analysis that holds several.
        title: the figure's title.

    Example:
        >>> import ostate, torch
        >>> from ostate.analysis import summarize
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> fig = plot_layer_profile(summarize(ostate.from_state_dict(opt.state_dict(), model=m)), by="layer")
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['0', '1']
    """
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index)
    return draw(series, by=by, title=title)


def draw(series: list[Series], *, by: str | None = None, title: str | None = None) -> Figure:
    """The figure for already analysed series (what ``ostate plot --kind layer-profile`` draws)."""
    by = check_plot_view(KIND, by)
    layers = _layers(series)
    if not layers:
        raise OstateError("no layers with effective learning rates to plot", hint="the optimizer has no state yet")
    position = {layer: i for i, layer in enumerate(layers)}
    fig = Figure(figsize=(min(24.0, max(7.0, 2.5 + 0.32 * len(layers))), 4.8), layout="constrained")
    ax = fig.subplots()
    overlay = len(series) > 1
    x = np.arange(len(layers))
    split_styles: dict[Any, str] = {}
    named: set[str] = set()
    for index, s in enumerate(series):
        series_colour, dash = series_style(index)
        for split, per_layer in _profiles(s, by).items():
            colour = _colour(by, split, split_styles) if by != "layer" else series_colour
            # Points only where the layer has such parameters; the line joins them across the others.
            points = sorted(
                (position[layer], p50, p_low, p_high) for layer, (p50, p_low, p_high) in per_layer.items() if p50 > 0
            )
            if not points:
                continue
            xs, median, low, high = (np.array(v, dtype=float) for v in zip(*points))
            ax.fill_between(xs, low, high, color=colour, alpha=0.13, linewidth=0)
            ax.vlines(xs, low, high, color=colour, alpha=0.5, linewidth=1.0)  # the band of an isolated point
            # Colour says the kind (or group): named once in the legend; line style says the checkpoint.
            name = _label(by, split) if by != "layer" else (s.label if overlay else "all parameters")
            ax.plot(
                xs,
                median,
                color=colour,
                linestyle=dash if overlay else "-",
                marker="o",
                markersize=3.5,
                linewidth=1.5,
                label=name if name not in named else "_",
                gid=f"median|{s.label}|{split}",
            )
            named.add(name)
        for groups, lr in group_lrs(s, s.rows("model")[0]) if s.rows("model") else []:
            ax.axhline(
                lr,
                color=series_colour if overlay else "#555555",
                linestyle=":",
                linewidth=1.0,
                label=f"{s.label + ': ' if overlay else ''}lr of {groups}: {lr:.3g}",
                gid=f"lr|{s.label}",
            )
    if not any((line.get_gid() or "").startswith("median|") for line in ax.get_lines()):
        # every median is 0, negative or NaN (e.g. NaN state): say so rather than draw empty axes
        ax.text(
            0.5,
            0.75,
            "not drawn: no layer has a positive, finite median effective learning rate\n"
            "(NaN or inf in the state, or an lr of 0; `ostate doctor` says which)",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#555555",
            fontsize=9,
        )
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    step = max(1, math.ceil(len(layers) / MAX_TICK_LABELS))
    ax.set_xticks(
        x[::step],
        [layers[i] for i in x[::step]],
        rotation=60 if len(layers) > 6 else 0,
        ha="right" if len(layers) > 6 else "center",
        fontsize=8,
    )
    ax.set_xlabel("layer (model order)" + (f"; every {step}th named" if step > 1 else ""))
    ax.set_ylabel("effective learning rate $\\eta_i$\n(median, band p5-p95; log scale)")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if overlay and by != "layer":  # a key to the line styles: one per checkpoint
        handles += [Line2D([], [], color="#333333", linestyle=series_style(i)[1]) for i in range(len(series))]
        names += [s.label for s in series]
    ax.legend(handles, names, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    what = series[0].describe() if not overlay else " vs ".join(s.label for s in series)
    split_name = {"kind": "per parameter kind", "group": "per param group", "layer": "all parameters"}[by]
    fig.suptitle(title or f"Effective learning rate by layer, {split_name}: {what}", fontsize=11)
    return fig


def _layers(series: list[Series]) -> list[str]:
    """Layer names in the first series' model order, then layers only later series have."""
    layers: dict[str, None] = {}
    for s in series:
        layers.update(dict.fromkeys(row.key for row in s.rows("layer") if QUANTITY in row.sketches))
    return list(layers)


def _profiles(s: Series, by: str) -> dict[Any, dict[str, tuple[float, float, float]]]:
    """``{split: {layer: (p50, p5, p95)}}``: the layer view's own quantiles for ``by="layer"``, else
    quantiles of the merged sketches of each layer's parameters of one kind or group."""
    if by == "layer":
        return {
            "all": {
                row.key: (row.row[f"{QUANTITY}_p50"], row.row[f"{QUANTITY}_p5"], row.row[f"{QUANTITY}_p95"])
                for row in s.rows("layer")
                if QUANTITY in row.sketches
            }
        }
    column = {"kind": "param_kind", "group": "group"}[by]
    parts: dict[Any, dict[str, list[Sketch]]] = defaultdict(lambda: defaultdict(list))
    for row in s.rows("param"):
        if QUANTITY in row.sketches:
            parts[row.row[column]][row.row["layer"]].append(row.sketches[QUANTITY])
    if by == "kind":
        order = sorted(parts, key=lambda k: (PARAM_KINDS.index(k) if k in PARAM_KINDS else len(PARAM_KINDS), str(k)))
    else:
        order = sorted(parts)
    out: dict[Any, dict[str, tuple[float, float, float]]] = {}
    for split in order:
        out[split] = {}
        for layer, sketches in parts[split].items():
            p_low, p50, p_high = Sketch.merged(sketches).quantiles([BAND[0], 0.5, BAND[1]])
            out[split][layer] = (p50, p_low, p_high)
    return out


def _colour(by: str, split: Any, assigned: dict[Any, str]) -> str:
    if by == "kind" and split in KIND_COLOURS:
        return KIND_COLOURS[split]
    if split not in assigned:
        assigned[split] = OKABE_ITO[len(assigned) % len(OKABE_ITO)]
    return assigned[split]


def _label(by: str, split: Any) -> str:
    return f"{split}" if by == "kind" else f"group {split}"


KIND = PlotKind(
    name="layer-profile",
    summary="median effective learning rate per layer with its p5-p95 band, one line per kind or group",
    draw=draw,
    views=("kind", "group", "layer"),
)
