r"""GaLore AdamW (``galore_torch.GaLoreAdamW``, galore-torch 1.0): Adam moments in a low-rank projected space.

A param group with ``rank`` projects its matrices; its state per parameter holds
``step``, the projection :math:`P` (read from GaLore's ``projector`` object as
``projector_ortho``, with ``projector_type``, ``projector_scale`` :math:`s`,
``projector_update_proj_gap``) and the moments of the *projected* gradient, ``exp_avg``
and ``exp_avg_sq``. For an :math:`m\times n` parameter projected from the right
(``std`` with :math:`m \ge n`, or ``right``) :math:`P = B` is :math:`r\times n` and the
moments are :math:`m\times r`; from the left (``std`` with :math:`m < n`, or ``left``)
:math:`P = A` is :math:`m\times r` and the moments :math:`r\times n`. Other groups are
HF-style AdamW. Step :math:`t+1` (source: ``galore_torch/adamw.py``, ``galore_projector.py``):

.. math::
    P &\leftarrow \text{the top-}r\text{ singular vectors of } G \text{ when } t \bmod
        \text{update\_proj\_gap} = 0 \quad(\text{right: } V_{:r}^\top,\ \text{left: } U_{:, :r}) \\
    R &= G P^\top \ (\text{right}), \qquad R = P^\top G \ (\text{left}) \\
    m &\leftarrow \beta_1 m + (1-\beta_1) R, \qquad v \leftarrow \beta_2 v + (1-\beta_2) R^2 \\
    \alpha &= \gamma\,\sqrt{1-\beta_2^{t+1}}/(1-\beta_1^{t+1}) \ (\text{correct\_bias, else } \gamma) \\
    \theta &\leftarrow \theta - \alpha\, s\, \frac{m}{\sqrt v+\epsilon} P \ (\text{right}),
        \quad \theta - \alpha\, s\, P \frac{m}{\sqrt v+\epsilon} \ (\text{left}), \qquad
        \theta \leftarrow \theta - \gamma\lambda\theta

The **effective learning rate in parameter space** is the diagonal of the linear map
from a bias-corrected first moment (in gradient units, as for Adam) to the step: for
coordinate :math:`(i, j)`, with :math:`c_2 = 1-\beta_2^t` (1 without bias correction),

.. math::
    \eta_{ij} = \gamma\sqrt{c_2}\, s \sum_k \frac{B_{kj}^2}{\sqrt{v_{ik}}+\epsilon} \ (\text{right}), \qquad
    \eta_{ij} = \gamma\sqrt{c_2}\, s \sum_k \frac{A_{ik}^2}{\sqrt{v_{kj}}+\epsilon} \ (\text{left})

(unprojected parameters: :math:`\gamma\sqrt{c_2}/(\sqrt{v_i}+\epsilon)`). Directions
outside the projection's subspace get (nearly) nothing: the ``eff_lr`` of a coordinate
is small where its row or column lies outside it.

``next_update`` is exact, including a refresh of the projection from the gradient's
SVD (computed as galore-torch does). The ``update`` quantity (zero gradient) uses the
saved projection; ``projection_refresh_next`` says when the next step replaces it.
``exp_avg_abs`` is the first moment projected back to parameter space,
:math:`|m P|` or :math:`|P m|`. The ``full`` projection type (two matrices) is read
but not computed.

**First step** of a parameter without state: galore-torch creates ``step`` 0, zero
moments of the projected shape and a projector without a matrix, which the first step
fills from the SVD of that step's gradient (step 0 is a refresh). ``next_update``, given
the gradient, computes that SVD as galore-torch does, so the first step is predicted
exactly: :math:`-\gamma s\,\frac{R}{|R|+\epsilon}P` (right; left: :math:`P\frac{R}{|R|+\epsilon}`)
with :math:`R` the gradient projected on its own top-:math:`r` singular vectors. Its
effective learning rate depends on that gradient and is refused.

**Strategies**: only ``fresh`` and ``reload``: the projector is an object of
galore-torch's, which ostate reads as its attributes but does not write back.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.family import Family, Group, adaptive_first_step, group_has, step_of, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset(
    {
        "step",
        "exp_avg",
        "exp_avg_sq",
        "projector_ortho",
        "projector_ortho_left",
        "projector_ortho_right",
        "projector_rank",
        "projector_scale",
        "projector_type",
        "projector_update_proj_gap",
    }
)


def _projected(param: ParamState) -> bool:
    if "projector_ortho_left" in param.state:
        raise OstateError(f"'{param.name}': GaLore's 'full' projection (two matrices) is not computed by ostate")
    return "projector_ortho" in param.state


def _side(param: ParamState) -> str:
    """``right`` (moments m x r, projection r x n) or ``left`` (moments r x n, projection m x r)."""
    moment, ortho, rank = (
        param.state["exp_avg"].shape,
        param.state["projector_ortho"].shape,
        param.state["projector_rank"],
    )
    return "right" if moment[1] == ortho[0] == rank else "left"


def _step_size(group: Group, step: float) -> float:
    lr = group["lr"]
    if not group.get("correct_bias", True):
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    v = param.read("exp_avg_sq")
    v = v if v.dtype == torch.float64 else v.float()
    t = step_of(param)
    c2 = (1 - group["betas"][1] ** t) if group.get("correct_bias", True) else 1.0
    inverse = v.sqrt().add_(group["eps"]).reciprocal_().mul_(group["lr"] * math.sqrt(c2))
    if not _projected(param):
        return inverse
    ortho = param.read("projector_ortho").to(inverse.dtype)
    scale = float(param.state["projector_scale"])
    squared = ortho.square()
    return (inverse @ squared if _side(param) == "right" else squared @ inverse).mul_(scale)


def _orthogonal(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """galore-torch's ``get_orthogonal_matrix`` (right: the top rows of V^T; left: the top columns of U)."""
    matrix = grad.float() if grad.dtype != torch.float else grad
    u, _s, vh = torch.linalg.svd(matrix, full_matrices=False)
    out = vh[:rank, :] if side == "right" else u[:, :rank]
    return out.to(grad.dtype) if grad.dtype != torch.float else out


