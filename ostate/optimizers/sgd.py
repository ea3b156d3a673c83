r"""SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD`` computes it.

The state holds only the momentum buffer :math:`b` (``momentum_buffer``); there is no
step counter, and with ``momentum=0`` there is no state at all. Step, given gradient
:math:`g` and weights :math:`\theta`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \quad\text{(weight decay)} \\
    b &\leftarrow g \text{ on the first step, else } \mu b + (1-\tau) g \\
    d &= g + \mu b \text{ (Nesterov) or } b \\
    \theta &\leftarrow \theta - \gamma d

The **effective learning rate** is the factor on the momentum buffer, :math:`\gamma`,
the same for every coordinate. For a gradient held constant the step settles at
:math:`\gamma(1-\tau)/(1-\mu)` times the gradient (plain momentum) or
:math:`\gamma(1 + \mu(1-\tau)/(1-\mu))` (Nesterov); ``steady_state_lr`` reports it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, FirstStep, Group, StateLayout, fresh_absent, group_has
from ostate.state import ParamState


def steady_state_lr(*, lr: float, momentum: float, dampening: float, nesterov: bool) -> float:
    r"""The step per unit of a constant gradient once the buffer has converged."""
    if momentum == 0:
        return lr
    settled = (1 - dampening) / (1 - momentum)
    return lr * (1 + momentum * settled) if nesterov else lr * settled


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    shape = param.shape if param.shape is not None else ()
    return torch.full(shape, float(group["lr"]), dtype=torch.float32)


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype."""
    lr, momentum, dampening = group["lr"], group.get("momentum", 0.0), group.get("dampening", 0.0)
    wd = group.get("weight_decay", 0.0)
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        g = g.add(theta, alpha=wd)
    if momentum != 0:
        if "momentum_buffer" in param.state:
            buf = param.read("momentum_buffer").to(theta.dtype).mul(momentum).add_(g, alpha=1 - dampening)
        else:
            buf = g.detach().clone()
        g = g.add(buf, alpha=momentum) if group.get("nesterov", False) else buf
    theta.add_(g, alpha=-lr)
    return theta - weight


def sgd_momentum_update(momentum_buffer: torch.Tensor, *, lr: float, momentum: float, nesterov: bool) -> torch.Tensor:
    r"""The next step's change with a zero gradient and no weight decay: :math:`-\gamma\mu b`,
    or :math:`-\gamma\mu^2 b` with Nesterov."""
    factor = momentum * momentum if nesterov else momentum
    return momentum_buffer.float() * (-lr * factor)


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    q: dict = {"eff_lr": float(group["lr"])}
    if "momentum_buffer" in chunk:
        q["momentum_buffer_abs"] = chunk["momentum_buffer"].abs()
        q["update"] = sgd_momentum_update(
            chunk["momentum_buffer"],
            lr=group["lr"],
            momentum=group.get("momentum", 0.0),
            nesterov=group.get("nesterov", False),
        )
    return q


def columns(param: ParamState, group: Group) -> dict:
    return {
        "steady_state_lr": steady_state_lr(
            lr=group["lr"],
            momentum=group.get("momentum", 0.0),
            dampening=group.get("dampening", 0.0),
            nesterov=group.get("nesterov", False),
        )
    }


def _match(state_keys: frozenset[str], group: Group) -> int:
    if not state_keys <= {"momentum_buffer"}:
        return 0
    if group_has(group, "momentum", "dampening", "nesterov"):
        return 4
    return 1 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """SGD keeps nothing before its first step (that step sets the momentum buffer to the gradient)."""
    return {}


SGD = Family(
    name="sgd",
    label="SGD",
    match=_match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("momentum_buffer_abs_mean", "momentum_buffer_abs_max", "eff_lr_p50", "steady_state_lr"),
    hyperparameters=("lr", "initial_lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    first_moment="momentum_buffer_abs",
    quantized_moments={"momentum_buffer": True},
    # SGD's first step sets the buffer to the gradient itself: a fresh buffer is an absent one
    # (a zero buffer would damp that step by 1 - dampening).
    layout=StateLayout(first_moment=("momentum_buffer",), fresh={"momentum_buffer": fresh_absent}),
    first_step=FirstStep(initial_state),
)
