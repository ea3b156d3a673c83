r"""Learning-rate-free Adam: Prodigy (``prodigyopt.Prodigy``) and D-Adaptation (``dadaptation.DAdaptAdam``).

Both learn a step-size estimate :math:`d` that **multiplies the learning rate**
:math:`\gamma` (``lr``, usually 1.0). :math:`d` and the step counter :math:`k` live in
the *param groups* (every group holds the same values), with the sums the estimate is
made of; the per-parameter state holds the moments and the running sum :math:`s`. When
fine-tuning from such a checkpoint, :math:`d` decides the step size more than anything
else: it grows from ``d0`` (1e-6) by orders of magnitude over the first steps, and a
fresh optimizer starts from ``d0`` again. With :math:`c = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
when ``use_bias_correction`` (1 otherwise), the next step (:math:`k+1`) takes
:math:`d_{lr} = d\,\gamma\,c` with the *saved* :math:`d` (sources: prodigyopt 1.1
``prodigy.py``, dadaptation 3.2 ``dadapt_adam.py``).

**Prodigy** (state ``step``, ``s`` and ``p0``: every ``slice_p``-th coordinate of the
flattened parameter, ``exp_avg`` when :math:`\beta_1 > 0`, ``exp_avg_sq``). Its moments
carry :math:`d`:

.. math::
    g &\leftarrow g + \lambda\theta \quad\text{(unless decouple)} \\
    m &\leftarrow \beta_1 m + d(1-\beta_1) g, \qquad v \leftarrow \beta_2 v + d^2(1-\beta_2) g^2 \\
    d' &= \text{the new estimate (from every parameter's gradient: }
        \hat d = d_{coef}\,\frac{\sum\text{numerators}}{\sum_i \lVert s_i\rVert_1}\text{, }
        d' = \min(\max(d_{max}, \hat d),\ d\cdot\text{growth\_rate})) \\
    \theta &\leftarrow \theta - \lambda d_{lr}\theta \quad\text{(decouple)}, \qquad
        \theta \leftarrow \theta - d_{lr}\,\frac{m}{\sqrt v + d'\epsilon}
        \quad\left(\beta_1 = 0:\ \theta - d_{lr} d'\,\frac{g}{\sqrt v + d'\epsilon}\right)

**D-Adaptation Adam**: state ``step``, ``s``, ``exp_avg``, ``exp_avg_sq``; the group's
``layer_scale`` :math:`r` scales its parameters' steps. Its first moment carries
:math:`d_{lr}`:

.. math::
    m &\leftarrow \beta_1 m + r\,d_{lr}(1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    \theta &\leftarrow \theta - \lambda d_{lr}\theta \quad\text{(decouple)}, \qquad
        \theta \leftarrow \theta - \frac{m}{\sqrt v + \epsilon}

The **effective learning rate** of coordinate :math:`i` is, as for Adam, the factor
that multiplies a bias-corrected first moment *in gradient units* in the next step,
from the saved state and the saved :math:`d`:

.. math::
    \text{Prodigy:}\ \eta_i = \frac{d\,\gamma\sqrt{c_2}}{\sqrt{v_i}/d + \epsilon}, \qquad
    \text{D-Adaptation:}\ \eta_i = \frac{r\,d\,\gamma\sqrt{c_2}}{\sqrt{v_i} + \epsilon}

with :math:`c_2 = 1-\beta_2^{k+1}` under bias correction (1 otherwise); Prodigy's
:math:`\sqrt v/d` is :math:`v` back in gradient units. ``d_lr`` is the column
:math:`d\gamma c`.

``next_update`` is D-Adaptation's next step exactly. Prodigy's next step divides by
:math:`\sqrt v + d'\epsilon`, where :math:`d'` depends on every parameter's next
gradient; a per-parameter prediction uses the saved :math:`d` there (everything else is
exact; :func:`prodigy_step` takes :math:`d'` when it is known): the two differ by
:math:`(d'-d)\epsilon` in a denominator of size :math:`\sqrt v \approx d|g|`, which
matters only where :math:`\epsilon` does (coordinates with gradients near
:math:`\epsilon`, e.g. of a LayerNorm followed by a BatchNorm). Without a first moment
(:math:`\beta_1 = 0`) the step is also proportional to :math:`d'`, so the per-parameter
prediction is :math:`d/d'` times the real step. The ``update`` quantity (next step with a zero gradient)
is exact for both: with zero gradients :math:`d'` follows from the group's saved sums.
A group whose ``lr`` is 0 next to groups with another lr is stepped with the other
groups' lr, which its group does not record: ``next_update`` refuses it.

**Strategies.** The estimate :math:`d` lives in the param groups with what it is learned
from (Prodigy: ``d_max``, ``d_numerator``; D-Adaptation: ``numerator_weighted``) and the
counter :math:`k`; the per-parameter ``s`` (and Prodigy's starting point ``p0``) feed it.
The moments carry :math:`d` (Prodigy's :math:`m` in units of :math:`d\,g`, :math:`v` of
:math:`d^2g^2`; D-Adaptation's :math:`m` of :math:`d_{lr}\,g`), so a saved moment is only
consistent with the :math:`d` it was made with. ``reload`` keeps all of it (the next step is
the library's own continuation); ``fresh`` clears the per-parameter state and puts the
groups' learned values back to a new optimizer's (:math:`d = d_0`; D-Adaptation does not
save its ``d0``: the library's default 1e-6, or the harness's new optimizer's own). ``reset-m`` and ``reset-v`` zero one moment
and keep :math:`d`, its sums, ``s`` and ``p0``: a zero moment restarts in the units of the
kept :math:`d`, as a new gradient enters it, so the kept moment and :math:`d` stay in
proportion; resetting :math:`d` under a kept moment would not (a moment of the old scale
over new gradients scaled by :math:`d_0`, orders of magnitude smaller). The state's
``step`` does not enter the update and :math:`k` (the bias correction's counter) is one
for the whole optimizer, learned with :math:`d`, so ``reset-step`` and ``keep-v`` are
refused; there is no age correction for the ``-ac`` strategies to make. A ``NAME:REGEX``
strategy keeps some parameters' state, so it keeps :math:`d`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.family import Family, Group, StateLayout, adaptive_first_step, fresh_zeros, group_has, zeros_for
from ostate.state import ParamState

_PRODIGY_STATE = frozenset({"step", "s", "p0", "exp_avg", "exp_avg_sq"})
_DADAPT_ADAM_STATE = frozenset({"step", "s", "exp_avg", "exp_avg_sq"})


def next_step_correction(group: Group) -> tuple[float, float]:
    r""":math:`(c, c_2)`: the next step's bias correction :math:`\sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    and :math:`1-\beta_2^{k+1}` (both 1 without ``use_bias_correction``).

    Example:
        >>> c, c2 = next_step_correction({"betas": (0.9, 0.99), "k": 0, "use_bias_correction": True})
        >>> round(c, 12), round(c2, 12)
        (1.0, 0.01)
    """
    if not group.get("use_bias_correction", False):
        return 1.0, 1.0
    beta1, beta2 = group["betas"][:2]
    step = group["k"] + 1
    c2 = 1 - beta2**step
    return c2**0.5 / (1 - beta1**step), c2


def d_lr(group: Group) -> float:
    r""":math:`d\,\gamma\,c`: the step size of the next step (the saved :math:`d` times lr, bias-corrected)."""
    return group["d"] * group["lr"] * next_step_correction(group)[0]


def prodigy_next_d_zero_gradient(group: Group) -> float:
    r"""The estimate :math:`d'` that Prodigy's next step makes when every gradient is zero.

    Then every numerator term is 0 and every :math:`s` decays by :math:`\beta_3`, so
    :math:`\hat d` is the saved :math:`d_{coef}\,` ``d_numerator`` / ``d_denom``.
    """
    d, d0 = group["d"], group["d0"]
    if group["lr"] <= 0 or not group.get("d_denom"):
        return d
    d_hat = group["d_coef"] * group["d_numerator"] / group["d_denom"]
    if d == d0:
        d = max(d, d_hat)
    d_max = max(group["d_max"], d_hat)
    return min(d_max, d * group["growth_rate"])


def as_float(values: torch.Tensor) -> torch.Tensor:
    return values if values.dtype == torch.float64 else values.float()


def prodigy_effective_lr(exp_avg_sq: torch.Tensor, group: Group) -> torch.Tensor:
    d = group["d"]
    _c, c2 = next_step_correction(group)
    return as_float(exp_avg_sq).sqrt().div_(d).add_(group["eps"]).reciprocal_().mul_(d * group["lr"] * c2**0.5)


def dadapt_adam_effective_lr(exp_avg_sq: torch.Tensor, group: Group) -> torch.Tensor:
    _c, c2 = next_step_correction(group)
    scale = group.get("layer_scale", 1.0) * group["d"] * group["lr"] * c2**0.5
    return as_float(exp_avg_sq).sqrt().add_(group["eps"]).reciprocal_().mul_(scale)


def refuse_zero_lr(param: ParamState, group: Group) -> None:
    if group["lr"] == 0:
        raise OstateError(
            f"'{param.name}': its param group has lr 0, and these optimizers step such a group with the other "
            "groups' lr, which its group does not record",
            hint="the effective learning rate is still defined; the next update cannot be computed per group",
        )


def prodigy_step(
    param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor, *, next_d: float
) -> torch.Tensor:
    """Prodigy's next change of ``weight`` given the step's new estimate ``next_d`` (:math:`d'`), in its order."""
    refuse_zero_lr(param, group)
    beta1, beta2 = group["betas"][:2]
    d, eps, decay = group["d"], group["eps"], group["weight_decay"]
    dlr = d_lr(group)
    theta = weight.detach().clone()
    g = grad.add(theta, alpha=decay) if decay != 0 and not group["decouple"] else grad
    exp_avg_sq = param.read("exp_avg_sq").to(theta.dtype).mul(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
    denom = exp_avg_sq.sqrt().add_(next_d * eps)
    if decay != 0 and group["decouple"]:
        theta.add_(theta, alpha=-decay * dlr)
    if beta1 > 0:
        exp_avg = param.read("exp_avg").to(theta.dtype).mul(beta1).add_(g, alpha=d * (1 - beta1))
        theta.addcdiv_(exp_avg, denom, value=-dlr)
    else:
        theta.addcdiv_(g, denom, value=-dlr * next_d)  # prodigyopt multiplies by the new d here
    return theta - weight


def prodigy_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Prodigy's next change of ``weight`` with the saved d in the eps term (see the module docstring)."""
    return prodigy_step(param, group, grad, weight, next_d=group["d"])


