r"""bitsandbytes optimizers with 8-bit (or 32-bit) state: Adam/AdamW, Lion, SGD momentum, RMSprop, Adagrad.

**State layout** (source: bitsandbytes/optim/optimizer.py, ``Optimizer1State`` /
``Optimizer2State.init_state`` and ``Optimizer8bit.state_dict``). Per parameter:
``step`` (a Python int) and ``state1`` (first moment, or the only state) and, for
Adam, ``state2`` (second moment). A parameter with fewer than ``min_8bit_size``
(default 4096) elements keeps them as float32; a larger one keeps them as uint8
codes with ``qmap1``/``qmap2`` (the 256-value dynamic maps, signed for ``state1``
and unsigned for ``state2``) and ``absmax1``/``absmax2`` (one float32 scale per
block). Blocks are 256 elements in current releases and were 2048 in older ones; the
size is inferred from the number of scales. Releases before blockwise quantisation
(``block_wise=False``) kept one scale, ``max1``/``max2``. Since bitsandbytes 0.45
``state_dict()`` nests these tensors under ``__bnb_optimizer_quant_state__`` (so that
FSDP does not gather them); older releases kept them flat. ostate reads both.

**Dequantisation**, for element :math:`j` of a tensor with code :math:`q_j` in block
:math:`b = \lfloor j / B \rfloor`:

.. math::
    x_j = \mathrm{qmap}[q_j] \cdot \mathrm{absmax}_b

**Update rules** (bitsandbytes' kernels; :math:`m` = ``state1``, :math:`v` =
``state2``, dequantised, and re-quantised after the step):

- Adam / AdamW (``"adam"``): :math:`m \leftarrow \beta_1 m + (1-\beta_1)g`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2)g^2`, :math:`\theta \leftarrow
  \theta(1-\gamma\lambda)` (weight decay is *always* decoupled, for Adam8bit too),
  :math:`\theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^{t+1}}
  \cdot\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^{t+1}}+\epsilon}`.
  Effective lr as torch's Adam: :math:`\eta_i = \gamma/(\sqrt{v_i/(1-\beta_2^t)}+\epsilon)`.
- Lion (``"lion"``):
  :math:`\theta \leftarrow \theta(1-\gamma\lambda) - \gamma\,\mathrm{sign}(\beta_1 m + (1-\beta_1) g)`,
  :math:`m \leftarrow \beta_2 m + (1-\beta_2) g`. :math:`\eta_i = \gamma`.
- SGD momentum (``"momentum"``, betas = (momentum, dampening); dampening is ignored
  by the kernels): :math:`g \leftarrow g + \lambda\theta`, :math:`b \leftarrow g` on
  the first step, else :math:`\mu b + g`; :math:`\theta \leftarrow \theta - \gamma b`.
  :math:`\eta_i = \gamma`.
- RMSprop (``"rmsprop"``, betas = (alpha, momentum)): :math:`g \leftarrow g + \lambda\theta`,
  :math:`v \leftarrow \alpha v + (1-\alpha) g^2`, :math:`\theta \leftarrow \theta - \gamma g/(\sqrt v + \epsilon)`.
  :math:`\eta_i = \gamma/(\sqrt{v_i}+\epsilon)`.
- Adagrad (``"adagrad"``): :math:`g \leftarrow g + \lambda\theta`, :math:`s \leftarrow s + g^2`,
  :math:`\theta \leftarrow \theta - \gamma g/(\sqrt s + \epsilon)`. :math:`\eta_i = \gamma/(\sqrt{s_i}+\epsilon)`.

``next_update`` follows the CPU kernels of bitsandbytes 0.50 operation by operation
(the CUDA kernels compute the same formulas). Not mirrored, because the state dict
does not record them: percentile clipping (``gnorm_vec``), update-norm clipping of
LAMB/LARS (``unorm_vec``, ``max_unorm``), and per-parameter overrides registered
with ``GlobalOptimManager``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.adam import (
    ADAM_MOMENTS,
    adam_effective_lr,
    adam_momentum_update,
    adam_snr,
    bias_corrected_preconditioned,
)
from ostate.optimizers.family import (
    Family,
    FirstStep,
    Group,
    Preconditioned,
    adaptive_first_step,
    plain_preconditioned,
    step_of,
)
from ostate.state import ParamState

QUANT_KEYS = frozenset({"qmap1", "qmap2", "absmax1", "absmax2", "max1", "max2", "new_max1", "new_max2"})
_ONE_STATE_KEYS = frozenset({"step", "state1", "qmap1", "absmax1", "max1", "new_max1", "gnorm_vec", "unorm_vec"})
_TWO_STATE_KEYS = _ONE_STATE_KEYS | {"state2", "qmap2", "absmax2", "max2", "new_max2"}
# Block sizes bitsandbytes has used for blockwise 8-bit state (256 now, 2048 in older releases).
_BLOCK_SIZES = tuple(2**k for k in range(6, 13))


def infer_blocksize(numel: int, blocks: int) -> int:
    """The block size that splits ``numel`` elements into ``blocks`` scales.

    Example:
        >>> infer_blocksize(4480, 18), infer_blocksize(4480, 3)
        (256, 2048)
    """
    for size in _BLOCK_SIZES:
        if -(-numel // size) == blocks:
            return size
    raise OstateError(
        f"cannot tell the quantisation block size: {numel} elements with {blocks} scales",
        hint=f"bitsandbytes uses blocks of {', '.join(map(str, _BLOCK_SIZES))} elements",
    )


def dequantize_blockwise(
    codes: torch.Tensor, qmap: torch.Tensor, absmax: torch.Tensor, blocksize: int | None = None
) -> torch.Tensor:
    r"""float32 values :math:`\mathrm{qmap}[q_j] \cdot \mathrm{absmax}_{\lfloor j/B \rfloor}`, in ``codes``' shape."""
    n, blocks = codes.numel(), absmax.numel()
    blocksize = blocksize or infer_blocksize(n, blocks)
    values = qmap.float().index_select(0, codes.reshape(-1).int())
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n))
    return padded.view(blocks, blocksize).mul_(absmax.float().reshape(-1, 1)).reshape(-1)[:n].reshape(codes.shape)


