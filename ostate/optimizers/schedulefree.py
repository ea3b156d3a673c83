r"""Schedule-free AdamW, as ``schedulefree.AdamWScheduleFree`` (facebookresearch/schedule_free) computes it.

The state holds the base sequence :math:`z` (``z``) and :math:`v` (``exp_avg_sq``);
the step counter :math:`k`, ``weight_sum``, ``lr_max`` and ``train_mode`` live in the
*param groups*. The model's weights are :math:`y` in train mode and :math:`x` in eval
mode (``optimizer.eval()``, recommended before saving), with
:math:`y = (1-\beta_1)z + \beta_1 x`. Step :math:`k+1`, given gradient :math:`g` at
:math:`y`, with :math:`\gamma` = ``lr``, :math:`W` = ``warmup_steps``, :math:`r` and
:math:`p` = ``weight_lr_power``:

.. math::
    \gamma_{k+1} &= \gamma \cdot \min\left(1, \tfrac{k+1}{W}\right), \qquad
        \gamma_{max} = \max(\gamma_{max}, \gamma_{k+1}) \\
    w &= (k+1)^r \gamma_{max}^p, \qquad S \leftarrow S + w, \qquad c = w/S \\
    v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \qquad
        \hat g = \frac{g}{\sqrt{v/(1-\beta_2^{k+1})} + \epsilon} + \lambda y \\
    y &\leftarrow (1-c)\,y + c\,z + \gamma_{k+1}(\beta_1(1-c) - 1)\,\hat g, \qquad
        z \leftarrow z - \gamma_{k+1}\hat g

The **effective learning rate** of coordinate :math:`i` is the factor on the gradient
in the :math:`z` step, with the next step's scheduled lr and the saved second moment:

.. math::
    \eta_i = \frac{\gamma_{k+1}}{\sqrt{v_i/(1-\beta_2^{k})} + \epsilon}

``next_update`` returns the change of the parameter tensor as saved: in eval mode that
includes ``optimizer.train()`` moving it from :math:`x` to :math:`y` before the step.
The momentum-like part of a step needs the weights (:math:`c(z-y)`), so there is no
``update`` quantity.

**Strategies.** What the optimizer learns into each param group (its own: the groups'
``lr`` differ) is :math:`k`, ``weight_sum`` :math:`S`, ``lr_max`` and ``scheduled_lr`` (the
last step's :math:`\gamma_k`, for the record): :data:`SCHEDULEFREE_GROUP_STATE`. ``reload``
keeps them (the next step is the library's continuation); ``fresh`` clears the
per-parameter state (``z`` is the weights at the first step, which cannot be written
ahead: no entry) and puts them back to a new optimizer's (:func:`schedulefree_fresh_group`).
``train_mode`` says whether the saved weights are :math:`x` or :math:`y`: it goes with the
weights and ``z``, and no strategy changes it. ``reset-v`` zeroes :math:`v` and keeps
:math:`z` and the groups' values; as Adam's ``reset-v`` it keeps the counter, so the new
:math:`v` is bias-corrected as a mature one (the first steps are up to
:math:`1/\sqrt{1-\beta_2}` larger). There is no first moment (:data:`RESET_M_REFUSAL`),
no per-parameter step, and :math:`k` moves with :math:`S` (:data:`RESET_STEP_REFUSAL`,
:data:`KEEP_V_REFUSAL`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import (
    Family,
    Group,
    Preconditioned,
    StateLayout,
    adaptive_first_step,
    fresh_zeros,
    group_has,
    plain_preconditioned,
    zeros_for,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"z", "exp_avg_sq"})


def scheduled_lr(group: Group) -> float:
    r""":math:`\gamma_{k+1}`: the lr of the next step after linear warmup."""
    k, warmup = group["k"], group.get("warmup_steps", 0)
    return group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)


def averaging_weight(group: Group, lr: float) -> float:
    """:math:`c_{k+1}`, the weight of :math:`z` in the next average given the next step's lr ``lr``
    (0 when the weights sum to 0, as the library's ``ZeroDivisionError`` branch)."""
    k = group["k"]
    lr_max = max(lr, group["lr_max"])
    weight = ((k + 1) ** group.get("r", 0.0)) * (lr_max ** group.get("weight_lr_power", 2.0))
    weight_sum = group["weight_sum"] + weight
    return weight / weight_sum if weight_sum != 0 else 0.0


def next_averaging_weight(group: Group) -> float:
    """:math:`c_{k+1}` with the warmup-scheduled lr (AdamW and SGD schedule-free)."""
    return averaging_weight(group, scheduled_lr(group))


def schedulefree_effective_lr(exp_avg_sq: torch.Tensor, group: Group, lr: float | None = None) -> torch.Tensor:
    """``lr`` (default: the warmup-scheduled lr) over the saved second moment's bias-corrected root plus eps."""
    v = exp_avg_sq if exp_avg_sq.dtype == torch.float64 else exp_avg_sq.float()
    k, beta2 = group["k"], group["betas"][1]
    bias_correction2 = 1 - beta2**k if k > 0 else 1.0
    return (scheduled_lr(group) if lr is None else lr) / (v.div(bias_correction2).sqrt_() + group["eps"])


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return schedulefree_effective_lr(param.read("exp_avg_sq"), group)


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of the parameter tensor as saved (``x`` in eval mode, ``y`` in train mode) after the next step."""
    beta1, beta2 = group["betas"]
    eps, decay = group["eps"], group.get("weight_decay", 0.0)
    z = param.read("z").to(weight.dtype)
    y = weight.detach().clone()
    if not group.get("train_mode", False):
        y.lerp_(end=z, weight=1 - beta1)  # optimizer.train(): x -> y
    lr = scheduled_lr(group)
    ckp1 = next_averaging_weight(group)
    bias_correction2 = 1 - beta2 ** (group["k"] + 1)
    exp_avg_sq = param.read("exp_avg_sq").to(weight.dtype).mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    grad_normalized = grad.div(denom)
    if decay != 0:
        grad_normalized.add_(y, alpha=decay)
    y.lerp_(end=z, weight=ckp1)
    y.add_(grad_normalized, alpha=lr * (beta1 * (1 - ckp1) - 1))
    return y - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {"eff_lr": schedulefree_effective_lr(chunk["exp_avg_sq"], group), "exp_avg_sq": chunk["exp_avg_sq"]}


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r""":math:`g / (\sqrt{v/(1-\beta_2^k)} + \epsilon)`; the numerator is the gradient, which the state does not hold."""
    k, beta2 = group["k"], group["betas"][1]
    return plain_preconditioned(None, chunk["exp_avg_sq"], group["eps"], scale=1.0 / (1 - beta2**k) if k > 0 else 1.0)


def columns(param: ParamState, group: Group) -> dict:
    return {
        "k": group["k"],
        "train_mode": bool(group.get("train_mode", False)),
        "scheduled_lr": scheduled_lr(group),
        "averaging_weight": next_averaging_weight(group),
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("z" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    if not group_has(group, "k", "weight_sum", "lr_max", "warmup_steps", "train_mode", "betas", "eps"):
        return 0
    # RAdamScheduleFree (silent_sgd_phase) and the reference version (decay_at_z) step differently.
    return 0 if "silent_sgd_phase" in group or "decay_at_z" in group else 5


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """schedulefree's state before the first step: ``z`` a copy of the weights, a zero ``exp_avg_sq``
    (its counters are in the param group)."""
    return {"z": weight.detach().clone(), **zeros_for(weight, "exp_avg_sq")}


# What schedulefree 1.4 AdamWScheduleFree.step() writes into each group (from that group's own lr):
# the counter k, the sum of the averaging weights, the largest scheduled lr, the last scheduled lr.
SCHEDULEFREE_GROUP_STATE = ("k", "weight_sum", "lr_max", "scheduled_lr")
RESET_M_REFUSAL = (
    "schedule-free keeps no first moment: its momentum is the interpolation y = (1-beta1) z + beta1 x between "
    "the state's z and the averaged weights x, which the weights themselves hold; use reset-v or 'fresh'"
)
KEEP_V_REFUSAL = (
    "keep-v restarts a first moment and a step count, which schedule-free does not keep: its momentum is the "
    "interpolation between z and the weights, and each param group's counter k moves with weight_sum; use reset-v "
    "or 'fresh'"
)
RESET_STEP_REFUSAL = (
    "schedule-free keeps no per-parameter step: each param group's counter k sets the warmup, the bias "
    "correction and the averaging weights, with their sum weight_sum, which only 'fresh' restarts consistently; "
    "use reset-v or 'fresh'"
)


def schedulefree_fresh_group(group: Group) -> dict:
    """A new AdamWScheduleFree's learned group values (its constructor's defaults).

    Example:
        >>> schedulefree_fresh_group({"k": 40, "lr_max": 2e-3})
        {'k': 0, 'weight_sum': 0.0, 'lr_max': -1.0, 'scheduled_lr': 0.0}
    """
    return {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}


SCHEDULEFREE_LAYOUT = StateLayout(
    second_moment=("exp_avg_sq",),
    fresh={"exp_avg_sq": fresh_zeros},  # no fresh z: the weights at the first step (fresh leaves the state out)
    keep_v_refusal=KEEP_V_REFUSAL,
    group_state=SCHEDULEFREE_GROUP_STATE,
    group_state_per_group=True,
    group_mode=("train_mode",),
    fresh_group=schedulefree_fresh_group,
    reset_m_refusal=RESET_M_REFUSAL,
    reset_step_refusal=RESET_STEP_REFUSAL,
)

SCHEDULEFREE_ADAMW = Family(
    name="schedulefree_adamw",
    label="AdamW schedule-free",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=(
        "k",
        "train_mode",
        "scheduled_lr",
        "averaging_weight",
        "exp_avg_sq_mean",
        "eff_lr_min",
        "eff_lr_p50",
        "eff_lr_max",
    ),
    hyperparameters=("lr", "betas", "eps", "weight_decay", "warmup_steps", "r", "weight_lr_power", "k", "train_mode"),
    second_moment="exp_avg_sq",
    preconditioned=preconditioned,
    notes=(
        "Schedule-free AdamW: the step counter k lives in the param groups; eff_lr uses the next step's "
        "warmup-scheduled lr. The saved weights are x in eval mode and y in train mode.",
    ),
    layout=SCHEDULEFREE_LAYOUT,
    first_step=adaptive_first_step(initial_state, "-lr_1 * g / (|g| + eps)"),
)