def dadapt_adam_next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """D-Adaptation Adam's next change of ``weight``, in its order of operations."""
    refuse_zero_lr(param, group)
    beta1, beta2 = group["betas"][:2]
    eps, decay, r = group["eps"], group["weight_decay"], group.get("layer_scale", 1.0)
    dlr = d_lr(group)
    theta = weight.detach().clone()
    g = grad.add(theta, alpha=decay) if decay != 0 and not group["decouple"] else grad
    exp_avg = param.read("exp_avg").to(theta.dtype).mul(beta1).add_(g, alpha=r * dlr * (1 - beta1))
    exp_avg_sq = param.read("exp_avg_sq").to(theta.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    if decay != 0 and group["decouple"]:
        theta.add_(theta, alpha=-decay * dlr)
    theta.addcdiv_(exp_avg, denom, value=-1)
    return theta - weight


def prodigy_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    v = as_float(chunk["exp_avg_sq"])
    q: dict = {"eff_lr": prodigy_effective_lr(v, group), "exp_avg_sq": v}
    beta1, beta2 = group["betas"][:2]
    if "exp_avg" in chunk and beta1 > 0:
        m = as_float(chunk["exp_avg"])
        q["exp_avg_abs"] = m.abs()
        d_next = prodigy_next_d_zero_gradient(group)
        q["update"] = m.mul(-d_lr(group) * beta1).div_(v.mul(beta2).sqrt_().add_(d_next * group["eps"]))
    return q


def dadapt_adam_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    v, m = as_float(chunk["exp_avg_sq"]), as_float(chunk["exp_avg"])
    beta1, beta2 = group["betas"][:2]
    return {
        "eff_lr": dadapt_adam_effective_lr(v, group),
        "exp_avg_abs": m.abs(),
        "exp_avg_sq": v,
        "update": m.mul(-beta1).div_(v.mul(beta2).sqrt_().add_(group["eps"])),
    }


def columns(param: ParamState, group: Group) -> dict:
    """The learned step size: ``d``, ``d_lr`` (the next step's d * lr * bias correction) and, for Prodigy, d / d0."""
    out = {"d": group["d"], "d_lr": d_lr(group)}
    if group.get("d0"):
        out["d_over_d0"] = group["d"] / group["d0"]
    return out


def _prodigy_match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"s", "exp_avg_sq"} <= state_keys <= _PRODIGY_STATE):
        return 0
    return 6 if group_has(group, "d", "d0", "d_coef", "d_max", "d_numerator", "k", "betas", "eps") else 0


