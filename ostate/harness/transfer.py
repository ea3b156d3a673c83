"""Carry a source checkpoint onto the fine-tuning model and optimizer, parameter by parameter name.

The fine-tuning model may differ from the source's (a new head, a different vocabulary):
weights and optimizer state move by name, and a parameter whose name is new or whose
shape changed keeps its initialisation and starts with no optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ostate.errors import OstateError
from ostate.harness.source import Source
from ostate.reset.strategies import V_AGE_KEY, layout_or_none, optimizer_kind

# The torch class of each optimizer family the default optimizer factory can rebuild.
OPTIMIZER_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {  # classes; each takes lr=
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adamax": torch.optim.Adamax,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
}
# Group keys that describe a run rather than the optimizer (set again by the harness).
_RUN_KEYS = ("params", "param_names", "lr", "initial_lr", V_AGE_KEY)

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]


@dataclass
class Transfer:
    """What moved from the source: the state dict for the new optimizer and a record of it."""

    state_dict: dict[str, Any]
    names: list[str]  # the new optimizer's parameter names, in index order
    carried: list[str] = field(default_factory=list)
    started_fresh: list[str] = field(default_factory=list)  # no state carried (new, reshaped or never stepped)
    reshaped: list[str] = field(default_factory=list)  # in the source with another shape (a new head, a new vocabulary)


def load_weights(model: nn.Module, source: Source) -> list[str]:
    """Copy the source's weights into ``model`` by name; returns the entries that kept their
    initialisation (absent from the source, or of another shape).

    Example:
        >>> import torch
        >>> src = Source("-", {"weight": torch.ones(2, 2), "bias": torch.ones(3)}, {}, {}, "adamw", "")
        >>> load_weights(torch.nn.Linear(2, 2), src)
        ['bias']
    """
    own = model.state_dict()
    usable = {k: v for k, v in source.weights.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def optimizer_like_source(source: Source) -> OptimizerFactory:
    """A factory for an optimizer of the source's class with the source's param groups.

    Each parameter joins the group its name was in; parameters the source did not have
    (or had in another shape) get a group of their own (with group 0's hyperparameters), so that a strategy can
    treat them apart (keep-v's bias correction is per group). Every group starts at the
    trial's peak ``lr``.
    """
    if source.kind not in OPTIMIZER_CLASSES:
        raise OstateError(
            f"cannot rebuild an optimizer of kind '{source.kind}' for fine-tuning",
            where=source.path,
            hint="give the task an optimizer factory (Python: Task(optimizer=...); TOML: optimizer = 'module:function')",
        )
    cls = OPTIMIZER_CLASSES[source.kind]
    saved_groups = source.optimizer_state["param_groups"]
    group_of = source.group_by_name()

    def make(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        old = {
            n
            for n, p in named
            if n in group_of and n in source.weights and tuple(source.weights[n].shape) == tuple(p.shape)
        }
        groups = []
        for g, saved in enumerate(saved_groups):
            members = [(n, p) for n, p in named if n in old and group_of[n] == g]
            if members:
                groups.append({**_hyperparameters(saved), "params": members})
        new = [(n, p) for n, p in named if n not in old]
        if new:
            groups.append({**_hyperparameters(saved_groups[0]), "params": new})
        return cls(groups, lr=lr)

    return make


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _RUN_KEYS}


def _same_layout(a: str, b: str) -> bool:
    """Whether two families keep their state alike (Adam and AdamW), so one's state loads into the other."""
    layout_a = layout_or_none(a)
    return layout_a is not None and layout_a is layout_or_none(b)


def transfer_state(source: Source, optimizer: torch.optim.Optimizer, model: nn.Module) -> Transfer:
    """The source's optimizer state re-indexed for ``optimizer`` (a fresh optimizer over ``model``).

    Tensors are copied, so trials never share (or write to) the source's memory. The
    result keeps ``optimizer``'s own param groups: the trial's hyperparameters win.
    """
    target_kind, source_kind = optimizer_kind(optimizer), source.kind
    if source_kind != "unknown" and target_kind != source_kind and not _same_layout(source_kind, target_kind):
        raise OstateError(
            f"the source's optimizer state is {source_kind} but the fine-tuning optimizer is {target_kind}",
            where=source.path,
            hint="only the 'fresh' strategy can run; use an optimizer of the source's kind to compare the others",
        )
    name_of = {id(p): n for n, p in model.named_parameters()}
    fresh = optimizer.state_dict()
    saved = source.state_by_name()
    names: list[str] = []
    state: dict[int, dict[str, Any]] = {}
    out = Transfer(state_dict={**fresh, "state": state}, names=names)
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = name_of[id(p)]
            names.append(name)
            weight = source.weights.get(name)
            if weight is not None and tuple(weight.shape) != tuple(p.shape):
                out.reshaped.append(f"{name} {tuple(weight.shape)} -> {tuple(p.shape)}")
            if name in saved and weight is not None and tuple(weight.shape) == tuple(p.shape):
                state[index] = {
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in saved[name].items()
                }
                out.carried.append(name)
            else:
                if index in fresh["state"]:
                    state[index] = fresh["state"][index]
                out.started_fresh.append(name)
            index += 1
    if saved and not out.carried:
        raise OstateError(
            f"none of the fine-tuning model's {len(names)} parameters matches a source parameter by name and shape",
            where=source.path,
            hint=f"the model has {_examples(names)}; the source has {_examples(list(saved))}"
            + (f"; other shapes: {_examples(out.reshaped)}" if out.reshaped else "")
            + "; fine-tune the source's architecture, its parameters named alike",
        )
    return out


def _examples(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
