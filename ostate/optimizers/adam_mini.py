r"""Adam-mini (``adam_mini.Adam_mini``, 1.1): one second moment per block of a parameter.

Adam-mini puts every parameter in a param group of its own, named after it (``name``),
with ``lr``, ``beta1``, ``beta2``, ``eps`` and ``weight_decay``. The parameter's name
decides its blocks (source: ``adam_mini/adam_mini.py``, ``Adam_mini.step``); the state
says which was chosen:

- **coordinate** (names with ``bias``): Adam's ``m``, ``v`` and ``step`` (one
  :math:`v` per coordinate);
- **head** (query and key: ``q_proj``, ``k_proj``, ``wq``, ``wk``, ...): ``m`` viewed as
  (heads, dim²/n_heads), ``vmean`` (heads, 1), ``head_per_gpu``;
- **neuron** (embedding, output, value, attention output and MLP matrices): ``m`` of
  the parameter's shape, ``vmean`` (rows, 1), ``neuron_per_gpu``: one block per row;
- **tensor** (everything else, e.g. norms): ``m``, a 0-d ``vmean``, ``block_numel``
  (the whole tensor is one block) and ``reduced``.

**Update**, step :math:`t+1`, for a block :math:`B` with gradient :math:`g`:

.. math::
    \bar v_B &\leftarrow \beta_2 \bar v_B + (1-\beta_2)\,\mathrm{mean}_{i\in B}\, g_i^2
        \quad (\text{tensor blocks: } \textstyle\sum_{i\in B} g_i^2/\text{block\_numel}) \\
    \theta &\leftarrow \theta(1-\gamma\lambda), \qquad m \leftarrow \mathrm{lerp}(m, g, 1-\beta_1) \\
    \theta_i &\leftarrow \theta_i - \gamma\,\frac{m_i/(1-\beta_1^{t+1})}
        {\sqrt{\bar v_B}/\sqrt{1-\beta_2^{t+1}} + \epsilon}

(coordinate blocks are AdamW, in the same order). The **effective learning rate** is
Adam's with the block's :math:`\bar v_B` for every coordinate of the block,
:math:`\eta_B = \gamma/(\sqrt{\bar v_B}/\sqrt{1-\beta_2^t} + \epsilon)`;
:func:`block_effective_lr` gives it once per block, with the block's name
(``{param}[head 3]``, ``{param}[row 17]``, ``{param}``, ``{param}[i]``).

``next_update`` is exact (the block means need only this parameter's gradient). Not
mirrored: ``reduced`` tensor blocks sum their squared gradients across ranks
(all-reduce), which a single process cannot see.

**First step** of a parameter without state: not predicted. Adam-mini chooses the
parameter's blocks when it first steps it, from the parameter's name (the group's
``name``) and the optimizer's name lists (``embd_names``, ``output_names``,
``wqk_names``, ``wv_names``, ``attn_proj_names``, ``mlp_names``, ``adam_block_names``:
attributes of the optimizer object that users extend, not saved in its state dict) and,
for a query or key, the head size ``dim * dim / n_heads`` (constructor arguments, not
saved). The first step differs by block kind (a coordinate block moves by
:math:`\gamma g/(|g|+\epsilon)`, a row by :math:`\gamma g/(\mathrm{RMS}(g_{row})+\epsilon)`),
so ``next_update`` and ``effective_lr`` refuse such a parameter and say so; once
stepped, the state records the split.

**Strategies**: ``reset-m`` (``m``), ``reset-v`` (``v``, ``vmean``), ``reset-step``
(``step``, which the bias corrections use), as for Adam; ``keep-v`` is refused (its
step hook reads torch's ``betas``); ``fresh`` clears the state (Adam-mini creates it at
the first step).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ostate.errors import OstateError
from ostate.optimizers.adam import adam_effective_lr, adam_momentum_update
from ostate.optimizers.family import (
    Family,
    Group,
    StateLayout,
    fresh_zeros,
    group_has,
    step_of,
    unpredictable_first_step,
)
from ostate.state import ParamState

_STATE_KEYS = frozenset({"m", "v", "vmean", "step", "head_per_gpu", "neuron_per_gpu", "reduced", "block_numel"})


def block_kind(param: ParamState) -> str:
    """``coordinate``, ``head``, ``neuron`` or ``tensor``: how Adam-mini split this parameter."""
    keys = param.state
    if "v" in keys:
        return "coordinate"
    if "head_per_gpu" in keys:
        return "head"
    if "neuron_per_gpu" in keys:
        return "neuron"
    if "vmean" in keys:
        return "tensor"
    raise OstateError(f"'{param.name}': Adam-mini state without v or vmean", hint=f"its keys: {', '.join(keys)}")


def _second_moment(param: ParamState, like: torch.Tensor) -> torch.Tensor:
    """:math:`v`, or each block's :math:`\\bar v_B` broadcast to the shape of ``m`` (``like``), in float32."""
    if block_kind(param) == "coordinate":
        return param.read("v").float()
    vmean = param.read("vmean").float()
    return vmean.expand(like.shape)


def _betas(group: Group) -> tuple[float, float]:
    return group["beta1"], group["beta2"]


def effective_lr(param: ParamState, group: Group) -> torch.Tensor:
    m = param.read("m")
    v = _second_moment(param, m)
    eff = adam_effective_lr(v.contiguous(), lr=group["lr"], beta2=group["beta2"], eps=group["eps"], step=step_of(param))
    # Head blocks keep m as (heads, head size): the parameter's shape where the model gives it.
    return eff.reshape(param.shape) if param.shape is not None and param.numel == eff.numel() else eff