def _dadapt_adam_match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"s", "exp_avg", "exp_avg_sq"} <= state_keys <= _DADAPT_ADAM_STATE):
        return 0
    return 6 if group_has(group, "d", "k", "layer_scale", "numerator_weighted", "betas", "eps") else 0


_REFUSAL = (
    "the state's step count does not enter the update: the param groups' counter k does (bias correction), "
    "one for the whole optimizer and learned with the estimate d; use reset-m or reset-v (d kept), "
    "or 'fresh' (d back to d0)"
)
# d0 of dadaptation 3.2's DAdaptAdam (its groups do not record it: the constructor keeps it as self.d0).
DADAPT_D0 = 1e-6
# What prodigyopt 1.1 learns into every param group (step() reads group 0's and writes all):
# the estimate d, its running maximum d_max, the numerator sum d_numerator, the counter k,
# and d_denom, d_hat (written by each step for the record; the next step recomputes them).
PRODIGY_GROUP_STATE = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k")
# dadaptation 3.2 DAdaptAdam's: d, the weighted numerator sum and the counter k.
DADAPT_ADAM_GROUP_STATE = ("d", "numerator_weighted", "k")


def prodigy_fresh_group(group: Group) -> dict:
    """A new Prodigy's learned group values: ``d = d_max = d0``, ``d_numerator`` 0, ``k`` 0 (no ``d_denom``,
    ``d_hat`` before its first step).

    Example:
        >>> prodigy_fresh_group({"d0": 1e-6, "d": 3e-3})
        {'d': 1e-06, 'd_max': 1e-06, 'd_numerator': 0.0, 'k': 0}
    """
    return {"d": group["d0"], "d_max": group["d0"], "d_numerator": 0.0, "k": 0}


