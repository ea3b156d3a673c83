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
from ostate.reset.strategies import age_offsets

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

    A parameter whose second moment has a recorded age (keep-v, the age-correct strategies)
    is analysed with its step set to v's age, the counter its denominator's correction uses.
    Empty when the optimizer has no state yet or ostate has no math for its kind.
    """
    state_dict = optimizer.state_dict()
    if not state_dict["state"] or kind not in families():
        return {}
    state = dict(state_dict["state"])
    for group in state_dict["param_groups"]:
        for index, (_, v_offset) in zip(group["params"], age_offsets(group)):
            if v_offset and index in state and "step" in state[index]:
                state[index] = {**state[index], "step": state[index]["step"] + v_offset}
    checkpoint = ostate.from_state_dict({**state_dict, "state": state}, model=model, optimizer=kind)
    table = ostate.analyze(checkpoint, by="group")
    if "eff_lr_p50" not in table:
        return {}
    return {int(g): float(v) for g, v in zip(table["group"], table["eff_lr_p50"]) if not math.isnan(v)}


def evaluation_records(step: int, result: Any, prefix: str = "eval", part: str = "evaluate") -> list[Record]:
    """``<prefix>_loss`` (and ``<prefix>_<name>``) records from what a task's ``part`` returned
    (``eval``: evaluate, ``source``: source_evaluate, ``val``: validate)."""
    values = {"loss": result} if isinstance(result, (int, float)) else dict(result)
    if "loss" not in values:
        raise OstateError(f"the task's {part}() returned no 'loss'", hint=f"it returned: {sorted(values)}")
    return [(step, f"{prefix}_{name}", ALL, float(value)) for name, value in values.items()]


def gradient_to_second_moment(
    optimizer: torch.optim.Optimizer, names: dict[int, str], key: str | None
) -> dict[str, float]:
    r"""Per parameter (by name): :math:`\mathrm{mean}(g^2)/\mathrm{mean}(\hat v)`, the new gradient's
    square over the loaded second moment ``key`` as its bias correction sees it (``v / (1 - beta2^a)``,
    ``a`` its age), read before the first fine-tuning step. Adam-Rel's analysis (Ellis et al.
    2024): far above 1, the first update is as large as a fresh optimizer's; near or below 1, the
    kept v damps it. ``inf`` where v is zero (fresh, reset-v); empty for a kind without ``key``.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(2); opt.step(); p.grad = torch.full((2,), 2.0)
        >>> {k: round(v, 4) for k, v in gradient_to_second_moment(opt, {id(p): "w"}, "exp_avg_sq").items()}
        {'w': 4.0}
    """
    out: dict[str, float] = {}
    if key is None:
        return out
    for group in optimizer.param_groups:
        betas = group.get("betas")
        for p, (_, v_offset) in zip(group["params"], age_offsets(group)):
            state = optimizer.state.get(p, {})
            if p.grad is None or id(p) not in names:
                continue
            g2 = float(p.grad.detach().double().square().mean())
            v = state.get(key)
            if not isinstance(v, torch.Tensor):
                out[names[id(p)]] = math.inf
                continue
            v_mean = float(v.detach().double().mean())
            step = float(state["step"]) + v_offset if "step" in state else 0.0
            if betas is not None and step > 0:
                v_mean /= 1 - betas[1] ** step
            out[names[id(p)]] = g2 / v_mean if v_mean > 0 else math.inf
    return out