def block_effective_lr(param: ParamState, group: Group) -> list[tuple[str, float]]:
    """One ``(block name, effective lr)`` per block of the parameter (Adam-mini's own split)."""
    kind = block_kind(param)
    v = param.read("v" if kind == "coordinate" else "vmean").float().reshape(-1)
    eff = adam_effective_lr(v, lr=group["lr"], beta2=group["beta2"], eps=group["eps"], step=step_of(param))
    label = {"coordinate": "", "head": "head ", "neuron": "row "}.get(kind)
    if label is None:
        return [(param.name, float(eff[0]))]
    return [(f"{param.name}[{label}{i}]", float(x)) for i, x in enumerate(eff.tolist())]


def next_update(param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Adam-mini's next change of ``weight``, in its order of operations."""
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    beta1, beta2 = _betas(group)
    kind = block_kind(param)
    p = weight.detach().clone()
    m = param.read("m").to(p.dtype)
    g = grad.view(m.shape) if kind == "head" else grad
    step = step_of(param) + 1
    bias_correction_1 = 1 - beta1**step
    bias_correction_2_sqrt = math.sqrt(1 - beta2**step)
    if kind == "coordinate":
        v = param.read("v").to(p.dtype).mul(beta2).addcmul_(g, g.conj(), value=1 - beta2)
        if wd > 0.0:
            p.mul_(1 - lr * wd)
        m = m.lerp(g, 1 - beta1)
        h = (v.sqrt() / bias_correction_2_sqrt).add_(eps)
        p.addcdiv_(m, h, value=-lr / bias_correction_1)
        return p - weight
    if kind == "tensor":
        mean_square = torch.sum(g * g) / param.state["block_numel"]
    else:
        mean_square = torch.mean(g * g, dim=1, keepdim=True)
    vmean = param.read("vmean").to(p.dtype)
    if kind != "tensor":
        vmean = vmean.mul(beta2).add_(mean_square, alpha=1 - beta2)
    if wd > 0.0:
        p.mul_(1 - lr * wd)
    m = m.lerp(g, 1 - beta1)
    if kind == "tensor":  # the tensor block updates vmean after m
        vmean = vmean.mul(beta2).add_(mean_square, alpha=1 - beta2)
    h = (vmean.sqrt() / bias_correction_2_sqrt).add_(eps)
    stepsize = (1 / bias_correction_1) / h
    update = (m * stepsize).view(p.size()).mul_(lr)
    p.add_(-update)
    return p - weight


def quantities(chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState) -> dict:
    # Unchunked: the block's second moment is read whole and broadcast over m.
    beta1, beta2 = _betas(group)
    step, lr, eps = step_of(param), group["lr"], group["eps"]
    m = param.read("m").float()
    v = _second_moment(param, m).contiguous()
    return {
        "eff_lr": adam_effective_lr(v, lr=lr, beta2=beta2, eps=eps, step=step).reshape(-1),
        "exp_avg_abs": m.abs().reshape(-1),
        "exp_avg_sq": v.reshape(-1),
        "update": adam_momentum_update(m, v * beta2, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step).reshape(-1),
    }


def columns(param: ParamState, group: Group) -> dict:
    """How the parameter is split into blocks: the kind, the number of blocks and their size."""
    if "m" not in param.state:
        return {}
    kind = block_kind(param)
    numel = param.state["m"].numel
    blocks = {"coordinate": numel, "tensor": 1}.get(kind) or param.state["vmean"].numel
    return {"block_kind": kind, "blocks": blocks, "block_numel": numel // max(blocks, 1)}


def match(state_keys: frozenset[str], group: Group) -> int:
    if state_keys and not ("m" in state_keys and state_keys <= _STATE_KEYS):
        return 0
    return 6 if group_has(group, "beta1", "beta2", "eps", "name", "lr") and "betas" not in group else 0


ADAM_MINI = Family(
    name="adam_mini",
    label="Adam-mini",
    match=match,
    quantities=quantities,
    effective_lr=effective_lr,
    next_update=next_update,
    columns=columns,
    display=("block_kind", "blocks", "exp_avg_sq_mean", "eff_lr_min", "eff_lr_p50", "eff_lr_max"),
    hyperparameters=("lr", "initial_lr", "beta1", "beta2", "eps", "weight_decay"),
    first_moment="exp_avg_abs",
    second_moment="exp_avg_sq",
    chunked=False,
    signed_first_moment=lambda chunk, group, param: param.read("m").float().reshape(-1),
    layout=StateLayout(
        first_moment=("m",),
        second_moment=("v", "vmean"),
        counter=("step",),
        fresh={"m": fresh_zeros, "v": fresh_zeros, "vmean": fresh_zeros, "step": fresh_zeros},
        keep_v_refusal="the step hook that keeps a kept v's bias correction reads torch's 'betas'; Adam-mini's groups "
        "keep 'beta1' and 'beta2'",
    ),
    first_step=unpredictable_first_step(
        "Adam-mini splits a parameter into blocks (one per coordinate, head, row, or the whole tensor) at its "
        "first step, by matching its name against the optimizer's name lists (embd_names, output_names, "
        "wqk_names, wv_names, attn_proj_names, mlp_names, adam_block_names) and, for a query or key, by the "
        "head size dim * dim / n_heads: these are attributes of the optimizer object, not saved in its state "
        "dict, and the first step differs by block"
    ),
    notes=(
        "Adam-mini: one second moment per block (head, row or whole tensor; 'coordinate' is plain Adam); "
        "exp_avg_sq is each coordinate's block mean, eff_lr the block's Adam effective lr",
    ),
)