def _project_back(param: ParamState, low: torch.Tensor, ortho: torch.Tensor) -> torch.Tensor:
    kind = param.state["projector_type"]
    if kind == "std":
        back = low @ ortho if low.shape[0] >= low.shape[1] else ortho @ low
    elif kind == "reverse_std":
        back = ortho @ low if low.shape[0] <= low.shape[1] else low @ ortho
    elif kind == "right":
        back = low @ ortho
    elif kind == "left":
        back = ortho @ low
    else:
        raise OstateError(f"'{param.name}': unknown GaLore projection type '{kind}'")
    return back * param.state["projector_scale"]


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GaLore AdamW's next change of ``weight`` (refreshing the projection when the step says so)."""
    beta1, beta2 = group["betas"]
    p = weight.detach().clone()
    saved_step = step_of(param)
    low = grad
    ortho = None
    if _projected(param):
        side = _side(param)
        ortho = param.read("projector_ortho").to(grad.dtype)
        if saved_step % param.state["projector_update_proj_gap"] == 0:
            ortho = _orthogonal(grad, int(param.state["projector_rank"]), side)
        low = grad @ ortho.t() if side == "right" else ortho.t() @ grad
    exp_avg = param.read("exp_avg").to(low.dtype).mul(beta1).add_(low, alpha=1.0 - beta1)
    exp_avg_sq = param.read("exp_avg_sq").to(low.dtype).mul(beta2).addcmul_(low, low, value=1.0 - beta2)
    norm_grad = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
    if ortho is not None:
        norm_grad = _project_back(param, norm_grad, ortho)
    p.add_(norm_grad, alpha=-_step_size(group, saved_step + 1))
    if group["weight_decay"] > 0.0:
        p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))
    return p - weight


