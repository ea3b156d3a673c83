r"""NAdam (and NAdamW), as ``torch.optim.NAdam`` computes it.

A checkpoint holds the state after step :math:`t`: :math:`m_t` (``exp_avg``),
:math:`v_t` (``exp_avg_sq``), :math:`t` (``step``) and the product of the momentum
schedule :math:`\mu^{prod}_t = \prod_{k \le t} \mu_k` (``mu_product``). The momentum
schedule, with :math:`\psi` = ``momentum_decay`` (default 0.004):

.. math::
    \mu_k = \beta_1 \left(1 - \tfrac12 \cdot 0.96^{k\psi}\right)

Step :math:`t+1`, given gradient :math:`g` and weights :math:`\theta`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    \theta &\leftarrow \theta(1-\gamma\lambda) \text{ (decoupled) or } g \leftarrow g + \lambda\theta \\
    \mu^{prod}_{t+1} &= \mu^{prod}_t \, \mu_{t+1} \\
    m_{t+1} &= \beta_1 m_t + (1-\beta_1) g, \qquad v_{t+1} = \beta_2 v_t + (1-\beta_2) g^2 \\
    d &= \sqrt{v_{t+1}/(1-\beta_2^{t+1})} + \epsilon \\
    \theta &\leftarrow \theta - \gamma\frac{1-\mu_{t+1}}{1-\mu^{prod}_{t+1}}\cdot\frac{g}{d}
        - \gamma\frac{\mu_{t+2}}{1-\mu^{prod}_{t+1}\mu_{t+2}}\cdot\frac{m_{t+1}}{d}

The **effective learning rate** of coordinate :math:`i` is the factor shared by both
terms, read from the saved state (:math:`\epsilon` outside the square root, as in Adam):

.. math::
    \eta_i = \frac{\gamma}{\sqrt{v_{t,i}/(1-\beta_2^{t})} + \epsilon}

The momentum schedule enters through the two coefficients, reported per parameter for
the next step: ``grad_coef`` :math:`(1-\mu_{t+1})/(1-\mu^{prod}_{t+1})` and
``momentum_coef`` :math:`\mu_{t+2}/(1-\mu^{prod}_{t+1}\mu_{t+2})`. :math:`\mu_t` rises
slowly (about 0.45 at the start, 0.855 only after about 14,000 steps with the defaults).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Mapping

import torch

from ostate.optimizers.adam import ADAM_MOMENTS, adam_effective_lr, adam_snr, bias_corrected_preconditioned
from ostate.optimizers.family import (
    Family,
    Group,
    Preconditioned,
    StateLayout,
    adaptive_first_step,
    fresh_ones,
    fresh_zeros,
    group_has,
    scalar_of,
    step_of,
    zeros_for,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "mu_product"})


def momentum_at(step: float, *, beta1: float, momentum_decay: float) -> float:
    r""":math:`\mu_k = \beta_1(1 - \frac12 0.96^{k\psi})`."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


