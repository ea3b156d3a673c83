"""Optimizer families: recognition, effective learning rates and next updates.

One module per family holds its math (the formula is in the module docstring):

- torch.optim: ``adam`` (Adam, AdamW, AMSGrad), ``sgd``, ``adamax``, ``nadam``, ``radam``,
  ``adagrad``, ``rmsprop``, ``adadelta``, ``asgd``, ``rprop``, ``sparse_adam``,
  ``adafactor``, ``muon``, ``lbfgs`` (summary only);
- third-party: ``hf_adafactor`` (transformers), ``bnb8bit`` (bitsandbytes 8-bit and
  32-bit state), ``lion`` (lion-pytorch), ``schedulefree`` (schedule-free AdamW),
  ``schedulefree_variants`` (schedule-free SGD and RAdam);
- ``generic`` for state nobody recognises.

``registry.py`` lists them all (:data:`FAMILIES`); docs/optimizers.md lists each family's
recognition rule and formulas.
"""

from __future__ import annotations

import torch

from ostate.errors import OstateError
from ostate.optimizers.family import Family, Group, explain_bad_state, initial_param
from ostate.optimizers.registry import FAMILIES, detect, families, get_family
from ostate.state import ParamState

__all__ = ["FAMILIES", "Family", "detect", "families", "get_family", "effective_lr", "next_update", "family_for"]


def family_for(param: ParamState, group: Group, kind: str | None = None) -> Family:
    """The family named ``kind``, or the one detected from this parameter's state and group."""
    if kind is None:
        kind, _source, _also = detect(frozenset(param.state), [group])
    return get_family(kind)


def effective_lr(param: ParamState, group: Group, *, kind: str | None = None) -> torch.Tensor:
    r"""The per-coordinate effective learning rate of ``param`` (a tensor of its shape).

    ``kind`` names the optimizer family; by default it is detected from the state and
    the group. The formula for each family is in its module and in docs/optimizers.md.
    It uses the group's saved ``lr`` (after a scheduler step, usually the next step's lr).

    A parameter without state (a new head, an optimizer saved before its first step) gets
    the formula applied to the state its optimizer starts from, where the family
    describes it (``Family.first_step``) and that state determines the first step's rate
    (SGD, Lion, Muon, Rprop, Adagrad, ...); an adaptive family's first step divides by the
    first gradient (Adam: :math:`-\gamma g/(|g|+\epsilon)`), which only
    :func:`next_update` is given, and is refused with that explanation.

    Example:
        >>> import ostate, torch
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.AdamW([p], lr=1e-3)
        >>> p.grad = torch.ones(3); opt.step()
        >>> ckpt = ostate.from_state_dict(opt.state_dict())
        >>> o = ckpt.optimizers[0]
        >>> ostate.effective_lr(o.params[0], o.groups[0]).shape
        torch.Size([3])
    """
    family = family_for(param, group, kind)
    if family.effective_lr is None:
        raise OstateError(f"no effective learning rate is defined for optimizer kind '{family.name}'")
    if not param.has_state and family.first_step is not None:
        _refuse_unpredictable(param, family)
        if family.first_step.effective_lr_refusal is not None:
            raise OstateError(
                f"'{param.name}' has no state yet (first step), and for optimizer kind '{family.name}' "
                + family.first_step.effective_lr_refusal,
                hint="ostate.next_update(param, group, grad, weight) predicts the first step from the gradient",
            )
        if param.shape is None:
            raise OstateError(f"'{param.name}' has no state yet and ostate does not know its shape")
        param = initial_param(param, family.first_step, group, torch.zeros(param.shape))
    with explain_bad_state(param, family, group):
        return family.effective_lr(param, group)


def next_update(
    param: ParamState, group: Group, grad: torch.Tensor, weight: torch.Tensor, *, kind: str | None = None
) -> torch.Tensor:
    """The change of the weights (new minus old) that the optimizer's next ``step()`` makes.

    Computed from the saved state, the gradient ``grad`` and the current ``weight``, in
    the weight's dtype and in the library's order of operations, so it matches the real
    step to rounding. Families whose next step needs more (LBFGS re-evaluates the loss)
    raise :class:`~ostate.OstateError`.

    A parameter without state (a new head, an optimizer saved before its first step) is
    stepped from the state its optimizer creates at the first step (its documented
    initial values, ``Family.first_step``), so its first step is predicted exactly too;
    a family that does not describe that state refuses such a parameter, and one whose
    first step depends on what nothing saved holds says what (``FirstStep.refusal``).

    Example:
        >>> import ostate, torch
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.RAdam([p], lr=1e-2)
        >>> p.grad = torch.ones(3); opt.step()
        >>> o = ostate.from_state_dict(opt.state_dict()).optimizers[0]
        >>> grad = torch.tensor([0.5, -1.0, 2.0])
        >>> delta = ostate.next_update(o.params[0], o.groups[0], grad, p.detach())
        >>> before = p.detach().clone(); p.grad = grad; opt.step()
        >>> torch.equal(delta, p.detach() - before)
        True
    """
    family = family_for(param, group, kind)
    if family.next_update is None:
        raise OstateError(f"the next update of optimizer kind '{family.name}' cannot be computed from its state")
    if not param.has_state and family.first_step is not None:
        _refuse_unpredictable(param, family)
        param = initial_param(param, family.first_step, group, weight.detach())
    with explain_bad_state(param, family, group):
        return family.next_update(param, group, grad, weight)


def _refuse_unpredictable(param: ParamState, family: Family) -> None:
    """One clear error for a parameter without state whose first step the family says it cannot predict."""
    if family.first_step is not None and family.first_step.refusal is not None:
        raise OstateError(
            f"'{param.name}' has no state yet (first step), and optimizer kind '{family.name}' cannot predict it: "
            + family.first_step.refusal,
            hint="once the optimizer has stepped it, its state records what is missing and its steps are predicted",
        )
