r"""Adadelta, as ``torch.optim.Adadelta`` computes it.

A checkpoint holds the state after step :math:`t`: :math:`v_t` (``square_avg``, the
average of squared gradients), :math:`u_t` (``acc_delta``, the average of squared
updates) and :math:`t` (``step``, which the update does not use). Step :math:`t+1`,
given gradient :math:`g` and weights :math:`\theta`, with :math:`\rho` the decay:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \quad\text{(L2 weight decay)} \\
    v_{t+1} &= \rho v_t + (1-\rho) g^2 \\
    \Delta &= \frac{\sqrt{u_t + \epsilon}}{\sqrt{v_{t+1} + \epsilon}}\, g \\
    u_{t+1} &= \rho u_t + (1-\rho) \Delta^2 \\
    \theta &\leftarrow \theta - \gamma \Delta

:math:`\epsilon` sits *inside* both square roots. The **effective learning rate** of
coordinate :math:`i` is the factor on the gradient, read from the saved state:

.. math::
    \eta_i = \gamma \frac{\sqrt{u_{t,i} + \epsilon}}{\sqrt{v_{t,i} + \epsilon}}

A zero gradient moves nothing, so there is no ``update`` quantity.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, Group, StateLayout, adaptive_first_step, fresh_zeros, group_has, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "square_avg", "acc_delta"})


def adadelta_effective_lr(square_avg: torch.Tensor, acc_delta: torch.Tensor, *, lr: float, eps: float):
    r""":math:`\gamma\sqrt{u+\epsilon}/\sqrt{v+\epsilon}`, elementwise, in float32 (or float64 if given)."""
    dtype = torch.float64 if square_avg.dtype == torch.float64 else torch.float32
    return (acc_delta.to(dtype) + eps).sqrt_().div_((square_avg.to(dtype) + eps).sqrt_()).mul_(lr)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return adadelta_effective_lr(param.read("square_avg"), param.read("acc_delta"), lr=group["lr"], eps=group["eps"])


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group.get("weight_decay", 0.0)
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        g = g.add(theta, alpha=wd)
    square_avg = param.read("square_avg").to(theta.dtype).mul(rho).addcmul_(g, g, value=1 - rho)
    std = square_avg.add(eps).sqrt_()
    delta = param.read("acc_delta").to(theta.dtype).add(eps).sqrt_()
    delta.div_(std).mul_(g)
    theta.add_(delta, alpha=-lr)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {
        "eff_lr": adadelta_effective_lr(chunk["square_avg"], chunk["acc_delta"], lr=group["lr"], eps=group["eps"]),
        "square_avg": chunk["square_avg"],
        "acc_delta": chunk["acc_delta"],
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("acc_delta" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "rho", "eps"):
        return 5
    return 3 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Adadelta state before the first step: ``step`` 0, zero ``square_avg`` and ``acc_delta``."""
    return {"step": torch.tensor(0.0), **zeros_for(weight, "square_avg", "acc_delta")}


ADADELTA = Family(
    name="adadelta",
    label="Adadelta",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    display=("square_avg_mean", "acc_delta_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "rho", "eps", "weight_decay", "maximize"),
    second_moment="square_avg",
    layout=StateLayout(
        second_moment=("square_avg", "acc_delta"),
        counter=("step",),
        fresh={"square_avg": fresh_zeros, "acc_delta": fresh_zeros, "step": fresh_zeros},
        step_in_update=lambda group: False,
    ),
    first_step=adaptive_first_step(initial_state, "-lr * sqrt(eps) * g / sqrt((1 - rho) g^2 + eps)"),
)
