r"""Adagrad, as ``torch.optim.Adagrad`` computes it (dense and sparse gradients).

A checkpoint holds the accumulated squared gradients :math:`s_t` (``sum``, which
starts at ``initial_accumulator_value``) and :math:`t` (``step``). Unlike most
optimizers, torch creates this state in the constructor, so every parameter has it,
with :math:`t = 0` before its first step. Step :math:`t+1`, given gradient :math:`g` and
weights :math:`\theta`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \quad\text{(L2 weight decay)} \\
    \tilde\gamma_{t+1} &= \frac{\gamma}{1 + t\,\eta_{decay}} \quad\text{(the decayed lr, } \eta_{decay}
        = \text{lr\_decay)} \\
    s_{t+1} &= s_t + g^2 \\
    \theta &\leftarrow \theta - \tilde\gamma_{t+1} \frac{g}{\sqrt{s_{t+1}} + \epsilon}

With a sparse gradient only its entries change. The **effective learning rate** of
coordinate :math:`i` is the factor on the gradient, with the next step's decayed lr
and the saved accumulator:

.. math::
    \eta_i = \frac{\tilde\gamma_{t+1}}{\sqrt{s_{t,i}} + \epsilon}
"""

from __future__ import annotations

from typing import Any, Mapping

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
    step_of,
)
from ostate.optimizers.sparse_adam import sparse_like
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "sum"})


def decayed_lr(*, lr: float, lr_decay: float, step: float) -> float:
    r"""The lr of step :math:`k`: :math:`\gamma / (1 + (k-1)\eta_{decay})`."""
    return lr / (1 + (step - 1) * lr_decay)


def adagrad_effective_lr(state_sum: torch.Tensor, *, clr: float, eps: float) -> torch.Tensor:
    r""":math:`\tilde\gamma / (\sqrt{s} + \epsilon)`, elementwise."""
    s = state_sum if state_sum.dtype == torch.float64 else state_sum.float()
    return clr / (s.sqrt() + eps)


def _next_clr(param: ParamState, group: Group) -> float:
    return decayed_lr(lr=group["lr"], lr_decay=group.get("lr_decay", 0.0), step=step_of(param) + 1)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return adagrad_effective_lr(param.read("sum"), clr=_next_clr(param, group), eps=group["eps"])


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    eps, wd = group["eps"], group.get("weight_decay", 0.0)
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        g = g.add(theta, alpha=wd)
    clr = _next_clr(param, group)
    state_sum = param.read("sum").to(theta.dtype).clone()
    if g.is_sparse:
        g = g.coalesce()
        values = g._values()
        state_sum.add_(sparse_like(g, values.pow(2)))
        std_values = state_sum.sparse_mask(g)._values().sqrt_().add_(eps)
        theta.add_(sparse_like(g, values / std_values), alpha=-clr)
    else:
        state_sum.addcmul_(g, g, value=1)
        theta.addcdiv_(g, state_sum.sqrt().add_(eps), value=-clr)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    return {
        "eff_lr": adagrad_effective_lr(chunk["sum"], clr=_next_clr(param, group), eps=group["eps"]),
        "sum": chunk["sum"],
    }


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r""":math:`g / (\sqrt{s} + \epsilon)`: the numerator is the gradient, which the state does not hold."""
    return plain_preconditioned(None, chunk["sum"], group["eps"])


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    return {"decayed_lr": _next_clr(param, group)}


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("sum" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "lr_decay", "initial_accumulator_value"):
        return 5
    return 3 if state_keys else 0


def fresh_sum(value: Any, group: Group) -> torch.Tensor:
    """The accumulator a fresh Adagrad starts from: ``initial_accumulator_value`` everywhere."""
    return torch.full_like(value, float(group.get("initial_accumulator_value", 0.0)))


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Adagrad state (made in its constructor): ``step`` 0, ``sum`` full of ``initial_accumulator_value``."""
    initial = group.get("initial_accumulator_value", 0.0)
    return {"step": torch.tensor(0.0), "sum": torch.full_like(weight, initial, memory_format=torch.preserve_format)}


ADAGRAD = Family(
    name="adagrad",
    label="Adagrad",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("sum_mean", "decayed_lr", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "lr_decay", "initial_accumulator_value", "eps", "weight_decay", "maximize"),
    second_moment="sum",
    preconditioned=preconditioned,
    # bitsandbytes' Adagrad8bit keeps the accumulator with the signed dynamic map (Optimizer1State).
    quantized_moments={"sum": True},
    # torch creates Adagrad's state in the constructor, not at the first step.
    layout=StateLayout(
        second_moment=("sum",),
        counter=("step",),
        fresh={"sum": fresh_sum, "step": fresh_zeros},
        step_in_update=lambda group: float(group.get("lr_decay", 0.0)) != 0.0,
        lazy_init=False,
    ),
    notes=(
        "Adagrad: decayed_lr is the next step's lr / (1 + step * lr_decay); a zero gradient moves nothing, "
        "so there is no update column.",
    ),
    first_step=adaptive_first_step(initial_state, "-lr * g / (sqrt(s0 + g^2) + eps)"),
)
