r"""Schedule-free SGD and RAdam, as ``schedulefree.SGDScheduleFree`` and ``schedulefree.RAdamScheduleFree`` compute them.

Both keep schedule-free AdamW's averaging (:mod:`ostate.optimizers.schedulefree`): the
state holds the base sequence :math:`z` (``z``), the param groups the counter :math:`k`,
``weight_sum`` :math:`S`, ``lr_max`` and ``train_mode``; the weights are :math:`x` in eval
mode and :math:`y = (1-\beta)z + \beta x` in train mode (:math:`\beta` = ``momentum`` for
SGD, :math:`\beta_1` for RAdam). Step :math:`k+1`, given gradient :math:`g` at :math:`y`:

.. math::
    \gamma_{max} &= \max(\gamma_{max}, \gamma_{k+1}), \quad
        w = (k+1)^r \gamma_{max}^p, \quad S \leftarrow S + w, \quad c = w/S \;(0 \text{ if } S = 0) \\
    y &\leftarrow (1-c)\,y + c\,z + \gamma_{k+1}(\beta(1-c) - 1)\,\hat g, \qquad
        z \leftarrow z - \gamma_{k+1}\hat g

**SGD** (state: ``z`` only): :math:`\gamma_{k+1} = \gamma\min(1, \tfrac{k+1}{W})` (``warmup_steps``)
and :math:`\hat g = g + \lambda y`. Its **effective learning rate** is :math:`\gamma_{k+1}`,
the same for every coordinate.

**RAdam** (state: ``z`` and ``exp_avg_sq`` :math:`v`; no warmup: the rectification is one),
with :math:`t = k+1`, :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
:math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`:

.. math::
    r_t &= \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}
        \text{ if } \rho_t > 4, \text{ else } 0 \text{ (}\texttt{silent\_sgd\_phase}\text{) or } 1, \qquad
        \gamma_t = \gamma\, r_t \\
    v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \qquad
        \hat g = \frac{g}{\sqrt{v/(1-\beta_2^t)} + \epsilon} + \lambda y \text{ if } \rho_t > 4,
        \text{ else } g + \lambda y

In the silent phase (the first 4 steps at :math:`\beta_2 = 0.999`) nothing moves but
:math:`v` and :math:`k`. The **effective learning rate** is
:math:`\gamma_t / (\sqrt{v_i/(1-\beta_2^{k})} + \epsilon)` with the saved :math:`v` once
:math:`\rho_t > 4`, :math:`\gamma_t` (0 when silent) before.

**Strategies** as for schedule-free AdamW: ``reload`` keeps the groups' :math:`k`, :math:`S`,
``lr_max``, ``scheduled_lr``; ``fresh`` writes a new optimizer's and no state (``z`` is the
weights at the first step); ``train_mode`` goes with the weights. RAdam's ``reset-v`` zeroes
:math:`v` and keeps :math:`k` (so the rectification stays on and the new :math:`v` is
corrected as a mature one). Neither has a first moment or a per-parameter step, and SGD has no
second moment either: every partial strategy is refused for it (:data:`SGD_PARTIAL_REFUSAL`), and
for RAdam all but ``reset-v`` (:data:`RADAM_RESET_STEP_REFUSAL`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from ostate.optimizers.family import Family, FirstStep, Group, StateLayout, group_has, zeros_for
from ostate.optimizers.schedulefree import (
    SCHEDULEFREE_GROUP_STATE,
    SCHEDULEFREE_LAYOUT,
    averaging_weight,
    columns,
    next_averaging_weight,
    preconditioned,
    scheduled_lr,
    schedulefree_effective_lr,
    schedulefree_fresh_group,
)
from ostate.state import ParamState

_COUNTERS = ("k", "weight_sum", "lr_max", "train_mode")


def _train_mode_y(weight: torch.Tensor, z: torch.Tensor, group: Group, beta: float) -> torch.Tensor:
    """The weights the step starts from: ``y`` (in eval mode, ``optimizer.train()`` moves ``x`` to ``y``)."""
    y = weight.detach().clone()
    if not group.get("train_mode", False):
        y.lerp_(end=z, weight=1 - beta)
    return y


def _full(param: ParamState, value: float) -> torch.Tensor:
    return torch.full(param.shape if param.shape is not None else (), float(value), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- SGD
def sgd_effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return _full(param, scheduled_lr(group))


def sgd_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of the parameter tensor as saved (``x`` in eval mode, ``y`` in train mode) after the next step."""
    momentum, decay = group["momentum"], group.get("weight_decay", 0.0)
    z = param.read("z").to(weight.dtype)
    y = _train_mode_y(weight, z, group, momentum)
    lr, ckp1 = scheduled_lr(group), next_averaging_weight(group)
    g = grad.clone()
    if decay != 0:
        g.add_(y, alpha=decay)
    y.lerp_(end=z, weight=ckp1)
    y.add_(g, alpha=lr * (momentum * (1 - ckp1) - 1))
    return y - weight