@lru_cache(maxsize=64)  # the same for every parameter of a group
def expected_mu_product(step: int, *, beta1: float, momentum_decay: float) -> float:
    r""":math:`\prod_{k=1}^{t}\mu_k`, what ``mu_product`` holds after :math:`t` untouched steps."""
    if step <= 0:
        return 1.0
    log_sum = 0.0
    for start in range(1, step + 1, 1 << 20):
        k = torch.arange(start, min(step, start + (1 << 20) - 1) + 1, dtype=torch.float64)
        log_sum += float(torch.log(beta1 * (1.0 - 0.5 * torch.pow(0.96, k * momentum_decay))).sum())
    return math.exp(log_sum)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return adam_effective_lr(
        param.read("exp_avg_sq"), lr=group["lr"], beta2=group["betas"][1], eps=group["eps"], step=step_of(param)
    )


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in the weight's dtype and torch's order."""
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    psi = group.get("momentum_decay", 4e-3)
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    step = step_of(param) + 1
    bias_correction2 = 1 - beta2**step
    if wd != 0:
        if group.get("decoupled_weight_decay", False):
            theta.mul_(1 - lr * wd)
        else:
            g = g.add(theta, alpha=wd)
    mu = momentum_at(step, beta1=beta1, momentum_decay=psi)
    mu_next = momentum_at(step + 1, beta1=beta1, momentum_decay=psi)
    # torch keeps mu_product as a tensor (float32 by default) and multiplies in place.
    mu_product = param.read("mu_product").clone().mul_(mu).item()
    exp_avg = param.read("exp_avg").to(theta.dtype).lerp(g, 1 - beta1)
    exp_avg_sq = param.read("exp_avg_sq").to(theta.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
    theta.addcdiv_(g, denom, value=-lr * (1.0 - mu) / (1.0 - mu_product))
    theta.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product * mu_next))
    return theta - weight


def next_coefficients(param: ParamState, group: Group) -> tuple[float, float, float, float]:
    r"""``(mu_{t+1}, mu_{t+2}, grad_coef, momentum_coef)`` of the next step."""
    beta1 = group["betas"][0]
    psi = group.get("momentum_decay", 4e-3)
    step = step_of(param) + 1
    mu = momentum_at(step, beta1=beta1, momentum_decay=psi)
    mu_next = momentum_at(step + 1, beta1=beta1, momentum_decay=psi)
    mu_product = scalar_of(param, "mu_product") * mu
    return mu, mu_next, (1 - mu) / (1 - mu_product), mu_next / (1 - mu_product * mu_next)


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"]
    eps, lr = group["eps"], group["lr"]
    step = step_of(param)
    _mu, _mu_next, _grad_coef, momentum_coef = next_coefficients(param, group)
    # With a zero gradient only the momentum term moves the weights: m -> beta1 m, v -> beta2 v.
    denom = (chunk["exp_avg_sq"].float() * beta2).div_(1 - beta2 ** (step + 1)).sqrt_().add_(eps)
    return {
        "eff_lr": adam_effective_lr(chunk["exp_avg_sq"], lr=lr, beta2=beta2, eps=eps, step=step),
        "exp_avg_abs": chunk["exp_avg"].abs(),
        "exp_avg_sq": chunk["exp_avg_sq"],
        "snr": adam_snr(chunk["exp_avg"], chunk["exp_avg_sq"], beta1=beta1, beta2=beta2, step=step),
        "update": (chunk["exp_avg"].float() * beta1).div_(denom).mul_(-lr * momentum_coef),
    }


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r"""Both terms of the update share Adam's :math:`1/(\sqrt{\hat v}+\epsilon)`; the saved part's numerator is :math:`m`."""
    return bias_corrected_preconditioned(chunk["exp_avg"], chunk["exp_avg_sq"], group, step_of(param), q["eff_lr"])


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None or "mu_product" not in param.state:
        return {}
    beta1, beta2 = group["betas"]
    psi = group.get("momentum_decay", 4e-3)
    mu, mu_next, grad_coef, momentum_coef = next_coefficients(param, group)
    mu_product = scalar_of(param, "mu_product")
    expected = expected_mu_product(int(param.step), beta1=beta1, momentum_decay=psi)
    return {
        "mu_t": momentum_at(param.step, beta1=beta1, momentum_decay=psi) if param.step > 0 else float("nan"),
        "mu_next": mu,
        "mu_product": mu_product,
        # False when step and mu_product disagree (e.g. step was reset without mu_product).
        "mu_product_consistent": math.isclose(mu_product, expected, rel_tol=1e-3, abs_tol=1e-30),
        "grad_coef": grad_coef,
        "momentum_coef": momentum_coef,
        "bias_correction2": 1 - beta2**param.step,
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("mu_product" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "betas", "eps", "momentum_decay"):
        return 5
    return 3 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's NAdam state before the first step: ``step`` 0, ``mu_product`` 1, zero moments."""
    return {"step": torch.tensor(0.0), "mu_product": torch.tensor(1.0), **zeros_for(weight, "exp_avg", "exp_avg_sq")}


NADAM = Family(
    name="nadam",
    label="NAdam",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=(
        "exp_avg_abs_mean",
        "exp_avg_sq_mean",
        "mu_next",
        "momentum_coef",
        "eff_lr_min",
        "eff_lr_p50",
        "eff_lr_max",
    ),
    hyperparameters=(
        "lr",
        "initial_lr",
        "betas",
        "eps",
        "weight_decay",
        "momentum_decay",
        "decoupled_weight_decay",
        "maximize",
    ),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    moments=ADAM_MOMENTS,  # the same averages as Adam; eps is added to sqrt(v_hat)
    preconditioned=preconditioned,
    layout=StateLayout(
        first_moment=("exp_avg",),
        second_moment=("exp_avg_sq",),
        counter=("step", "mu_product"),
        fresh={"exp_avg": fresh_zeros, "exp_avg_sq": fresh_zeros, "step": fresh_zeros, "mu_product": fresh_ones},
        v_bias_corrected=True,
    ),
    notes=("NAdam: step and mu_product must be reset together; mu_product_consistent says whether they agree.",),
    first_step=adaptive_first_step(initial_state, "-lr * g / (|g| + eps) with Nesterov momentum"),
)
