r"""SOAP (``pytorch_optimizer.SOAP``, pytorch-optimizer 4.1): Adam in the eigenbasis of Shampoo's preconditioner.

**State** (source: ``pytorch_optimizer/optimizer/soap.py``), per parameter: ``exp_avg``
(:math:`m`, the first moment *in parameter space*), ``exp_avg_sq`` (:math:`v`, the
second moment *in the rotated basis*), ``GG`` (one matrix per dimension: Shampoo's
:math:`L = \mathrm{EMA}(GG^\top)` and :math:`R = \mathrm{EMA}(G^\top G)`, with
``shampoo_beta``; an empty list for a dimension above ``max_precondition_dim`` and for
vectors unless ``precondition_1d``), ``Q`` (their eigenbases :math:`Q_L, Q_R`, refreshed
every ``precondition_frequency`` steps by one power iteration and a QR), and the
settings. The step counter :math:`S` lives in the param groups (``step``; the first
call only initialises, so :math:`S-1` moment updates have been made).

**Update** of an :math:`m\times n` matrix, with
:math:`\mathcal{P}(X) = Q_L^\top X Q_R` and :math:`\mathcal{P}^{-1}(X) = Q_L X Q_R^\top`
(a dimension without a basis is left as it is):

.. math::
    m &\leftarrow \mathrm{lerp}(m, g, 1-\beta_1), \qquad
        v \leftarrow \mathrm{lerp}(v, \mathcal{P}(g)^2, 1-\beta_2) \\
    \alpha &= \gamma\,\sqrt{1-\beta_2^{S}}/(1-\beta_1^{S}) \ (\text{correct\_bias, else } \gamma) \\
    \theta &\leftarrow \theta - \alpha\,\mathcal{P}^{-1}\!\left(\frac{\mathcal{P}(m)}{\sqrt v+\epsilon}\right),
        \qquad \theta \leftarrow \theta(1-\gamma\lambda)

then :math:`L, R` move towards the new gradient's outer products and, every
``precondition_frequency`` steps, :math:`Q` is refreshed (for the step after).

The **effective learning rate** is the diagonal of the linear map from a bias-corrected
first moment (gradient units) to the step, in parameter space, with
:math:`c_2 = 1-\beta_2^{S-1}` (the saved moment's age):

.. math::
    \eta_{ij} = \gamma\sqrt{c_2}\sum_{k,l} \frac{(Q_L)_{ik}^2 (Q_R)_{jl}^2}{\sqrt{v_{kl}}+\epsilon}
    = \gamma\sqrt{c_2}\left[(Q_L\circ Q_L)\,\frac{1}{\sqrt v+\epsilon}\,(Q_R\circ Q_R)^\top\right]_{ij}

— it needs the full eigenbases, which the state holds. ``exp_avg_sq`` is :math:`v`
*in the rotated basis* (one value per eigen-direction pair, not per weight).

``next_update`` is exact (the refresh of :math:`Q` acts after the step). Not supported:
``merge_dims`` (dimensions merged into a matrix), ``normalize_gradient`` (the step is
divided by its own RMS: ``next_update`` mirrors it, the effective lr refuses it) and
``maximize`` and ``data_format``, which the optimizer keeps as attributes, not in its state
(the defaults are assumed).

**First step** of a parameter without state. The optimizer's first ``step()`` (the
groups' :math:`S` is 0, or absent in a state saved before it) only initialises: it
creates zero moments and takes :math:`L, R` and :math:`Q` from the gradient, and moves
no weight (not even by the weight decay), so ``next_update`` is 0 and so is the
effective learning rate. A parameter that gets its first gradient later (a new head,
:math:`S \ge 1`) is initialised the same way within the step, then updated with the
group's bias correction for :math:`S` (not the parameter's age):
``next_update`` computes :math:`L, R` from that gradient and their eigenbases as
pytorch-optimizer does (``torch.linalg.eigh``, columns reversed), so it is exact; the
effective learning rate then depends on that gradient and is refused.

**Strategies**: only ``fresh`` and ``reload`` (the moments are tied to the bases in the
same state).
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.family import Family, FirstStep, Group, group_has, zeros_for
from ostate.state import ParamState

_STATE_KEYS = frozenset({"exp_avg", "exp_avg_sq", "GG", "Q", "precondition_frequency", "shampoo_beta"})


def _bases(param: ParamState) -> list[Any]:
    bases = param.state.get("Q")
    if not isinstance(bases, (list, tuple)):
        raise OstateError(f"'{param.name}': SOAP state without its eigenbases Q", hint="it may never have stepped")
    return list(bases)


def _check(param: ParamState, group: Group) -> None:
    if group.get("merge_dims", False):
        raise OstateError(f"'{param.name}': SOAP with merge_dims=True is not computed by ostate")


def project(x: torch.Tensor, bases: list[Any], backward: bool = False) -> torch.Tensor:
    """SOAP's ``project``: rotate each dimension into (or, ``backward``, out of) its eigenbasis."""
    for mat in bases:
        if len(mat) > 0:
            x = torch.tensordot(x, mat.to(x.dtype), dims=[[0], [1 if backward else 0]])
        else:
            x = x.permute([*range(1, x.dim()), 0])
    return x


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """pytorch-optimizer's SOAP state as ``init_group`` creates it, before it sees the gradient: zero moments,
    zero ``GG`` per preconditioned dimension (an empty list for the others), no bases yet (``Q`` None), and
    the settings."""
    limit = group["max_precondition_dim"]
    if weight.dim() == 1:
        sizes = [weight.shape[0] if group.get("precondition_1d", False) and weight.shape[0] <= limit else 0]
    else:
        sizes = [size if size <= limit else 0 for size in weight.shape]
    shampoo_beta = group.get("shampoo_beta")
    return {
        **zeros_for(weight, "exp_avg", "exp_avg_sq"),
        "GG": [torch.zeros(n, n, dtype=weight.dtype) if n else [] for n in sizes],
        "Q": None,
        "precondition_frequency": group["precondition_frequency"],
        "shampoo_beta": shampoo_beta if shampoo_beta is not None else group["betas"][1],
    }


