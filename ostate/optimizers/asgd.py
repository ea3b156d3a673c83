r"""ASGD (averaged SGD), as ``torch.optim.ASGD`` computes it.

A checkpoint holds, after step :math:`t`: the step size :math:`\eta_t` (``eta``) and
the averaging rate :math:`\mu_t` (``mu``) that the *next* step will use, the running
average of the weights :math:`a_t` (``ax``) and :math:`t` (``step``). Step :math:`t+1`,
given gradient :math:`g` and weights :math:`\theta`, with :math:`\lambda_d` = ``lambd``,
:math:`\alpha` = ``alpha`` and :math:`t_0` = ``t0``:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \quad\text{(L2 weight decay)} \\
    \theta &\leftarrow \theta(1 - \lambda_d\eta_t) - \eta_t g \\
    a_{t+1} &= a_t + \mu_t(\theta - a_t) \quad (\text{or } \theta \text{ while } \mu_t = 1) \\
    \eta_{t+1} &= \frac{\gamma}{(1 + \lambda_d\gamma (t+1))^{\alpha}}, \qquad
        \mu_{t+1} = \frac{1}{\max(1, t+1-t_0)}

The **effective learning rate** is the saved :math:`\eta_t`, the same for every
coordinate of the parameter; the group's ``lr`` only enters through the schedule of
later steps. The decay :math:`1-\lambda_d\eta_t` acts on the weights themselves, so the
next step with a zero gradient cannot be computed without them: there is no ``update``
quantity. ``ax`` (the averaged weights, what ASGD returns as its solution) is
summarised as it is.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, FirstStep, Group, group_has, scalar_of, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "eta", "mu", "ax"})


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    ax = param.state["ax"]
    return torch.full(tuple(ax.shape), scalar_of(param, "eta"), dtype=torch.float32)


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    wd, lambd = group.get("weight_decay", 0.0), group["lambd"]
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        g = g.add(theta, alpha=wd)
    eta = scalar_of(param, "eta")
    theta.mul_(1 - lambd * eta)
    theta.add_(g, alpha=-eta)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {"eff_lr": scalar_of(param, "eta"), "ax": chunk["ax"]}


def columns(param: ParamState, group: Group) -> dict:
    if "eta" not in param.state:
        return {}
    eta, mu = scalar_of(param, "eta"), scalar_of(param, "mu")
    return {
        "eta": eta,
        "mu": mu,
        # Averaging has started once step > t0 (mu < 1); before that ax simply follows the weights.
        "averaging": mu < 1,
        "decay_factor": 1 - group["lambd"] * eta,
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"eta", "ax"} <= state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "lambd", "alpha", "t0"):
        return 5
    return 3 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's ASGD state before the first step: ``step`` 0, ``eta`` = lr, ``mu`` 1, zero ``ax``."""
    return {
        "step": torch.tensor(0.0),
        "eta": torch.tensor(float(group["lr"])),
        "mu": torch.tensor(1.0),
        **zeros_for(weight, "ax"),
    }


ASGD = Family(
    name="asgd",
    label="ASGD",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("eta", "mu", "averaging", "decay_factor", "ax_rms"),
    hyperparameters=("lr", "initial_lr", "lambd", "alpha", "t0", "weight_decay", "maximize"),
    notes=("ASGD: eff_lr is the step size eta saved in the state for the next step, not the group's lr.",),
    first_step=FirstStep(initial_state),
)
