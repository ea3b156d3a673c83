r"""RAdam (rectified Adam, with or without decoupled weight decay), as ``torch.optim.RAdam`` computes it.

A checkpoint holds the state after step :math:`t`: :math:`m_t` (``exp_avg``),
:math:`v_t` (``exp_avg_sq``) and :math:`t` (``step``). The length of the approximated
simple moving average, and the rectification factor:

.. math::
    \rho_\infty = \frac{2}{1-\beta_2} - 1, \qquad
    \rho_k = \rho_\infty - \frac{2k\beta_2^k}{1-\beta_2^k}, \qquad
    r_k = \sqrt{\frac{(\rho_k-4)(\rho_k-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_k}}

Step :math:`t+1`, given gradient :math:`g` and weights :math:`\theta`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    \theta &\leftarrow \theta(1-\gamma\lambda) \text{ (decoupled) or } g \leftarrow g + \lambda\theta \\
    m_{t+1} &= \beta_1 m_t + (1-\beta_1) g, \qquad v_{t+1} = \beta_2 v_t + (1-\beta_2) g^2,
        \qquad \hat m = \frac{m_{t+1}}{1-\beta_1^{t+1}} \\
    \theta &\leftarrow \theta - \gamma\,\hat m \cdot r_{t+1}\frac{\sqrt{1-\beta_2^{t+1}}}{\sqrt{v_{t+1}}+\epsilon}
        \quad\text{if } \rho_{t+1} > 5 \\
    \theta &\leftarrow \theta - \gamma\,\hat m \quad\text{otherwise (SGD with momentum, no adaptivity)}

:math:`\epsilon` is added to the *uncorrected* :math:`\sqrt{v}` (unlike Adam). With
:math:`\beta_2 = 0.999`, rectification switches on at step 6.

The **effective learning rate** of coordinate :math:`i` is the factor on
:math:`\hat m`, with the next step's rectification and the saved second moment:

.. math::
    \eta_i = \gamma\, r_{t+1} \frac{\sqrt{1-\beta_2^{t}}}{\sqrt{v_{t,i}} + \epsilon}
        \quad\text{if } \rho_{t+1} > 5, \qquad \eta_i = \gamma \text{ otherwise.}
"""

from __future__ import annotations

from typing import Mapping, cast

import torch

