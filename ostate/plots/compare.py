r"""The figure of a comparison: how each parameter's optimizer state moved between checkpoints.

Four panels over the parameters (in the later checkpoint's order): the median of
:math:`\log_{10}(v_B/v_A)` with its 25-75% and 5-95% ranges, the cosine of the first
moments, the change of the effective learning rate (:math:`\log_{10}(\eta_B/\eta_A)`, median
and 5-95%), and the fraction of coordinates whose state did not change. One colour per
pair of checkpoints, in the Okabe-Ito colour-blind-safe palette. Drawn on a bare
:class:`matplotlib.figure.Figure` (no pyplot, no display), so it works headless.

The figure is drawn from a :class:`~ostate.compare.compute.Comparison` already computed
(:func:`ostate.compare.compute.compare`, or :func:`ostate.figures.plot` from paths);
nothing here reads a checkpoint.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ostate.errors import OstateError
from ostate.plots.kind import COMPARISON, PlotKind, check_plot_view
from ostate.plots.style import OKABE_ITO, save_figure

if TYPE_CHECKING:
    from ostate.compare.compute import Comparison

# Above this many parameters the x axis shows positions instead of names.
MAX_NAMED = 40


def compare_figure(result: Comparison) -> Figure:
    """A 2x2 figure of ``result``'s per-parameter movements (parameters present in both checkpoints).

    Example:
        >>> import ostate, torch, tempfile, os
        >>> from ostate.compare.compute import compare
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters()); d = tempfile.mkdtemp()
        >>> for step in range(2):
        ...     m(torch.randn(8, 4)).square().sum().backward(); opt.step(); opt.zero_grad()
        ...     torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, os.path.join(d, f"{step}.pt"))
        >>> fig = compare_figure(compare(os.path.join(d, "0.pt"), os.path.join(d, "1.pt")))
        >>> [ax.get_ylabel() for ax in fig.axes][:2]
        ['log10(v_B / v_A)', 'cosine(m_A, m_B)']
    """
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).flatten()
    names: list[str] = []
    pairs = result.pairs
    width = 0.6 / max(len(pairs), 1)
    for k, pair in enumerate(pairs):
        table = pair.table()
        if table.empty:
            continue
        table = table[table["status"] == "both"]
        if not names:
            names = list(table["name"])
        position = {name: i for i, name in enumerate(names)}
        x = np.array([position.get(n, np.nan) for n in table["name"]], dtype=float) + (k - (len(pairs) - 1) / 2) * width
        colour = OKABE_ITO[k % len(OKABE_ITO)]
        label = f"{_short(pair.a)} → {_short(pair.b)}"
        v = {q: _column(table, f"log10_v_ratio_{q}") for q in ("p5", "p25", "p50", "p75", "p95")}
        _ranged(axes[0], x, v["p50"], v["p25"], v["p75"], v["p5"], v["p95"], colour, label)
        axes[1].plot(x, _column(table, "m_cosine"), "o", color=colour, markersize=4, label=label)
        lr = {q: np.log10(1.0 + _column(table, f"eff_lr_relchange_{q}")) for q in ("p5", "p50", "p95")}
        _ranged(axes[2], x, lr["p50"], None, None, lr["p5"], lr["p95"], colour, label)
        axes[3].plot(x, _column(table, "unchanged_frac"), "o", color=colour, markersize=4, label=label)
    titles = [
        ("second moment", "log10(v_B / v_A)"),
        ("first moment", "cosine(m_A, m_B)"),
        ("effective learning rate", "log10(η_B / η_A)"),
        ("state not changed", "fraction of coordinates"),
    ]
    drawn = []
    for ax, (title, ylabel) in zip(axes, titles):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        has_data = any(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in ax.get_lines())
        drawn.append(has_data)
        if not has_data:
            # e.g. plain SGD keeps no second moment, or no parameter has state in both checkpoints
            ax.text(
                0.5,
                0.5,
                f"nothing to draw: no {title} in both checkpoints",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="#555555",
            )
    for k in (0, 2):
        if drawn[k]:  # a reference line only under data: it would cross the "nothing to draw" text
            axes[k].axhline(0.0, color="#000000", linewidth=0.8)
    axes[1].set_ylim(-1.05, 1.05)
    axes[3].set_ylim(-0.05, 1.05)
    for ax in axes[2:]:
        if names and len(names) <= MAX_NAMED:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("parameter (position in the later checkpoint)")
    # Which checkpoints (one pair: A -> B; several: one colour each), on the first panel with data.
    keyed = next((ax for ax, has_data in zip(axes, drawn) if has_data), None)
    if pairs and keyed is not None:
        keyed.legend(fontsize=8)
    fig.suptitle("optimizer state, parameter by parameter" + (f" ({len(names)} parameters)" if names else ""))
    return fig


def save_compare_figure(result: Comparison, path: str | os.PathLike) -> str:
    """Draw :func:`compare_figure` and save it atomically (PNG, SVG or PDF, from the extension)."""
    return save_figure(compare_figure(result), path)


def draw(result: Comparison, *, by: str | None = None) -> Figure:
    """The figure of a computed comparison (what ``ostate plot --kind compare`` draws).

    ``by``, when given, must be how the comparison paired its checkpoints (``consecutive``
    or ``first``: ``compare(..., against=by)``).
    """
    if not (hasattr(result, "pairs") and hasattr(result, "against")):
        raise OstateError(
            f"the compare plot draws a comparison, not a {type(result).__name__}",
            hint="compute one with ostate.compare.compute.compare(*paths), or give the paths to ostate.figures.plot",
        )
    if by is not None and check_plot_view(KIND, by) != result.against:
        raise OstateError(
            f"this comparison pairs its checkpoints {result.against}, not {by}",
            hint=f"compare(..., against='{by}') makes the pairs",
        )
    return compare_figure(result)


KIND = PlotKind(
    name="compare",
    summary="how each parameter's state moved between checkpoints (ostate compare)",
    views=("consecutive", "first"),
    draw=draw,
    takes=COMPARISON,
)


def _column(table, name: str) -> np.ndarray:
    """A column as floats, or NaN where the comparison has no such statistic (e.g. SGD: no v)."""
    return table[name].to_numpy(dtype=float) if name in table else np.full(len(table), np.nan)


def _ranged(ax, x, middle, low, high, lowest, highest, colour, label) -> None:
    middle = np.asarray(middle, dtype=float)
    if lowest is not None:
        ax.vlines(
            x, np.asarray(lowest, dtype=float), np.asarray(highest, dtype=float), color=colour, linewidth=0.8, alpha=0.6
        )
    if low is not None:
        ax.vlines(x, np.asarray(low, dtype=float), np.asarray(high, dtype=float), color=colour, linewidth=2.5)
    ax.plot(x, middle, "o", color=colour, markersize=4, label=label)


def _short(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return name if len(name) <= 30 else name[:27] + "..."