def dadapt_adam_fresh_group(group: Group) -> dict:
    """A new DAdaptAdam's learned group values: ``d = d0``, ``numerator_weighted`` 0, ``k`` 0. Its groups
    do not record ``d0``: the library's default (:data:`DADAPT_D0`) unless the group has a ``d0`` key."""
    return {"d": group.get("d0", DADAPT_D0), "numerator_weighted": 0.0, "k": 0}


_FRESH = {"exp_avg": fresh_zeros, "exp_avg_sq": fresh_zeros, "step": fresh_zeros, "s": fresh_zeros}
_PRODIGY_LAYOUT = StateLayout(
    first_moment=("exp_avg",),
    second_moment=("exp_avg_sq",),
    counter=("step",),
    fresh=_FRESH,  # no fresh p0: a new Prodigy takes the weights at its first step (fresh leaves the state out)
    step_in_update=lambda group: False,
    keep_v_refusal=_REFUSAL,
    group_state=PRODIGY_GROUP_STATE,
    fresh_group=prodigy_fresh_group,
    flat=("s", "p0"),
    reset_step_refusal=_REFUSAL,
)
_DADAPT_ADAM_LAYOUT = StateLayout(
    first_moment=("exp_avg",),
    second_moment=("exp_avg_sq",),
    counter=("step",),
    fresh=_FRESH,
    step_in_update=lambda group: False,
    keep_v_refusal=_REFUSAL,
    group_state=DADAPT_ADAM_GROUP_STATE,
    fresh_group=dadapt_adam_fresh_group,
    reset_step_refusal=_REFUSAL,
)
_DISPLAY = ("d", "d_lr", "exp_avg_sq_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max")
_NOTE = (
    "the learned step size d multiplies lr (d_lr = d * lr * bias correction is the next step's size) and lives "
    "in the param groups: a fresh optimizer starts again from d0; eff_lr includes d"
)


