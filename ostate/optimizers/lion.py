r"""Lion, as ``lion_pytorch.Lion`` (lucidrains/lion-pytorch) computes it.

A checkpoint holds only :math:`m` (``exp_avg``), the :math:`\beta_2` average of past
gradients; there is no step count. Step, given gradient :math:`g` and weights
:math:`\theta`:

.. math::
    \theta &\leftarrow \theta(1 - \gamma\lambda) \quad\text{(decoupled weight decay)} \\
    \theta &\leftarrow \theta - \gamma\,\mathrm{sign}(\beta_1 m + (1-\beta_1) g) \\
    m &\leftarrow \beta_2 m + (1-\beta_2) g

Every coordinate whose update direction is not exactly zero moves by :math:`\gamma`:
the **effective learning rate** is :math:`\eta_i = \gamma` (a step size in parameter
units, as for any sign method). With a zero gradient the step is
:math:`-\gamma\,\mathrm{sign}(m)`.

``Lion(decoupled_weight_decay=True)`` divides :math:`\lambda` by the initial lr; that
flag and the initial lr live on the optimizer object, not in its state dict, so
``next_update`` assumes the default (``False``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, FirstStep, Group, group_has, zeros_for
from ostate.state import ParamState


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return torch.full(tuple(param.state["exp_avg"].shape), float(group["lr"]), dtype=torch.float32)


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in lion-pytorch's order of operations."""
    lr, wd = group["lr"], group.get("weight_decay", 0.0)
    beta1, _beta2 = group["betas"]
    theta = weight.detach().clone()
    theta.mul_(1.0 - lr * wd)
    direction = param.read("exp_avg").to(theta.dtype).mul(beta1).add(grad, alpha=1.0 - beta1).sgn_()
    theta.add_(direction, alpha=-lr)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {
        "eff_lr": float(group["lr"]),
        "exp_avg_abs": chunk["exp_avg"].abs(),
        "update": chunk["exp_avg"].float().sign().mul_(-float(group["lr"])),
    }


def columns(param: ParamState, group: Group) -> dict:
    if "exp_avg" not in param.state:
        return {}
    m = param.read("exp_avg")
    # Coordinates whose momentum is exactly zero do not move without a gradient.
    return {"zero_momentum_fraction": float((m == 0).float().mean()) if m.numel() else float("nan")}


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and state_keys != {"exp_avg"}:
        return 0
    # lion-pytorch's groups are exactly lr, betas, weight_decay: no eps.
    if group_has(group, "betas", "weight_decay") and "eps" not in group and len(group.get("betas", ())) == 2:
        return 4
    return 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """lion-pytorch's state before the first step: a zero ``exp_avg``."""
    return zeros_for(weight, "exp_avg")


LION = Family(
    name="lion",
    label="Lion (lion-pytorch)",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("exp_avg_abs_mean", "exp_avg_abs_max", "zero_momentum_fraction", "eff_lr_p50"),
    hyperparameters=("lr", "initial_lr", "betas", "weight_decay"),
    first_moment="exp_avg_abs",
    # bitsandbytes' Lion8bit keeps the momentum with the signed dynamic map (Optimizer1State).
    quantized_moments={"exp_avg": True},
    notes=(
        "Lion: every coordinate moves by exactly lr (sign update). Lion(decoupled_weight_decay=True) is not "
        "recorded in the state dict; the next update assumes it was off.",
    ),
    first_step=FirstStep(initial_state),
)