def sgd_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {"eff_lr": scheduled_lr(group)}


def sgd_match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and state_keys != {"z"}:
        return 0
    if not group_has(group, *_COUNTERS, "warmup_steps", "momentum") or "betas" in group:
        return 0
    return 5


def sgd_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """SGDScheduleFree's state before the first step: ``z`` a copy of the weights."""
    return {"z": weight.detach().clone()}


SGD_PARTIAL_REFUSAL = (
    "schedule-free SGD keeps only z: no first moment (its momentum is the interpolation y = (1-momentum) z + "
    "momentum x between z and the averaged weights x, which the weights themselves hold), no second moment, and "
    "no per-parameter step (each param group's counter k sets the warmup and the averaging weights, with their sum "
    "weight_sum); use 'fresh' or 'reload'"
)

SCHEDULEFREE_SGD = Family(
    name="schedulefree_sgd",
    label="SGD schedule-free",
    match=sgd_match,
    quantities=sgd_quantities,
    effective_lr=sgd_effective_lr,
    next_update=sgd_next_update,
    columns=columns,  # schedule-free AdamW's: k, train_mode, scheduled_lr, averaging_weight
    display=("k", "train_mode", "scheduled_lr", "averaging_weight", "eff_lr_p50"),
    hyperparameters=("lr", "momentum", "weight_decay", "warmup_steps", "r", "weight_lr_power", "k", "train_mode"),
    notes=(
        "Schedule-free SGD: the step counter k lives in the param groups; eff_lr is the next step's "
        "warmup-scheduled lr. The saved weights are x in eval mode and y in train mode.",
    ),
    layout=StateLayout(
        group_state=SCHEDULEFREE_GROUP_STATE,
        group_state_per_group=True,
        group_mode=("train_mode",),
        fresh_group=schedulefree_fresh_group,
        partial_refusal=SGD_PARTIAL_REFUSAL,
    ),
    first_step=FirstStep(sgd_initial_state),
)


# ----------------------------------------------------------------------------------------- RAdam
def rectification(group: Group, step: int) -> tuple[float, bool]:
    r"""RAdamScheduleFree's :math:`r_t` at step ``step`` and whether :math:`\rho_t > 4` (the gradient is
    then divided by the root of :math:`\hat v`), in the library's own operations.

    Example:
        >>> rectification({"betas": (0.9, 0.999), "silent_sgd_phase": True}, 1)
        (0.0, False)
        >>> rectification({"betas": (0.9, 0.999), "silent_sgd_phase": False}, 1)
        (1.0, False)
        >>> round(rectification({"betas": (0.9, 0.999), "silent_sgd_phase": True}, 20)[0], 4)
        0.0848
    """
    beta2 = group["betas"][1]
    beta2_t = beta2**step
    bias_correction2 = 1 - beta2_t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2_t / bias_correction2
    if rho_t > 4.0:
        return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5, True
    return float(not group.get("silent_sgd_phase", True)), False


def rectified_lr(group: Group) -> float:
    r""":math:`\gamma_{k+1} = \gamma\, r_{k+1}`: the lr of the next step."""
    return group["lr"] * rectification(group, group["k"] + 1)[0]


