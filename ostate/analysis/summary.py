"""The header of a report: what an optimizer is, its groups, steps, coverage and sizes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ostate.analysis.engine import check_loaded
from ostate.optimizers import get_family
from ostate.state import OptimizerState

LR_NOTE = (
    "effective learning rates use each group's saved lr; a scheduler that stepped before the save "
    "has usually already set it to the next step's lr"
)


def describe(optimizer: OptimizerState) -> dict[str, Any]:
    """A JSON-ready description of one optimizer (no tensor data is read except step counts).

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> d = describe(ostate.from_state_dict(opt.state_dict()).optimizers[0])
        >>> d["kind"], d["params_with_state"], d["steps"]["min"]
        ('adamw', 2, 1.0)
    """
    check_loaded(optimizer, "ostate.describe", (OptimizerState,))
    family = get_family(optimizer.kind)
    params = optimizer.params
    with_state = [p for p in params if p.has_state]
    steps = [p.step for p in with_state if p.step is not None]
    dtype_bytes: Counter[str] = Counter()
    for p in params:
        for t in p.tensors().values():
            dtype_bytes[str(t.dtype).removeprefix("torch.")] += t.nbytes
    groups = []
    for g, group in enumerate(optimizer.groups):
        members = [p for p in params if p.group == g]
        shown = {k: _plain(group[k]) for k in family.hyperparameters if k in group}
        others = {k: _plain(v) for k, v in group.items() if k not in shown and _is_plain(v)}
        groups.append(
            {
                "index": g,
                "params": len(members),
                "numel": sum(p.numel or 0 for p in members),
                "hyperparameters": shown,
                "other": others,
                # Only frozen parameters (ParamState.frozen): not a group of the optimizer itself.
                "frozen": optimizer.is_frozen_group(g),
            }
        )
    return {
        "location": optimizer.location,
        "kind": optimizer.kind,
        "kind_label": family.label,
        "kind_source": optimizer.kind_source,
        "groups": groups,
        "steps": {
            "min": min(steps) if steps else None,
            "max": max(steps) if steps else None,
            "distinct": len(set(steps)),
            "differ": len(set(steps)) > 1,
        },
        "params": len(params),
        "params_with_state": len(with_state),
        "params_without_state": [p.name for p in params if not p.has_state],
        "params_first_step": first_step_params(optimizer),
        "name_sources": dict(Counter(p.name_source for p in params)),
        "name_notes": list(optimizer.name_notes),
        "state_bytes": sum(dtype_bytes.values()),
        "state_dtypes": dict(dtype_bytes),
        "lr_note": LR_NOTE,
        "notes": list(family.notes),
        "warnings": list(optimizer.warnings),
    }


def first_step_params(optimizer: OptimizerState) -> list[str]:
    """The names of the parameters that have no state yet and whose first step the family predicts
    (``Family.first_step`` with an initial state; Adam-mini's cannot be predicted): not frozen, and of a
    family that keeps state (SGD without momentum keeps none, so its parameters are not waiting for any).

    Example:
        >>> import ostate, torch
        >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
        >>> first_step_params(ostate.from_state_dict(opt.state_dict()).optimizers[0])
        ['param.0']
    """
    family = get_family(optimizer.kind)
    if family.first_step is None or family.first_step.initial_state is None:
        return []
    initial_state = family.first_step.initial_state
    keeps_state = any(p.has_state for p in optimizer.params) or any(
        initial_state(torch.zeros(1), group)
        for i, group in enumerate(optimizer.groups)
        if not optimizer.is_frozen_group(i)
    )
    return [p.name for p in optimizer.params if keeps_state and not p.has_state and not p.frozen]


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return value.item()
    return value if _is_plain(value) else repr(value)
