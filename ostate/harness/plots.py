"""The ablation's figures: eval-loss curves with CI bands, final loss and paired differences, update RMS.

Figures share ostate's plot style (:mod:`ostate.plots.style`: the Agg canvas, no
global pyplot state, the Okabe-Ito colour-blind-safe palette, atomic saving as PNG,
SVG or PDF by extension); the baseline strategy is drawn in black, and there is one
panel per cell of settings.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import pandas as pd
from matplotlib.figure import Figure

from ostate.errors import OstateError
from ostate.harness.summary import CELL, Summary, _cell_label
from ostate.plots.style import LINESTYLES, OKABE_ITO, panel_grid, save_figure

MAX_PANELS = 12


def colours(strategies: Sequence[str], baseline: str) -> dict[str, tuple[str, str]]:
    """A (colour, line style) per strategy: the baseline black and solid, the others in turn.

    Example:
        >>> colours(["reload", "fresh"], "reload")
        {'reload': ('#000000', '-'), 'fresh': ('#E69F00', '--')}
    """
    out, i = {}, 0
    for s in strategies:
        if s == baseline:
            out[s] = ("#000000", "-")
        else:
            out[s] = (OKABE_ITO[i % len(OKABE_ITO)], LINESTYLES[(i + 1) % len(LINESTYLES)])
            i += 1
    return out


def _cells(frame: pd.DataFrame, keys: Sequence[str] = CELL) -> list[tuple]:
    cells = sorted({tuple(row) for row in frame[list(keys)].itertuples(index=False, name=None)})
    return cells[:MAX_PANELS]


def _cell_title(cell: tuple, keys: Sequence[str] = CELL) -> str:
    return _cell_label({k: v for k, v in zip(keys, cell) if k != "steps"})


def _strategies(summary: Summary) -> list[str]:
    return list(dict.fromkeys(summary.strategies["strategy"]))


def plot_curves(summary: Summary, path: str | os.PathLike, *, title: str = "") -> str:
    """Eval loss against step: the mean across seeds and its 95% CI band, per strategy.

    The frame stops a little above the loss before fine-tuning (step 0): a curve that
    leaves it is worse than not fine-tuning at all, and is marked "off the top" in the
    legend instead of squeezing the others flat.
    """
    curves = summary.curves[summary.curves["metric"] == "eval_loss"]
    return _line_panels(
        summary,
        curves,
        path,
        ylabel="eval loss",
        cap_at_start=True,
        title=title or "Eval loss (mean, 95% CI over seeds)",
    )


def plot_update_rms(summary: Summary, path: str | os.PathLike, *, first: int = 50, title: str = "") -> str:
    """RMS of the weights' change over the first ``first`` steps (all parameters; geometric mean
    across seeds and the 95% interval of its logarithm), log scale."""
    curves = summary.curves[(summary.curves["metric"] == "update_rms") & (summary.curves["step"] <= first)]
    return _line_panels(
        summary,
        curves,
        path,
        ylabel="update RMS",
        log=True,
        title=title or f"Update RMS, first {first} steps (mean, 95% CI over seeds)",
    )


def _line_panels(
    summary: Summary,
    curves: pd.DataFrame,
    path,
    *,
    ylabel: str,
    title: str,
    log: bool = False,
    cap_at_start: bool = False,
) -> str:
    if curves.empty:
        raise OstateError("nothing to plot: no finished trials")
    style = colours(_strategies(summary), summary.baseline)
    cells = _cells(curves, summary.cell)
    fig, axes = panel_grid(len(cells))
    for ax, cell in zip(axes, cells):
        mine = curves[(curves[list(summary.cell)] == pd.Series(cell, index=list(summary.cell))).all(axis=1)]
        start = mine[mine["step"] == mine["step"].min()]["mean"].max()
        top = start + 0.1 * (start - mine["mean"].min()) if cap_at_start else math.inf
        for strategy, line in mine.groupby("strategy", sort=False):
            colour, dash = style.get(strategy, ("#999999", "-"))
            label = f"{strategy} (off the top)" if line["mean"].max() > top else strategy
            ax.plot(line["step"], line["mean"], color=colour, linestyle=dash, linewidth=1.6, label=label)
            ax.fill_between(line["step"], line["lo"], line["hi"], color=colour, alpha=0.18, linewidth=0)
        if math.isfinite(top) and mine["hi"].max() > top:
            inside = mine.groupby("strategy").filter(lambda line, top=top: line["mean"].max() <= top)
            bottom = min(inside["mean"].min(), inside["lo"].min() if inside["lo"].notna().any() else math.inf)
            ax.set_ylim(bottom - 0.05 * (top - bottom), top)
        ax.set_title(_cell_title(cell, summary.cell), fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_final(summary: Summary, path: str | os.PathLike, *, title: str = "") -> str:
    """Per cell: the final eval loss (mean, 95% CI) and, as bars from zero, the paired
    difference of each strategy from the baseline (95% CI; below zero is better). When one
    difference is more than 20 times the median one, that axis is symlog (linear up to the
    median difference) so the small differences stay visible."""
    table = summary.strategies
    if table.empty:
        raise OstateError("nothing to plot: no finished trials")
    style = colours(_strategies(summary), summary.baseline)
    cells = _cells(table, summary.cell)
    fig = Figure(
        figsize=(9.5, 0.6 + 0.42 * len(_strategies(summary)) * len(cells) + 0.8 * len(cells)), layout="constrained"
    )
    axes = fig.subplots(len(cells), 2, squeeze=False)
    for (left, right), cell in zip(axes, cells):
        mine = table[(table[list(summary.cell)] == pd.Series(cell, index=list(summary.cell))).all(axis=1)].reset_index(
            drop=True
        )
        names = list(mine["strategy"])
        ys = list(range(len(names)))[::-1]
        for y, (_, row) in zip(ys, mine.iterrows()):
            colour = style[row["strategy"]][0]
            err = [[row["final_mean"] - row["final_lo"]], [row["final_hi"] - row["final_mean"]]]
            left.errorbar(row["final_mean"], y, xerr=err if row["n"] > 1 else None, fmt="o", color=colour, capsize=3)
        left.set_yticks(ys, names)
        left.set_xlabel("final eval loss (mean, 95% CI)")
        left.set_title(_cell_title(cell, summary.cell), fontsize=9)
        left.grid(axis="x", alpha=0.3)
        paired = summary.paired
        if not paired.empty:
            paired = paired[
                (paired["quantity"] == "final")
                & (paired[list(summary.cell)] == pd.Series(cell, index=list(summary.cell))).all(axis=1)
            ]
        for y, name in zip(ys, names):
            row = paired[paired["strategy"] == name] if not paired.empty else paired
            if name == summary.baseline or row.empty:
                continue
            row = row.iloc[0]
            err = [[row["diff_mean"] - row["diff_lo"]], [row["diff_hi"] - row["diff_mean"]]]
            right.barh(
                y, row["diff_mean"], color=style[name][0], alpha=0.85, xerr=err if row["pairs"] > 1 else None, capsize=3
            )
        right.axvline(0, color="black", linewidth=0.8)
        right.set_yticks(ys, names)
        sizes = sorted(abs(v) for v in (paired["diff_mean"] if not paired.empty else []) if v and math.isfinite(v))
        scale = ""
        if len(sizes) > 1 and sizes[-1] > 20 * sizes[len(sizes) // 2]:
            # One strategy far off would flatten the rest: linear near zero, logarithmic beyond.
            right.set_xscale("symlog", linthresh=sizes[len(sizes) // 2])
            scale = "; symlog scale"
        right.set_xlabel(f"final eval loss minus {summary.baseline} (paired, 95% CI{scale})")
        right.grid(axis="x", alpha=0.3)
    fig.suptitle(title or "Final eval loss", fontsize=11)
    return save_figure(fig, path)


def plot_pareto(summary: Summary, path: str | os.PathLike, *, title: str = "") -> str:
    """Forgetting against learning, per cell: each strategy's final target loss (x) and final
    source loss (y), mean and 95% CI over seeds. Down and to the left is better on both; a
    strategy to the left of the baseline but above it won on the target by forgetting more."""
    table = summary.strategies
    if "source_final_mean" not in table:
        raise OstateError("nothing to plot: the trials have no source evaluation")
    cells = _cells(table, summary.cell)
    fig, axes = panel_grid(len(cells))
    style = colours(_strategies(summary), summary.baseline)
    for ax, cell in zip(axes, cells):
        mine = table[(table[list(summary.cell)] == pd.Series(cell, index=list(summary.cell))).all(axis=1)]
        for _, row in mine.iterrows():
            colour, _ = style[row["strategy"]]
            x, y = row["final_mean"], row["source_final_mean"]
            xerr = [[x - row["final_lo"]], [row["final_hi"] - x]] if not math.isnan(row["final_lo"]) else None
            yerr = (
                [[y - row["source_final_lo"]], [row["source_final_hi"] - y]]
                if not math.isnan(row["source_final_lo"])
                else None
            )
            label = row["strategy"] + (f" ({row['failed']}/{row['n']} failed)" if row["failed"] else "")
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", color=colour, capsize=3, label=label)
        ax.set_xlabel("final target (eval) loss")
        ax.set_ylabel("final source loss (forgetting)")
        ax.set_title(_cell_title(cell, summary.cell), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Target against source loss (mean, 95% CI over seeds)", fontsize=11)
    return save_figure(fig, path)


def write_plots(summary: Summary, directory: str | os.PathLike, *, fmt: str = "png", title: str = "") -> list[str]:
    """The figures into ``directory``: ``eval_loss.<fmt>``, ``final_loss.<fmt>``, ``update_rms.<fmt>``
    and, where the trials evaluated on source data, ``pareto.<fmt>`` (target against source loss)."""
    directory = os.fspath(directory)
    prefix = f"{title}: " if title else ""
    pareto = []
    if "source_final_mean" in summary.strategies and summary.strategies["source_final_mean"].notna().any():
        pareto = [
            plot_pareto(summary, os.path.join(directory, f"pareto.{fmt}"), title=f"{prefix}target against source loss")
        ]
    return pareto + [
        plot_curves(
            summary, os.path.join(directory, f"eval_loss.{fmt}"), title=f"{prefix}eval loss (mean, 95% CI over seeds)"
        ),
        plot_final(summary, os.path.join(directory, f"final_loss.{fmt}"), title=f"{prefix}final eval loss"),
        plot_update_rms(
            summary,
            os.path.join(directory, f"update_rms.{fmt}"),
            title=f"{prefix}update RMS over the first steps (mean, 95% CI)",
        ),
    ]