from ostate.optimizers.adam import adam_snr, moment_estimates
from ostate.optimizers.family import (
    Family,
    Group,
    Moments,
    Preconditioned,
    StateLayout,
    fresh_zeros,
    group_has,
    plain_preconditioned,
    step_of,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
# torch switches rectification on when rho_t exceeds this.
RHO_THRESHOLD = 5.0


def rectification(step: float, beta2: float) -> tuple[float, float | None]:
    r"""``(rho_k, r_k)`` at step :math:`k`; ``r_k`` is None where rectification is off (:math:`\rho_k \le 5`).

    Example:
        >>> rho, r = rectification(6, 0.999)
        >>> round(rho, 3), r is not None
        (5.994, True)
        >>> rectification(5, 0.999)[1] is None
        True
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    if rho <= RHO_THRESHOLD:
        return rho, None
    return rho, ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5


def radam_effective_lr(
    exp_avg_sq: torch.Tensor, *, lr: float, beta2: float, eps: float, step: float
) -> torch.Tensor | float:
    """The per-coordinate factor on the bias-corrected first moment (a float where it is lr everywhere)."""
    _rho, rect = rectification(step + 1, beta2)
    if rect is None:
        return float(lr)
    v = exp_avg_sq if exp_avg_sq.dtype == torch.float64 else exp_avg_sq.float()
    return (lr * rect * (1 - beta2**step) ** 0.5) / (v.sqrt() + eps)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    v = param.read("exp_avg_sq")
    eta = radam_effective_lr(v, lr=group["lr"], beta2=group["betas"][1], eps=group["eps"], step=step_of(param))
    return torch.full(v.shape, eta, dtype=torch.float32) if isinstance(eta, float) else eta


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    step = step_of(param) + 1
    if wd != 0:
        if group.get("decoupled_weight_decay", False):
            theta.mul_(1 - lr * wd)
        else:
            g = g.add(theta, alpha=wd)
    exp_avg = param.read("exp_avg").to(theta.dtype).lerp(g, 1 - beta1)
    exp_avg_sq = param.read("exp_avg_sq").to(theta.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bias_corrected_exp_avg = exp_avg / bias_correction1
    _rho, rect = rectification(step, beta2)
    if rect is not None:
        adaptive_lr = (bias_correction2**0.5) / exp_avg_sq.sqrt().add_(eps)
        theta.add_(bias_corrected_exp_avg * lr * adaptive_lr * rect, alpha=-1.0)
    else:
        theta.add_(bias_corrected_exp_avg * lr, alpha=-1.0)
    return theta - weight


def radam_momentum_update(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
) -> torch.Tensor:
    """The next step's change with a zero gradient and no weight decay (m -> beta1 m, v -> beta2 v)."""
    t = step + 1
    m_hat = exp_avg.float() * (beta1 / (1 - beta1**t))
    _rho, rect = rectification(t, beta2)
    if rect is None:
        return m_hat.mul_(-lr)
    return m_hat.div_((exp_avg_sq.float() * beta2).sqrt_().add_(eps)).mul_(-lr * rect * (1 - beta2**t) ** 0.5)


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"]
    step = step_of(param)
    kwargs = dict(lr=group["lr"], beta2=beta2, eps=group["eps"], step=step)
    return {
        "eff_lr": radam_effective_lr(chunk["exp_avg_sq"], **kwargs),
        "exp_avg_abs": chunk["exp_avg"].abs(),
        "exp_avg_sq": chunk["exp_avg_sq"],
        "snr": adam_snr(chunk["exp_avg"], chunk["exp_avg_sq"], beta1=beta1, beta2=beta2, step=step),
        "update": radam_momentum_update(chunk["exp_avg"], chunk["exp_avg_sq"], beta1=beta1, **kwargs),
    }


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r"""The rectified update :math:`\hat m\,r\sqrt{1-\beta_2^t}/(\sqrt{v}+\epsilon)`: :math:`\epsilon` on the
    *uncorrected* :math:`\sqrt v` (before rectification switches on, :math:`v` and :math:`\epsilon` are unused)."""
    return plain_preconditioned(chunk["exp_avg"], chunk["exp_avg_sq"], group["eps"])


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    beta1, beta2 = group["betas"]
    rho, rect = rectification(param.step + 1, beta2)
    return {
        "rho": rho,
        "rectified": rect is not None,
        "rect_factor": rect if rect is not None else float("nan"),
        "bias_correction1": 1 - beta1**param.step,
        "bias_correction2": 1 - beta2**param.step,
    }


def eps_root(group: Group, step: float) -> float:
    r""":math:`\epsilon/\sqrt{1-\beta_2^t}`: RAdam adds :math:`\epsilon` to the uncorrected :math:`\sqrt v`."""
    bias_correction2 = 1 - group["betas"][1] ** step
    return float(group["eps"]) / bias_correction2**0.5 if bias_correction2 > 0 else float("nan")


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"exp_avg", "exp_avg_sq"} <= state_keys <= _STATE_KEYS):
        return 0
    # RAdam's groups have weight_decay but neither Adam's amsgrad nor NAdam's momentum_decay.
    if not group_has(group, "betas", "eps", "weight_decay") or "amsgrad" in group or "momentum_decay" in group:
        return 0
    # torch's groups carry its implementation flags; schedule-free's and bitsandbytes' groups do not.
    if not any(key in group for key in ("foreach", "differentiable", "capturable")) or "k" in group:
        return 0
    # Older torch releases had no decoupled_weight_decay key: RAdam is then a weaker reading.
    return 4 if "decoupled_weight_decay" in group else 2


RADAM = Family(
    name="radam",
    label="RAdam",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=(
        "exp_avg_abs_mean",
        "exp_avg_sq_mean",
        "rectified",
        "rect_factor",
        "eff_lr_min",
        "eff_lr_p50",
        "eff_lr_max",
    ),
    hyperparameters=("lr", "initial_lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize"),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    moments=Moments(
        estimates=moment_estimates,
        betas=lambda group: cast("tuple[float, float]", tuple(map(float, group["betas"][:2]))),
        eps_root=eps_root,
    ),
    preconditioned=preconditioned,
    layout=StateLayout(
        first_moment=("exp_avg",),
        second_moment=("exp_avg_sq",),
        counter=("step",),
        fresh={"exp_avg": fresh_zeros, "exp_avg_sq": fresh_zeros, "step": fresh_zeros},
    ),
    notes=(
        "RAdam: rho, rectified and rect_factor are those of the next step (t+1); while not rectified "
        "the step is lr times the bias-corrected momentum, with no adaptivity.",
    ),
)