def _back(param: ParamState, low: torch.Tensor) -> torch.Tensor:
    if not _projected(param):
        return low
    return _project_back(param, low, param.read("projector_ortho").to(low.dtype)) / param.state["projector_scale"]


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    # Unchunked: the projected moments are not shaped like the parameter; everything is in parameter space.
    beta1, beta2 = group["betas"]
    m, v = param.read("exp_avg").float(), param.read("exp_avg_sq").float()
    momentum = (m * beta1) / (v * beta2).sqrt_().add_(group["eps"])
    if _projected(param):
        momentum = _project_back(param, momentum, param.read("projector_ortho").float())
    return {
        "eff_lr": effective_lr(param, group).reshape(-1),
        "exp_avg_abs": _back(param, m).abs().reshape(-1),
        "update": momentum.mul_(-_step_size(group, step_of(param) + 1)).reshape(-1),
    }


def columns(param: ParamState, group: Group) -> dict:
    """Whether and how the parameter is projected, and whether the next step replaces the projection."""
    if "exp_avg" not in param.state:
        return {}
    if "projector_ortho" not in param.state:
        return {"projected": False}
    gap = param.state["projector_update_proj_gap"]
    return {
        "projected": True,
        "rank": param.state["projector_rank"],
        "projection": _side(param),
        "projection_refresh_next": param.step is not None and bool(gap) and param.step % gap == 0,
        "projection_scale": param.state["projector_scale"],
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if not group_has(group, "lr", "betas", "eps", "weight_decay", "correct_bias"):
        return 0
    if not state_keys:  # saved before the first step: a projected group says GaLore, a plain one only fits it
        return 7 if group_has(group, "rank", "update_proj_gap", "scale", "proj_type") else 1
    return 7 if {"projector_ortho", "exp_avg", "exp_avg_sq"} <= state_keys <= _STATE_KEYS else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """galore-torch's state before the first step: ``step`` 0 and zero moments, of the projected shape for a
    matrix in a group with ``rank``, with the projector's settings from the group and a zero matrix of its shape
    (the first step replaces it with the gradient's singular vectors; ``full``: two, which ostate does not compute).
    """
    if "rank" not in group or weight.dim() != 2:
        return {"step": 0, **zeros_for(weight, "exp_avg", "exp_avg_sq")}
    rows, cols = weight.shape
    kind, rank = group["proj_type"], int(group["rank"])
    state: dict = {
        "step": 0,
        "projector_rank": rank,
        "projector_scale": group["scale"],
        "projector_type": kind,
        "projector_update_proj_gap": group["update_proj_gap"],
    }
    kept = min(rank, rows, cols)  # torch.linalg.svd's reduced factors have min(rows, cols) vectors
    if kind == "full":
        return state | {
            "projector_ortho_left": torch.zeros(rows, kept),
            "projector_ortho_right": torch.zeros(kept, cols),
        }
    side = {"std": rows >= cols, "reverse_std": rows < cols, "right": True, "left": False}.get(kind)
    if side is None:
        raise OstateError(f"unknown GaLore projection type '{kind}'")
    moment, ortho = ((rows, kept), (kept, cols)) if side else ((kept, cols), (rows, kept))
    zeros = torch.zeros(moment, dtype=weight.dtype)
    return state | {
        "projector_ortho": torch.zeros(ortho, dtype=weight.dtype),
        "exp_avg": zeros,
        "exp_avg_sq": zeros.clone(),
    }


GALORE_ADAMW = Family(
    name="galore_adamw",
    label="GaLore AdamW",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("projected", "rank", "projection_refresh_next", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "betas", "eps", "weight_decay", "correct_bias", "rank", "update_proj_gap"),
    first_moment="exp_avg_abs",
    chunked=False,
    signed_first_moment=lambda chunk, group, param: _back(param, param.read("exp_avg").float()).reshape(-1),
    first_step=adaptive_first_step(
        initial_state,
        "-lr * scale * P(R / (|R| + eps)), with R the gradient projected on its own top-rank singular vectors",
    ),
    notes=(
        "GaLore AdamW: moments live in a rank-r projection; eff_lr is the diagonal of the map from a first moment "
        "to the step in parameter space, exp_avg_abs the first moment projected back",
    ),
)
