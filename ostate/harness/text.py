"""The summary of an ablation as plain-text tables, one per cell of settings."""

from __future__ import annotations

import math

import pandas as pd

from ostate.harness.summary import Summary, _cell_label
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


def _pair(paired: pd.DataFrame, strategy: str, quantity: str):
    if paired.empty:
        return None
    found = paired[(paired["strategy"] == strategy) & (paired["quantity"] == quantity)]
    return found.iloc[0] if len(found) else None


def _interval(row, quantity: str) -> str:
    """``mean ± half-width``; with fewer than three finished seeds the t interval is not shown."""
    if row["n"] - row["failed"] < 3:
        mean = row[f"{quantity}_mean"]
        return "-" if mean is None or math.isnan(mean) else f"{mean:.4g} (n<3)"
    return plus_minus(row[f"{quantity}_mean"], row[f"{quantity}_lo"], row[f"{quantity}_hi"])


def _bracket(value: float, lo: float, hi: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4g}" if math.isnan(lo) else f"{value:.4g} [{lo:.3g}, {hi:.3g}]"


def render_summary(summary: Summary) -> str:
    """Every cell's table: per strategy the runs that failed, the final eval loss (mean ± 95% CI
    half-width; the interquartile mean with its bootstrap interval), the AUC, the final source loss
    (forgetting), steps to target (Kaplan-Meier median; restricted mean ± CI), the paired
    difference of the final eval loss from the baseline with its p-values (raw t, Holm-adjusted,
    Wilcoxon) and the probability of improvement; then the warnings and a verdict per cell."""
    blocks = []
    table = summary.strategies
    if table.empty:
        return "(no finished trials)\n"
    keys = list(summary.cell)
    for cell, rows in table.groupby(keys, sort=True):
        values = dict(zip(keys, cell if isinstance(cell, tuple) else (cell,)))
        target = rows["target"].iloc[0]
        heading = f"{_cell_label(values)}; target loss {target:.4g}"
        tuned = "lr" not in keys
        extra = [
            c[: -len("_mean")]
            for c in rows.columns
            if c.startswith("final_") and c.endswith("_mean") and c != "final_mean"
        ]
        source = "source_final_mean" in rows and rows["source_final_mean"].notna().any()
        head = [
            "strategy",
            *(["lr", "warmup"] if tuned else []),
            "n",
            "failed",
            "final eval loss",
            "IQM [95% CI]",
            "AUC",
            *(["source loss"] if source else []),
            "steps to target (median; mean ± CI)",
            *(e.removeprefix("final_").replace("_", " ") for e in extra),
            f"final - {summary.baseline}",
            "p (t)",
            "p_holm",
            "p (Wilcoxon)",
            "P(better)",
            *([f"source - {summary.baseline}"] if source else []),
        ]
        paired = summary.paired
        if not paired.empty:
            paired = paired[(paired[keys] == pd.Series(values)).all(axis=1)]
        cells = []
        for _, row in rows.iterrows():
            pair, source_pair = _pair(paired, row["strategy"], "final"), _pair(paired, row["strategy"], "source_final")
            median = row["to_target_median"]
            steps = (
                ("-" if math.isnan(median) else f"{median:g}")
                + "; "
                + plus_minus(row["to_target_rmst"], row["to_target_rmst_lo"], row["to_target_rmst_hi"])
            )
            cells.append(
                [
                    row["strategy"],
                    *([f"{row['lr']:g}", f"{int(row['warmup'])}"] if tuned else []),
                    f"{row['n']}",
                    f"{row['failed']}",
                    _interval(row, "final"),
                    _bracket(row["final_iqm"], row["final_iqm_lo"], row["final_iqm_hi"]),
                    _interval(row, "auc"),
                    *([_interval(row, "source_final")] if source else []),
                    steps + f" ({row['reached']}/{row['n']} reached)",
                    *(_interval(row, e) for e in extra),
                    plus_minus(pair["diff_mean"], pair["diff_lo"], pair["diff_hi"], signed=True)
                    if pair is not None
                    else "",
                    _p(pair["p_t"]) if pair is not None else "",
                    _p(pair["p_holm"]) if pair is not None else "",
                    _p(pair["p_wilcoxon"]) if pair is not None else "",
                    f"{pair['prob_improvement']:.2f}" if pair is not None else "",
                    *(
                        [
                            plus_minus(
                                source_pair["diff_mean"], source_pair["diff_lo"], source_pair["diff_hi"], signed=True
                            )
                            if source_pair is not None
                            else ""
                        ]
                        if source
                        else []
                    ),
                ]
            )
        blocks.append(heading + "\n" + text_table(head, cells, left={"strategy", "n"}))
    note = (
        "values: mean ± half-width of the 95% t interval over the seeds that did not fail (n<3: too few seeds "
        "for an interval); IQM: interquartile mean, percentile bootstrap; AUC: time-averaged eval loss; "
        "steps to target: Kaplan-Meier median and restricted mean (runs that never reach it censored); "
        f"final - {summary.baseline}: paired by seed; p_holm: Holm-adjusted over the cell's tests; "
        "P(better): probability of improvement (a failed run loses to every finished one)"
        + (
            "; lr and warmup: each strategy's best on the validation split, numbers on the test split"
            if "lr" not in keys
            else ""
        )
    )
    text = "\n\n".join(blocks) + "\n\n" + note + "\n"
    if summary.warnings:
        text += "\nwarnings:\n" + "".join(f"- {w}\n" for w in summary.warnings)
    if summary.verdicts:
        text += "\nverdict:\n" + "".join(f"- {v}\n" for v in summary.verdicts)
    return text
