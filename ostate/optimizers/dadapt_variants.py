r"""D-Adaptation's other optimizers: ``DAdaptSGD``, ``DAdaptAdaGrad``, ``DAdaptLion`` and ``DAdaptAdan``.

Like ``DAdaptAdam`` (:mod:`ostate.optimizers.dadapt`), each learns a step-size estimate
:math:`d` that **multiplies the learning rate** :math:`\gamma` (``lr``, usually 1.0): the
step of every parameter is made with :math:`d_{lr} = d\gamma` (DAdaptSGD:
:math:`d\gamma/\lVert g_0\rVert`). :math:`d`, the sums it is estimated from and the
counter :math:`k` live in the *param groups* (every group holds the same values); a new
optimizer starts from ``d0`` (1e-6, not recorded in the groups). Each step is made with
the *saved* :math:`d`; the new estimate :math:`d'` (from every parameter's gradient)
only enters the step after, so ``next_update`` is each library's next step exactly
(sources: dadaptation 3.2 ``dadapt_sgd.py``, ``dadapt_adagrad.py``, ``dadapt_lion.py``,
``dadapt_adan.py``). These optimizers read ``lr``, momentum and weight decay of group 0
(SGD, AdaGrad: also for the other groups); ostate uses each parameter's own group, the
same when the groups agree. A group with lr 0 next to groups with another lr is stepped
with the other groups' lr: ``next_update`` refuses it, as for DAdaptAdam.

**DAdaptSGD** (state ``z``, ``s``, ``x0``; groups ``d``, ``numerator_weighted``, ``k``,
``g0_norm``): dual averaging. With :math:`d_{lr} = d\gamma/\lVert g_0\rVert`, where
:math:`\lVert g_0\rVert` is the norm of *every* parameter's first gradient (saved in the
groups by the first step), and :math:`c = 1-\mu` (``momentum`` :math:`\mu`):

.. math::
    g \leftarrow g + \lambda\theta, \qquad s \leftarrow s + d_{lr}\,g, \qquad
    z = x_0 - s, \qquad \theta \leftarrow (1-c)\,\theta + c\,z

**DAdaptAdaGrad** (state ``alphak`` (starts at 1e-6), ``sk``, ``x0``; groups ``d``,
``gsq_weighted``, ``sksq_weighted``, ``skl1``, ``k``): dual averaging with AdaGrad's
denominator, :math:`d_{lr} = d\gamma`:

.. math::
    g \leftarrow g + \lambda\theta, \quad \alpha \leftarrow \alpha + g^2, \quad
    s \leftarrow s + d_{lr}\,g, \quad z = x_0 - \frac{s}{\sqrt\alpha + \epsilon}, \quad
    \theta \leftarrow (1-c)\,\theta + c\,z \ (\mu > 0), \ \theta \leftarrow z \ (\mu = 0)

**DAdaptLion** (state ``exp_avg``, ``s``; groups ``d``, ``numerator_weighted``, ``k``):
its momentum carries :math:`d_{lr}` (the sign mixes it with the plain gradient, as the
library does):

.. math::
    \theta &\leftarrow \theta(1 - d_{lr}\lambda) - d_{lr}\,\mathrm{sign}(\beta_1 m + (1-\beta_1) g) \\
    m &\leftarrow \beta_2 m + (1-\beta_2)\,d_{lr}\,g

**DAdaptAdan** (state ``step``, ``s``, ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq``,
``pre_grad``; groups ``d``, ``gsq_weighted``, ``k``): with :math:`\delta = g - g_{prev}`
(0 at the first step) and :math:`u = g + \beta_2\delta`:

.. math::
    m &\leftarrow \beta_1 m + d_{lr}(1-\beta_1) g, \qquad
        n \leftarrow \beta_2 n + d_{lr}(1-\beta_2)\,\delta, \qquad
        v \leftarrow \beta_3 v + (1-\beta_3) u^2 \\
    \theta &\leftarrow \frac{\theta - (m + \beta_2 n)/(\sqrt v + \epsilon)}{1 + d_{lr}\lambda}
        \quad\left(\texttt{no\_prox}:\ \theta(1 - d_{lr}\lambda) - \frac{m + \beta_2 n}{\sqrt v + \epsilon}\right)

The **effective learning rate** is the factor on a gradient in the next step, from the
saved state and :math:`d`: SGD :math:`\eta = d\gamma/\lVert g_0\rVert` (the weights move
:math:`c` of it at once and follow :math:`z` after), AdaGrad
:math:`\eta_i = d\gamma/(\sqrt{\alpha_i} + \epsilon)` (a small gradient's step),
Lion :math:`\eta = d\gamma` (sign descent: every coordinate moves by it), Adan
:math:`\eta_i = d\gamma/(\sqrt{v_i} + \epsilon)` (the factor on :math:`m + \beta_2 n` in
gradient units, as DAdaptAdam's). ``d_lr`` is the column :math:`d\gamma` (SGD:
:math:`d\gamma/\lVert g_0\rVert`). The ``update`` quantity (the next step with a zero
gradient and no weight decay) is given for Lion and Adan (from the state alone); SGD's
and AdaGrad's depend on the weights themselves.

A DAdaptSGD that never stepped has no :math:`\lVert g_0\rVert`: its first step divides by
the norm of every parameter's first gradient, so it is refused per parameter (a new
parameter of a stepped DAdaptSGD is predicted: ``g0_norm`` is saved).

**Strategies.** ``reload`` keeps everything; ``fresh`` clears the per-parameter state and
puts the groups' learned values back to a new optimizer's (:math:`d = d_0`, the sums 0,
:math:`k` 0; SGD's ``g0_norm`` dropped: the next step measures it again). SGD and AdaGrad
*compute* the weights from their whole state at each step (:math:`z` from :math:`x_0` and
:math:`s`), so no part of it can be reset alone: zeroing :math:`s` sends the weights back
to :math:`x_0`, resetting AdaGrad's :math:`\alpha` divides the kept :math:`s` by
:math:`\sqrt{10^{-6}}`; every partial strategy is refused. Lion: ``reset-m`` zeroes
:math:`m`, keeps :math:`d` and ``s`` (a zero :math:`m` restarts in units of the kept
:math:`d_{lr}`); it keeps no second moment and no step. Adan: ``reset-m`` zeroes both
momenta :math:`m, n`, ``reset-v`` zeroes :math:`v`, keeping :math:`d`; its update has no
bias correction and its state's ``step`` only marks the first step (where :math:`\delta`
starts at 0), so ``reset-step`` and ``keep-v`` are refused.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.dadapt import DADAPT_D0, as_float, columns, refuse_zero_lr
from ostate.optimizers.family import (
    Family,
    FirstStep,
    Group,
    StateLayout,
    adaptive_first_step,
    fresh_zeros,
    group_has,
    zeros_for,
)
from ostate.state import ParamState

_SGD_STATE = frozenset({"z", "s", "x0"})
_ADAGRAD_STATE = frozenset({"alphak", "sk", "x0", "weighted_sk"})
_LION_STATE = frozenset({"exp_avg", "s"})
_ADAN_STATE = frozenset({"step", "s", "exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad"})
# DAdaptAdaGrad's initial alphak (a constant in dadapt_adagrad.py, not its eps).
ADAGRAD_ALPHA0 = 1e-6


def _shape(param: ParamState) -> tuple[int, ...]:
    return tuple(param.shape) if param.shape is not None else ()


def sgd_d_lr(group: Group, name: str = "the group") -> float:
    r""":math:`d\gamma/\lVert g_0\rVert`: DAdaptSGD's step size (an error before its first step).

    Example:
        >>> sgd_d_lr({"d": 0.5, "lr": 1.0, "g0_norm": 2.0})
        0.25
    """
    if not group.get("g0_norm"):
        raise OstateError(
            f"'{name}': DAdaptSGD's first step divides by the norm of every parameter's first gradient (g0_norm, "
            "which that step saves in the param groups): not known before it",
            hint="a parameter of a DAdaptSGD that has stepped is predicted; this optimizer never stepped",
        )
    return group["d"] * group["lr"] / group["g0_norm"]


def sgd_effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return torch.full(_shape(param), sgd_d_lr(group, param.name), dtype=torch.float32)


def sgd_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DAdaptSGD's next change of ``weight``, in its order of operations."""
    refuse_zero_lr(param, group)
    dlr = sgd_d_lr(group, param.name)
    ck, decay = 1 - group["momentum"], group["weight_decay"]
    theta = weight.detach().clone()
    g = grad.add(theta, alpha=decay) if decay != 0 else grad
    s = param.read("s").to(theta.dtype).add(g, alpha=dlr)
    z = param.read("x0").to(theta.dtype) - s
    theta.mul_(1 - ck).add_(z, alpha=ck)
    return theta - weight


