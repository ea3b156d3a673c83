"""What a trial records: per-step losses and RMS sizes, and at eval steps the effective LR per group.

Every record is ``(step, metric, group, value)``; ``group`` is the param group's
index, or :data:`ALL` (-1) for a value over the whole model (losses, and RMS over
every parameter). Metric names:

- ``train_loss`` (every step), ``eval_loss`` and ``eval_<name>`` (eval steps, step 0 included);
- ``lr``: each group's learning rate at the step;
- ``grad_rms`` and ``update_rms``: :math:`\\sqrt{\\mathrm{mean}(x^2)}` of the gradient and
  of the change of the weights at the step, per group and over all;
- ``eff_lr_p50``: the median per-coordinate effective learning rate of each group, from
  ostate's own analysis of the optimizer's state (eval steps after the first step).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

import ostate
from ostate.errors import OstateError
from ostate.optimizers import families
from ostate.reset.strategies import V_AGE_KEY

ALL = -1
Record = tuple[int, str, int, float]


def rms_by_group(tensors_by_group: Iterable[Iterable[torch.Tensor]]) -> dict[int, float]:
    """RMS of each group's tensors together, and of all of them under :data:`ALL`.

    Example:
        >>> rms_by_group([[torch.ones(3)], [torch.full((1,), 3.0)]])
        {0: 1.0, 1: 3.0, -1: 1.7320508075688772}
    """
    out: dict[int, float] = {}
    total_sq, total_n = 0.0, 0
    for g, tensors in enumerate(tensors_by_group):
        sq, n = 0.0, 0
        for t in tensors:
            sq += float(t.double().square().sum())
            n += t.numel()
        if n:
            out[g] = math.sqrt(sq / n)
        total_sq, total_n = total_sq + sq, total_n + n
    if total_n:
        out[ALL] = math.sqrt(total_sq / total_n)
    return out


def median_effective_lr(optimizer: torch.optim.Optimizer, model: torch.nn.Module, kind: str) -> dict[int, float]:
    """Each group's median effective LR (``eff_lr_p50`` of ``ostate.analyze(..., by="group")``).

    A group whose kept second moment has a recorded age (keep-v) is analysed with its
    step set to that age plus the steps since, the counter its bias correction uses.
    Empty when the optimizer has no state yet or ostate has no math for its kind.
    """
    state_dict = optimizer.state_dict()
    if not state_dict["state"] or kind not in families():
        return {}
    state = dict(state_dict["state"])
    for group in state_dict["param_groups"]:
        age = group.get(V_AGE_KEY)
        for index in group["params"] if age else ():
            if index in state and "step" in state[index]:
                state[index] = {**state[index], "step": state[index]["step"] + age}
    checkpoint = ostate.from_state_dict({**state_dict, "state": state}, model=model, optimizer=kind)
    table = ostate.analyze(checkpoint, by="group")
    if "eff_lr_p50" not in table:
        return {}
    return {int(g): float(v) for g, v in zip(table["group"], table["eff_lr_p50"]) if not math.isnan(v)}


def evaluation_records(step: int, result: Any) -> list[Record]:
    """``eval_loss`` (and ``eval_<name>``) records from what a task's evaluate returned."""
    values = {"loss": result} if isinstance(result, (int, float)) else dict(result)
    if "loss" not in values:
        raise OstateError("the task's evaluate() returned no 'loss'", hint=f"it returned: {sorted(values)}")
    return [(step, f"eval_{name}", ALL, float(value)) for name, value in values.items()]
