r"""torchao's low-bit Adam and AdamW (``torchao.optim``: ``AdamW8bit``, ``AdamW4bit``, ``AdamWFp8``, and Adam).

**State** (source: torchao 0.18, ``torchao/optim/adam.py``): ``step`` (a float32 0-d
tensor), ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``). A
parameter with at least 4096 elements and a multiple of the block size keeps them as a
quantised tensor subclass, which ostate's readers give as the dequantised moment and its
quantisation (``{key}_quant``, ``{key}_scale``, ``{key}_qmap``; the layouts and the
blockwise dequantisation :math:`x_j = \mathrm{qmap}[q_j]\cdot s_{\lfloor j/B\rfloor}` are
in ``ostate/formats/files/torchao_state.py``); smaller ones keep plain tensors. The
param groups hold ``lr`` (a 0-d tensor, read as a number), ``betas``, ``eps``,
``weight_decay``, ``amsgrad`` and nothing else. Whether the optimizer was Adam or AdamW
is an attribute of the optimizer object, not saved: AdamW (the usual choice) is assumed.

**Update** (``single_param_adam``, compiled, everything in float32, the moments
dequantised before and re-quantised after the step), step :math:`t+1`:

.. math::
    \theta &\leftarrow \theta - \gamma\lambda\theta \quad\text{(AdamW)}, \qquad
        g \leftarrow g + \lambda\theta \quad\text{(Adam)} \\
    m &\leftarrow \mathrm{lerp}(m, g, 1-\beta_1), \qquad
        v \leftarrow \mathrm{lerp}(v, g^2, 1-\beta_2) \\
    \theta &\leftarrow \theta - \gamma\,\frac{m/(1-\beta_1^{t+1})}{\sqrt{\hat v}/\sqrt{1-\beta_2^{t+1}} + \epsilon}
        \quad (\hat v = v \text{, or } \max(v^{max}, v) \text{ with amsgrad})

The **effective learning rate** is Adam's, on the dequantised second moment:
:math:`\eta_i = \gamma/(\sqrt{v_{t,i}}/\sqrt{1-\beta_2^t}+\epsilon)`.

``next_update`` follows these operations on the dequantised state (so it matches the
real step to float32 rounding: torch.compile fuses them); bf16 stochastic rounding
(``bf16_stochastic_round``, not saved) is random and not mirrored.

**First step** of a parameter without state (an optimizer saved before its first step
saves no state at all, neither the moments nor their quantisation): torchao creates
``step`` 0 and zero moments (a quantised moment starts as all-zero codes with zero block
scales, which dequantise to exactly 0), so the first step is the update above from zero
moments in float32, :math:`-\gamma g/(|g|+\epsilon)` plus the weight decay.

**Strategies**: only ``fresh`` and ``reload``: the moments are tensor subclasses that
ostate reads (as their inner tensors) but does not write back.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from ostate.optimizers.adam import ADAM_MOMENTS, adam_effective_lr, adam_momentum_update, adam_snr
from ostate.optimizers.family import Family, Group, adaptive_first_step, group_has, step_of, zeros_for
from ostate.state import ParamState

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_QUANT_KEYS = frozenset(f"{m}_{part}" for m in _MOMENTS for part in ("quant", "scale", "qmap"))
_STATE_KEYS = frozenset({"step", *_MOMENTS}) | _QUANT_KEYS
# Keys that torch.optim's Adam groups have and torchao's do not.
_TORCH_GROUP_KEYS = ("foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def _v_key(group: Group) -> str:
    return "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return adam_effective_lr(
        param.read(_v_key(group)), lr=float(group["lr"]), beta2=group["betas"][1], eps=group["eps"], step=step_of(param)
    )


def _update(decoupled: bool):
    def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # lr and step are float32 tensors in torchao, so are the bias corrections: computed so here.
        lr = torch.tensor(float(group["lr"]), dtype=torch.float32)
        wd, eps = group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"][:2]
        p, g = weight.detach().float(), grad.float()
        if decoupled:
            p = p - lr * wd * p
        else:
            g = g + wd * p
        step = torch.tensor(step_of(param) + 1, dtype=torch.float32)
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        m = param.read("exp_avg").float().lerp(g, 1 - beta1)
        v = param.read("exp_avg_sq").float().lerp(g.square(), 1 - beta2)
        if group.get("amsgrad", False):
            v = torch.maximum(param.read("max_exp_avg_sq").float(), v)
        denom = (v.sqrt() / bias_correction2.sqrt()) + eps
        p = p - lr * (m / bias_correction1) / denom
        return p.to(weight.dtype) - weight

    next_update.__doc__ = f"torchao's {'AdamW' if decoupled else 'Adam'} next change of ``weight`` (float32 math)."
    return next_update


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"][:2]
    step, lr, eps = step_of(param), float(group["lr"]), group["eps"]
    m, v = chunk["exp_avg"].float(), chunk[_v_key(group)].float()
    next_v = v if group.get("amsgrad", False) else v * beta2
    return {
        "eff_lr": adam_effective_lr(v, lr=lr, beta2=beta2, eps=eps, step=step),
        "exp_avg_abs": m.abs(),
        "exp_avg_sq": chunk["exp_avg_sq"].float(),
        "snr": adam_snr(m, v, beta1=beta1, beta2=beta2, step=step),
        "update": adam_momentum_update(m, next_v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step),
    }


def quantization_columns(param: ParamState, group: Group) -> dict:
    """How each moment is stored: ``8bit``, ``4bit``, ``fp8`` or ``32bit``, the block size, and the block scales' spread."""
    quant = param.state.get("exp_avg_quant")
    if quant is None:
        return {"state_bits": "32bit"} if "exp_avg" in param.state else {}
    out: dict = {"state_bits": quant}
    for key in ("exp_avg", "exp_avg_sq"):
        if f"{key}_scale" not in param.state:
            continue
        scale = param.read(f"{key}_scale").float().reshape(-1)
        if key == "exp_avg":
            out["blocksize"] = param.state["exp_avg"].numel // max(scale.numel(), 1)
        median = float(scale.median())
        out[f"{key}_scale_max"] = float(scale.max())
        out[f"{key}_block_spread"] = float(scale.max()) / median if median > 0 else float("inf")
    if "exp_avg_sq_scale" in param.state:
        # Second moments that dequantise to exactly 0: the next gradient there is divided by eps alone.
        out["exp_avg_sq_zero_fraction"] = float((param.read("exp_avg_sq") == 0).float().mean())
    return out