def is_quantized(param: ParamState) -> bool:
    ref = param.state.get("state1")
    return ref is not None and getattr(ref, "dtype", None) == torch.uint8


def dequantized(param: ParamState, index: int) -> torch.Tensor:
    """``state1`` (index 1) or ``state2`` (index 2) as float32 values, whatever their storage."""
    codes = param.read(f"state{index}")
    if codes.dtype != torch.uint8:
        return codes.float()
    qmap = param.read(f"qmap{index}")
    if f"absmax{index}" in param.state:
        return dequantize_blockwise(codes, qmap, param.read(f"absmax{index}"))
    if f"max{index}" in param.state:  # block_wise=False: one scale for the whole tensor
        return (
            qmap.float()
            .index_select(0, codes.reshape(-1).int())
            .mul_(param.read(f"max{index}").float().reshape(-1)[0])
            .reshape(codes.shape)
        )
    raise OstateError(f"'{param.name}' has 8-bit state{index} but neither absmax{index} nor max{index}")


def _check_mirrorable(param: ParamState) -> None:
    for key, what in (("gnorm_vec", "percentile clipping"), ("unorm_vec", "update-norm clipping (LAMB/LARS)")):
        if key in param.state:
            raise OstateError(
                f"'{param.name}' was trained with {what}, whose setting is not in the state dict",
                hint="the next update cannot be computed from the checkpoint; effective learning rates still can",
            )


def _working_copies(param: ParamState, grad: torch.Tensor, weight: torch.Tensor):
    """float32 gradient and a float32 copy of the weights, as the kernels work on them, and the storage."""
    return grad.float(), weight.detach().to(torch.float32, copy=True), is_quantized(param)


# ------------------------------------------------------------------------- update rules
def _adam_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = group["betas"][:2]
    g, p, eight_bit = _working_copies(param, grad, weight)
    step = step_of(param) + 1
    m = dequantized(param, 1).mul_(beta1).add_(g, alpha=1.0 - beta1)
    v = dequantized(param, 2).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    if eight_bit:
        denom = (v.sqrt() / correction2).add_(eps)
        if wd > 0.0:
            p.mul_(1.0 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / correction1)
    else:
        if wd > 0.0:
            p.mul_(1.0 - lr * wd)
        p.add_(m / (v.sqrt() + eps * correction2), alpha=-lr * correction2 / correction1)
    return p.to(weight.dtype) - weight


