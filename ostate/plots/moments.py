r"""The moments: |m̂| against √v̂ for every coordinate, as a 2-D histogram with reference lines.

For an Adam-style optimizer each coordinate has a bias-corrected first moment
:math:`\hat m = m/(1-\beta_1^t)` and second moment :math:`\hat v = v/(1-\beta_2^t)`. Their
joint distribution is counted during the analysis (``summarize(..., joint=True)``;
cells four to an octave on each axis, :mod:`ostate.analysis.joint`) and drawn on
log-log axes, one panel per param group by default. Reference lines, from the panel's
:math:`\beta_1, \beta_2, \epsilon` and step :math:`t`:

- **ε** (vertical): :math:`\sqrt{\hat v} = \epsilon` (RAdam: :math:`\epsilon/\sqrt{1-\beta_2^t}`);
  to its left ε dominates the update's denominator and the step shrinks below
  :math:`\gamma\,\hat m/\sqrt{\hat v}`;
- **pure noise**: :math:`|\hat m| = \sqrt{\frac{1-\beta_1}{1+\beta_1}\frac{1+\beta_1^t}{1-\beta_1^t}}\,\sqrt{\hat v}`
  (0.229 for :math:`\beta_1 = 0.9` once :math:`\beta_1^t` is small): where the RMS of
  :math:`|\hat m|/\sqrt{\hat v}` sits when gradients are zero-mean noise;
- **largest possible**: the Cauchy-Schwarz bound :math:`|\hat m| \le c(\beta_1,\beta_2,t)\sqrt{\hat v}`
  (7.27 for (0.9, 0.999) as :math:`t \to \infty`); no gradient sequence reaches above it.

Formulas: :func:`ostate.optimizers.adam.pure_noise_snr` and :func:`~ostate.optimizers.adam.max_snr`.
Several checkpoints are drawn as contours (the smallest regions holding 50% and 90% of
the coordinates), one colour and line style each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, cast

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ostate.analysis import ViewRow
from ostate.analysis.joint import JointHistogram
from ostate.errors import OstateError
from ostate.optimizers.adam import max_snr, pure_noise_snr
from ostate.plots.kind import PlotKind, check_plot_view
from ostate.plots.panels import Panel, groups_of, panels
from ostate.plots.series import PlotInput, Series, as_series
from ostate.plots.style import SEQUENTIAL_COLORMAP, panel_grid, series_style

JOINT = "moments"
XLABEL = r"$\sqrt{\hat v_i}$ (bias-corrected RMS gradient; log scale)"
YLABEL = r"$|\hat m_i|$ (bias-corrected mean gradient; log scale)"
# Contours of several checkpoints: the smallest regions holding these fractions of the coordinates.
CONTOUR_FRACTIONS = (0.9, 0.5)
# The x axis stretches to show the ε line when it lies at most this many decades below the data.
EPS_REACH_DECADES = 3.0


@dataclass(frozen=True)
class Reference:
    """The constants of a panel's reference lines."""

    beta1: float
    beta2: float
    eps_root: float
    step: float

    @property
    def noise(self) -> float:
        return pure_noise_snr(self.beta1, self.step)

    @property
    def bound(self) -> float:
        return max_snr(self.beta1, self.beta2, self.step)

    @property
    def lines(self) -> tuple[float, float, float]:
        """The three lines as drawn (3 significant digits): equal lines are drawn once."""
        return cast(
            "tuple[float, float, float]", tuple(float(f"{v:.3g}") for v in (self.eps_root, self.noise, self.bound))
        )


def plot_moments(
    inputs: PlotInput | Sequence[PlotInput],
    *,
    by: str = "group",
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
    title: str | None = None,
) -> Figure:
    """|m̂| against √v̂ per coordinate with the ε, pure-noise and largest-possible lines, as a Figure.

    Only for optimizers that keep moving averages of both g and g² (Adam, AdamW, NAdam,
    RAdam, bitsandbytes Adam); any other raises :class:`~ostate.OstateError`. The analyses
    must come from ``summarize(..., joint=True)`` (:func:`ostate.figures.plot_moments`
    also takes paths, checkpoints and optimizers, and summarises them so).

    Args:
        inputs: one or more analyses or series; several are drawn as contours.
        by: one panel per param ``group`` (default), parameter ``kind``, ``layer``, or the whole
            ``model``. A panel that mixes groups with different betas or eps is refused.
        labels: legend labels, one per input (default: "checkpoint N" for several inputs).
        optimizer_index: which optimizer of an analysis that holds several.
        title: the figure's title.

    Example:
        >>> import ostate, torch
        >>> from ostate.analysis import summarize
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        >>> for _ in range(3):
        ...     m(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> fig = plot_moments(summarize(ostate.from_state_dict(opt.state_dict(), model=m), joint=True))
        >>> fig.axes[0].get_title()
        'group 0: betas (0.9, 0.999), eps 1e-08, step 3'
    """
    series = as_series(inputs, labels=labels, optimizer_index=optimizer_index, joint=True)
    return draw(series, by=by, title=title)


