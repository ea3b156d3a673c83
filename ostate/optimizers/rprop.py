r"""Rprop (resilient backpropagation), as ``torch.optim.Rprop`` computes it.

A checkpoint holds, after step :math:`t`: each coordinate's step size :math:`s_t`
(``step_size``, started at the group's ``lr``), the previous gradient
:math:`g^{prev}` (``prev``; zeroed where the sign flipped) and :math:`t` (``step``).
Step :math:`t+1`, given gradient :math:`g` and weights :math:`\theta`, with
:math:`(\eta^-, \eta^+)` = ``etas`` and :math:`(s_{min}, s_{max})` = ``step_sizes``:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    f_i &= \eta^+ \text{ if } g_i g^{prev}_i > 0, \quad \eta^- \text{ if } g_i g^{prev}_i < 0,
        \quad 1 \text{ otherwise} \\
    s_{t+1} &= \mathrm{clamp}(s_t f, s_{min}, s_{max}) \\
    g_i &\leftarrow 0 \text{ where the sign flipped} \\
    \theta &\leftarrow \theta - \mathrm{sign}(g)\, s_{t+1}

Rprop has no weight decay. The step ignores the gradient's size, so the **effective
learning rate** is the step size itself, in units of the parameter (how far each
coordinate moved in its last step, unless its sign flipped):

.. math::
    \eta_i = s_{t,i}

The group's ``lr`` is only the initial step size. A zero gradient moves nothing, so
there is no ``update`` quantity.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, FirstStep, Group, group_has, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "prev", "step_size"})


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    s = param.read("step_size")
    return s if s.dtype == torch.float64 else s.float()


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    etaminus, etaplus = group["etas"]
    step_size_min, step_size_max = group["step_sizes"]
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    sign = g.mul(param.read("prev").to(theta.dtype)).sign()
    sign[sign.gt(0)] = etaplus
    sign[sign.lt(0)] = etaminus
    sign[sign.eq(0)] = 1
    step_size = param.read("step_size").to(theta.dtype).mul(sign).clamp_(step_size_min, step_size_max)
    g = g.clone(memory_format=torch.preserve_format)
    g[sign.eq(etaminus)] = 0
    theta.addcmul_(g.sign(), step_size, value=-1)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    step_size = chunk["step_size"]
    return {
        "eff_lr": step_size if step_size.dtype == torch.float64 else step_size.float(),
        "prev_abs": chunk["prev"].abs(),
    }


def columns(param: ParamState, group: Group) -> dict:
    if "step_size" not in param.state:
        return {}
    s = param.read("step_size")
    step_size_min, step_size_max = group["step_sizes"]
    if s.numel() == 0:
        return {}
    return {
        # Coordinates pinned at a bound: at the top they cannot grow, at the bottom they barely move.
        "at_max_fraction": float((s >= step_size_max).float().mean()),
        "at_min_fraction": float((s <= step_size_min).float().mean()),
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"prev", "step_size"} <= state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "etas", "step_sizes"):
        return 5
    return 3 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Rprop state before the first step: ``step`` 0, zero ``prev``, ``step_size`` full of lr."""
    return {
        "step": torch.tensor(0.0),
        **zeros_for(weight, "prev"),
        "step_size": torch.full_like(weight, float(group["lr"]), memory_format=torch.preserve_format),
    }


RPROP = Family(
    name="rprop",
    label="Rprop",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("prev_abs_mean", "at_max_fraction", "at_min_fraction", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "etas", "step_sizes", "maximize"),
    notes=(
        "Rprop: eff_lr is each coordinate's saved step size (in parameter units); the group's lr was only "
        "the initial step size.",
    ),
    first_step=FirstStep(initial_state),
)
