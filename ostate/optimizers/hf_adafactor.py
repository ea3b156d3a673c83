r"""Adafactor as ``transformers.optimization.Adafactor`` computes it (the fairseq algorithm).

A checkpoint holds, after step :math:`t` (``step``, a Python int): for a parameter of
two or more dimensions the row and column averages of the squared gradient,
:math:`R_t` (``exp_avg_sq_row``, shape ``shape[:-1]``) and :math:`C_t`
(``exp_avg_sq_col``, shape ``shape[:-2] + shape[-1:]``); for a vector the full
second moment :math:`V_t` (``exp_avg_sq``); with ``beta1`` set, :math:`m_t`
(``exp_avg``); and ``RMS``, the root mean square of the weights *before* step
:math:`t`. Step :math:`t+1`, given gradient :math:`G` and weights :math:`\theta`, with
:math:`(\epsilon_1, \epsilon_2)` = ``eps``, :math:`c` = ``decay_rate`` and :math:`d` =
``clip_threshold``:

.. math::
    \rho_{t+1} &= \min\left(10^{-6}(t+1) \text{ if warmup\_init else } 10^{-2},
        \tfrac{1}{\sqrt{t+1}}\right) \text{ if relative\_step, else } \gamma \\
    \gamma_{t+1} &= \rho_{t+1} \cdot \max(\epsilon_2, \mathrm{RMS}(\theta)) \text{ if scale\_parameter,
        else } \rho_{t+1} \\
    \hat\beta_2 &= 1 - (t+1)^{c} \\
    R &\leftarrow \hat\beta_2 R + (1-\hat\beta_2)\,\mathrm{mean}_j(G^2+\epsilon_1), \qquad
        C \leftarrow \hat\beta_2 C + (1-\hat\beta_2)\,\mathrm{mean}_i(G^2+\epsilon_1) \\
    \hat V_{ij} &= \frac{R_i C_j}{\mathrm{mean}_i R_i} \quad\text{(a vector: }
        V \leftarrow \hat\beta_2 V + (1-\hat\beta_2)(G^2 + \epsilon_1)\text{)} \\
    U &= \frac{G}{\sqrt{\hat V}}, \qquad U \leftarrow \gamma_{t+1}\frac{U}{\max(1, \mathrm{RMS}(U)/d)} \\
    m &\leftarrow \beta_1 m + (1-\beta_1) U, \quad U \leftarrow m \quad\text{(with beta1: an EMA of scaled updates)} \\
    \theta &\leftarrow \theta - \lambda\gamma_{t+1}\theta - U

The next step needs the state, the gradient (clipping) and the weights (RMS), so
``next_update`` is exact. The **effective learning rate** of coordinate :math:`i` is
the factor on the gradient before clipping (and before momentum), with the next
step's :math:`\rho_{t+1}` and the saved ``RMS`` for the weights' scale (one step old):

.. math::
    \eta_i = \frac{\gamma_{t+1}}{\sqrt{\hat V_{t,i}}}

``exp_avg_sq`` is the reconstructed :math:`\hat V_t` per coordinate.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ostate.optimizers.family import Family, Group, adaptive_first_step, group_has, scalar_of, step_of
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "RMS"})
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def relative_step_size(group: Group, step: float) -> float:
    r""":math:`\rho_k`: the group's ``lr``, or the relative step schedule when ``relative_step``."""
    if group.get("relative_step", False):
        min_step = 1e-6 * step if group.get("warmup_init", False) else 1e-2
        return min(min_step, 1.0 / math.sqrt(step))
    return group["lr"]


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def next_lr(param: ParamState, group: Group) -> float:
    r""":math:`\gamma_{t+1}` with the saved ``RMS`` (the weights' scale before step :math:`t`)."""
    rho = relative_step_size(group, step_of(param) + 1)
    if group.get("scale_parameter", False):
        return rho * max(group["eps"][1], scalar_of(param, "RMS"))
    return rho