def adagrad_effective_lr(alphak: torch.Tensor, group: Group) -> torch.Tensor:
    return as_float(alphak).sqrt().add_(group["eps"]).reciprocal_().mul_(group["d"] * group["lr"])


def adagrad_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DAdaptAdaGrad's next change of ``weight`` (dense gradients), in its order of operations."""
    refuse_zero_lr(param, group)
    if grad.is_sparse:
        raise OstateError(f"'{param.name}': DAdaptAdaGrad's step on a sparse gradient is not computed by ostate")
    dlr, eps, decay, momentum = group["d"] * group["lr"], group["eps"], group["weight_decay"], group["momentum"]
    theta = weight.detach().clone()
    g = grad.add(theta, alpha=decay) if decay != 0 else grad
    alphak = param.read("alphak").to(theta.dtype).add(g * g)
    sk = param.read("sk").to(theta.dtype).add(g, alpha=dlr)
    z = param.read("x0").to(theta.dtype) - sk.div(torch.sqrt(alphak) + eps)
    if momentum != 0:
        ck = 1 - momentum
        theta.mul_(1 - ck).add_(z, alpha=ck)
    else:
        theta = z
    return theta - weight


def lion_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DAdaptLion's next change of ``weight``, in its order of operations."""
    refuse_zero_lr(param, group)
    dlr, wd, beta1 = group["d"] * group["lr"], group["weight_decay"], group["betas"][0]
    theta = weight.detach().clone()
    theta.mul_(1 - dlr * wd)
    update = param.read("exp_avg").to(theta.dtype).mul(beta1).add_(grad, alpha=1 - beta1).sign_()
    theta.add_(update, alpha=-dlr)
    return theta - weight


