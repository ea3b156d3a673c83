r"""Adam, AdamW and AMSGrad, as ``torch.optim.Adam`` / ``torch.optim.AdamW`` compute them.

A checkpoint holds the state after step :math:`t`: :math:`m_t` (``exp_avg``),
:math:`v_t` (``exp_avg_sq``), :math:`t` (``step``), and with AMSGrad
:math:`v^{max}_t` (``max_exp_avg_sq``). Step :math:`t+1`, given gradient :math:`g`
and weights :math:`\theta`:

.. math::
    g &\leftarrow -g \quad\text{if maximize} \\
    \theta &\leftarrow \theta (1 - \gamma\lambda) \quad\text{(AdamW: decoupled weight decay)} \\
    g &\leftarrow g + \lambda\theta \quad\text{(Adam: L2 weight decay, enters both moments)} \\
    m_{t+1} &= \beta_1 m_t + (1-\beta_1) g \\
    v_{t+1} &= \beta_2 v_t + (1-\beta_2) g^2 \\
    \hat v &= v_{t+1} \text{, or } \max(v^{max}_t, v_{t+1}) \text{ with AMSGrad} \\
    \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^{t+1}} \cdot
        \frac{m_{t+1}}{\sqrt{\hat v}/\sqrt{1-\beta_2^{t+1}} + \epsilon}

The **effective learning rate** of coordinate :math:`i` is the factor that multiplies
the bias-corrected first moment :math:`\hat m = m/(1-\beta_1^t)`, read from the saved
state:

.. math::
    \eta_i = \frac{\gamma}{\sqrt{v_{t,i}} / \sqrt{1-\beta_2^{t}} + \epsilon}

with :math:`\gamma` the group's saved ``lr`` (after a scheduler step this is usually
the lr of the *next* step), :math:`v` replaced by ``max_exp_avg_sq`` under AMSGrad,
and :math:`\epsilon` added to :math:`\sqrt{\hat v}` (outside the square root).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ostate.optimizers.family import (
    Family,
    Group,
    Moments,
    Preconditioned,
    StateLayout,
    adaptive_first_step,
    fresh_zeros,
    group_has,
    step_of,
    zeros_for,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})


def second_moment_key(group: Group) -> str:
    """The state key that plays :math:`v` in the denominator."""
    return "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"


def adam_effective_lr(exp_avg_sq: torch.Tensor, *, lr: float, beta2: float, eps: float, step: float) -> torch.Tensor:
    r""":math:`\gamma / (\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon)`, elementwise, in float32 (or float64 if given)."""
    v = exp_avg_sq if exp_avg_sq.dtype == torch.float64 else exp_avg_sq.float()
    return _effective_lr_from_root(v.sqrt(), lr=lr, beta2=beta2, eps=eps, step=step)


def _effective_lr_from_root(root: torch.Tensor, *, lr: float, beta2: float, eps: float, step: float) -> torch.Tensor:
    # gamma / (r / c + eps) = gamma c / (r + eps c), with c = sqrt(1 - beta2^t): two fewer passes.
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    return torch.add(root, eps * bias_correction2_sqrt).reciprocal_().mul_(lr * bias_correction2_sqrt)


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    beta2 = group["betas"][1]
    return adam_effective_lr(
        param.read(second_moment_key(group)), lr=group["lr"], beta2=beta2, eps=group["eps"], step=step_of(param)
    )


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Adam's next change of ``weight`` (L2 weight decay unless the group says decoupled)."""
    return adam_update(param, group, grad, weight, decoupled=bool(group.get("decoupled_weight_decay", False)))


