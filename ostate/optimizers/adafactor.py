r"""Adafactor as ``torch.optim.Adafactor`` computes it (factored second moment, relative step size).

A checkpoint holds, after step :math:`t` (``step``): for a parameter of two or more
dimensions the row factor :math:`R_t` (``row_var``, shape ``(..., n, 1)``) and the
column factor :math:`C_t` (``col_var``, shape ``(..., 1, m)``) of the second moment;
for a vector the full second moment :math:`\hat V_t` (``variance``). Step :math:`t+1`,
given gradient :math:`G` and weights :math:`\theta`, with :math:`\tau` = ``beta2_decay``,
:math:`(\epsilon_1, \epsilon_2)` = ``eps`` (:math:`\epsilon_1` defaults to the dtype's
machine epsilon) and :math:`d` the clipping threshold:

.. math::
    G &\leftarrow -G \quad\text{if maximize} \\
    \hat\beta_{2,t+1} &= 1 - (t+1)^{\tau}, \qquad \rho_{t+1} = \min\left(\gamma, \tfrac{1}{\sqrt{t+1}}\right),
        \qquad \alpha = \max(\epsilon_2, \mathrm{RMS}(\theta))\,\rho_{t+1} \\
    \theta &\leftarrow \theta(1 - \gamma\lambda) \quad\text{(decoupled weight decay)} \\
    R &\leftarrow \mathrm{lerp}(R, \mathrm{mean}_j G_{ij}^2, (t+1)^{\tau}), \qquad
        C \leftarrow \mathrm{lerp}(C, \mathrm{mean}_i G_{ij}^2, (t+1)^{\tau}) \\
    \hat V_{ij} &= \frac{R_i C_j}{\max(\mathrm{mean}_i R_i, \epsilon_1)}
        \quad\text{(a vector: } \hat V \leftarrow \mathrm{lerp}(\hat V, G^2, (t+1)^{\tau})\text{)} \\
    U &= \frac{G}{\max(\sqrt{\hat V}, \epsilon_1)}, \qquad
        \theta \leftarrow \theta - \frac{\alpha}{\max(1, \mathrm{RMS}(U)/d)}\, U

Everything the next step needs is the state, the gradient (for the update clipping)
and the weights (for :math:`\mathrm{RMS}(\theta)`), so ``next_update`` is exact.

The **effective learning rate** from the state alone is *relative*: the factor on the
gradient per unit of the weights' scale :math:`\max(\epsilon_2, \mathrm{RMS}(\theta))`,
which the state does not record, before update clipping:

.. math::
    \eta_i = \frac{\rho_{t+1}}{\max(\sqrt{\hat V_{t,i}}, \epsilon_1)}

Multiply by :math:`\max(\epsilon_2, \mathrm{RMS}(\theta))` (see :func:`weight_scale`) for
the absolute rate. ``variance`` is the reconstructed :math:`\hat V_t` per coordinate.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, Group, adaptive_first_step, group_has, step_of, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "row_var", "col_var", "variance"})


def eps1_of(group: Group, dtype: torch.dtype) -> float:
    eps1 = group["eps"][0]
    return torch.finfo(dtype).eps if eps1 is None else eps1


def relative_step(*, lr: float, step: float) -> float:
    r""":math:`\rho_k = \min(\gamma, 1/\sqrt{k})`."""
    return min(lr, 1 / (step**0.5))


def weight_scale(weight: torch.Tensor, group: Group) -> float:
    r""":math:`\max(\epsilon_2, \mathrm{RMS}(\theta))`: turns the relative ``eff_lr`` into an absolute one."""
    return max(group["eps"][1], weight.norm(2).item() / (weight.numel() ** 0.5))


def reconstructed_variance(param: ParamState, group: Group) -> torch.Tensor:
    r""":math:`\hat V_t` in the parameter's shape: :math:`R_i C_j / \max(\mathrm{mean}(R), \epsilon_1)`
    (matrices) or ``variance`` (vectors)."""
    if "variance" in param.state:
        return param.read("variance")
    row_var, col_var = param.read("row_var"), param.read("col_var")
    eps1 = eps1_of(group, row_var.dtype)
    return (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp(min=eps1))


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    variance = reconstructed_variance(param, group)
    eps1 = eps1_of(group, variance.dtype)
    rho = relative_step(lr=group["lr"], step=step_of(param) + 1)
    v = variance if variance.dtype == torch.float64 else variance.float()
    return rho / v.sqrt().clamp_(min=eps1)


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    lr, wd, d = group["lr"], group.get("weight_decay", 0.0), group["d"]
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    eps1, eps2 = eps1_of(group, theta.dtype), group["eps"][1]
    step = step_of(param) + 1
    one_minus_beta2 = step ** group["beta2_decay"]
    alpha = max(eps2, theta.norm(2).item() / (theta.numel() ** 0.5)) * relative_step(lr=lr, step=step)
    if wd != 0:
        theta.mul_(1 - lr * wd)
    if g.dim() > 1:
        row_mean = torch.norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1))
        row_var = param.read("row_var").to(theta.dtype).lerp(row_mean, one_minus_beta2)
        col_mean = torch.norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2))
        col_var = param.read("col_var").to(theta.dtype).lerp(col_mean, one_minus_beta2)
        var_estimate = row_var @ col_var
        var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        var_estimate = param.read("variance").to(theta.dtype).lerp(g * g, one_minus_beta2)
    update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
    update.mul_(g)
    denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))
    theta.add_(update, alpha=-alpha / denom)
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    # Unchunked: the factored state is read whole from the parameter.
    return {
        "eff_lr": effective_lr(param, group).reshape(-1),
        "variance": reconstructed_variance(param, group).reshape(-1),
    }


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    step = param.step + 1
    return {
        "factored": "row_var" in param.state,
        "rho_next": relative_step(lr=group["lr"], step=step),
        "beta2_next": 1 - step ** group["beta2_decay"],
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not (state_keys & {"row_var", "variance"} and state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "beta2_decay", "d", "eps"):
        return 5
    return 3 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Adafactor state before the first step: ``step`` 0 and zero factors ``row_var`` (``(..., n, 1)``)
    and ``col_var`` (``(..., 1, m)``), or a zero ``variance`` for a vector."""
    if weight.dim() < 2:
        return {"step": torch.tensor(0.0), **zeros_for(weight, "variance")}
    rows, cols = list(weight.shape), list(weight.shape)
    rows[-1], cols[-2] = 1, 1
    return {"step": torch.tensor(0.0), "row_var": weight.new_zeros(rows), "col_var": weight.new_zeros(cols)}


ADAFACTOR = Family(
    name="adafactor",
    label="Adafactor (torch.optim)",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("factored", "variance_mean", "rho_next", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "beta2_decay", "eps", "d", "weight_decay", "maximize"),
    second_moment="variance",
    chunked=False,
    notes=(
        "Adafactor (torch.optim): eff_lr is relative, per unit of max(eps2, RMS(weights)), which the state "
        "does not record; it is rho_next / max(sqrt(V), eps1), before update clipping.",
    ),
    first_step=adaptive_first_step(initial_state, "-lr * G / max(|G|, eps1), its second moment replaced by G^2"),
)