def draw(series: list[Series], *, by: str | None = None, title: str | None = None) -> Figure:
    """The figure for series summarised with ``joint=True`` (what ``ostate plot --kind moments`` draws)."""
    by = check_plot_view(KIND, by)
    shown, total = panels(series, by, whole_model=False)
    shown = [p for p in shown if any(row is not None and JOINT in row.joints for row in p.rows)]
    if not shown:
        raise OstateError("no moments to plot", hint="no parameter has optimizer state yet")
    overlay = len(series) > 1
    fig, axes = panel_grid(len(shown), width=5.6 if not overlay else 5.0, height=4.4, columns=2)
    for ax, panel in zip(axes, shown):
        references = [
            _reference(s, row, panel) if row is not None and JOINT in row.joints else None
            for s, row in zip(series, panel.rows)
        ]
        notes = []
        data_x: list[float] = []
        for index, (s, row) in enumerate(zip(series, panel.rows)):
            if row is None or JOINT not in row.joints:
                continue
            joint = row.joints[JOINT]
            x_edges, y_edges, counts = joint.grid()
            if counts.size:
                data_x += [x_edges[0], x_edges[-1]]
                if overlay:
                    _contours(ax, x_edges, y_edges, counts, series_style(index), s.label)
                else:
                    mesh = ax.pcolormesh(
                        x_edges,
                        y_edges,
                        np.ma.masked_equal(counts.T, 0),
                        cmap=SEQUENTIAL_COLORMAP,
                        norm=LogNorm(vmin=1, vmax=max(1, int(counts.max()))),
                        gid=f"joint|{s.label}",
                    )
                    fig.colorbar(mesh, ax=ax, label="coordinates per cell", pad=0.01)
            left_out = _left_out(joint)
            if left_out:
                notes.append(f"{s.label}: {left_out}" if overlay else left_out)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _reference_lines(ax, series, references, data_x, notes)
        ax.set_title(_title(panel, references), fontsize=9)
        ax.set_xlabel(XLABEL, fontsize=9)
        ax.set_ylabel(YLABEL, fontsize=9)
        ax.grid(alpha=0.25)
        handles, names = ax.get_legend_handles_labels()
        if overlay:
            handles += [
                Line2D([], [], color=series_style(i)[0], linestyle=series_style(i)[1]) for i in range(len(series))
            ]
            names += [f"{s.label}: 50% / 90% of coordinates" for s in series]
        ax.legend(handles, names, fontsize=7, frameon=True, framealpha=0.85, loc="upper left")
        if notes:
            ax.text(
                0.99,
                0.02,
                "\n".join(notes),
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                color="#333333",
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0},
            )
    what = series[0].describe() if not overlay else " vs ".join(s.label for s in series)
    shown_note = f" (first {len(shown)} of {total} panels)" if total > len(shown) else ""
    fig.suptitle(title or f"First against second moment per coordinate: {what}{shown_note}", fontsize=11)
    return fig


def _reference(s: Series, row: ViewRow, panel: Panel) -> Reference:
    """The panel's constants for series ``s``; refused when its groups disagree on them."""
    moments = s.family.moments
    assert moments is not None  # the moments plot takes only families with moments
    step = row.row.get("step_max", row.row.get("step"))
    step = float(step) if step is not None else math.nan
    found = {
        (moments.betas(s.analysis.optimizer.groups[g]), moments.eps_root(s.analysis.optimizer.groups[g], step))
        for g in groups_of(s, row)
    }
    if len(found) > 1:
        raise OstateError(
            f"the panel '{panel.title}' mixes param groups with different betas or eps, so it has no "
            "single set of reference lines",
            hint="split it with by=group",
        )
    (beta1, beta2), eps_root = found.pop()
    return Reference(beta1, beta2, eps_root, step)


def _title(panel: Panel, references: list[Reference | None]) -> str:
    known = [r for r in references if r is not None]
    if not known or len({(r.beta1, r.beta2, r.eps_root) for r in known}) > 1:
        return panel.title
    r = known[0]
    steps = " / ".join(dict.fromkeys(f"{k.step:g}" for k in known))
    return f"{panel.title}: betas ({r.beta1:g}, {r.beta2:g}), eps {r.eps_root:.3g}, step {steps}"