def next_update_adamw(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """AdamW's next change of ``weight`` (decoupled weight decay)."""
    return adam_update(param, group, grad, weight, decoupled=True)


def adam_update(
    param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor, *, decoupled: bool
) -> torch.Tensor:
    """The change of ``weight`` that the next ``step()`` makes, computed in the weight's dtype
    with torch's order of operations (so the result matches torch to rounding)."""
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    theta = weight.detach().clone()
    g = -grad if group.get("maximize", False) else grad
    if wd != 0:
        if decoupled:
            theta.mul_(1 - lr * wd)
        else:
            g = g.add(theta, alpha=wd)
    exp_avg = param.read("exp_avg").to(theta.dtype).lerp(g, 1 - beta1)
    exp_avg_sq = param.read("exp_avg_sq").to(theta.dtype).mul(beta2).addcmul_(g, g, value=1 - beta2)
    step = step_of(param) + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if group.get("amsgrad", False):
        exp_avg_sq = torch.maximum(param.read("max_exp_avg_sq").to(theta.dtype), exp_avg_sq)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    theta.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    return theta - weight


def adam_snr(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float, step: float
) -> torch.Tensor:
    r""":math:`|\hat m| / \sqrt{\hat v}` elementwise (0 where :math:`v = 0`), without :math:`\epsilon`."""
    return _snr_from_root(exp_avg.float().abs(), exp_avg_sq.float().sqrt(), beta1=beta1, beta2=beta2, step=step)


def _snr_from_root(
    exp_avg_abs: torch.Tensor, root: torch.Tensor, *, beta1: float, beta2: float, step: float
) -> torch.Tensor:
    scale = _divide((1 - beta2**step) ** 0.5, 1 - beta1**step)
    snr = torch.div(exp_avg_abs, root).mul_(scale)
    if _may_hold_zero(root):  # coordinates that never had a gradient: 0, not 0/0
        snr.masked_fill_(root == 0, 0.0)
    return snr


def adam_momentum_update(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
) -> torch.Tensor:
    r"""The next step's change with a zero gradient and no weight decay:
    :math:`-\frac{\gamma}{1-\beta_1^{t+1}} \cdot \frac{\beta_1 m}{\sqrt{\beta_2 v}/\sqrt{1-\beta_2^{t+1}}+\epsilon}`.

    ``exp_avg_sq`` here is the *next* second moment (:math:`\beta_2 v`, or
    ``max_exp_avg_sq`` under AMSGrad, which a zero gradient leaves unchanged).
    """
    return _momentum_update_from_root(
        exp_avg.float(), exp_avg_sq.float().sqrt(), lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step
    )


def _momentum_update_from_root(
    exp_avg: torch.Tensor,
    next_root: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    root_scale: float = 1.0,
) -> torch.Tensor:
    # next_root * root_scale is the square root of the next second moment.
    t = step + 1
    denom = torch.mul(next_root, root_scale / (1 - beta2**t) ** 0.5).add_(eps)
    return torch.div(exp_avg, denom, out=denom).mul_(-lr * beta1 / (1 - beta1**t))


def _may_hold_zero(root: torch.Tensor) -> bool:
    """Whether a tensor of square roots (>= 0, or NaN) may hold a zero: one min() instead of a pass through bool."""
    return root.numel() > 0 and not float(root.min()) > 0


def _divide(a: float, b: float) -> float:
    # A state saved at step 0 (never stepped, or a reset counter) has no bias correction: NaN, not a crash.
    return a / b if b else math.nan


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    step = step_of(param)
    amsgrad = bool(group.get("amsgrad", False))
    m, v = chunk["exp_avg"].float(), chunk["exp_avg_sq"].float()
    root = v.sqrt()  # shared by the effective lr, the SNR and the update
    denominator_root = chunk["max_exp_avg_sq"].float().sqrt() if amsgrad else root
    exp_avg_abs = m.abs()
    q = {
        "eff_lr": _effective_lr_from_root(denominator_root, lr=lr, beta2=beta2, eps=eps, step=step),
        "exp_avg_abs": exp_avg_abs,
        "exp_avg_sq": v,
        "snr": _snr_from_root(exp_avg_abs, root, beta1=beta1, beta2=beta2, step=step),
        # With a zero gradient v becomes beta2 * v; AMSGrad keeps max(v_max, beta2 * v) = v_max.
        "update": _momentum_update_from_root(
            m,
            denominator_root,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            step=step,
            root_scale=1.0 if amsgrad else beta2**0.5,
        ),
    }
    if "max_exp_avg_sq" in chunk:
        q["max_exp_avg_sq"] = chunk["max_exp_avg_sq"]
    if amsgrad:
        q["amsgrad_ratio"] = amsgrad_ratio(denominator_root, root)
    return q


def amsgrad_ratio(max_root: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    r""":math:`\sqrt{v^{max}/v}` elementwise: how many times smaller AMSGrad's step is than Adam's would be
    (1 where both are 0; :math:`+\infty` where only :math:`v` is).

    Example:
        >>> amsgrad_ratio(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])).tolist()
        [2.0, 1.0, inf]
    """
    ratio = torch.div(max_root, root)
    if _may_hold_zero(root):
        ratio.masked_fill_((root == 0) & (max_root == 0), 1.0)
    return ratio


def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    r"""The saved state's update :math:`\hat m / (\sqrt{\hat v} + \epsilon)` (numerator up to :math:`1/(1-\beta_1^t)`)."""
    return bias_corrected_preconditioned(
        chunk["exp_avg"], chunk[second_moment_key(group)], group, step_of(param), q["eff_lr"]
    )


def bias_corrected_preconditioned(
    numerator: torch.Tensor, exp_avg_sq: torch.Tensor, group: Group, step: float, eff_lr: torch.Tensor
) -> Preconditioned:
    r""":math:`n / (\sqrt{v/(1-\beta_2^t)} + \epsilon)`, reusing ``eff_lr`` :math:`= \gamma/(\ldots)` as the
    inverse denominator (recomputed with :math:`\gamma = 1` when the group's lr is 0).

    Shared by every family whose :math:`\epsilon` is added to the bias-corrected
    :math:`\sqrt{\hat v}` (Adam, AdamW, AMSGrad, NAdam, bitsandbytes Adam).
    """
    beta2 = group["betas"][1]
    v = exp_avg_sq.float()
    lr = group["lr"]
    inverse = eff_lr if lr else adam_effective_lr(v, lr=1.0, beta2=beta2, eps=group["eps"], step=step)
    return Preconditioned(
        numerator=numerator,
        second_moment=v,
        inverse_denominator=inverse,  # eff_lr = lr / (sqrt(v_hat) + eps)
        eps=float(group["eps"]),
        second_moment_scale=_divide(1.0, 1 - beta2**step),
        inverse_denominator_scale=1.0 / lr if lr else 1.0,
    )


def pure_noise_snr(beta1: float, step: float = math.inf) -> float:
    r"""The ratio :math:`|\hat m| / \sqrt{\hat v}` at its root mean square under pure gradient noise.

    With gradients drawn independently with mean zero and variance :math:`\sigma^2`,
    :math:`E[m_t^2] = (1-\beta_1)^2 \frac{1-\beta_1^{2t}}{1-\beta_1^2}\sigma^2` and
    :math:`E[v_t] = (1-\beta_2^t)\sigma^2`, so after bias correction

    .. math::
        \sqrt{\frac{E[\hat m^2]}{E[\hat v]}} = \sqrt{\frac{1-\beta_1}{1+\beta_1} \cdot
            \frac{1+\beta_1^t}{1-\beta_1^t}} \;\to\; \sqrt{\frac{1-\beta_1}{1+\beta_1}}
            \quad (t \to \infty)

    (0.229 for :math:`\beta_1 = 0.9`; 1 at :math:`t = 1`, where :math:`\hat m^2 = \hat v = g^2`).
    A coordinate well above this line has a gradient with a consistent sign.

    Example:
        >>> round(pure_noise_snr(0.9), 4), pure_noise_snr(0.9, 1)
        (0.2294, 1.0)
    """
    ratio = (1 - beta1) / (1 + beta1)
    if math.isfinite(step):
        ratio *= (1 + beta1**step) / (1 - beta1**step)
    return math.sqrt(ratio)


def max_snr(beta1: float, beta2: float, step: float = math.inf) -> float:
    r"""The largest :math:`|\hat m| / \sqrt{\hat v}` any gradient sequence can give after :math:`t` steps.

    By Cauchy-Schwarz, with :math:`\rho = \beta_1^2/\beta_2`,
    :math:`m_t^2 = (1-\beta_1)^2 (\sum_j \beta_1^j g_{t-j})^2 \le (1-\beta_1)^2
    \sum_{j<t} \rho^j \sum_j \beta_2^j g_{t-j}^2`, so

    .. math::
        \frac{|\hat m|}{\sqrt{\hat v}} \le \sqrt{\frac{(1-\beta_1)^2}{1-\beta_2}
            \sum_{j=0}^{t-1}\rho^j \cdot \frac{1-\beta_2^t}{(1-\beta_1^t)^2}}
            \;\to\; \sqrt{\frac{(1-\beta_1)^2}{(1-\beta_2)(1-\beta_1^2/\beta_2)}} \quad (t\to\infty)

    (7.27 for (0.9, 0.999), 1.165 for (0.9, 0.95), 1 when :math:`\beta_1 = \beta_2`;
    infinite for :math:`t \to \infty` when :math:`\beta_1^2 \ge \beta_2`). The bound is
    attained by :math:`g_k \propto (\beta_1/\beta_2)^{t-k}`, a gradient that grows
    steadily; it is 1 at :math:`t = 1`.

    Example:
        >>> round(max_snr(0.9, 0.999), 2), round(max_snr(0.9, 0.95), 3), max_snr(0.9, 0.9)
        (7.27, 1.165, 1.0)
        >>> round(max_snr(0.9, 0.999, 1), 12)
        1.0
    """
    rho = beta1**2 / beta2
    if math.isfinite(step):
        geometric = step if rho == 1 else (1 - rho**step) / (1 - rho)
        return math.sqrt((1 - beta1) ** 2 / (1 - beta2) * geometric * (1 - beta2**step) / (1 - beta1**step) ** 2)
    if rho >= 1:
        return math.inf
    return math.sqrt((1 - beta1) ** 2 / ((1 - beta2) * (1 - rho)))


def moment_estimates(
    chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: Mapping
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`|\hat m| = |m|/(1-\beta_1^t)` and :math:`\sqrt{\hat v} = \sqrt{v/(1-\beta_2^t)}`, from the
    ``exp_avg_abs`` and ``exp_avg_sq`` quantities (the EMA :math:`v`, also under AMSGrad)."""
    beta1, beta2 = group["betas"][:2]
    step = step_of(param)
    first = torch.mul(q["exp_avg_abs"].float(), _divide(1.0, 1 - beta1**step))
    second = torch.sqrt(q["exp_avg_sq"].float()).mul_(_divide(1.0, (1 - beta2**step) ** 0.5))
    return first, second


ADAM_MOMENTS = Moments(
    estimates=moment_estimates,
    betas=lambda group: (float(group["betas"][0]), float(group["betas"][1])),
    eps_root=lambda group, step: float(group["eps"]),  # eps is added to sqrt(v_hat)
)


def columns(param: ParamState, group: Group) -> dict:
    if param.step is None:
        return {}
    beta1, beta2 = group["betas"]
    return {"bias_correction1": 1 - beta1**param.step, "bias_correction2": 1 - beta2**param.step}


def _match(decoupled: bool):
    def match(state_keys: frozenset[str], group: Group) -> int:
        if state_keys and not ({"exp_avg", "exp_avg_sq"} <= state_keys <= _STATE_KEYS):
            return 0
        if not group_has(group, "betas", "eps"):
            return 1 if state_keys else 0
        if "decoupled_weight_decay" in group:
            return 4 if bool(group["decoupled_weight_decay"]) == decoupled and "amsgrad" in group else 0
        # Before torch 2.6, Adam and AdamW groups had the same keys.
        return 3 if "amsgrad" in group else 1

    return match


_DISPLAY = ("exp_avg_abs_mean", "exp_avg_sq_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max")
# bitsandbytes' 8-bit Adam keeps m with the signed and v with the unsigned dynamic map.
_QUANTIZED = {"exp_avg": True, "exp_avg_sq": False}
_HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
# One layout for Adam and AdamW (AMSGrad's max_exp_avg_sq goes with v): a state of one loads into the other.
ADAM_LAYOUT = StateLayout(
    first_moment=("exp_avg",),
    second_moment=("exp_avg_sq", "max_exp_avg_sq"),
    counter=("step",),
    fresh={"exp_avg": fresh_zeros, "exp_avg_sq": fresh_zeros, "max_exp_avg_sq": fresh_zeros, "step": fresh_zeros},
    v_bias_corrected=True,
)


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torch's Adam/AdamW state before the first step: ``step`` 0 and zero moments (AMSGrad: ``max_exp_avg_sq`` too)."""
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad", False) else ("exp_avg", "exp_avg_sq")
    return {"step": torch.tensor(0.0), **zeros_for(weight, *keys)}


ADAM_FIRST_STEP = adaptive_first_step(initial_state, "-lr * g / (|g| + eps)")

ADAM = Family(
    name="adam",
    label="Adam",
    match=_match(decoupled=False),
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=_DISPLAY,
    hyperparameters=_HYPER,
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    preconditioned=preconditioned,
    quantized_moments=_QUANTIZED,
    moments=ADAM_MOMENTS,
    layout=ADAM_LAYOUT,
    first_step=ADAM_FIRST_STEP,
)


ADAMW = Family(
    name="adamw",
    label="AdamW",
    match=_match(decoupled=True),
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update_adamw,
    columns=columns,
    display=_DISPLAY,
    hyperparameters=_HYPER,
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    preconditioned=preconditioned,
    quantized_moments=_QUANTIZED,
    moments=ADAM_MOMENTS,
    layout=ADAM_LAYOUT,
    preferred=True,
    notes=("AdamW: weight decay is decoupled (theta <- theta * (1 - lr * weight_decay) before the Adam step).",),
    first_step=ADAM_FIRST_STEP,
)
