r"""From trial records to the answer: per-strategy statistics and paired differences against a baseline.

Trials are grouped into *cells* (same ``lr``, ``warmup``, ``batch_size``, ``schedule``
and ``steps``); within a cell each strategy has one trial per seed. Per trial:

- ``final``: the eval loss at the last eval step;
- ``auc``: the area under the eval-loss curve over :math:`[0, N]` by the trapezoid
  rule, divided by :math:`N` (the run's time-averaged eval loss, in loss units);
- ``to_target``: the first eval step whose loss is at or below the cell's target loss
  (not reached: missing). The target is the user's, or else the baseline's mean final
  eval loss in the cell ("how soon does a strategy get where reload ends").

Per strategy and cell: mean, standard deviation and 95% t interval of each (see
:mod:`ostate.harness.stats`); ``to_target`` over the trials that reached the target,
with ``reached`` counting them. A trial whose training loss became non-finite is
counted in ``diverged`` and left out of the means. Paired differences
(strategy minus baseline, same seed, same cell) get their own interval, a paired
t-test and Wilcoxon's signed-rank test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from ostate.harness.metrics import ALL
from ostate.harness.stats import mean_ci, paired_test, t_quantile

CELL = ("lr", "warmup", "batch_size", "schedule", "steps")


@dataclass
class Summary:
    """Tables of one ablation (pandas DataFrames), ready to print, save or plot.

    - ``trials``: one row per trial: settings, ``final``, ``auc``, ``to_target``,
      ``diverged`` and ``final_<metric>`` for other eval metrics (e.g. accuracy);
    - ``strategies``: one row per cell and strategy with ``n`` and, for each of
      ``final``, ``auc``, ``to_target`` (and ``final_<metric>``), ``_mean``, ``_std``,
      ``_lo``, ``_hi``; plus ``target``, ``reached`` and ``diverged``;
    - ``paired``: one row per cell, strategy and quantity (``final``, ``auc``): the
      paired difference from the baseline: ``pairs``, ``diff_mean``, ``diff_lo``,
      ``diff_hi``, ``t``, ``p_t``, ``p_wilcoxon``;
    - ``curves``: per cell, strategy, metric (``eval_loss``, ``update_rms``) and step:
      ``n``, ``mean``, ``lo``, ``hi`` across seeds (for ``update_rms`` the geometric
      mean and the interval of its logarithm).
    """

    trials: pd.DataFrame
    strategies: pd.DataFrame
    paired: pd.DataFrame
    curves: pd.DataFrame
    baseline: str


def summarize_trials(
    trials: pd.DataFrame,
    records: pd.DataFrame,
    *,
    baseline: str = "reload",
    target: float | None = None,
    order: Sequence[str] | None = None,
) -> Summary:
    """Summarise finished trials (``ResultsStore.trials()`` and ``.records()`` rows).

    ``order`` lists the strategies in the order tables and plots show them (default:
    the baseline first, then as they appear).
    """
    order = list(order) if order is not None else list(dict.fromkeys(trials["strategy"]))
    if baseline in order:
        order = [baseline] + [s for s in order if s != baseline]
    rank = {s: i for i, s in enumerate(order)}
    per_trial = _per_trial(trials, records)
    per_trial["to_target"] = np.nan
    per_trial["target"] = np.nan
    evals = records[(records["metric"] == "eval_loss")]
    rows, paired_rows = [], []
    for cell, members in per_trial.groupby(list(CELL), sort=True):
        cell_target = target
        if cell_target is None:
            reference = (
                members[members["strategy"] == baseline]
                if baseline in set(members["strategy"])
                else members[members["strategy"] == min(members["strategy"], key=lambda s: rank.get(s, 1e9))]
            )
            cell_target = mean_ci(reference["final"]).mean
        for index, trial in members.iterrows():
            curve = evals[evals["trial_id"] == trial["trial_id"]].sort_values("step")
            reached = curve[curve["value"] <= cell_target]["step"]
            per_trial.loc[index, "target"] = cell_target
            if not trial["diverged"] and len(reached):
                per_trial.loc[index, "to_target"] = float(reached.iloc[0])
        members = per_trial.loc[members.index]
        extra = [c for c in members.columns if c.startswith("final_")]
        for strategy, group in sorted(members.groupby("strategy"), key=lambda kv: rank.get(kv[0], 1e9)):
            ok = group[~group["diverged"]]
            row = dict(
                zip(CELL, cell),
                strategy=strategy,
                n=len(group),
                diverged=int(group["diverged"].sum()),
                target=cell_target,
                reached=int(ok["to_target"].notna().sum()),
            )
            for quantity in ("final", "auc", "to_target", *extra):
                interval = mean_ci(ok[quantity].tolist())
                row.update(
                    {
                        f"{quantity}_mean": interval.mean,
                        f"{quantity}_std": interval.std,
                        f"{quantity}_lo": interval.lo,
                        f"{quantity}_hi": interval.hi,
                    }
                )
            rows.append(row)
            if strategy == baseline or baseline not in set(members["strategy"]):
                continue
            base = members[members["strategy"] == baseline].set_index("seed")
            mine = group.set_index("seed")
            seeds = sorted(set(base.index) & set(mine.index))
            for quantity in ("final", "auc"):
                x = [_value(mine, s, quantity) for s in seeds]
                y = [_value(base, s, quantity) for s in seeds]
                test = paired_test(x, y)
                paired_rows.append(
                    dict(
                        zip(CELL, cell),
                        strategy=strategy,
                        quantity=quantity,
                        pairs=test.interval.n,
                        diff_mean=test.interval.mean,
                        diff_lo=test.interval.lo,
                        diff_hi=test.interval.hi,
                        t=test.t,
                        p_t=test.p_t,
                        p_wilcoxon=test.p_wilcoxon,
                    )
                )
    curves = _curves(per_trial, records, rank)
    return Summary(per_trial, pd.DataFrame(rows), pd.DataFrame(paired_rows), curves, baseline)


def _value(frame: pd.DataFrame, seed: int, quantity: str) -> float:
    row = frame.loc[seed]
    return math.nan if row["diverged"] else float(row[quantity])


def _per_trial(trials: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    out = trials[["trial_id", "strategy", "seed", *CELL]].copy().reset_index(drop=True)
    diverged_steps = records[(records["metric"] == "train_loss") & ~np.isfinite(records["value"].astype(float))]
    diverged = set(diverged_steps["trial_id"])
    finals: dict[str, dict[str, float]] = {}
    evals = records[records["metric"].str.startswith("eval_")].sort_values(["trial_id", "step"])
    for (trial_id, metric), curve in evals.groupby(["trial_id", "metric"]):
        steps, values = curve["step"].to_numpy(float), curve["value"].to_numpy(float)
        entry = finals.setdefault(trial_id, {})
        if metric == "eval_loss":
            entry["final"] = values[-1]
            span = steps[-1] - steps[0]
            area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)))  # the trapezoid rule
            entry["auc"] = area / span if span > 0 else values[-1]
        else:
            entry[f"final_{metric.removeprefix('eval_')}"] = values[-1]
    for column in sorted({k for v in finals.values() for k in v} | {"final", "auc"}):
        out[column] = [finals.get(t, {}).get(column, np.nan) for t in out["trial_id"]]
    out["diverged"] = [t in diverged for t in out["trial_id"]]
    return out


def _curves(per_trial: pd.DataFrame, records: pd.DataFrame, rank: dict[str, int]) -> pd.DataFrame:
    wanted = records[records["metric"].isin(["eval_loss", "update_rms"]) & (records["grp"] == ALL)].copy()
    kept = per_trial[~per_trial["diverged"]]
    merged = wanted.merge(kept[["trial_id", "strategy", *CELL]], on="trial_id")
    # Update sizes span orders of magnitude: their interval is taken on log10 values (a geometric mean).
    logged = merged["metric"] == "update_rms"
    merged.loc[logged, "value"] = np.log10(merged.loc[logged, "value"].astype(float).clip(lower=1e-30))
    keys = [*CELL, "strategy", "metric", "step"]
    frame = merged.groupby(keys, sort=False)["value"].agg(["count", "mean", "std"]).reset_index()
    frame = frame.rename(columns={"count": "n"})
    half = [
        t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan for n, sd in zip(frame["n"], frame["std"])
    ]
    frame["lo"], frame["hi"] = frame["mean"] - half, frame["mean"] + half
    logged = frame["metric"] == "update_rms"
    for column in ("mean", "lo", "hi"):
        frame.loc[logged, column] = 10.0 ** frame.loc[logged, column]
    frame["_rank"] = frame["strategy"].map(lambda s: rank.get(s, 1e9))
    frame = frame.sort_values([*CELL, "_rank", "metric", "step"]).drop(columns=["_rank", "std"])
    return frame.reset_index(drop=True)
