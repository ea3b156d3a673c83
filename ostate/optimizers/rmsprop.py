r"""RMSprop (plain, centered, with momentum), as ``torch.optim.RMSprop`` computes it.

A checkpoint holds the state after step :math:`t`: :math:`v_t` (``square_avg``),
with ``centered`` the gradient average :math:`\bar g_t` (``grad_avg``), with momentum
the buffer :math:`b_t` (``momentum_buffer``), and :math:`t` (``step``, which the update
does not use). Step :math:`t+1`, given gradient :math:`g` and weights :math:`\theta`, with
:math:`\alpha` the smoothing constant:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \quad\text{(L2 weight decay)} \\
    v_{t+1} &= \alpha v_t + (1-\alpha) g^2 \\
    \bar g_{t+1} &= \alpha \bar g_t + (1-\alpha) g \quad\text{(centered)} \\
    d &= \sqrt{v_{t+1} - \bar g_{t+1}^2} + \epsilon \text{ (centered), or } \sqrt{v_{t+1}} + \epsilon \\
    b_{t+1} &= \mu b_t + g/d, \quad \theta \leftarrow \theta - \gamma b_{t+1}
        \quad\text{(momentum } \mu > 0\text{)} \\
    \theta &\leftarrow \theta - \gamma g/d \quad\text{(no momentum)}

There is no bias correction. The **effective learning rate** of coordinate :math:`i` is
the factor on the gradient, read from the saved state:

.. math::
    \eta_i = \frac{\gamma}{\sqrt{v_{t,i} - \bar g_{t,i}^2} + \epsilon} \text{ (centered)}, \qquad
    \eta_i = \frac{\gamma}{\sqrt{v_{t,i}} + \epsilon} \text{ (otherwise)}

With momentum, a normalised gradient held constant is amplified by
``momentum_gain`` :math:`= 1/(1-\mu)`. A centered :math:`v - \bar g^2` that rounding
made negative gives NaN, as it would in torch.
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

_STATE_KEYS = frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"})


def rmsprop_denominator(square_avg: torch.Tensor, grad_avg: torch.Tensor | None, *, eps: float) -> torch.Tensor:
    r""":math:`\sqrt{v - \bar g^2} + \epsilon` (centered) or :math:`\sqrt{v} + \epsilon`, in float32 or float64."""
    v = square_avg if square_avg.dtype == torch.float64 else square_avg.float()
    if grad_avg is not None:
        v = v.addcmul(grad_avg.to(v.dtype), grad_avg.to(v.dtype), value=-1)
    return v.sqrt().add_(eps)


def _grad_avg(source: Mapping[str, torch.Tensor] | ParamState, group: Group) -> torch.Tensor | None:
    if not group.get("centered", False):
        return None
    return source.read("grad_avg") if isinstance(source, ParamState) else source["grad_avg"]


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return group["lr"] / rmsprop_denominator(param.read("square_avg"), _grad_avg(param, group), eps=group["eps"])


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
    wd, momentum = group.get("weight_decay", 0.0), group.get("momentum", 0.0)
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        g = g.add(theta, alpha=wd)
    square_avg = param.read("square_avg").to(theta.dtype).mul(alpha).addcmul_(g, g, value=1 - alpha)
    if group.get("centered", False):
        grad_avg = param.read("grad_avg").to(theta.dtype).lerp(g, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if momentum > 0:
        buf = param.read("momentum_buffer").to(theta.dtype).mul(momentum).addcdiv_(g, avg)
        theta.add_(buf, alpha=-lr)
    else:
        theta.addcdiv_(g, avg, value=-lr)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    q: dict = {
        "eff_lr": group["lr"] / rmsprop_denominator(chunk["square_avg"], _grad_avg(chunk, group), eps=group["eps"]),
        "square_avg": chunk["square_avg"],
    }
    if "grad_avg" in chunk:
        q["grad_avg_abs"] = chunk["grad_avg"].abs()
    momentum = group.get("momentum", 0.0)
    if momentum > 0 and "momentum_buffer" in chunk:
        q["momentum_buffer_abs"] = chunk["momentum_buffer"].abs()
        # A zero gradient leaves g/d = 0, so the buffer only decays: b -> mu b.
        q["update"] = chunk["momentum_buffer"].float() * (-group["lr"] * momentum)
    return q


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r""":math:`g / (\sqrt{v - \bar g^2} + \epsilon)` (centered) or :math:`g / (\sqrt{v} + \epsilon)`; the numerator
    is the gradient, which the state does not hold."""
    v = chunk["square_avg"].float()
    grad_avg = _grad_avg(chunk, group)
    if grad_avg is not None:
        v = v.addcmul(grad_avg.float(), grad_avg.float(), value=-1)
    return plain_preconditioned(None, v, group["eps"])


def columns(param: ParamState, group: Group) -> dict:
    momentum = group.get("momentum", 0.0)
    return {"momentum_gain": 1 / (1 - momentum) if momentum < 1 else float("inf")}


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("square_avg" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    if "acc_delta" in state_keys:
        return 0
    if group_has(group, "alpha", "centered", "momentum"):
        return 5
    return 2 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's RMSprop state before the first step: ``step`` 0, zero ``square_avg`` (and ``momentum_buffer``
    with momentum, ``grad_avg`` when centered)."""
    keys = ["square_avg"]
    if group.get("momentum", 0) > 0:
        keys.append("momentum_buffer")
    if group.get("centered", False):
        keys.append("grad_avg")
    return {"step": torch.tensor(0.0), **zeros_for(weight, *keys)}


RMSPROP = Family(
    name="rmsprop",
    label="RMSprop",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("square_avg_mean", "momentum_gain", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "alpha", "eps", "centered", "momentum", "weight_decay", "maximize"),
    first_moment="momentum_buffer_abs",
    second_moment="square_avg",
    preconditioned=preconditioned,
    # bitsandbytes' RMSprop8bit keeps square_avg with the signed dynamic map (Optimizer1State).
    quantized_moments={"square_avg": True},
    # Centred RMSprop divides by sqrt(square_avg - grad_avg^2): grad_avg is part of the
    # variance estimate, not a first moment, and goes with square_avg (zeroing only
    # square_avg would make the variance negative and the weights NaN).
    layout=StateLayout(
        first_moment=("momentum_buffer",),
        second_moment=("square_avg", "grad_avg"),
        counter=("step",),
        fresh={"momentum_buffer": fresh_zeros, "grad_avg": fresh_zeros, "square_avg": fresh_zeros, "step": fresh_zeros},
        step_in_update=lambda group: False,
    ),
    first_step=adaptive_first_step(initial_state, "-lr * g / (sqrt(1 - alpha) |g| + eps)"),
)
