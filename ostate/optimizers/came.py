r"""CAME (``came_pytorch.CAME``, came-pytorch 0.1): Adafactor's factored second moment with a confidence-guided step.

**State** (source: ``came_pytorch/CAME.py``), per parameter: ``step``, ``exp_avg``
(:math:`m`, an EMA of *normalised updates*), ``RMS`` (of the weights, stored but not
used by the update) and, for a matrix, four factored statistics: ``exp_avg_sq_row`` and
``exp_avg_sq_col`` (:math:`R, C`: row and column means of the EMA of :math:`g^2+\epsilon_1`)
and ``exp_avg_res_row`` and ``exp_avg_res_col`` (:math:`R', C'`: the same for the
*instability* :math:`(u-m)^2+\epsilon_2`, how far each normalised update is from its
momentum); a vector keeps ``exp_avg_sq`` whole and has no instability. Groups: ``lr``,
``betas`` :math:`(\beta_1,\beta_2,\beta_3)`, ``eps`` :math:`(\epsilon_1,\epsilon_2)`,
``clip_threshold`` :math:`d`, ``weight_decay``. With
:math:`\mathrm{rec}(R, C)_{ij} = R_i C_j/\mathrm{mean}(R)`, step :math:`t+1`:

.. math::
    R &\leftarrow \beta_2 R + (1-\beta_2)\,\mathrm{mean}_j(g^2+\epsilon_1), \quad
        C \leftarrow \beta_2 C + (1-\beta_2)\,\mathrm{mean}_i(g^2+\epsilon_1), \quad
        \hat V = \mathrm{rec}(R, C) \\
    u &= \frac{g}{\sqrt{\hat V}}, \qquad u \leftarrow \frac{u}{\max(1, \mathrm{RMS}(u)/d)}, \qquad
        m \leftarrow \beta_1 m + (1-\beta_1) u \\
    r &= (u-m)^2 + \epsilon_2, \quad R' \leftarrow \beta_3 R' + (1-\beta_3)\,\mathrm{mean}_j r, \quad
        C' \leftarrow \beta_3 C' + (1-\beta_3)\,\mathrm{mean}_i r, \quad \hat S = \mathrm{rec}(R', C') \\
    \theta &\leftarrow \theta - \gamma\lambda\theta, \qquad
        \theta \leftarrow \theta - \gamma\,\frac{m}{\sqrt{\hat S}} \quad (\text{a vector: } \theta - \gamma m)

The **effective learning rate** is the factor on a first moment in gradient units, with
the saved statistics, before clipping:
:math:`\eta_{ij} = \gamma/(\sqrt{\hat V_{ij}}\sqrt{\hat S_{ij}})` (a vector:
:math:`\gamma/\sqrt{V_i}`). ``exp_avg_sq`` is :math:`\hat V`, ``instability`` is
:math:`\hat S` (large: the updates disagree with their momentum, and CAME's step is
small). ``next_update`` is exact; the ``update`` quantity (zero gradient) too.

**First step** of a parameter without state: came-pytorch creates ``step`` 0, ``RMS`` 0
and zero ``exp_avg`` and statistics (factored for a matrix), so the first step is the
update above from zeros, exactly predicted by ``next_update``. It divides by the first
gradient (:math:`u = g/\sqrt{(1-\beta_2)(g^2+\epsilon_1)}` factored, clipped to RMS
:math:`d`), so its effective learning rate is refused.

**Strategies**: ``reset-m`` (``exp_avg``), ``reset-v`` (the second-moment and
instability factors); the step count does not enter the update, so ``reset-step`` and
``keep-v`` are refused.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.optimizers.family import Family, Group, StateLayout, adaptive_first_step, fresh_zeros, group_has, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset(
    {"step", "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col", "RMS"}
)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reconstructed(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    r""":math:`R_i C_j / \mathrm{mean}(R)` (the product of the inverse square roots CAME takes, inverted)."""
    return (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)


def _approx_rsqrt(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """CAME's ``_approx_sq_grad``: :math:`1/\\sqrt{\\mathrm{rec}(R, C)}`, in its order of operations."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return torch.mul(r_factor, col.unsqueeze(-2).rsqrt())


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _factored(param: ParamState) -> bool:
    return "exp_avg_sq_row" in param.state


def second_moment(param: ParamState) -> torch.Tensor:
    r""":math:`\hat V` with the parameter's shape (float32)."""
    if _factored(param):
        return _reconstructed(param.read("exp_avg_sq_row").float(), param.read("exp_avg_sq_col").float())
    return param.read("exp_avg_sq").float()


def instability(param: ParamState) -> torch.Tensor | None:
    r""":math:`\hat S` with the parameter's shape (float32), or None for a vector."""
    if not _factored(param):
        return None
    return _reconstructed(param.read("exp_avg_res_row").float(), param.read("exp_avg_res_col").float())


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    denominator = second_moment(param).sqrt()
    s = instability(param)
    if s is not None:
        denominator.mul_(s.sqrt())
    return denominator.reciprocal_().mul_(group["lr"])