def reconstructed_second_moment(param: ParamState) -> torch.Tensor:
    r""":math:`\hat V_t` with the parameter's shape: :math:`R_i C_j / \mathrm{mean}(R)`, or ``exp_avg_sq``."""
    if "exp_avg_sq" in param.state:
        return param.read("exp_avg_sq")
    row, col = param.read("exp_avg_sq_row"), param.read("exp_avg_sq_col")
    return (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    v = reconstructed_second_moment(param)
    v = v if v.dtype == torch.float64 else v.float()
    return next_lr(param, group) / v.sqrt()


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in transformers' order of operations."""
    g = grad.float() if grad.dtype in _LOW_PRECISION else grad
    p32 = weight.detach().float() if weight.dtype in _LOW_PRECISION else weight.detach().clone()
    step = step_of(param) + 1
    rms = _rms(p32)
    lr = relative_step_size(group, step)
    if group.get("scale_parameter", False):
        lr = max(group["eps"][1], rms) * lr  # a 0-d tensor where RMS wins, as in transformers
    beta2t = 1.0 - math.pow(step, group["decay_rate"])
    update = (g**2) + group["eps"][0]
    if g.dim() >= 2:
        row = param.read("exp_avg_sq_row").to(g).mul(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col = param.read("exp_avg_sq_col").to(g).mul(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        update = torch.mul(r_factor, c_factor)
        update.mul_(g)
    else:
        exp_avg_sq = param.read("exp_avg_sq").to(g).mul(beta2t).add_(update, alpha=1.0 - beta2t)
        update = exp_avg_sq.rsqrt().mul_(g)
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)
    beta1 = group.get("beta1")
    if beta1 is not None:
        update = param.read("exp_avg").to(g).mul(beta1).add_(update, alpha=1 - beta1)
    if group.get("weight_decay", 0.0) != 0:
        p32.add_(p32, alpha=(-group["weight_decay"] * lr))
    p32.add_(-update)
    return p32.to(weight.dtype) - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    # Unchunked: the factored state is read whole from the parameter.
    q = {
        "eff_lr": effective_lr(param, group).reshape(-1),
        "exp_avg_sq": reconstructed_second_moment(param).reshape(-1),
    }
    beta1 = group.get("beta1")
    if beta1 is not None and "exp_avg" in param.state:
        exp_avg = param.read("exp_avg").reshape(-1)
        q["exp_avg_abs"] = exp_avg.abs()
        # A zero gradient gives a zero scaled update, so the step is the decayed EMA: -beta1 * m.
        q["update"] = exp_avg.float() * -beta1
    return q


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    step = param.step + 1
    return {
        "factored": "exp_avg_sq_row" in param.state,
        "rel_step": relative_step_size(group, step),
        "param_scale": max(group["eps"][1], scalar_of(param, "RMS")) if group.get("scale_parameter") else 1.0,
        "next_lr": next_lr(param, group),
        "beta2_next": 1.0 - math.pow(step, group["decay_rate"]),
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("RMS" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    if group_has(group, "clip_threshold", "decay_rate", "relative_step", "scale_parameter"):
        return 5
    return 3 if state_keys else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """transformers' Adafactor state before the first step: ``step`` 0, ``RMS`` 0, zero ``exp_avg`` (with
    ``beta1``), and zero ``exp_avg_sq_row``/``exp_avg_sq_col`` (two or more dimensions) or ``exp_avg_sq``."""
    shape = tuple(weight.shape)
    dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
    state: dict = {"step": 0, "RMS": 0}
    if group.get("beta1") is not None:
        state["exp_avg"] = torch.zeros(shape, dtype=dtype)
    if len(shape) >= 2:
        state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=dtype)
        state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype)
    else:
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype)
    return state


HF_ADAFACTOR = Family(
    name="hf_adafactor",
    label="Adafactor (transformers)",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("factored", "exp_avg_sq_mean", "next_lr", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=(
        "lr",
        "initial_lr",
        "relative_step",
        "scale_parameter",
        "warmup_init",
        "eps",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
    ),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    chunked=False,
    notes=(
        "Adafactor (transformers): with relative_step the group's lr is ignored; eff_lr uses the next "
        "step's relative step size times max(eps2, saved RMS of the weights), before update clipping.",
    ),
    first_step=adaptive_first_step(initial_state, "-lr * G / sqrt(G^2 + eps1), clipped to RMS 1"),
)