def first_bases(param: ParamState, grad: torch.Tensor) -> list[Any]:
    """The eigenbases SOAP takes from a parameter's first gradient (``update_pre_conditioner`` on zero ``GG``,
    then ``get_orthogonal_matrix``), in its order of operations."""
    weight = 1.0 - param.state["shampoo_beta"]
    statistics = [mat.clone() if len(mat) > 0 else [] for mat in param.state["GG"]]
    if grad.dim() == 1:
        if len(statistics[0]) > 0:
            statistics[0].lerp_((grad.unsqueeze(1) @ grad.unsqueeze(0)).to(statistics[0].dtype), weight=weight)
    else:
        for idx, mat in enumerate(statistics):
            if len(mat) > 0:
                others = [*chain(range(idx), range(idx + 1, grad.dim()))]
                mat.lerp_(torch.tensordot(grad, grad, dims=[others] * 2).to(mat.dtype), weight=weight)
    bases: list[Any] = []
    for mat in statistics:
        if len(mat) == 0:
            bases.append([])
            continue
        _values, vectors = torch.linalg.eigh(mat + 1e-30 * torch.eye(mat.shape[0], dtype=mat.dtype))
        bases.append(torch.flip(vectors, dims=[1]))
    return bases


def _only_initialises(group: Group) -> bool:
    """Whether the next ``step()`` is the optimizer's first, which only initialises (moves no weight)."""
    return group.get("step", 0) == 0


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    _check(param, group)
    if _only_initialises(group):
        return torch.zeros(param.shape or ())
    if param.state.get("Q", ()) is None:
        raise OstateError(
            f"'{param.name}' has no state yet (first step), and for optimizer kind 'soap' its first step rotates by "
            "the eigenbases of its first gradient's outer products and divides by that rotated gradient: the "
            "effective learning rate of a first step is the first gradient's, not a function of the state",
            hint="ostate.next_update(param, group, grad, weight) predicts the first step from the gradient",
        )
    if group.get("normalize_gradient", False):
        raise OstateError(
            f"'{param.name}': with normalize_gradient the step is divided by its own RMS, which needs the gradient",
            hint="the next update is still computed",
        )
    v = param.read("exp_avg_sq")
    v = v if v.dtype == torch.float64 else v.float()
    age = group["step"] - 1
    c2 = (1 - group["betas"][1] ** age) if group.get("correct_bias", True) else 1.0
    inverse = v.sqrt().add_(group["eps"]).reciprocal_()
    # The diagonal of P^-1(P(.)/d): rotate 1/d back with the squared bases.
    squared = [mat.to(inverse.dtype).square() if len(mat) > 0 else mat for mat in _bases(param)]
    return project(inverse, squared, backward=True).mul_(group["lr"] * math.sqrt(c2))


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SOAP's next change of ``weight``, in its order of operations (the bases from ``grad`` at a parameter's
    first step; nothing at the optimizer's first, which only initialises)."""
    _check(param, group)
    if _only_initialises(group):
        return torch.zeros_like(weight)
    bases = first_bases(param, grad) if param.state.get("Q", ()) is None else _bases(param)
    beta1, beta2 = group["betas"]
    step = group["step"]
    step_size = group["lr"]
    if group.get("correct_bias", True):
        step_size *= math.sqrt(1 - beta2**step) / (1 - beta1**step)
    p = weight.detach().clone()
    projected = project(grad, bases)
    exp_avg = param.read("exp_avg").to(p.dtype).lerp(grad, 1.0 - beta1)
    exp_avg_sq = param.read("exp_avg_sq").to(p.dtype).lerp(projected.square(), 1.0 - beta2)
    denominator = exp_avg_sq.sqrt().add_(group["eps"])
    norm_grad = project(project(exp_avg, bases) / denominator, bases, backward=True)
    if group.get("normalize_gradient", False):
        norm_grad.div_(torch.mean(norm_grad.square()).sqrt_().add_(group["eps"]))
    p.add_(norm_grad, alpha=-step_size)
    if group["weight_decay"] != 0.0:
        p.mul_(1.0 - group["weight_decay"] * group["lr"])
    return p - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    # Unchunked: the bases rotate whole tensors.
    m = param.read("exp_avg").float()
    q: dict = {"exp_avg_abs": m.abs().reshape(-1), "exp_avg_sq": param.read("exp_avg_sq").float().reshape(-1)}
    if not group.get("normalize_gradient", False) and not group.get("merge_dims", False):
        q["eff_lr"] = effective_lr(param, group).reshape(-1)
    return q