def prodigy_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """prodigyopt's state before the first step: ``step`` 0, ``s`` zeros and ``p0`` the weights' every
    ``slice_p``-th coordinate (a 0-dim zero for an all-zero weight), ``exp_avg`` (when beta1 > 0) and
    ``exp_avg_sq`` zeros. At that step ``p == p0`` and ``s`` is 0, so the estimate of d is 0 and d stays
    as the group holds it: the first step is exactly :func:`prodigy_next_update` of this state."""
    slice_p = int(group.get("slice_p", 1) or 1)
    flat = weight.detach().flatten()[::slice_p]
    p0 = flat.clone() if bool(weight.any()) else torch.tensor(0, dtype=weight.dtype)
    keys = ("exp_avg", "exp_avg_sq") if group["betas"][0] > 0 else ("exp_avg_sq",)
    return {"step": 0, "s": torch.zeros_like(flat), "p0": p0, **zeros_for(weight, *keys)}


def dadapt_adam_initial_state(weight: torch.Tensor, group: Group) -> dict:
    """dadaptation's DAdaptAdam state before the first step: ``step`` 0 and zero ``s``, ``exp_avg``,
    ``exp_avg_sq`` (with ``s`` 0 the estimate of d is 0: d stays as the group holds it)."""
    return {"step": 0, **zeros_for(weight, "s", "exp_avg", "exp_avg_sq")}


PRODIGY = Family(
    name="prodigy",
    label="Prodigy",
    match=_prodigy_match,
    quantities=prodigy_quantities,
    effective_lr=lambda param, group: prodigy_effective_lr(param.read("exp_avg_sq"), group),
    next_update=prodigy_next_update,
    columns=columns,
    display=("d_over_d0", *_DISPLAY),
    hyperparameters=(
        "lr",
        "d",
        "d0",
        "d_max",
        "k",
        "betas",
        "beta3",
        "eps",
        "weight_decay",
        "decouple",
        "use_bias_correction",
        "growth_rate",
        "d_coef",
    ),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    layout=_PRODIGY_LAYOUT,
    lr_scale="d",
    notes=("Prodigy: " + _NOTE,),
    first_step=adaptive_first_step(prodigy_initial_state, "-d * lr * g / (|g| + eps)"),
)

DADAPT_ADAM = Family(
    name="dadapt_adam",
    label="D-Adaptation Adam",
    match=_dadapt_adam_match,
    quantities=dadapt_adam_quantities,
    effective_lr=lambda param, group: dadapt_adam_effective_lr(param.read("exp_avg_sq"), group),
    next_update=dadapt_adam_next_update,
    columns=columns,
    display=_DISPLAY,
    hyperparameters=(
        "lr",
        "d",
        "k",
        "betas",
        "eps",
        "weight_decay",
        "decouple",
        "use_bias_correction",
        "growth_rate",
        "layer_scale",
    ),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    layout=_DADAPT_ADAM_LAYOUT,
    lr_scale="d",
    notes=("D-Adaptation Adam: " + _NOTE + "; the first moment already carries d * lr",),
    first_step=adaptive_first_step(dadapt_adam_initial_state, "-d * lr * g / (|g| + eps)"),
)