def _lion_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lr, wd = group["lr"], group["weight_decay"]
    beta1 = group["betas"][0]
    g, p, eight_bit = _working_copies(param, grad, weight)
    m = dequantized(param, 1)
    if wd > 0.0:
        p.mul_(1.0 - lr * wd)
    if eight_bit:
        direction = torch.sign(m.mul(beta1) + g.mul(1.0 - beta1))
    else:
        direction = m.mul(beta1).add(g, alpha=1.0 - beta1).sign()
    p.add_(direction, alpha=-lr)
    return p.to(weight.dtype) - weight


def _momentum_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lr, wd = group["lr"], group["weight_decay"]
    beta1 = group["betas"][0]
    g, p, eight_bit = _working_copies(param, grad, weight)
    if eight_bit or wd > 0.0:
        g = g.add(p, alpha=wd)
    buf = g if step_of(param) + 1 == 1 else dequantized(param, 1).mul_(beta1).add_(g)
    p.add_(buf, alpha=-lr)
    return p.to(weight.dtype) - weight


def _rmsprop_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    alpha = group["betas"][0]
    g, p, eight_bit = _working_copies(param, grad, weight)
    if eight_bit or wd > 0.0:
        g = g.add(p, alpha=wd)
    v = dequantized(param, 1).mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    if eight_bit:
        p.addcdiv_(g, v.sqrt().add_(eps), value=-lr)
    else:
        p.add_(g / (v.sqrt() + eps), alpha=-lr)
    return p.to(weight.dtype) - weight


def _adagrad_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    g, p, eight_bit = _working_copies(param, grad, weight)
    if eight_bit or wd > 0.0:
        g = g.add(p, alpha=wd)
    s = dequantized(param, 1).addcmul_(g, g, value=1.0)
    if eight_bit:
        p.addcdiv_(g, s.sqrt().add_(eps), value=-lr)
    else:
        p.add_(g / (s.sqrt() + eps), alpha=-lr)
    return p.to(weight.dtype) - weight


def _mirrored(rule: Callable) -> Callable:
    def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        _check_mirrorable(param)
        return rule(param, group, grad, weight)

    next_update.__doc__ = "The change of ``weight`` that the next ``step()`` makes (bitsandbytes' CPU kernel order)."
    return next_update


# ---------------------------------------------------------------- effective lr and tables
def _adam_effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return adam_effective_lr(
        dequantized(param, 2), lr=group["lr"], beta2=group["betas"][1], eps=group["eps"], step=step_of(param)
    )


def _constant_effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return torch.full(tuple(param.state["state1"].shape), float(group["lr"]), dtype=torch.float32)


def _rms_effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    return group["lr"] / (dequantized(param, 1).sqrt_().add_(group["eps"]))


def _adam_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    beta1, beta2 = group["betas"][:2]
    step = step_of(param)
    m, v = dequantized(param, 1).reshape(-1), dequantized(param, 2).reshape(-1)
    return {
        "eff_lr": adam_effective_lr(v, lr=group["lr"], beta2=beta2, eps=group["eps"], step=step),
        "exp_avg_abs": m.abs(),
        "exp_avg_sq": v,
        "snr": adam_snr(m, v, beta1=beta1, beta2=beta2, step=step),
        "update": adam_momentum_update(
            m, v * beta2, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=step
        ),
    }


def _lion_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    m = dequantized(param, 1).reshape(-1)
    return {"eff_lr": float(group["lr"]), "exp_avg_abs": m.abs(), "update": m.sign().mul_(-float(group["lr"]))}


def _momentum_quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    buf = dequantized(param, 1).reshape(-1)
    return {
        "eff_lr": float(group["lr"]),
        "momentum_buffer_abs": buf.abs(),
        "update": buf * (-group["lr"] * group["betas"][0]),
    }


