"""A strategy applied to a live optimizer, by the names of the model's parameters: what both StrategyCallbacks do.

The optimizer's state dict is transformed exactly as ``ostate reset`` transforms a
saved one (:func:`ostate.reset.strategies.apply_strategy`) and loaded back, so a
training that resumes with a callback steps as one that resumes from a checkpoint
``ostate reset`` wrote, except that ``fresh`` takes the values a new optimizer learns
into its groups from the live optimizer's own constructor defaults (a DAdaptAdam built
with another ``d0`` restarts at that ``d0``, which no saved state records). keep-v's recorded age is honoured by hooks on the optimizer
(:func:`ostate.reset.strategies.attach`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch

from ostate.errors import OstateError
from ostate.reset.strategies import Strategy, apply_strategy, attach, optimizer_kind, plan


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``)."""
    for _ in range(4):  # a wrapper may itself subclass torch.optim.Optimizer (accelerate's does)
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OstateError(
            f"cannot apply a strategy to a {type(optimizer).__name__}: not a torch.optim.Optimizer",
            hint="DeepSpeed keeps its own optimizer: apply the strategy to the checkpoint with ostate reset instead",
        )
    return optimizer


def apply_to_optimizer(
    optimizer: Any, model: torch.nn.Module, strategy: str | Strategy, params: str | None = None
) -> tuple[dict[str, int], Callable[[], None]]:
    """Apply ``strategy`` (restricted to the parameters whose names match the regex ``params``)
    to ``optimizer``'s state in place; returns how many parameters got each action and the
    function that detaches keep-v's hooks.

    Example:
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> actions, detach = apply_to_optimizer(opt, m, "reset-v", params="bias")
        >>> actions, float(opt.state[m.bias]["exp_avg_sq"].abs().sum())
        ({'reload': 1, 'reset-v': 1}, 0.0)
    """
    chosen = Strategy.parse(strategy)
    if params is not None:
        if chosen.params is not None:
            raise OstateError(f"strategy '{chosen}' has a regex already; give params= or NAME:REGEX, not both")
        chosen = Strategy(chosen.name, params)
    inner = torch_optimizer(optimizer)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise OstateError(
                    "the optimizer holds a parameter that is not the model's",
                    hint="give the callback the model the optimizer was built on",
                )
            names.append(name_of[id(p)])
    state_dict = inner.state_dict()
    kind = optimizer_kind(inner)
    actions = plan(state_dict, chosen, names=names)
    # fresh puts what the optimizer learned into its groups (D-Adaptation's d, schedule-free's k) back to a
    # new optimizer's: this optimizer's constructor defaults (DAdaptAdam's groups do not record its d0).
    new_groups = [dict(inner.defaults) for _ in state_dict["param_groups"]]
    inner.load_state_dict(apply_strategy(state_dict, chosen, names=names, kind=kind, new_groups=new_groups))
    return dict(Counter(actions.values())), attach(inner)