def radam_effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    lr = rectified_lr(group)
    if not rectification(group, group["k"] + 1)[1]:
        return _full(param, lr)
    return schedulefree_effective_lr(param.read("exp_avg_sq"), group, lr)


def radam_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of the parameter tensor as saved (``x`` in eval mode, ``y`` in train mode) after the next step."""
    beta1, beta2 = group["betas"]
    eps, decay = group["eps"], group.get("weight_decay", 0.0)
    z = param.read("z").to(weight.dtype)
    y = _train_mode_y(weight, z, group, beta1)
    step = group["k"] + 1
    rect, rectified = rectification(group, step)
    lr = group["lr"] * rect
    ckp1 = averaging_weight(group, lr)
    exp_avg_sq = param.read("exp_avg_sq").to(weight.dtype).mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    if rectified:
        g = grad.div(exp_avg_sq.div(1 - beta2**step).sqrt_().add_(eps))
    else:
        g = grad.clone()
    if decay != 0:
        g.add_(y, alpha=decay)
    y.lerp_(end=z, weight=ckp1)
    y.add_(g, alpha=lr * (beta1 * (1 - ckp1) - 1))
    return y - weight


def radam_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    lr = rectified_lr(group)
    if not rectification(group, group["k"] + 1)[1]:
        return {"eff_lr": lr, "exp_avg_sq": chunk["exp_avg_sq"]}
    return {"eff_lr": schedulefree_effective_lr(chunk["exp_avg_sq"], group, lr), "exp_avg_sq": chunk["exp_avg_sq"]}


def radam_columns(param: ParamState, group: Group) -> dict:
    rect, rectified = rectification(group, group["k"] + 1)
    lr = group["lr"] * rect
    return {
        "k": group["k"],
        "train_mode": bool(group.get("train_mode", False)),
        "rectified": rectified,
        "scheduled_lr": lr,
        "averaging_weight": averaging_weight(group, lr),
    }


def radam_match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("z" in state_keys and state_keys <= {"z", "exp_avg_sq"}):
        return 0
    if not group_has(group, *_COUNTERS, "silent_sgd_phase", "betas", "eps"):
        return 0
    return 5


def radam_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """RAdamScheduleFree's state before the first step: ``z`` a copy of the weights, a zero ``exp_avg_sq``."""
    return {"z": weight.detach().clone(), **zeros_for(weight, "exp_avg_sq")}


RADAM_RESET_STEP_REFUSAL = (
    "schedule-free RAdam keeps no per-parameter step: each param group's counter k sets the rectification "
    "(and the silent first steps), the bias correction and the averaging weights, with their sum weight_sum, "
    "which only 'fresh' restarts consistently; use reset-v or 'fresh'"
)

SCHEDULEFREE_RADAM = Family(
    name="schedulefree_radam",
    label="RAdam schedule-free",
    match=radam_match,
    quantities=radam_quantities,
    effective_lr=radam_effective_lr,
    next_update=radam_next_update,
    columns=radam_columns,
    display=(
        "k",
        "train_mode",
        "rectified",
        "scheduled_lr",
        "averaging_weight",
        "exp_avg_sq_mean",
        "eff_lr_min",
        "eff_lr_p50",
        "eff_lr_max",
    ),
    hyperparameters=(
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "silent_sgd_phase",
        "r",
        "weight_lr_power",
        "k",
        "train_mode",
    ),
    second_moment="exp_avg_sq",
    preconditioned=preconditioned,
    notes=(
        "Schedule-free RAdam: the step counter k lives in the param groups; eff_lr uses the next step's "
        "rectified lr (0 in the silent first steps). The saved weights are x in eval mode and y in train mode.",
    ),
    layout=dataclasses.replace(SCHEDULEFREE_LAYOUT, reset_step_refusal=RADAM_RESET_STEP_REFUSAL),
    # Its first step is never rectified (rho_1 = 1): -lr * g (or nothing in the silent phase), not adaptive.
    first_step=FirstStep(radam_initial_state),
)
