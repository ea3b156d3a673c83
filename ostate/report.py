"""The inspect report: a checkpoint's header and tables, rendered as text, CSV, JSON or Markdown."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ostate.analysis import HeadLayout, describe, summarize
from ostate.analysis.columns import CORE, OPTIONAL_STATISTICS, statistic_of
from ostate.analysis.engine import check_view
from ostate.distributed import RayExecutor, summarize_on_ray
from ostate.errors import OstateError
from ostate.loading import as_checkpoint, selected_optimizers
from ostate.optimizers import get_family
from ostate.render import (
    cells,
    format_bytes,
    format_value,
    jsonable,
    markdown_table,
    text_table,
)
from ostate.render import (
    render as render_as,
)
from ostate.state import Checkpoint

# Metadata shown on the header's "training:" line, in this order.
_TRAINING_KEYS = ("epoch", "global_step", "step", "iteration", "max_steps", "processes")
_KEY_COLUMNS = {
    "param": ("name", "name_source", "shape", "numel", "group", "step"),
    "group": ("group", "lr", "params", "numel", "step_min", "step_max"),
    "layer": ("layer", "params", "numel", "step_min", "step_max"),
    "kind": ("param_kind", "params", "numel", "step_min", "step_max"),
    "model": ("params", "params_with_state", "numel", "step_min", "step_max"),
}
# What the header and the table say of a parameter whose optimizer will create its state at the next step.
FIRST_STEP = "no state yet (first step)"
# Shown after the family's own columns whenever the table has them.
_EXTRA_COLUMNS = ("update_to_weight_rms",)
_PRECONDITIONER_COLUMNS = ("precond_min", "precond_p50", "precond_max")


@dataclass
class OptimizerReport:
    description: dict[str, Any]
    table: pd.DataFrame
    columns: list[str]  # the columns a human-readable rendering shows


@dataclass
class Report:
    """What ``ostate inspect`` shows: one header per checkpoint, one table per optimizer."""

    path: str
    format: str
    view: str
    metadata: dict[str, Any]
    weights_location: str | None
    weights_count: int
    schedulers: list[dict[str, Any]]
    optimizers: list[OptimizerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The statistic families the tables hold ("core", and "compressibility", "q8" when computed).
    statistics: tuple[str, ...] = (CORE,)


def inspect(
    checkpoint: Checkpoint | str | os.PathLike,
    *,
    by: str = "param",
    sort: str | None = None,
    ascending: bool = False,
    top: int | None = None,
    optimizer_index: int | None = None,
    columns: list[str] | None = None,
    progress: bool = False,
    workers: int | None = None,
    heads: HeadLayout | None = None,
    compressibility: bool = False,
    executor: RayExecutor | None = None,
) -> Report:
    """Build the report for a checkpoint (loaded, or its path).

    ``sort`` orders rows by a column (largest first unless ``ascending``), ``top``
    keeps the first N rows, ``optimizer_index`` picks one optimizer when the file
    holds several, ``columns`` replaces the default columns of the text renderings
    (``["all"]`` shows every column). ``workers`` and ``heads`` go to
    :func:`ostate.analysis.summarize`.

    Only the statistics that the shown columns need are computed: the core (every
    quantity's sketch, trouble fractions, weights) always; Adam-mini compressibility
    (``vmean_*``) and the 8-bit error (``*_q8_relerr``) when ``columns`` or ``sort``
    name one of their columns, ``columns == ["all"]``, or ``compressibility`` (both).

    ``executor`` runs the analysis on Ray (:mod:`ostate.distributed`); the report is the same.
    """
    check_view(by)
    checkpoint = as_checkpoint(checkpoint)
    optimizers = selected_optimizers(checkpoint, optimizer_index)
    report = Report(
        path=checkpoint.path,
        format=checkpoint.format,
        view=by,
        metadata=dict(checkpoint.metadata),
        weights_location=checkpoint.weights_location,
        weights_count=len(checkpoint.weights or {}),
        schedulers=[_scheduler_summary(s) for s in checkpoint.schedulers],
        warnings=list(checkpoint.warnings),
    )
    chosen = Checkpoint(
        checkpoint.path,
        checkpoint.format,
        optimizers,
        checkpoint.weights,
        checkpoint.weights_location,
        config=checkpoint.config,
    )
    statistics = needed_statistics(columns, sort, compressibility)
    if executor is not None:
        positions = [i for i, o in enumerate(checkpoint.optimizers) if any(o is s for s in optimizers)]
        analysis = summarize_on_ray(checkpoint, executor, optimizers=positions, heads=heads, statistics=statistics)
    else:
        analysis = summarize(chosen, heads=heads, workers=workers, progress=progress, statistics=statistics)
    report.notes = analysis.notes
    report.statistics = analysis.statistics
    for optimizer, result in zip(optimizers, analysis.optimizers):
        table = result.table(by)
        if sort is not None:
            if sort not in table.columns:
                raise OstateError(
                    f"no column '{sort}' to sort by", hint=f"columns: {', '.join(map(str, table.columns))}"
                )
            table = table.sort_values(sort, ascending=ascending, na_position="last", kind="stable")
        if top is not None:
            table = table.head(top)
        shown = _shown_columns(optimizer.kind, by, table, columns)
        report.optimizers.append(OptimizerReport(describe(optimizer), table.reset_index(drop=True), shown))
    return report


def needed_statistics(columns: list[str] | None, sort: str | None, compressibility: bool) -> frozenset[str]:
    """The optional statistic families an inspect report must compute for these columns and sort key.

    Example:
        >>> sorted(needed_statistics(None, None, False)), sorted(needed_statistics(["name", "exp_avg_q8_relerr"], None, False))
        ([], ['q8'])
        >>> sorted(needed_statistics(["all"], None, False)) == sorted(needed_statistics(None, None, True))
        True
    """
    if compressibility or columns == ["all"]:
        return frozenset(OPTIONAL_STATISTICS)
    named = [*(columns or ()), *([sort] if sort else [])]
    return frozenset(statistic_of(c) for c in named) - {CORE}


def _shown_columns(kind: str, by: str, table: pd.DataFrame, requested: list[str] | None) -> list[str]:
    if requested == ["all"]:
        return [c for c in table.columns if c != "optimizer"]
    if requested:
        missing = [c for c in requested if c not in table.columns]
        if missing:
            raise OstateError(f"no column {', '.join(missing)}", hint=f"columns: {', '.join(map(str, table.columns))}")
        return requested
    family = get_family(kind)
    stats = list(family.display) or [c for c in table.columns if c.endswith(("_mean", "_rms"))]
    # A group at lr 0 (a finished schedule) has eff_lr 0: its preconditioner says what carries over.
    stats += [c for c in _PRECONDITIONER_COLUMNS if c in table.columns and table[c].notna().any()]
    return [c for c in (*_KEY_COLUMNS[by], *stats, *_EXTRA_COLUMNS) if c in table.columns]


def _scheduler_summary(state: dict[str, Any]) -> dict[str, Any]:
    keep = ("_location", "last_epoch", "_step_count", "_last_lr", "base_lrs")
    return {k.lstrip("_") if k == "_location" else k: jsonable(state[k]) for k in keep if k in state}


# ---------------------------------------------------------------------- rendering
def render(report: Report, fmt: str = "table") -> str:
    """The report as text (``table``), ``csv``, ``json`` or ``markdown``."""
    return render_as(
        fmt,
        table=lambda: _render_text(report, markdown=False),
        csv=lambda: _csv_table(report),
        json=lambda: to_json(report),
        markdown=lambda: _render_text(report, markdown=True),
    )


def _csv_table(report: Report) -> pd.DataFrame:
    frames = [o.table for o in report.optimizers]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def to_json(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (NaN becomes null)."""
    out: dict[str, Any] = {
        "path": report.path,
        "format": report.format,
        "view": report.view,
        "metadata": jsonable(report.metadata),
        "weights": {"location": report.weights_location, "tensors": report.weights_count},
        "schedulers": report.schedulers,
        "warnings": report.warnings,
        "notes": report.notes,
        "statistics": list(report.statistics),
        "optimizers": [],
    }
    for o in report.optimizers:
        d = o.description
        entry = {
            "location": d["location"],
            "kind": d["kind"],
            "kind_label": d["kind_label"],
            "kind_source": d["kind_source"],
            "groups": [
                {"index": g["index"], "params": g["params"], "numel": g["numel"], **g["hyperparameters"], **g["other"]}
                for g in d["groups"]
            ],
            **{
                k: d[k]
                for k in (
                    "steps",
                    "params_with_state",
                    "params_without_state",
                    "params_first_step",
                    "name_sources",
                    "state_bytes",
                    "state_dtypes",
                    "lr_note",
                    "notes",
                    "warnings",
                )
            },
            "param_count": d["params"],
        }
        records = o.table.to_dict(orient="records")
        records.reverse()
        rows = []
        while records:  # each record dropped once converted: one table's records in memory, not two
            rows.append(jsonable(records.pop()))
        entry["params" if report.view == "param" else "rows"] = rows
        out["optimizers"].append(entry)
    return out


def _header_lines(report: Report) -> list[str]:
    lines = [f"checkpoint: {report.path} ({report.format})"]
    meta = {k: report.metadata[k] for k in _TRAINING_KEYS if k in report.metadata}
    training = [f"{k}={format_value(v)}" for k, v in meta.items()]
    if "logged_lr" in report.metadata:
        at = report.metadata.get("logged_lr_step")
        training.append(
            f"last logged lr={format_value(report.metadata['logged_lr'])}"
            + (f" (step {format_value(at)})" if at is not None else "")
        )
    if training:
        lines.append("training: " + ", ".join(training))
    if report.weights_location:
        lines.append(f"model weights: {report.weights_location} ({report.weights_count} floating-point tensors)")
    for s in report.schedulers:
        lr = s.get("_last_lr")  # the lr the schedule set for the next step
        lines.append(
            f"scheduler: {s.get('location')} (last_epoch={format_value(s.get('last_epoch'))}"
            + (f", last lr={format_value(lr)}" if lr is not None else "")
            + ")"
        )
    for w in report.warnings:
        lines.append(f"warning: {w}")
    for note in report.notes:
        lines.append(f"note: {note}")
    return lines


def _optimizer_lines(o: OptimizerReport) -> list[str]:
    d = o.description
    lines = [f"optimizer at '{d['location']}': {d['kind_label']} ({d['kind_source']})"]
    for g in d["groups"]:
        hp = " ".join(f"{k}={format_value(v)}" for k, v in g["hyperparameters"].items())
        if g.get("frozen"):
            hp = "frozen (not in the optimizer)"
        lines.append(f"  group {g['index']}: {g['params']} params, {g['numel']:,} coords; {hp}")
    steps = d["steps"]
    if steps["min"] is None:
        lines.append("  steps: none recorded in the state")
    elif steps["differ"]:
        lines.append(
            f"  steps: {format_value(steps['min'])} to {format_value(steps['max'])} "
            f"({steps['distinct']} different counts across parameters)"
        )
    else:
        lines.append(f"  steps: {format_value(steps['min'])} (same for every parameter)")
    missing = d["params_without_state"]
    dtypes = ", ".join(f"{k} {format_bytes(v)}" for k, v in d["state_dtypes"].items())
    lines.append(
        f"  state: {d['params_with_state']} of {d['params']} parameters; {format_bytes(d['state_bytes'])}"
        + (f" ({dtypes})" if dtypes else "")
    )
    first = set(d["params_first_step"])
    if first:
        lines.append(f"  {FIRST_STEP}: {_names([n for n in missing if n in first])}")
    if len(missing) > len(first):
        lines.append(f"  without state (frozen or never stepped): {_names([n for n in missing if n not in first])}")
    lines.append(
        "  names: "
        + ", ".join(f"{k} {v}" for k, v in d["name_sources"].items())
        + "".join(f"; {note}" for note in d.get("name_notes", ()))
    )
    lines.append(f"  note: {d['lr_note']}")
    for note in d["notes"]:
        lines.append(f"  note: {note}")
    for w in d["warnings"]:
        lines.append(f"  warning: {w}")
    return lines


def _names(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def _cells(o: OptimizerReport) -> list[list[str]]:
    """The table's text cells; a parameter waiting for its first step says so instead of a row of gaps."""
    rows = cells(o.table, o.columns)
    first = set(o.description["params_first_step"])
    stats = [i for i, c in enumerate(o.columns) if c not in _KEY_COLUMNS["param"]]
    if not first or not stats or "name" not in o.table.columns:
        return rows
    for row, name in zip(rows, o.table["name"]):
        if name in first:
            row[stats[0]] = FIRST_STEP
            for i in stats[1:]:
                row[i] = ""
    return rows


def _render_text(report: Report, *, markdown: bool) -> str:
    out: list[str] = []
    header = _header_lines(report)
    out.extend(f"- {line}" for line in header) if markdown else out.extend(header)
    for o in report.optimizers:
        out.append("")
        lines = _optimizer_lines(o)
        if markdown:
            out.append(f"## {lines[0]}")
            out.append("")
            out.extend(f"- {line.strip()}" for line in lines[1:])
        else:
            out.extend(lines)
        out.append("")
        out.append(_markdown_table(o) if markdown else _text_table(o))
    return "\n".join(out) + "\n"


def _text_table(o: OptimizerReport) -> str:
    return text_table(
        list(o.columns),
        _cells(o),
        left={"name", "name_source", "layer", "param_kind", "shape", "dtype"},
    )


def _markdown_table(o: OptimizerReport) -> str:
    return markdown_table(list(o.columns), _cells(o))
