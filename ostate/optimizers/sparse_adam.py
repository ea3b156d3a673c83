r"""SparseAdam, as ``torch.optim.SparseAdam`` computes it (Adam masked to a sparse gradient's entries).

A checkpoint holds the state after :math:`t` steps: :math:`m_t` (``exp_avg``),
:math:`v_t` (``exp_avg_sq``) and :math:`t` (``step``, a Python int counting the calls
to ``step()`` that had a gradient, not how often each row was touched). Step
:math:`t+1`, given a sparse gradient :math:`g` with entries :math:`S` and weights
:math:`\theta`, changes only the coordinates :math:`i \in S`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    m_i &\leftarrow m_i + (1-\beta_1)(g_i - m_i), \qquad v_i \leftarrow v_i + (1-\beta_2)(g_i^2 - v_i) \\
    \theta_i &\leftarrow \theta_i - \gamma\frac{\sqrt{1-\beta_2^{t+1}}}{1-\beta_1^{t+1}}
        \cdot \frac{m_i}{\sqrt{v_i} + \epsilon}

There is no weight decay, and :math:`\epsilon` is added to the *uncorrected*
:math:`\sqrt{v}`. The **effective learning rate** of coordinate :math:`i` is the factor
on the bias-corrected first moment :math:`\hat m = m/(1-\beta_1^t)`:

.. math::
    \eta_i = \gamma\frac{\sqrt{1-\beta_2^{t}}}{\sqrt{v_{t,i}} + \epsilon}

A coordinate no gradient ever touched has :math:`v_i = 0` and so
:math:`\eta_i = \gamma\sqrt{1-\beta_2^t}/\epsilon`; with a zero gradient nothing moves,
so no ``update`` quantity is given.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.adam import adam_snr
from ostate.optimizers.family import (
    Family,
    Group,
    Preconditioned,
    adaptive_first_step,
    group_has,
    plain_preconditioned,
    step_of,
    zeros_for,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})


def sparse_like(grad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A sparse tensor with ``grad``'s (coalesced) indices and size, holding ``values``."""
    # The indices come from a coalesced gradient, valid by construction.
    return torch.sparse_coo_tensor(grad._indices(), values, grad.size(), check_invariants=False)


def sparse_adam_effective_lr(exp_avg_sq: torch.Tensor, *, lr: float, beta2: float, eps: float, step: float):
    r""":math:`\gamma\sqrt{1-\beta_2^t} / (\sqrt{v} + \epsilon)`, elementwise."""
    v = exp_avg_sq if exp_avg_sq.dtype == torch.float64 else exp_avg_sq.float()
    return (lr * (1 - beta2**step) ** 0.5) / (v.sqrt() + eps)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return sparse_adam_effective_lr(
        param.read("exp_avg_sq"), lr=group["lr"], beta2=group["betas"][1], eps=group["eps"], step=step_of(param)
    )


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes; ``grad`` must be sparse, as torch requires."""
    if not grad.is_sparse:
        raise OstateError(
            "SparseAdam's next step needs the sparse gradient",
            hint="pass the gradient as the model produced it (e.g. nn.Embedding(sparse=True)); torch's SparseAdam "
            "refuses dense gradients too",
        )
    lr, eps = group["lr"], group["eps"]
    beta1, beta2 = group["betas"]
    theta = weight.detach().clone()
    g = (-grad if group.get("maximize", False) else grad).coalesce()
    values = g._values()
    if values.numel() == 0:
        return torch.zeros_like(theta)
    exp_avg = param.read("exp_avg").to(theta.dtype)
    exp_avg_sq = param.read("exp_avg_sq").to(theta.dtype)
    old_exp_avg = exp_avg.sparse_mask(g)._values()
    exp_avg_update = values.sub(old_exp_avg).mul_(1 - beta1)
    old_exp_avg_sq = exp_avg_sq.sparse_mask(g)._values()
    exp_avg_sq_update = values.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
    numer = exp_avg_update.add_(old_exp_avg)
    denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(eps)
    step = int(step_of(param)) + 1
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    theta.add_(sparse_like(g, -step_size * numer.div_(denom)))
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"]
    step = step_of(param)
    return {
        "eff_lr": sparse_adam_effective_lr(
            chunk["exp_avg_sq"], lr=group["lr"], beta2=beta2, eps=group["eps"], step=step
        ),
        "exp_avg_abs": chunk["exp_avg"].abs(),
        "exp_avg_sq": chunk["exp_avg_sq"],
        "snr": adam_snr(chunk["exp_avg"], chunk["exp_avg_sq"], beta1=beta1, beta2=beta2, step=step),
    }


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r""":math:`m / (\sqrt{v} + \epsilon)`: :math:`\epsilon` on the *uncorrected* :math:`\sqrt v`."""
    return plain_preconditioned(chunk["exp_avg"], chunk["exp_avg_sq"], group["eps"])


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    beta1, beta2 = group["betas"]
    v = param.read("exp_avg_sq")
    return {
        "bias_correction1": 1 - beta1**param.step,
        "bias_correction2": 1 - beta2**param.step,
        # Rows of an embedding that no gradient has touched yet.
        "untouched_fraction": float((v == 0).float().mean()) if v.numel() else float("nan"),
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"exp_avg", "exp_avg_sq"} <= state_keys <= _STATE_KEYS):
        return 0
    # SparseAdam's groups are lr, betas, eps, maximize: no weight decay at all.
    if group_has(group, "betas", "eps") and "weight_decay" not in group and "k" not in group:
        return 5
    return 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's SparseAdam state before the first step: ``step`` 0, zero moments."""
    return {"step": 0, **zeros_for(weight, "exp_avg", "exp_avg_sq")}


SPARSE_ADAM = Family(
    name="sparse_adam",
    label="SparseAdam",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("exp_avg_abs_mean", "exp_avg_sq_mean", "untouched_fraction", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "betas", "eps", "maximize"),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    preconditioned=preconditioned,
    notes=(
        "SparseAdam: step counts calls with a gradient, not how often each row was touched; "
        "a zero gradient moves nothing, so there is no update column.",
    ),
    first_step=adaptive_first_step(initial_state, "-lr * g / (|g| + eps) on the rows of the gradient"),
)
