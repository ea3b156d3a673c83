"""Carry a source checkpoint onto the fine-tuning model and optimizer, parameter by parameter name.

The fine-tuning model may differ from the source's (a new head, a different vocabulary):
weights and optimizer state move by name, and a parameter whose name is new or whose
shape changed keeps its initialisation and starts with no optimizer state.
"""

from __future__ import annotations

import importlib
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
# The families of other libraries the default factory rebuilds: (module, class, pip package),
# imported when a source of that family is fine-tuned.
LIBRARY_CLASSES: dict[str, tuple[str, str, str]] = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "dadapt_adam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "schedulefree_sgd": ("schedulefree", "SGDScheduleFree", "schedulefree"),
    "schedulefree_radam": ("schedulefree", "RAdamScheduleFree", "schedulefree"),
    "dadapt_sgd": ("dadaptation", "DAdaptSGD", "dadaptation"),
    "dadapt_adagrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation"),
    "dadapt_lion": ("dadaptation", "DAdaptLion", "dadaptation"),
    "dadapt_adan": ("dadaptation", "DAdaptAdan", "dadaptation"),
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
    new_groups: list[dict[str, Any]] = field(default_factory=list)  # the new optimizer's own groups (fresh's d)


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
    cls = optimizer_class(source)
    layout = layout_or_none(source.kind)
    learned = layout.group_state + layout.group_mode if layout is not None else ()
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
                groups.append({**_hyperparameters(saved, learned), "params": members})
        new = [(n, p) for n, p in named if n not in old]
        if new:
            groups.append({**_hyperparameters(saved_groups[0], learned), "params": new})
        return cls(groups, lr=lr)

    return make


def optimizer_class(source: Source) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class the default factory rebuilds for the source's family (an OstateError
    for a family it cannot rebuild, or whose library is not installed)."""
    if source.kind in OPTIMIZER_CLASSES:
        return OPTIMIZER_CLASSES[source.kind]
    if source.kind in LIBRARY_CLASSES:
        module, name, package = LIBRARY_CLASSES[source.kind]
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            raise OstateError(
                f"fine-tuning a {source.kind} source with its own optimizer needs {package}",
                where=source.path,
                hint=f"pip install {package}, or give the task an optimizer factory",
            ) from None
    raise OstateError(
        f"cannot rebuild an optimizer of kind '{source.kind}' for fine-tuning",
        where=source.path,
        hint="give the task an optimizer factory (Python: Task(optimizer=...); TOML: optimizer = 'module:function')",
    )


def _hyperparameters(group: dict[str, Any], learned: tuple[str, ...] = ()) -> dict[str, Any]:
    """A saved group's hyperparameters: without the run's keys and what the optimizer learned into
    the group (Prodigy's d, schedule-free's k and train_mode: the factory builds a new optimizer;
    :func:`transfer_state` carries them)."""
    return {k: v for k, v in group.items() if k not in _RUN_KEYS and k not in learned}


def _same_layout(a: str, b: str) -> bool:
    """Whether two families keep their state alike (Adam and AdamW), so one's state loads into the other."""
    layout_a = layout_or_none(a)
    return layout_a is not None and layout_a is layout_or_none(b)


def transfer_state(source: Source, optimizer: torch.optim.Optimizer, model: nn.Module) -> Transfer:
    """The source's optimizer state re-indexed for ``optimizer`` (a fresh optimizer over ``model``).

    Tensors are copied, so trials never share (or write to) the source's memory. The
    result keeps ``optimizer``'s own param groups: the trial's hyperparameters win. What the
    source's optimizer learned into its groups (Prodigy's and D-Adaptation's step-size
    estimate ``d`` with its sums and counter; :attr:`~ostate.optimizers.family.StateLayout.group_state`)
    is state, not a hyperparameter: it is carried (:func:`carry_group_state`), and the
    strategy then keeps it, or resets it to ``new_groups``'s (the new optimizer's own). So is
    what says how the weights relate to the state (schedule-free's ``train_mode``: the
    source's weights are its ``x`` or its ``y``), which no strategy changes.
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
    out = Transfer(state_dict={**fresh, "state": state}, names=names, new_groups=fresh["param_groups"])
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
    layout = layout_or_none(target_kind)
    if layout is not None and (layout.group_state or layout.group_mode):
        group_of, carried = source.group_by_name(), set(out.carried)
        origins = [
            next((group_of[name_of[id(p)]] for p in group["params"] if name_of[id(p)] in carried), None)
            for group in optimizer.param_groups
        ]
        out.state_dict["param_groups"] = carry_group_state(
            fresh["param_groups"],
            source.optimizer_state["param_groups"],
            layout.group_state + layout.group_mode,
            origins,
            per_group=layout.group_state_per_group,
        )
    if saved and not out.carried:
        raise OstateError(
            f"none of the fine-tuning model's {len(names)} parameters matches a source parameter by name and shape",
            where=source.path,
            hint=f"the model has {_examples(names)}; the source has {_examples(list(saved))}"
            + (f"; other shapes: {_examples(out.reshaped)}" if out.reshaped else "")
            + "; fine-tune the source's architecture, its parameters named alike",
        )
    return out


def carry_group_state(
    groups: list[dict[str, Any]],
    saved_groups: list[dict[str, Any]],
    keys: tuple[str, ...],
    origins: list[int | None] | None = None,
    *,
    per_group: bool = False,
) -> list[dict[str, Any]]:
    """``groups`` with the learned values ``keys`` of the source's groups, the rest of each group unchanged.

    ``origins[i]`` is the source group that group ``i``'s carried parameters were in (None: it
    carries none). Optimizers whose groups all hold the optimizer's one value (Prodigy's ``d``;
    they step from the first group's) give every group the source's first group's values; with
    ``per_group`` (each group learns its own, as schedule-free does from its own lr) each group
    gets its origin's, and a group that carries no parameter keeps the new optimizer's, as a
    group added to a running optimizer starts.

    Example:
        >>> carry_group_state([{"d": 1e-6, "k": 0, "eps": 1e-8}], [{"d": 0.01, "k": 5, "d_hat": 0.02}], ("d", "d_hat", "k"))
        [{'d': 0.01, 'k': 5, 'eps': 1e-08, 'd_hat': 0.02}]
        >>> carry_group_state([{"k": 0}, {"k": 0}], [{"k": 7}, {"k": 9}], ("k",), [1, None], per_group=True)
        [{'k': 9}, {'k': 0}]
    """
    out = []
    for i, group in enumerate(groups):
        origin = origins[i] if origins is not None and i < len(origins) else None
        if per_group and origin is None:
            out.append(dict(group))
            continue
        saved = saved_groups[origin if per_group and origin is not None else 0]
        learned = {k: saved[k] for k in keys if k in saved}
        out.append({**{k: v for k, v in group.items() if k not in keys or k in learned}, **learned})
    return out


def _examples(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