def _step(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor, decay: bool) -> torch.Tensor:
    beta1, beta2, beta3 = group["betas"]
    eps1, eps2 = group["eps"]
    g = grad.float() if grad.dtype in _LOW_PRECISION else grad
    p = weight.detach().clone()
    update = (g**2) + eps1
    if _factored(param):
        row = param.read("exp_avg_sq_row").to(g).mul(beta2).add_(update.mean(dim=-1), alpha=1.0 - beta2)
        col = param.read("exp_avg_sq_col").to(g).mul(beta2).add_(update.mean(dim=-2), alpha=1.0 - beta2)
        update = _approx_rsqrt(row, col)
        update.mul_(g)
    else:
        exp_avg_sq = param.read("exp_avg_sq").to(g).mul(beta2).add_(update, alpha=1.0 - beta2)
        update = exp_avg_sq.rsqrt().mul_(g)
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    exp_avg = param.read("exp_avg").to(g).mul(beta1).add_(update, alpha=1 - beta1)
    if _factored(param):
        res = (update - exp_avg) ** 2 + eps2
        res_row = param.read("exp_avg_res_row").to(g).mul(beta3).add_(res.mean(dim=-1), alpha=1.0 - beta3)
        res_col = param.read("exp_avg_res_col").to(g).mul(beta3).add_(res.mean(dim=-2), alpha=1.0 - beta3)
        update = _approx_rsqrt(res_row, res_col).mul_(exp_avg)
    else:
        update = exp_avg.clone()
    if decay and group["weight_decay"] != 0:
        p.add_(p, alpha=-group["weight_decay"] * group["lr"])
    update.mul_(group["lr"])
    p.add_(-update.to(p.dtype))
    return p


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAME's next change of ``weight``, in its order of operations."""
    return _step(param, group, grad, weight, decay=True) - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    # Unchunked: the factored statistics are read whole.
    m = param.read("exp_avg").float()
    zeros = torch.zeros_like(m)
    q = {
        "eff_lr": effective_lr(param, group).reshape(-1),
        "exp_avg_abs": m.abs().reshape(-1),
        "exp_avg_sq": second_moment(param).reshape(-1),
        "update": _step(param, group, zeros, zeros, decay=False).reshape(-1),
    }
    s = instability(param)
    if s is not None:
        q["instability"] = s.reshape(-1)
    return q


def columns(param: ParamState, group: Group) -> dict:
    return {"factored": _factored(param)} if "exp_avg" in param.state else {}


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"exp_avg", "RMS"} <= state_keys <= _STATE_KEYS):
        return 0
    betas, eps = group.get("betas"), group.get("eps")
    if not (group_has(group, "lr", "clip_threshold", "weight_decay") and isinstance(betas, (list, tuple))):
        return 0
    return 6 if len(betas) == 3 and isinstance(eps, (list, tuple)) and len(eps) == 2 else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """came-pytorch's state before the first step: ``step`` 0, ``RMS`` 0, zero ``exp_avg`` and, for a matrix (two
    or more dimensions), zero row and column factors of the second moment and the instability (else a zero
    ``exp_avg_sq``), in the gradient's dtype (float32 for a half-precision parameter)."""
    like = weight.float() if weight.dtype in _LOW_PRECISION else weight
    state: dict = {"step": 0, "RMS": 0, **zeros_for(like, "exp_avg")}
    if like.dim() < 2:
        return state | zeros_for(like, "exp_avg_sq")
    rows, cols = like.shape[:-1], like.shape[:-2] + like.shape[-1:]
    return state | {
        key: torch.zeros(shape, dtype=like.dtype)
        for key, shape in (
            ("exp_avg_sq_row", rows),
            ("exp_avg_sq_col", cols),
            ("exp_avg_res_row", rows),
            ("exp_avg_res_col", cols),
        )
    }


CAME = Family(
    name="came",
    label="CAME",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("factored", "exp_avg_sq_mean", "instability_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "betas", "eps", "clip_threshold", "weight_decay"),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    chunked=False,
    layout=StateLayout(
        first_moment=("exp_avg",),
        second_moment=("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col"),
        counter=("step",),
        fresh={
            key: fresh_zeros
            for key in (
                "exp_avg",
                "exp_avg_sq",
                "exp_avg_sq_row",
                "exp_avg_sq_col",
                "exp_avg_res_row",
                "exp_avg_res_col",
            )
        }
        | {"step": fresh_zeros},
        step_in_update=lambda group: False,
        keep_v_refusal="CAME's step count does not enter the update (no bias correction); use reset-m",
    ),
    first_step=adaptive_first_step(
        initial_state, "-lr * (1 - beta1) * u / sqrt(S), u = g / sqrt(V) clipped to RMS clip_threshold, V from g^2"
    ),
    notes=(
        "CAME: eff_lr = lr / (sqrt(V) * sqrt(S)) with V the factored second moment (exp_avg_sq) and S the factored "
        "instability (u - m)^2 (instability; large where updates disagree with their momentum)",
    ),
)