def _rms_quantities(name: str) -> Callable:
    def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
        v = dequantized(param, 1).reshape(-1)
        return {"eff_lr": group["lr"] / (v.sqrt().add_(group["eps"])), name: v}

    return quantities


def _adam_preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
    # |m| serves as the numerator: it enters the compressibility sums squared.
    return bias_corrected_preconditioned(q["exp_avg_abs"], q["exp_avg_sq"], group, step_of(param), q["eff_lr"])


def _rms_preconditioned(name: str) -> Callable:
    def preconditioned(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState, q: dict) -> Preconditioned:
        return plain_preconditioned(None, q[name], group["eps"])  # the numerator is the gradient

    return preconditioned


def _signed_state1(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> torch.Tensor:
    """``state1`` dequantised, with its sign (the whole tensor: these families are not chunked)."""
    return dequantized(param, 1).reshape(-1)


def quantization_columns(param: ParamState, group: Group) -> dict:
    """How each state tensor is stored: bits, block size, and the spread of the block scales."""
    if "state1" not in param.state:
        return {}
    out: dict = {"state_bits": 8 if is_quantized(param) else 32}
    if not is_quantized(param):
        return out
    names = {1: "state1", 2: "state2"}
    for index, name in names.items():
        if f"absmax{index}" in param.state:
            absmax = param.read(f"absmax{index}").float().reshape(-1)
            if index == 1:
                out["blocksize"] = infer_blocksize(param.state["state1"].numel, absmax.numel())
            out[f"{name}_absmax_max"] = float(absmax.max())
            # Li et al. (2309.01507): outlier blocks make 8-bit state lose resolution elsewhere.
            median = float(absmax.median())
            out[f"{name}_block_spread"] = float(absmax.max()) / median if median > 0 else float("inf")
        elif f"max{index}" in param.state:
            out["blocksize"] = param.state["state1"].numel
            out[f"{name}_absmax_max"] = float(param.read(f"max{index}").float().reshape(-1)[0])
    if "state2" in param.state and "qmap2" in param.state:
        # Second moments that quantised to exactly zero: the next gradient there is divided by eps alone.
        out["state2_zero_fraction"] = float((dequantized(param, 2) == 0).float().mean())
    return out


# ---------------------------------------------------------------------------- recognition
def _is_bnb_group(group: Group) -> bool:
    return {"lr", "betas", "eps", "weight_decay"} <= set(group) and len(group.get("betas", ())) >= 2


def _match_adam(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ({"state1", "state2"} <= state_keys <= _TWO_STATE_KEYS):
        return 0
    if not _is_bnb_group(group) or len(group["betas"]) != 2:  # three betas: AdEMAMix
        return 0
    if "unorm_vec" in state_keys:  # LAMB: Adam plus update-norm clipping
        return 3
    return 5 if state_keys else 0


def _one_state(kind: str) -> Callable[[frozenset[str], Group], int]:
    def match(state_keys: frozenset[str], group: Group) -> int:
        if not state_keys or "state2" in state_keys or not ("state1" in state_keys and state_keys <= _ONE_STATE_KEYS):
            return 0
        if not _is_bnb_group(group):
            return 0
        beta1, beta2 = group["betas"][:2]
        eps = group["eps"]
        if eps == 0:  # Lion and SGD have no eps; betas[1] is Lion's beta2 or SGD's (unused) dampening
            if kind == "momentum":
                return 4 if beta2 == 0 else 3
            return 3 if kind == "lion" and beta2 > 0 else 0
        if kind == "rmsprop":
            return 4 if beta1 > 0 else 0
        if kind == "adagrad":
            return 4 if beta1 == 0 and beta2 == 0 else 0
        return 0

    return match


_HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")
_QUANT_DISPLAY = ("state_bits", "blocksize")
_NOTE = (
    "bitsandbytes: moments are dequantised blockwise (qmap[code] * absmax of the block) before any "
    "statistic; state_bits says which parameters kept 32-bit state.",
)


def _initial_state(keys: tuple[str, ...]) -> Callable[[torch.Tensor, Group], dict]:
    def initial_state(weight: torch.Tensor, group: Group) -> dict:
        """bitsandbytes' state before the first step: ``step`` 0 and zero states, in their 32-bit form.

        Whether the optimizer keeps 8-bit state is not saved (``optim_bits`` and
        ``min_8bit_size`` are its arguments, not the groups'); its first step is the same
        either way up to rounding, as zero codes with zero scales dequantise to zeros.
        """
        return {"step": 0, **{key: torch.zeros(tuple(weight.shape), dtype=torch.float32) for key in keys}}

    return initial_state


BNB_ADAM = Family(
    name="bnb_adam",
    label="bitsandbytes Adam/AdamW",
    match=_match_adam,
    quantities=_adam_quantities,
    effective_lr=_adam_effective_lr,
    next_update=_mirrored(_adam_update),
    columns=quantization_columns,
    display=(
        *_QUANT_DISPLAY,
        "state2_zero_fraction",
        "exp_avg_abs_mean",
        "exp_avg_sq_mean",
        "eff_lr_min",
        "eff_lr_p50",
        "eff_lr_max",
    ),
    hyperparameters=_HYPER,
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    moments=ADAM_MOMENTS,
    chunked=False,
    preconditioned=_adam_preconditioned,
    signed_first_moment=_signed_state1,
    notes=(*_NOTE, "bitsandbytes Adam: weight decay is decoupled (AdamW-style) for Adam8bit too."),
    first_step=adaptive_first_step(_initial_state(("state1", "state2")), "-lr * g / (|g| + eps)"),
)
BNB_LION = Family(
    name="bnb_lion",
    label="bitsandbytes Lion",
    match=_one_state("lion"),
    quantities=_lion_quantities,
    effective_lr=_constant_effective_lr,
    next_update=_mirrored(_lion_update),
    columns=quantization_columns,
    display=(*_QUANT_DISPLAY, "exp_avg_abs_mean", "exp_avg_abs_max", "eff_lr_p50"),
    hyperparameters=_HYPER,
    first_moment="exp_avg_abs",
    chunked=False,
    preferred=True,
    signed_first_moment=_signed_state1,
    notes=_NOTE,
    first_step=FirstStep(_initial_state(("state1",))),
)
BNB_MOMENTUM = Family(
    name="bnb_momentum",
    label="bitsandbytes SGD (momentum)",
    match=_one_state("momentum"),
    quantities=_momentum_quantities,
    effective_lr=_constant_effective_lr,
    next_update=_mirrored(_momentum_update),
    columns=quantization_columns,
    display=(*_QUANT_DISPLAY, "momentum_buffer_abs_mean", "momentum_buffer_abs_max", "eff_lr_p50"),
    hyperparameters=_HYPER,
    first_moment="momentum_buffer_abs",
    chunked=False,
    signed_first_moment=_signed_state1,
    notes=_NOTE,
    first_step=FirstStep(_initial_state(("state1",))),
)
BNB_RMSPROP = Family(
    name="bnb_rmsprop",
    label="bitsandbytes RMSprop",
    match=_one_state("rmsprop"),
    quantities=_rms_quantities("square_avg"),
    effective_lr=_rms_effective_lr,
    next_update=_mirrored(_rmsprop_update),
    columns=quantization_columns,
    display=(*_QUANT_DISPLAY, "square_avg_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=_HYPER,
    second_moment="square_avg",
    chunked=False,
    preconditioned=_rms_preconditioned("square_avg"),
    notes=_NOTE,
    first_step=adaptive_first_step(_initial_state(("state1",)), "-lr * g / (sqrt(1 - alpha) |g| + eps)"),
)
BNB_ADAGRAD = Family(
    name="bnb_adagrad",
    label="bitsandbytes Adagrad",
    match=_one_state("adagrad"),
    quantities=_rms_quantities("sum"),
    effective_lr=_rms_effective_lr,
    next_update=_mirrored(_adagrad_update),
    columns=quantization_columns,
    display=(*_QUANT_DISPLAY, "sum_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=_HYPER,
    second_moment="sum",
    chunked=False,
    preconditioned=_rms_preconditioned("sum"),
    notes=_NOTE,
    first_step=adaptive_first_step(_initial_state(("state1",)), "-lr * g / (|g| + eps)"),
)
