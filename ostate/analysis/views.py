"""Rows of a view: one per parameter, param group, layer, parameter kind or the whole model.

A row of a coarser view merges its parameters' sketches and adds their sums, so its
quantiles, RMS values and ratios are those of all its coordinates together. The
merged sketches stay available (:class:`ViewRow`), so histograms and plots never need
the raw data.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ostate.analysis.columns import derived_columns, merge_sums, sketch_columns
from ostate.analysis.joint import JointHistogram
from ostate.analysis.params import PARAM_KINDS, ParamSummary
from ostate.analysis.sketch import Sketch
from ostate.state import OptimizerState

VIEWS = ("param", "group", "layer", "kind", "model")
# The column that holds a row's key in each aggregated view.
KEY_COLUMN = {"group": "group", "layer": "layer", "kind": "param_kind", "model": None}


@dataclass
class ViewRow:
    """One row of a view: its key, its table row, and the merged sketches and sums behind it.

    ``sketches`` maps each quantity (``eff_lr``, ``exp_avg_sq``, ``update``, ``weight``,
    ...) to the sketch of every coordinate in the row; ``members`` are the names of
    the parameters merged into it; ``joints`` holds the merged joint histograms
    (``moments``) when the analysis was asked for them (``summarize(..., joint=True)``).
    """

    key: Any
    row: dict[str, Any]
    sketches: dict[str, Sketch] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    joints: dict[str, JointHistogram] = field(default_factory=dict)


def view_rows(
    optimizer: OptimizerState, summaries: list[ParamSummary], by: str, second_moment: str | None
) -> list[ViewRow]:
    """The rows of view ``by`` for one optimizer's parameter summaries, in table order."""
    if by == "param":
        return [ViewRow(s.row["name"], s.row, s.sketches, s.sums, [s.row["name"]], s.joints) for s in summaries]
    groups: dict[Any, list[ParamSummary]] = defaultdict(list)
    column = KEY_COLUMN[by]
    for s in summaries:
        groups[s.row[column] if column else "model"].append(s)
    keys = list(groups)
    if by == "layer" and optimizer.model_order:
        position = {name: i for i, name in enumerate(optimizer.model_order)}
        first = {k: min(position.get(m.row["name"], len(position)) for m in groups[k]) for k in keys}
        keys.sort(key=lambda k: first[k])
    elif by == "kind":
        keys.sort(key=lambda k: PARAM_KINDS.index(k) if k in PARAM_KINDS else len(PARAM_KINDS))
    return [_merged_row(optimizer, by, key, groups[key], second_moment) for key in keys]


def _merged_row(
    optimizer: OptimizerState, by: str, key: Any, members: list[ParamSummary], second_moment: str | None
) -> ViewRow:
    steps = [m.row["step"] for m in members if m.row["step"] is not None]
    row: dict[str, Any] = {"optimizer": optimizer.location}
    column = KEY_COLUMN[by]
    if column:
        row[column] = key
    if by == "group":
        row["lr"] = optimizer.groups[key].get("lr")
    row.update(
        {
            "params": len(members),
            "params_with_state": sum(1 for m in members if m.row["has_state"]),
            "numel": sum(m.row["numel"] or 0 for m in members),
            "step_min": min(steps) if steps else None,
            "step_max": max(steps) if steps else None,
            "step_spread": max(steps) - min(steps) if steps else None,
            "state_bytes": sum(m.row["state_bytes"] for m in members),
        }
    )
    quantities: dict[str, list[Sketch]] = defaultdict(list)
    for m in members:
        for quantity, sketch in m.sketches.items():
            quantities[quantity].append(sketch)
    sketches = {quantity: Sketch.merged(parts) for quantity, parts in quantities.items()}
    for quantity, sketch in sketches.items():
        row.update(sketch_columns(quantity, sketch))
    sums = merge_sums([m.sums for m in members])
    row.update(derived_columns(sketches, sums, second_moment))
    joints = {
        name: JointHistogram.merged(m.joints[name] for m in members if name in m.joints)
        for name in dict.fromkeys(name for m in members for name in m.joints)
    }
    return ViewRow(key, row, sketches, sums, [m.row["name"] for m in members], joints)