def columns(param: ParamState, group: Group) -> dict:
    """How many dimensions are preconditioned, and whether the next step refreshes the bases after it."""
    if "Q" not in param.state:
        return {}
    bases = _bases(param)
    frequency = param.state.get("precondition_frequency", group.get("precondition_frequency"))
    step = group.get("step", 0)
    return {
        "preconditioned_dims": sum(1 for mat in bases if len(mat) > 0),
        "basis_refresh_next": bool(frequency) and step > 0 and step % frequency == 0,
    }


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"exp_avg", "exp_avg_sq", "GG", "Q"} <= state_keys <= _STATE_KEYS):
        return 0
    # The groups' step appears at the first step(): a state saved before it has neither step nor state.
    keys = ("shampoo_beta", "precondition_frequency", "max_precondition_dim", *(("step",) if state_keys else ()))
    return 7 if group_has(group, *keys) else 0


SOAP = Family(
    name="soap",
    label="SOAP (pytorch-optimizer)",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("preconditioned_dims", "basis_refresh_next", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=(
        "lr",
        "initial_lr",
        "betas",
        "eps",
        "weight_decay",
        "shampoo_beta",
        "precondition_frequency",
        "max_precondition_dim",
        "step",
    ),
    first_moment="exp_avg_abs",
    chunked=False,
    first_step=FirstStep(initial_state),
    notes=(
        "SOAP: Adam in the eigenbasis Q of Shampoo's preconditioner; eff_lr is the diagonal of the rotated "
        "preconditioner in parameter space, exp_avg_sq the second moment in the rotated basis",
    ),
)
