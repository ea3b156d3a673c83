r"""From trial records to the answer: per-strategy statistics and paired differences against a baseline.

Trials are grouped into *cells* (same ``lr``, ``warmup``, ``batch_size``, ``schedule``
and ``steps``); within a cell each strategy has one trial per seed. Per trial:

- ``final``: the eval loss at the last eval step;
- ``auc``: the area under the eval-loss curve over :math:`[0, N]` by the trapezoid
  rule, divided by :math:`N` (the run's time-averaged eval loss, in loss units);
- ``to_target``: the first eval step whose loss is at or below the cell's target loss
  (not reached: censored at the last step). The target is the user's, or else the
  baseline's mean final eval loss in the cell ("how soon does a strategy get where
  reload ends");
- ``source_final``: the final loss on held-out source data (forgetting), where the task
  has a source evaluation; ``val_final`` likewise on the validation split;
- ``failed``: the run diverged (a non-finite training loss) or exploded (an eval loss
  above ten times the one before fine-tuning).

Per strategy and cell: mean, standard deviation and 95% t interval of each (see
:mod:`ostate.harness.stats`) over the runs that did not fail, with ``failed`` counting
the others; the interquartile mean with a percentile bootstrap interval (Agarwal et al.
2021); steps to target as censored data: the Kaplan-Meier median and the restricted
mean up to the last step with its interval (``to_target_rmst``, never outside
``[0, steps]``). A bounded metric (accuracy and the like, ``BOUNDED``) gets its
interval clipped to [0, 1].

Paired differences (strategy minus baseline, same seed, same cell) of ``final``,
``auc`` and ``source_final`` get their own interval and a paired t-test (finished pairs),
Wilcoxon's signed-rank test in which a failed run ranks worse than every finished one,
Holm's adjustment over the cell's family of tests (``p_holm``), the probability of
improvement (a failed run loses to every finished one), the seeds a paired t-test would
need for the observed effect (``seeds_needed``), and Fisher's exact test of the failure
rates (``p_failed``). ``warnings`` says where seeds are too few; ``verdicts`` says the
answer per cell in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ostate.errors import OstateError
from ostate.harness.metrics import ALL
from ostate.harness.stats import (
    bootstrap_interval,
    fisher_exact_p,
    holm,
    iqm,
    mean_ci,
    paired_test,
    probability_of_improvement,
    seeds_needed,
    survival_summary,
    t_quantile,
    wilcoxon_p,
)

CELL = ("lr", "warmup", "batch_size", "schedule", "steps", "grad_clip", "beta2", "replay")
# Metrics whose values lie in [0, 1]: their intervals are clipped there.
BOUNDED = ("accuracy", "acc", "top1", "top5", "f1", "precision", "recall", "exact_match")
EXPLODED = 10.0  # an eval loss above this many times the one before fine-tuning counts as a failed run
WILCOXON_MIN_PAIRS = 6  # fewer pairs cannot reach p < 0.05 (exact two-sided minimum 2 / 2^n)
PAIRED = ("final", "auc", "source_final")


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
    warnings: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    cell: tuple[str, ...] = CELL  # the settings that make a cell (without lr and warmup when tuned)


def summarize_trials(
    trials: pd.DataFrame,
    records: pd.DataFrame,
    *,
    baseline: str = "reload",
    target: float | None = None,
    order: Sequence[str] | None = None,
    tune: bool = False,
) -> Summary:
    """Summarise finished trials (``ResultsStore.trials()`` and ``.records()`` rows).

    ``order`` lists the strategies in the order tables and plots show them (default:
    the baseline first, then as they appear). With ``tune``, each strategy is shown at
    its own best ``lr`` and ``warmup``: the pair with the lowest mean final loss on the
    validation split (``val_loss``), and the numbers reported are the test split's
    (``eval_loss``); the cells are then the other settings.
    """
    order = list(order) if order is not None else list(dict.fromkeys(trials["strategy"]))
    if baseline in order:
        order = [baseline] + [s for s in order if s != baseline]
    rank = {s: i for i, s in enumerate(order)}
    per_trial = _per_trial(trials, records)
    cell_keys = list(CELL)
    if tune:
        per_trial = select_tuned(per_trial)
        cell_keys = [c for c in CELL if c not in ("lr", "warmup")]
    per_trial["to_target"] = np.nan
    per_trial["reached"] = False
    per_trial["target"] = np.nan
    evals = records[(records["metric"] == "eval_loss")]
    rows, paired_rows = [], []
    warnings: list[str] = []
    for cell, members in per_trial.groupby(cell_keys, sort=True):
        cell_target = target
        if cell_target is None:
            reference = (
                members[members["strategy"] == baseline]
                if baseline in set(members["strategy"])
                else members[members["strategy"] == min(members["strategy"], key=lambda s: rank.get(s, 1e9))]
            )
            cell_target = mean_ci(reference[~reference["failed"]]["final"]).mean
        for index, trial in members.iterrows():
            curve = evals[evals["trial_id"] == trial["trial_id"]].sort_values("step")
            reached = curve[curve["value"] <= cell_target]["step"]
            per_trial.loc[index, "target"] = cell_target
            if not trial["failed"] and len(reached):
                per_trial.loc[index, "to_target"] = float(reached.iloc[0])
                per_trial.loc[index, "reached"] = True
            else:  # censored at the last step it ran
                per_trial.loc[index, "to_target"] = float(curve["step"].max()) if len(curve) else float(trial["steps"])
        members = per_trial.loc[members.index]
        extra = [c for c in members.columns if c.startswith("final_")]
        quantities = ["final", "auc", *(["source_final"] if members["source_final"].notna().any() else []), *extra]
        cell_rows = []
        for strategy, group in sorted(members.groupby("strategy"), key=lambda kv: rank.get(kv[0], 1e9)):
            ok = group[~group["failed"]]
            row = dict(
                zip(cell_keys, cell if isinstance(cell, tuple) else (cell,)),
                strategy=strategy,
                n=len(group),
                failed=int(group["failed"].sum()),
                target=cell_target,
                reached=int(group["reached"].sum()),
            )
            if tune:
                row.update(lr=float(group["lr"].iloc[0]), warmup=int(group["warmup"].iloc[0]))
            for quantity in quantities:
                interval = mean_ci(ok[quantity].tolist())
                lo, hi = interval.lo, interval.hi
                if quantity.removeprefix("final_") in BOUNDED:
                    lo, hi = max(0.0, lo), min(1.0, hi)
                iqm_lo, iqm_hi = bootstrap_interval(ok[quantity].tolist())
                row.update(
                    {
                        f"{quantity}_mean": interval.mean,
                        f"{quantity}_std": interval.std,
                        f"{quantity}_lo": lo,
                        f"{quantity}_hi": hi,
                        f"{quantity}_iqm": iqm(ok[quantity].tolist()),
                        f"{quantity}_iqm_lo": iqm_lo,
                        f"{quantity}_iqm_hi": iqm_hi,
                    }
                )
            horizon = float(group["steps"].iloc[0])
            survival = survival_summary(group["to_target"].tolist(), group["reached"].tolist(), horizon)
            row.update(
                to_target_median=survival.median,
                to_target_rmst=survival.rmst,
                to_target_rmst_lo=survival.lo,
                to_target_rmst_hi=survival.hi,
            )
            rows.append(row)
            cell_rows.append(row)
            if strategy == baseline or baseline not in set(members["strategy"]):
                continue
            base = members[members["strategy"] == baseline].set_index("seed")
            mine = group.set_index("seed")
            seeds = sorted(set(base.index) & set(mine.index))
            p_failed = fisher_exact_p(int(group["failed"].sum()), len(group), int(base["failed"].sum()), len(base))
            for quantity in [q for q in PAIRED if q in quantities]:
                x = [_value(mine, s, quantity) for s in seeds]
                y = [_value(base, s, quantity) for s in seeds]
                test = paired_test(x, y)  # the finished pairs
                ranked = [_ranked(a, b) for a, b in zip(x, y)]  # a failed run ranks worst
                p_w = wilcoxon_p(ranked) if any(not math.isnan(d) for d in ranked) else math.nan
                paired_rows.append(
                    dict(
                        zip(cell_keys, cell if isinstance(cell, tuple) else (cell,)),
                        strategy=strategy,
                        quantity=quantity,
                        pairs=len(seeds),
                        finished_pairs=test.interval.n,
                        diff_mean=test.interval.mean,
                        diff_lo=test.interval.lo,
                        diff_hi=test.interval.hi,
                        t=test.t,
                        p_t=test.p_t,
                        p_wilcoxon=p_w,
                        prob_improvement=probability_of_improvement(
                            [math.inf if math.isnan(v) else v for v in x],
                            [math.inf if math.isnan(v) else v for v in y],
                        ),
                        seeds_needed=seeds_needed(test.interval.mean, test.interval.std),
                        p_failed=p_failed,
                    )
                )
        label = _cell_label(dict(zip(cell_keys, cell if isinstance(cell, tuple) else (cell,))))
        n_min = min((r["n"] - r["failed"] for r in cell_rows), default=0)
        if n_min < WILCOXON_MIN_PAIRS:
            warnings.append(
                f"{label}: {n_min} finished seed(s) per strategy at the fewest; Wilcoxon's test cannot reach "
                f"p < 0.05 with fewer than {WILCOXON_MIN_PAIRS} pairs"
                + ("; with fewer than 3 the t intervals are too wide to mean much" if n_min < 3 else "")
            )
    paired = pd.DataFrame(paired_rows)
    if not paired.empty:
        paired["p_holm"] = np.nan
        for _, family in paired.groupby(cell_keys, sort=False):
            paired.loc[family.index, "p_holm"] = holm(family["p_t"].tolist())
        for _, row in paired.iterrows():
            width = row["diff_hi"] - row["diff_lo"]
            if row["quantity"] == "final" and not math.isnan(width) and width / 2 > abs(row["diff_mean"]):
                warnings.append(
                    f"{_cell_label(row)}: {row['strategy']} - {baseline}: the interval (±{width / 2:.2g}) is wider than "
                    f"the effect ({row['diff_mean']:+.2g}); about {_count(row['seeds_needed'])} seeds would detect it"
                )
    curves = _curves(per_trial, records, rank, cell_keys)
    strategies = pd.DataFrame(rows)
    summary = Summary(per_trial, strategies, paired, curves, baseline, warnings, cell=tuple(cell_keys))
    summary.verdicts = verdicts(summary)
    return summary


def select_tuned(per_trial: pd.DataFrame) -> pd.DataFrame:
    """The trials of each strategy's best ``lr`` and ``warmup`` per cell of the other settings:
    the lowest mean final validation loss over its finished seeds (a pair where any seed failed
    is chosen only when every pair has failures)."""
    if per_trial["val_final"].isna().all():
        raise OstateError(
            "tuning selects on a validation split, but the trials recorded none",
            hint="give the task validate(model) (TOML: validate = 'module:function'); every built-in task has one",
        )
    others = [c for c in CELL if c not in ("lr", "warmup")]
    keep = []
    for _, group in per_trial.groupby([*others, "strategy"], sort=False):
        scores = []
        for (lr, warmup), runs in group.groupby(["lr", "warmup"]):
            ok = runs[~runs["failed"]]
            scores.append((int(runs["failed"].sum()), ok["val_final"].mean() if len(ok) else math.inf, lr, warmup))
        _, _, lr, warmup = min(scores)
        keep.append(group[(group["lr"] == lr) & (group["warmup"] == warmup)])
    return pd.concat(keep).sort_index()


def verdicts(summary: Summary) -> list[str]:
    """One sentence per cell: the best strategy on the target (lowest mean final loss among those
    with the fewest failures), how it compares with the baseline (difference, interval, p_holm,
    probability of improvement) and its forgetting (source loss against the baseline's)."""
    out: list[str] = []
    table, paired = summary.strategies, summary.paired
    if table.empty:
        return out
    keys = list(summary.cell)
    for cell, rows in table.groupby(keys, sort=True):
        cell_values = dict(zip(keys, cell if isinstance(cell, tuple) else (cell,)))
        label = _cell_label(cell_values)
        ranked = rows.assign(_ok=rows["failed"]).sort_values(["_ok", "final_mean"])
        best = ranked.iloc[0]
        name = best["strategy"]
        text = f"{label}: best on the target: {name} (final loss {best['final_mean']:.4g}"
        text += f", {best['failed']}/{best['n']} failed)" if best["failed"] else ")"
        pairs = paired[(paired[keys] == pd.Series(cell_values)).all(axis=1)] if not paired.empty else paired
        if name == summary.baseline:
            text += f"; no strategy beat {name} on average"
        elif not pairs.empty:
            final = pairs[(pairs["strategy"] == name) & (pairs["quantity"] == "final")]
            if len(final):
                f = final.iloc[0]
                sure = (
                    "significant after Holm's adjustment"
                    if f["p_holm"] < 0.05
                    else "not significant after Holm's adjustment"
                    if not math.isnan(f["p_holm"])
                    else "no test possible"
                )
                text += (
                    f"; {f['diff_mean']:+.3g} against {summary.baseline} (95% CI {f['diff_lo']:+.3g} to "
                    f"{f['diff_hi']:+.3g}, p_holm {f['p_holm']:.2g}: {sure}; better in "
                    f"{f['prob_improvement']:.0%} of run pairs"
                )
                if not (f["p_holm"] < 0.05) and not math.isnan(f["seeds_needed"]):
                    text += f"; ~{_count(f['seeds_needed'])} seeds to detect it"
                text += ")"
            source = pairs[(pairs["strategy"] == name) & (pairs["quantity"] == "source_final")]
            if len(source):
                s = source.iloc[0]
                if s["diff_lo"] > 0:
                    text += f"; it forgets more: source loss {s['diff_mean']:+.3g} (CI {s['diff_lo']:+.3g} to {s['diff_hi']:+.3g})"
                elif s["diff_hi"] < 0:
                    text += f"; it forgets less: source loss {s['diff_mean']:+.3g} (CI {s['diff_lo']:+.3g} to {s['diff_hi']:+.3g})"
                else:
                    text += f"; forgetting not distinguishable: source loss {s['diff_mean']:+.3g}"
        out.append(text + ".")
    return out


def _count(n: float) -> str:
    return "-" if math.isnan(n) else "many" if math.isinf(n) else f"{int(n)}"


def _cell_label(values) -> str:
    parts = []
    for key in CELL:
        if key not in values:
            continue
        v = values[key]
        if key in ("grad_clip", "beta2", "replay") and not v:
            continue
        parts.append(f"{key}={v:g}" if isinstance(v, float) else f"{key}={v}")
    return ", ".join(parts)


def _ranked(a: float, b: float) -> float:
    """The difference a - b for the rank test, a failed run (NaN) counting as worse than any
    finished one: +inf when only a failed, -inf when only b did, 0 when both did."""
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a):
        return math.inf
    if math.isnan(b):
        return -math.inf
    return a - b