def adan_effective_lr(exp_avg_sq: torch.Tensor, group: Group) -> torch.Tensor:
    return as_float(exp_avg_sq).sqrt().add_(group["eps"]).reciprocal_().mul_(group["d"] * group["lr"])


def _adan_step(
    state: Mapping[str, torch.Tensor], group: Group, grad: torch.Tensor, previous: torch.Tensor, decay: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    beta1, beta2, beta3 = group["betas"]
    dlr, eps = group["d"] * group["lr"], group["eps"]
    grad_diff = grad - previous
    update = grad + beta2 * grad_diff
    m = state["exp_avg"].mul(beta1).add_(grad, alpha=dlr * (1.0 - beta1))
    n = state["exp_avg_diff"].mul(beta2).add_(grad_diff, alpha=dlr * (1.0 - beta2))
    v = state["exp_avg_sq"].mul(beta3).add_(update * update, alpha=1.0 - beta3)
    step = (m + beta2 * n).div_(v.sqrt().add_(eps))

    def apply(theta: torch.Tensor) -> torch.Tensor:
        if group["no_prox"]:
            return theta.mul_(1 - dlr * decay).add_(step, alpha=-1)
        return theta.add_(step, alpha=-1).div_(1 + dlr * decay)

    return apply


def adan_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DAdaptAdan's next change of ``weight``, in its order of operations (the first step takes
    the gradient difference as 0)."""
    refuse_zero_lr(param, group)
    theta = weight.detach().clone()
    state = {k: param.read(k).to(theta.dtype) for k in ("exp_avg", "exp_avg_diff", "exp_avg_sq")}
    previous = grad if not param.step else param.read("pre_grad").to(theta.dtype)
    return _adan_step(state, group, grad, previous, group["weight_decay"])(theta) - weight


def sgd_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    q: dict = {"s_abs": as_float(chunk["s"]).abs()}
    if group.get("g0_norm"):
        q["eff_lr"] = sgd_d_lr(group)
    return q


def adagrad_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    alphak = as_float(chunk["alphak"])
    return {"eff_lr": adagrad_effective_lr(alphak, group), "alphak": alphak, "sk_abs": as_float(chunk["sk"]).abs()}


def lion_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    m = as_float(chunk["exp_avg"])
    dlr = group["d"] * group["lr"]
    return {"eff_lr": dlr, "exp_avg_abs": m.abs(), "update": m.mul(group["betas"][0]).sign_().mul_(-dlr)}


def adan_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    v = as_float(chunk["exp_avg_sq"])
    q: dict = {"eff_lr": adan_effective_lr(v, group), "exp_avg_abs": as_float(chunk["exp_avg"]).abs(), "exp_avg_sq": v}
    if "pre_grad" in chunk and "exp_avg_diff" in chunk:
        state = {k: as_float(chunk[k]) for k in ("exp_avg", "exp_avg_diff", "exp_avg_sq")}
        zero = torch.zeros_like(v)
        q["update"] = _adan_step(state, group, zero, as_float(chunk["pre_grad"]), 0.0)(zero.clone())
    return q


def sgd_columns(param: ParamState, group: Group) -> dict:
    """``d``, ``d_lr`` (d * lr / g0_norm: the step size) and ``g0_norm`` (the first gradients' norm)."""
    out: dict = {"d": group["d"]}
    if group.get("g0_norm"):
        out |= {"d_lr": sgd_d_lr(group), "g0_norm": group["g0_norm"]}
    if group.get("d0"):
        out["d_over_d0"] = group["d"] / group["d0"]
    return out


def _match(required_state: set[str], allowed_state: frozenset[str], *keys: str, without: str | None = None):
    def match(state_keys: frozenset[str], group: Group) -> int:
        if state_keys and not (required_state <= state_keys <= allowed_state):
            return 0
        if without is not None and without in group:
            return 0
        return 6 if group_has(group, "d", "k", *keys) else 0

    return match


def fresh_group_of(*zeros: str) -> Callable[[Group], dict[str, Any]]:
    """The learned group values of a new optimizer: ``d = d0`` (the group's ``d0``, else the library's
    default), the sums ``zeros`` 0.0 and ``k`` 0; other learned keys (DAdaptSGD's ``g0_norm``) absent.

    Example:
        >>> fresh_group_of("numerator_weighted")({"d": 0.3, "k": 9, "numerator_weighted": 2.0, "g0_norm": 4.0})
        {'d': 1e-06, 'numerator_weighted': 0.0, 'k': 0}
    """

    def fresh(group: Group) -> dict[str, Any]:
        return {"d": group.get("d0", DADAPT_D0), **dict.fromkeys(zeros, 0.0), "k": 0}

    return fresh


def fresh_alphak(value: Any, group: Group) -> Any:
    """DAdaptAdaGrad's initial ``alphak``: full of 1e-6."""
    return torch.full_like(value, ADAGRAD_ALPHA0)


_DUAL_AVERAGING = (
    "its weights are computed from its whole state at every step (z = x0 - s, or x0 - sk / (sqrt(alphak) + eps) "
    "for AdaGrad), not moved by it: zeroing s sends the weights back to x0, the weights when it started, and "
    "resetting alphak divides the kept sk by sqrt(1e-6); the estimate d is learned from the same state. "
    "Use reload (d kept) or fresh (d back to d0)"
)
_ADAN_STEP = (
    "Adan's update has no bias correction: its state's step only marks the first step (where the gradient "
    "difference starts at 0) and the groups' k only counts steps; use reset-m (both momenta zeroed, d kept), "
    "reset-v, or 'fresh' (d back to d0)"
)
_NOTE = (
    "the learned step size d multiplies lr (d_lr is the step size) and lives in the param groups: a fresh "
    "optimizer starts again from d0; eff_lr includes d"
)
_NO_STEP = lambda group: False  # noqa: E731


def sgd_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """DAdaptSGD's state at a parameter's first step: ``z`` and ``x0`` copies of the weights, ``s`` zeros."""
    w = weight.detach()
    return {"z": w.clone(), "s": torch.zeros_like(w), "x0": w.clone()}


def adagrad_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """DAdaptAdaGrad's: ``alphak`` full of 1e-6, ``sk`` zeros, ``x0`` a copy of the weights."""
    w = weight.detach()
    return {"alphak": torch.full_like(w, ADAGRAD_ALPHA0), "sk": torch.zeros_like(w), "x0": w.clone()}


def lion_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """DAdaptLion's: zero ``exp_avg`` and ``s``."""
    return zeros_for(weight, "exp_avg", "s")


def adan_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """DAdaptAdan's: ``step`` 0 and zero ``s``, moments (its ``pre_grad`` is the first gradient)."""
    return {"step": 0, **zeros_for(weight, "s", "exp_avg", "exp_avg_diff", "exp_avg_sq")}


DADAPT_SGD = Family(
    name="dadapt_sgd",
    label="D-Adaptation SGD",
    match=_match({"s", "x0"}, _SGD_STATE, "numerator_weighted", "momentum", "growth_rate", without="betas"),
    quantities=sgd_quantities,
    effective_lr=sgd_effective_lr,
    next_update=sgd_next_update,
    columns=sgd_columns,
    display=("d", "d_lr", "g0_norm", "s_abs_mean"),
    hyperparameters=("lr", "d", "k", "g0_norm", "momentum", "weight_decay", "growth_rate"),
    layout=StateLayout(
        fresh={"s": fresh_zeros},  # z and x0 are the weights at the first step: fresh is no entry
        step_in_update=_NO_STEP,
        group_state=("d", "numerator_weighted", "k", "g0_norm"),
        fresh_group=fresh_group_of("numerator_weighted"),
        partial_refusal=_DUAL_AVERAGING,
    ),
    lr_scale="d",
    notes=("D-Adaptation SGD: " + _NOTE + "; its step size also divides by g0_norm, the first gradients' norm",),
    first_step=FirstStep(sgd_initial_state),
)

DADAPT_ADAGRAD = Family(
    name="dadapt_adagrad",
    label="D-Adaptation AdaGrad",
    match=_match({"alphak", "sk", "x0"}, _ADAGRAD_STATE, "gsq_weighted", "sksq_weighted", "skl1", "eps", "momentum"),
    quantities=adagrad_quantities,
    effective_lr=lambda param, group: adagrad_effective_lr(param.read("alphak"), group),
    next_update=adagrad_next_update,
    columns=columns,
    display=("d", "d_lr", "alphak_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "d", "k", "momentum", "eps", "weight_decay", "growth_rate"),
    second_moment="alphak",
    layout=StateLayout(
        second_moment=("alphak",),
        fresh={"alphak": fresh_alphak, "sk": fresh_zeros},  # x0: the weights at the first step
        step_in_update=_NO_STEP,
        group_state=("d", "gsq_weighted", "sksq_weighted", "skl1", "k"),
        fresh_group=fresh_group_of("gsq_weighted", "sksq_weighted", "skl1"),
        partial_refusal=_DUAL_AVERAGING,
    ),
    lr_scale="d",
    notes=("D-Adaptation AdaGrad: " + _NOTE,),
    first_step=adaptive_first_step(adagrad_initial_state, "-d * lr * g / (sqrt(1e-6 + g^2) + eps)"),
)

DADAPT_LION = Family(
    name="dadapt_lion",
    label="D-Adaptation Lion",
    match=_match({"exp_avg", "s"}, _LION_STATE, "numerator_weighted", "betas", without="eps"),
    quantities=lion_quantities,
    effective_lr=lambda param, group: torch.full(_shape(param), group["d"] * group["lr"], dtype=torch.float32),
    next_update=lion_next_update,
    columns=columns,
    display=("d", "d_lr", "exp_avg_abs_mean", "eff_lr_p50"),
    hyperparameters=("lr", "d", "k", "betas", "weight_decay"),
    first_moment="exp_avg_abs",
    layout=StateLayout(
        first_moment=("exp_avg",),
        fresh={"exp_avg": fresh_zeros, "s": fresh_zeros},
        step_in_update=_NO_STEP,
        group_state=("d", "numerator_weighted", "k"),
        fresh_group=fresh_group_of("numerator_weighted"),
    ),
    lr_scale="d",
    notes=("D-Adaptation Lion: " + _NOTE + "; its momentum already carries d * lr",),
    first_step=FirstStep(lion_initial_state),
)

DADAPT_ADAN = Family(
    name="dadapt_adan",
    label="D-Adaptation Adan",
    match=_match(
        {"s", "exp_avg", "exp_avg_diff", "exp_avg_sq"}, _ADAN_STATE, "gsq_weighted", "betas", "eps", "no_prox"
    ),
    quantities=adan_quantities,
    effective_lr=lambda param, group: adan_effective_lr(param.read("exp_avg_sq"), group),
    next_update=adan_next_update,
    columns=columns,
    display=("d", "d_lr", "exp_avg_sq_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "d", "k", "betas", "eps", "weight_decay", "no_prox", "growth_rate"),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    layout=StateLayout(
        first_moment=("exp_avg", "exp_avg_diff"),
        second_moment=("exp_avg_sq",),
        counter=("step",),
        # pre_grad: any value at step 0 (that step takes the gradient as the previous one)
        fresh={k: fresh_zeros for k in ("step", "s", "exp_avg", "exp_avg_diff", "exp_avg_sq", "pre_grad")},
        step_in_update=_NO_STEP,
        keep_v_refusal=_ADAN_STEP,
        group_state=("d", "gsq_weighted", "k"),
        fresh_group=fresh_group_of("gsq_weighted"),
        reset_step_refusal=_ADAN_STEP,
    ),
    lr_scale="d",
    notes=("D-Adaptation Adan: " + _NOTE + "; its momenta already carry d * lr",),
    first_step=adaptive_first_step(adan_initial_state, "-d * lr * (1 - beta1) * g / (sqrt(1 - beta3) |g| + eps)"),
)