def _reference_lines(
    ax, series: list[Series], references: list[Reference | None], data_x: list[float], notes: list[str]
) -> None:
    if not data_x:
        return
    # One set of lines per distinct drawing (series whose lines look the same share them); black if only one.
    distinct: dict[tuple[float, float, float], tuple[int, Reference]] = {}
    for index, r in enumerate(references):
        if r is not None:
            distinct.setdefault(r.lines, (index, r))
    lo, hi = min(data_x), max(data_x)
    shown_eps = [
        r.eps_root
        for _, r in distinct.values()
        if math.isfinite(r.eps_root) and lo / 10**EPS_REACH_DECADES <= r.eps_root
    ]
    lo, hi = min([lo] + shown_eps), max([hi] + shown_eps)
    xs = np.array([lo / 1.5, hi * 1.5])
    ax.set_xlim(*xs)
    for index, r in distinct.values():
        eps, noise, bound = r.eps_root, r.noise, r.bound
        colour = "#000000" if len(distinct) == 1 else series_style(index)[0]
        prefix = "" if len(distinct) == 1 else f"{series[index].label}: "
        if eps in shown_eps:
            ax.axvline(
                eps,
                color=colour,
                linestyle="-.",
                linewidth=1.2,
                label=f"{prefix}ε = {eps:.3g}: to the left ε dominates the step",
                gid="eps",
            )
        elif eps > 0:
            notes.append(f"{prefix}ε = {eps:.3g} lies far left of every √v̂ (off the axis)")
        if math.isfinite(noise):
            ax.plot(
                xs,
                noise * xs,
                color=colour,
                linestyle="--",
                linewidth=1.2,
                scalex=False,
                scaley=False,
                label=f"{prefix}pure noise: |m̂| = {noise:.3g} √v̂",
                gid="noise",
            )
        if math.isfinite(bound):
            ax.plot(
                xs,
                bound * xs,
                color=colour,
                linestyle=":",
                linewidth=1.4,
                scalex=False,
                scaley=False,
                label=f"{prefix}largest possible: |m̂| = {bound:.3g} √v̂",
                gid="bound",
            )


def _contours(
    ax, x_edges: np.ndarray, y_edges: np.ndarray, counts: np.ndarray, style: tuple[str, str], label: str
) -> None:
    """Outline the smallest sets of cells holding :data:`CONTOUR_FRACTIONS` of the coordinates."""
    # Density per unit of log-area, so that cells of different widths compare fairly.
    area = np.outer(np.diff(np.log2(x_edges)), np.diff(np.log2(y_edges)))
    density = counts / area
    order = np.argsort(density, axis=None)[::-1]
    cumulative = np.cumsum(counts.ravel()[order]) / counts.sum()
    levels = sorted(
        {
            float(density.ravel()[order][min(int(np.searchsorted(cumulative, f)), len(order) - 1)])
            for f in CONTOUR_FRACTIONS
        }
    )
    # A border of empty cells closes every contour.
    padded = np.pad(density, 1)
    x_centres = _padded_centres(x_edges)
    y_centres = _padded_centres(y_edges)
    colour, dash = style
    contour = ax.contour(
        x_centres,
        y_centres,
        padded.T,
        levels=[lv * 0.999 for lv in levels],
        colors=colour,
        linestyles=dash,
        linewidths=[1.0, 1.8][-len(levels) :],
    )
    contour.set_gid(f"contours|{label}")


def _padded_centres(edges: np.ndarray) -> np.ndarray:
    centres = np.sqrt(edges[:-1] * edges[1:])
    below = edges[0] / (centres[0] / edges[0]) if len(centres) else edges[0] / 2
    above = edges[-1] * (edges[-1] / centres[-1]) if len(centres) else edges[-1] * 2
    return np.concatenate([[below], centres, [above]])


def _left_out(joint: JointHistogram) -> str:
    parts = [
        f"{n:,} with {what}"
        for n, what in ((joint.zero_x, "v̂ = 0"), (joint.zero_y_only, "m̂ = 0 < v̂"), (joint.nonfinite, "NaN/inf"))
        if n
    ]
    return "not drawn: " + ", ".join(parts) if parts else ""


KIND = PlotKind(
    name="moments",
    summary="|m̂| against √v̂ per coordinate, with the ε, pure-noise and largest-possible lines (Adam family)",
    draw=draw,
    views=("group", "kind", "layer", "model"),
    joint=True,
)