def _value(frame: pd.DataFrame, seed: int, quantity: str) -> float:
    row = frame.loc[seed]
    return math.nan if row["failed"] else float(row[quantity])


def _per_trial(trials: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    trials = trials.assign(**{k: 0.0 for k in ("grad_clip", "beta2", "replay") if k not in trials})  # older tables
    out = trials[["trial_id", "strategy", "seed", *CELL]].copy().reset_index(drop=True)
    diverged_steps = records[(records["metric"] == "train_loss") & ~np.isfinite(records["value"].astype(float))]
    diverged = set(diverged_steps["trial_id"])
    finals: dict[str, dict[str, float]] = {}
    evals = records[records["metric"].str.match(r"^(eval|source|val)_")].sort_values(["trial_id", "step"])
    exploded = set()
    for (trial_id, metric), curve in evals.groupby(["trial_id", "metric"]):
        steps, values = curve["step"].to_numpy(float), curve["value"].to_numpy(float)
        entry = finals.setdefault(trial_id, {})
        if metric == "eval_loss":
            entry["final"] = values[-1]
            span = steps[-1] - steps[0]
            area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)))  # the trapezoid rule
            entry["auc"] = area / span if span > 0 else values[-1]
            if not np.all(np.isfinite(values)) or np.nanmax(values) > EXPLODED * abs(values[0]):
                exploded.add(trial_id)
        elif metric == "source_loss":
            entry["source_final"] = values[-1]
        elif metric == "val_loss":
            entry["val_final"] = values[-1]
        elif metric.startswith("eval_"):
            entry[f"final_{metric.removeprefix('eval_')}"] = values[-1]
    for column in sorted({k for v in finals.values() for k in v} | {"final", "auc", "source_final", "val_final"}):
        out[column] = [finals.get(t, {}).get(column, np.nan) for t in out["trial_id"]]
    out["diverged"] = [t in diverged for t in out["trial_id"]]
    out["failed"] = [t in diverged or t in exploded for t in out["trial_id"]]
    return out


def _curves(
    per_trial: pd.DataFrame, records: pd.DataFrame, rank: dict[str, int], cell: Sequence[str] = CELL
) -> pd.DataFrame:
    wanted = records[records["metric"].isin(["eval_loss", "source_loss", "update_rms"]) & (records["grp"] == ALL)]
    wanted = wanted.copy()
    kept = per_trial[~per_trial["failed"]]
    merged = wanted.merge(kept[["trial_id", "strategy", *cell]], on="trial_id")
    # Update sizes span orders of magnitude: their interval is taken on log10 values (a geometric mean).
    logged = merged["metric"] == "update_rms"
    merged.loc[logged, "value"] = np.log10(merged.loc[logged, "value"].astype(float).clip(lower=1e-30))
    keys = [*cell, "strategy", "metric", "step"]
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
    frame = frame.sort_values([*cell, "_rank", "metric", "step"]).drop(columns=["_rank", "std"])
    return frame.reset_index(drop=True)
