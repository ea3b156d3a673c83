r"""Muon (momentum orthogonalised by Newton–Schulz), as ``torch.optim.Muon`` computes it.

Muon optimises 2-D matrices only. A checkpoint holds the momentum buffer :math:`B`
(``momentum_buffer``) and no step count. Step, given gradient :math:`G` and weights
:math:`\theta` of shape :math:`A \times B`:

.. math::
    B &\leftarrow \mu B + (1-\mu) G \quad\text{(torch's code lerps; its docstring shows } \mu B + G\text{)} \\
    \tilde B &= (1-\mu) G + \mu B \text{ (Nesterov) or } B \\
    O &= \mathrm{NS}^{(a,b,c)}_k(\tilde B; \varepsilon) \quad\text{(} k \text{ quintic Newton–Schulz
        iterations in bfloat16, on } \tilde B / \max(\lVert\tilde B\rVert_F, \varepsilon)\text{)} \\
    \theta &\leftarrow \theta(1 - \gamma\lambda) - \gamma' O, \qquad
        \gamma' = \gamma\sqrt{\max(1, A/B)} \text{ (original) or } 0.2\,\gamma\sqrt{\max(A, B)}
        \text{ (match\_rms\_adamw)}

:math:`O` has roughly unit singular values whatever the size of the gradient, so the
update is a per-matrix quantity, not a per-coordinate one. The **effective learning
rate** is the adjusted :math:`\gamma'`, the same for every coordinate: the factor on
the orthogonalised direction. Orthogonalisation costs several matrix products per
matrix, so the table does not compute the next step's direction; ``next_update`` does.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ostate.errors import OstateError
from ostate.optimizers.family import Family, FirstStep, Group, group_has, zeros_for
from ostate.state import ParamState


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    r""":math:`\gamma'`: the lr scaled for the matrix's shape ``(A, B)``.

    Example:
        >>> adjusted_lr(0.02, None, (256, 64)), adjusted_lr(0.02, "match_rms_adamw", (256, 64))
        (0.04, 0.064)
    """
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


def newton_schulz(matrix: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float) -> torch.Tensor:
    r"""The quintic Newton–Schulz orthogonalisation :math:`X \leftarrow aX + (bXX^\top + c(XX^\top)^2)X`,
    in bfloat16 on the wide orientation of ``matrix``, as torch's Muon does it."""
    a, b, c = coefficients
    x = matrix.bfloat16()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    shape = tuple(param.state["momentum_buffer"].shape)
    return torch.full(shape, adjusted_lr(group["lr"], group.get("adjust_lr_fn"), shape), dtype=torch.float32)


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, in torch's order of operations."""
    if grad.ndim != 2:
        raise OstateError(f"Muon updates 2-D matrices only; '{param.name}' has shape {tuple(grad.shape)}")
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    theta = weight.detach().clone()
    buf = param.read("momentum_buffer").to(grad.dtype).lerp(grad, 1 - momentum)
    direction = grad.lerp(buf, momentum) if group.get("nesterov", True) else buf
    direction = newton_schulz(direction, group["ns_coefficients"], group["ns_steps"], group["eps"])
    theta.mul_(1 - lr * wd)
    theta.add_(direction, alpha=-adjusted_lr(lr, group.get("adjust_lr_fn"), theta.shape))
    return theta - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    shape = tuple(param.state["momentum_buffer"].shape)
    return {
        "eff_lr": adjusted_lr(group["lr"], group.get("adjust_lr_fn"), shape),
        "momentum_buffer_abs": chunk["momentum_buffer"].abs(),
    }


def columns(param: ParamState, group: Group) -> dict:
    if "momentum_buffer" not in param.state:
        return {}
    shape = tuple(param.state["momentum_buffer"].shape)
    lr = adjusted_lr(group["lr"], group.get("adjust_lr_fn"), shape)
    return {"adjusted_lr": lr, "lr_ratio": lr / group["lr"] if group["lr"] else float("nan")}


def match(state_keys: frozenset[str], group: Group) -> int:
    if not state_keys <= {"momentum_buffer"}:
        return 0
    return 5 if group_has(group, "ns_coefficients", "ns_steps") else 0


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Muon state before the first step: a zero ``momentum_buffer``."""
    return zeros_for(weight, "momentum_buffer")


MUON = Family(
    name="muon",
    label="Muon",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("momentum_buffer_abs_mean", "momentum_buffer_abs_rms", "adjusted_lr", "lr_ratio"),
    hyperparameters=(
        "lr",
        "initial_lr",
        "momentum",
        "nesterov",
        "weight_decay",
        "adjust_lr_fn",
        "ns_steps",
        "ns_coefficients",
        "eps",
    ),
    first_moment="momentum_buffer_abs",
    notes=(
        "Muon: the update is the orthogonalised momentum (unit singular values), so eff_lr is the "
        "shape-adjusted lr of the whole matrix, not a per-coordinate rate.",
    ),
    first_step=FirstStep(initial_state),
)
