"""Small multiples: one panel per row of a view (group, layer, parameter kind, or the whole model).

A panel holds, for each series (checkpoint), that series' row of the view with the
panel's key, so several checkpoints are drawn on the same axes. Rows are matched by key
(group index, layer name, kind), in the first series' order, then any keys only later
series have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ostate.analysis import ViewRow
from ostate.plots.series import Series

# More panels than this are not readable: the figure shows the first ones and says so.
MAX_PANELS = 24


@dataclass
class Panel:
    """One panel's title, and each series' row for it (``None`` where a series has no such row)."""

    by: str
    key: Any
    rows: list[ViewRow | None] = field(default_factory=list)

    @property
    def title(self) -> str:
        """``whole model``, ``group 0``, ``layer blocks.0.1`` or ``weight parameters``.

        Example:
            >>> Panel("group", 1).title, Panel("kind", "norm").title, Panel("model", "model").title
            ('group 1', 'norm parameters', 'whole model')
        """
        if self.by == "model":
            return "whole model"
        if self.by == "kind":
            return f"{self.key} parameters"
        return f"{self.by} {self.key}"


def panels(series: list[Series], by: str, *, whole_model: bool = True) -> tuple[list[Panel], int]:
    """The panels of view ``by`` (after a whole-model panel when ``whole_model`` and ``by`` is
    not ``model``), at most :data:`MAX_PANELS`, and how many there were in all."""
    keys: dict[Any, None] = {}
    by_series = []
    for s in series:
        rows = {row.key: row for row in s.rows(by)}
        by_series.append(rows)
        keys.update(dict.fromkeys(rows))
    out = []
    if whole_model and by != "model":
        out.append(Panel("model", "model", [next(iter(s.rows("model")), None) for s in series]))
    out += [Panel(by, key, [rows.get(key) for rows in by_series]) for key in keys]
    return out[:MAX_PANELS], len(out)


def groups_of(s: Series, row: ViewRow) -> list[int]:
    """The param groups whose parameters make up ``row``, in order."""
    group_of = {summary.row["name"]: summary.row["group"] for summary in s.analysis.summaries}
    return sorted({group_of[name] for name in row.members if name in group_of})


def group_lrs(s: Series, row: ViewRow) -> list[tuple[str, float]]:
    """Each distinct saved ``lr`` among the groups in ``row``, with the groups that have it in words
    (``"group 0"``, ``"groups 0, 1"``); groups whose lr is not a positive number (Adafactor's
    relative step: ``None``) are skipped."""
    by_lr: dict[float, list[int]] = {}
    for g in groups_of(s, row):
        lr: Any = s.analysis.optimizer.groups[g].get("lr")
        lr = lr.item() if hasattr(lr, "item") else lr  # torch allows a tensor lr
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
            by_lr.setdefault(float(lr), []).append(g)
    return [
        (("groups " if len(groups) > 1 else "group ") + ", ".join(map(str, groups)), lr) for lr, groups in by_lr.items()
    ]
