"""The summary of an ablation as plain-text tables, one per cell of settings."""

from __future__ import annotations

import math

import pandas as pd

from ostate.harness.summary import CELL, Summary
from ostate.render import text_table


def plus_minus(mean: float, lo: float, hi: float, *, signed: bool = False) -> str:
    """``mean ± half-width`` of a symmetric interval (just the mean when there is no interval).

    Example:
        >>> plus_minus(1.5, 1.25, 1.75), plus_minus(0.02, -0.01, 0.05, signed=True), plus_minus(2.0, math.nan, math.nan)
        ('1.5 ± 0.25', '+0.02 ± 0.03', '2')
    """
    if mean is None or math.isnan(mean):
        return "-"
    text = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    if lo is None or math.isnan(lo):
        return text
    return f"{text} ± {(hi - lo) / 2:.2g}"


def _p(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2g}"


def render_summary(summary: Summary) -> str:
    """Every cell's table: per strategy the final eval loss, AUC and steps to target (mean ± 95% CI
    half-width over seeds) and the paired difference of the final eval loss from the baseline."""
    blocks = []
    table = summary.strategies
    if table.empty:
        return "(no finished trials)\n"
    for cell, rows in table.groupby(list(CELL), sort=True):
        lr, warmup, batch, schedule, steps = cell
        target = rows["target"].iloc[0]
        heading = f"lr={lr:g}, warmup={warmup}, batch={batch}, {schedule}, {steps} steps; target loss {target:.4g}"
        extra = [
            c[: -len("_mean")]
            for c in rows.columns
            if c.startswith("final_") and c.endswith("_mean") and c != "final_mean"
        ]
        head = [
            "strategy",
            "n",
            "final eval loss",
            "AUC",
            "steps to target",
            "reached",
            *(e.removeprefix("final_").replace("_", " ") for e in extra),
            f"final - {summary.baseline}",
            "p (t)",
            "p (Wilcoxon)",
        ]
        paired = summary.paired
        if not paired.empty:
            paired = paired[
                (paired["quantity"] == "final") & (paired[list(CELL)] == pd.Series(cell, index=list(CELL))).all(axis=1)
            ]
        cells = []
        for _, row in rows.iterrows():
            pair = paired[paired["strategy"] == row["strategy"]] if not paired.empty else paired
            pair = pair.iloc[0] if len(pair) else None
            n = f"{row['n']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
            cells.append(
                [
                    row["strategy"],
                    n,
                    plus_minus(row["final_mean"], row["final_lo"], row["final_hi"]),
                    plus_minus(row["auc_mean"], row["auc_lo"], row["auc_hi"]),
                    plus_minus(row["to_target_mean"], row["to_target_lo"], row["to_target_hi"]),
                    f"{row['reached']}/{row['n'] - row['diverged']}",
                    *(plus_minus(row[f"{e}_mean"], row[f"{e}_lo"], row[f"{e}_hi"]) for e in extra),
                    plus_minus(pair["diff_mean"], pair["diff_lo"], pair["diff_hi"], signed=True)
                    if pair is not None
                    else "",
                    _p(pair["p_t"]) if pair is not None else "",
                    _p(pair["p_wilcoxon"]) if pair is not None else "",
                ]
            )
        blocks.append(heading + "\n" + text_table(head, cells, left={"strategy", "n"}))
    note = (
        "values: mean ± half-width of the 95% t interval over seeds; AUC: time-averaged eval loss; "
        f"final - {summary.baseline}: paired by seed"
    )
    return "\n\n".join(blocks) + "\n\n" + note + "\n"
