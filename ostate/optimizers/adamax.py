r"""Adamax, as ``torch.optim.Adamax`` computes it (Adam with an infinity norm).

A checkpoint holds the state after step :math:`t`: :math:`m_t` (``exp_avg``),
:math:`u_t` (``exp_inf``) and :math:`t` (``step``). Step :math:`t+1`, given gradient
:math:`g` and weights :math:`\theta`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \quad\text{(L2 weight decay)} \\
    m_{t+1} &= \beta_1 m_t + (1-\beta_1) g \\
    u_{t+1} &= \max(\beta_2 u_t, |g| + \epsilon) \\
    \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^{t+1}} \cdot \frac{m_{t+1}}{u_{t+1}}

:math:`\epsilon` sits *inside* the max, and :math:`u` has no bias correction. The
**effective learning rate** of coordinate :math:`i` is the factor on the
bias-corrected first moment :math:`\hat m = m/(1-\beta_1^t)`:

.. math::
    \eta_i = \frac{\gamma}{u_{t,i}}

(:math:`u_{t,i} \ge \epsilon` once the coordinate has had one step).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import (
    Family,
    Group,
    StateLayout,
    adaptive_first_step,
    fresh_zeros,
    group_has,
    step_of,
    zeros_for,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_inf"})


def adamax_effective_lr(exp_inf: torch.Tensor, *, lr: float) -> torch.Tensor:
    r""":math:`\gamma / u_i`, elementwise, in float32 (or float64 if given)."""
    u = exp_inf if exp_inf.dtype == torch.float64 else exp_inf.float()
    return lr / u


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return adamax_effective_lr(param.read("exp_inf"), lr=group["lr"])


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        g = g.add(theta, alpha=wd)
    exp_avg = param.read("exp_avg").to(theta.dtype).lerp(g, 1 - beta1)
    exp_inf = torch.maximum(param.read("exp_inf").to(theta.dtype).mul(beta2), g.abs().add_(eps))
    clr = lr / (1 - beta1 ** (step_of(param) + 1))
    theta.addcdiv_(exp_avg, exp_inf, value=-clr)
    return theta - weight


def adamax_momentum_update(
    exp_avg: torch.Tensor, exp_inf: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, step: float
) -> torch.Tensor:
    r"""The next step's change with a zero gradient and no weight decay:
    :math:`-\frac{\gamma}{1-\beta_1^{t+1}} \cdot \frac{\beta_1 m}{\max(\beta_2 u, \epsilon)}`."""
    u = (exp_inf.float() * beta2).clamp_(min=eps)
    return (exp_avg.float() * beta1).div_(u).mul_(-lr / (1 - beta1 ** (step + 1)))


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"]
    return {
        "eff_lr": adamax_effective_lr(chunk["exp_inf"], lr=group["lr"]),
        "exp_avg_abs": chunk["exp_avg"].abs(),
        "exp_inf": chunk["exp_inf"],
        "update": adamax_momentum_update(
            chunk["exp_avg"],
            chunk["exp_inf"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step=step_of(param),
        ),
    }


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    return {"bias_correction1": 1 - group["betas"][0] ** param.step}


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys:
        if not ("exp_inf" in state_keys and state_keys <= _STATE_KEYS):
            return 0
        return 5 if group_has(group, "betas", "eps") else 2
    # No state yet: Adamax's group has Adam's keys but neither amsgrad nor decoupled_weight_decay
    # (which RAdam and NAdam have had since torch 2.x).
    if group_has(group, "betas", "eps", "weight_decay", "differentiable") and not (
        {"amsgrad", "decoupled_weight_decay", "momentum_decay", "k", "alpha"} & set(group)
    ):
        return 3
    return 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Adamax state before the first step: ``step`` 0, zero ``exp_avg`` and ``exp_inf``."""
    return {"step": torch.tensor(0.0), **zeros_for(weight, "exp_avg", "exp_inf")}


ADAMAX = Family(
    name="adamax",
    label="Adamax",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("exp_avg_abs_mean", "exp_inf_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "betas", "eps", "weight_decay", "maximize"),
    first_moment="exp_avg_abs",
    second_moment="exp_inf",
    # The infinity norm has no bias correction: keep-v needs no correction of its age.
    layout=StateLayout(
        first_moment=("exp_avg",),
        second_moment=("exp_inf",),
        counter=("step",),
        fresh={"exp_avg": fresh_zeros, "exp_inf": fresh_zeros, "step": fresh_zeros},
    ),
    first_step=adaptive_first_step(initial_state, "-lr * g / (|g| + eps)"),
)
