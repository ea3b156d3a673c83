"""Statistics of optimizer state per parameter, param group, layer or whole model.

Every number comes from mergeable sketches (:mod:`ostate.analysis.sketch`): each
parameter's sketches are computed once and merged upward for the coarser views.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from ostate.analysis.params import STATS, ParamSummary, sketch_columns, summarize_param
from ostate.analysis.sketch import Sketch
from ostate.analysis.summary import describe
from ostate.errors import OstateError
from ostate.optimizers import get_family
from ostate.state import Checkpoint, OptimizerState

VIEWS = ("param", "group", "layer", "model")

__all__ = ["analyze", "describe", "summaries", "Sketch", "STATS", "VIEWS"]


def analyze(target: Checkpoint | OptimizerState, by: str = "param", *, progress: bool = False) -> pd.DataFrame:
    """A table of optimizer-state statistics, one row per parameter, group, layer or model.

    Args:
        target: a loaded checkpoint (all its optimizers) or one optimizer.
        by: ``param``, ``group``, ``layer`` (module prefix of the name) or ``model``.
        progress: show a progress bar on stderr for long work.

    Columns are described in docs/columns.md; quantity columns are named
    ``{quantity}_{stat}`` with stat in mean, rms, min, max, p1, p5, p25, p50, p75, p95, p99.

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> df = ostate.analyze(ostate.from_state_dict(opt.state_dict(), model=m))
        >>> list(df["name"]), bool((df["eff_lr_p50"] > 0).all())
        (['weight', 'bias'], True)
    """
    if by not in VIEWS:
        raise OstateError(f"unknown view '{by}'", hint=f"choose one of: {', '.join(VIEWS)}")
    optimizers = target.optimizers if isinstance(target, Checkpoint) else [target]
    frames = [_table(o, summaries(o, progress=progress), by) for o in optimizers]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summaries(optimizer: OptimizerState, *, progress: bool = False) -> Iterable[ParamSummary]:
    """Each parameter's summary, streamed (one parameter's tensors in memory at a time)."""
    family = get_family(optimizer.kind)
    total = sum(p.numel or 0 for p in optimizer.params if p.has_state)
    bar = tqdm(total=total, unit="coord", unit_scale=True, desc=optimizer.location, disable=not progress,
               delay=1.0, leave=False)
    with bar:
        for param in optimizer.params:
            yield summarize_param(optimizer, param, family)
            if param.has_state:
                bar.update(param.numel or 0)


def _table(optimizer: OptimizerState, items: Iterable[ParamSummary], by: str) -> pd.DataFrame:
    if by == "param":
        return pd.DataFrame([s.row for s in items])
    groups: dict[Any, list[ParamSummary]] = defaultdict(list)
    for s in items:
        key = {"group": s.row["group"], "layer": s.row["layer"], "model": "model"}[by]
        groups[key].append(s)
    keys = list(groups)
    if by == "layer" and optimizer.model_order:
        position = {name: i for i, name in enumerate(optimizer.model_order)}
        first = {k: min(position.get(m.row["name"], len(position)) for m in groups[k]) for k in keys}
        keys.sort(key=lambda k: first[k])
    return pd.DataFrame([_aggregate_row(optimizer, by, key, groups[key]) for key in keys])


def _aggregate_row(optimizer: OptimizerState, by: str, key: Any, members: list[ParamSummary]) -> dict[str, Any]:
    steps = [m.row["step"] for m in members if m.row["step"] is not None]
    row: dict[str, Any] = {"optimizer": optimizer.location, by: key}
    if by == "group":
        row["lr"] = optimizer.groups[key].get("lr")
    row.update(
        {
            "params": len(members),
            "params_with_state": sum(1 for m in members if m.row["has_state"]),
            "numel": sum(m.row["numel"] or 0 for m in members),
            "step_min": min(steps) if steps else None,
            "step_max": max(steps) if steps else None,
            "state_bytes": sum(m.row["state_bytes"] for m in members),
        }
    )
    quantities: dict[str, list[Sketch]] = defaultdict(list)
    for m in members:
        for quantity, sketch in m.sketches.items():
            quantities[quantity].append(sketch)
    for quantity, sketches in quantities.items():
        row.update(sketch_columns(quantity, Sketch.merged(sketches)))
    return row