def _match(state_keys: frozenset[str], group: Group) -> int:
    if not (state_keys & _QUANT_KEYS and {"exp_avg", "exp_avg_sq"} <= state_keys <= _STATE_KEYS):
        return 0
    if not group_has(group, "lr", "betas", "eps", "weight_decay") or any(k in group for k in _TORCH_GROUP_KEYS):
        return 0
    return 7


def initial_state(weight: torch.Tensor, group: Group) -> dict:
    """torchao's state before the first step: ``step`` 0 (a float32 tensor) and zero moments (``max_exp_avg_sq``
    too with amsgrad), dequantised: all-zero codes with zero block scales are zeros."""
    keys = _MOMENTS if group.get("amsgrad", False) else _MOMENTS[:2]
    return {"step": torch.tensor(0.0), **zeros_for(weight.float(), *keys)}


_FIRST_STEP = adaptive_first_step(initial_state, "-lr * g / (|g| + eps)")
_DISPLAY = ("state_bits", "blocksize", "exp_avg_sq_zero_fraction", "exp_avg_sq_mean", "eff_lr_min", "eff_lr_p50")
_HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad")
_NOTE = (
    "torchao low-bit Adam: moments dequantised blockwise from their 8-bit, 4-bit or FP8 codes; Adam or AdamW is "
    "not saved (AdamW is assumed; pass --optimizer torchao_adam for Adam)",
)

TORCHAO_ADAMW = Family(
    name="torchao_adamw",
    label="torchao low-bit AdamW",
    match=_match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=_update(decoupled=True),
    columns=quantization_columns,
    display=_DISPLAY,
    hyperparameters=_HYPER,
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    moments=ADAM_MOMENTS,
    preferred=True,
    notes=_NOTE,
    first_step=_FIRST_STEP,
)
# Adam's coupled weight decay; everything else as AdamW's (torchao saves no word of which it was).
TORCHAO_ADAM = dataclasses.replace(
    TORCHAO_ADAMW,
    name="torchao_adam",
    label="torchao low-bit Adam",
    next_update=_update(decoupled=False),
    preferred=False,
)
