r"""What to do with a saved optimizer state before fine-tuning: pure transforms of a state dict.

Each strategy turns a ``torch.optim.Optimizer.state_dict()`` into a new one (the input
is never modified; kept tensors are shared, reset ones are new). The fine-tuning
harness applies them before its trials, and the same functions are meant to write
changed checkpoints. No file is read or written here.

========================  ==================================================================
strategy                  what each parameter's state becomes
========================  ==================================================================
``fresh``                 nothing: a new optimizer's state
``reload``                everything as saved
``reset-m``               first moment(s) as new; second moment and step as saved
``reset-v``               second moment(s) as new; first moment and step as saved
``reset-step``            step (and what moves with it) as new; both moments as saved
``keep-v``                first moment and step as new; second moment as saved, with its
                          own age, so its bias correction stays that of a mature average
``S:REGEX``               ``S`` for the parameters whose name matches ``REGEX``
                          (``re.search``), ``reload`` for the others; except
                          ``reload:REGEX``, which reloads the matching ones and starts the
                          others ``fresh`` (e.g. ``reload:^(?!head\.)``: all but a new head)
========================  ==================================================================

"As new" means the value a fresh torch optimizer would start from: zeros for moments,
0 for ``step``, 1 for NAdam's ``mu_product``, ``initial_accumulator_value`` for
Adagrad's ``sum``; SGD's ``momentum_buffer`` is removed, because SGD's first step sets
the buffer to the gradient itself (a zero buffer would damp that step by
``1 - dampening``). Which keys are moments and counters depends on the optimizer
family: its ``layout`` (a :class:`~ostate.optimizers.family.StateLayout`) says so. A
strategy that has nothing to act on (``reset-v`` on SGD, ``reset-step`` where the step
count does not enter the update) is refused with an :class:`~ostate.errors.OstateError`,
as is anything but ``fresh`` and ``reload`` for an optimizer kind without a layout.

**keep-v and bias correction.** Adam (and AdamW, AMSGrad, NAdam) use one counter
:math:`t` for both corrections: :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v =
v/(1-\beta_2^t)`. Resetting :math:`m` and :math:`t` while keeping a saved :math:`v` of
age :math:`T` would divide the mature :math:`v` by :math:`1-\beta_2^s` at the new step
:math:`s`: at :math:`s=1` and :math:`\beta_2=0.999` a factor 1000, so the first steps
would be :math:`\sqrt{1000}\approx 31.6` times too small. No state dict alone can fix
this (the new gradient enters :math:`m` and :math:`v` with fixed weights, so no
rescaling of the saved tensors gives both corrections at every step). keep-v therefore
writes :math:`m=0`, :math:`t=0` (NAdam: ``mu_product=1``), keeps :math:`v`, records
:math:`T` in the param group as ``ostate_v_age``, and :func:`attach` adds a step
pre-hook that runs step :math:`s` with

.. math::
    c_s = \sqrt{\frac{1-\beta_2^{T+s}}{1-\beta_2^{s}}},\qquad
    \gamma \to c_s\gamma,\quad \epsilon \to c_s\epsilon,\quad \lambda \to \lambda / c_s

(restored after the step). Since torch's denominator is
:math:`\sqrt{v_s/(1-\beta_2^s)}+\epsilon = c_s(\sqrt{v_s/(1-\beta_2^{T+s})}+\epsilon)`
after the change, the step is exactly
:math:`-\gamma\,\hat m_s/(\sqrt{v_s/(1-\beta_2^{T+s})}+\epsilon)` with
:math:`\hat m_s = m_s/(1-\beta_1^s)`: a fresh, bias-corrected first moment over a
second moment that keeps its age. Decoupled weight decay :math:`\gamma\lambda` is
unchanged; L2 weight decay (Adam's and NAdam's default, added to the gradient) is not
scaled at all. Because the change is per group, every parameter of a group that keep-v
touches must share one age (the strategy is refused otherwise). Adamax's
infinity norm has no bias correction, so keep-v needs no hook there; RAdam ignores
:math:`v` for its first steps after a step reset (rectification), so keep-v is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ostate.errors import OstateError
from ostate.formats.naming.torch_optim import read_optimizer
from ostate.optimizers import families
from ostate.optimizers.family import ABSENT, StateLayout
from ostate.optimizers.identify import identify

STRATEGIES = ("fresh", "reload", "reset-m", "reset-v", "reset-step", "keep-v")

# The param-group key that records the age of a kept second moment (see keep-v above).
V_AGE_KEY = "ostate_v_age"


@dataclass(frozen=True)
class Strategy:
    """A strategy name and, optionally, the regex of parameter names it is restricted to.

    Example:
        >>> Strategy.parse("reload:^(?!head)")
        Strategy(name='reload', params='^(?!head)')
        >>> str(Strategy("reset-v", "embed"))
        'reset-v:embed'
    """

    name: str
    params: str | None = None

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise OstateError(
                f"unknown strategy '{self.name}'",
                hint=f"choose one of: {', '.join(STRATEGIES)}, "
                "optionally as NAME:REGEX for the parameters whose names match",
            )
        if self.params is not None:
            try:
                re.compile(self.params)
            except re.error as e:
                raise OstateError(f"strategy '{self}': the parameter regex does not compile: {e}") from None

    @classmethod
    def parse(cls, text: str | Strategy) -> Strategy:
        """``NAME`` or ``NAME:REGEX``."""
        if isinstance(text, Strategy):
            return text
        name, sep, regex = text.strip().partition(":")
        if sep and not regex:
            raise OstateError(f"strategy '{text}': empty parameter regex after ':'")
        return cls(name.strip(), regex if sep else None)

    def __str__(self) -> str:
        return self.name if self.params is None else f"{self.name}:{self.params}"


def layout_or_none(kind: str) -> StateLayout | None:
    """The state layout of an optimizer family, or ``None`` for a kind without one."""
    family = families().get(kind)
    return family.layout if family is not None else None


def layout_of(kind: str) -> StateLayout:
    """The state layout of an optimizer family (its :attr:`~ostate.optimizers.family.Family.layout`;
    an OstateError for a kind without one)."""
    layout = layout_or_none(kind)
    if layout is None:
        with_layout = sorted(name for name, family in families().items() if family.layout is not None)
        raise OstateError(
            f"optimizer kind '{kind}' has no known state layout, so only 'fresh' and 'reload' apply",
            hint=f"kinds with partial strategies: {', '.join(with_layout)}",
        )
    return layout


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The family of a torch optimizer object, detected from the keys of its state and
    param groups as :func:`detect_kind` detects a saved state's (never from its class name:
    a subclass of ``torch.optim.AdamW`` is ``adamw``). Before the first step, when most
    torch optimizers have no state yet, the param groups' keys decide (they tell every
    torch.optim family apart); ``unknown`` when nothing fits.

    Example:
        >>> optimizer_kind(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]))
        'adamw'
    """
    return detect_kind(optimizer.state_dict())


def detect_kind(state_dict: Mapping[str, Any]) -> str:
    """The optimizer family of a state dict, read and identified as :func:`ostate.load` does (``unknown`` if none fits)."""
    optimizer = read_optimizer(state_dict, "optimizer")
    identify(optimizer)
    return optimizer.kind


def param_names(
    state_dict: Mapping[str, Any], names: Mapping[Any, str] | Sequence[str] | None = None
) -> dict[Any, str]:
    """Each parameter index's name: from ``names`` (by index, or a list in index order) or the
    groups' ``param_names`` (saved by torch >= 2.6 when the optimizer was given named parameters)."""
    indices = [i for g in state_dict["param_groups"] for i in g["params"]]
    if names is not None:
        by_index = dict(zip(indices, names)) if isinstance(names, Sequence) else dict(names)
        missing = [i for i in indices if i not in by_index]
        if missing:
            raise OstateError(f"no name given for parameter index(es) {missing[:5]}")
        return {i: by_index[i] for i in indices}
    found: dict[Any, str] = {}
    for g in state_dict["param_groups"]:
        for i, name in zip(g["params"], g.get("param_names", [])):
            found[i] = name
    if len(found) != len(indices):
        raise OstateError(
            "the state dict does not name its parameters",
            hint="pass names=[...] (the model's named_parameters() order for a single group)",
        )
    return found


def plan(
    state_dict: Mapping[str, Any],
    strategy: str | Strategy,
    *,
    names: Mapping[Any, str] | Sequence[str] | None = None,
) -> dict[Any, str]:
    """What :func:`apply_strategy` does to each parameter index: a strategy name, or ``none``
    for a parameter that has no saved state (it starts fresh whatever the strategy).

    Example:
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.Adam(m.parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> plan(opt.state_dict(), "reset-v:bias", names=["weight", "bias"])
        {0: 'reload', 1: 'reset-v'}
    """
    strategy = Strategy.parse(strategy)
    indices = [i for g in state_dict["param_groups"] for i in g["params"]]
    state = state_dict.get("state", {})
    if strategy.params is None:
        chosen = {i: strategy.name for i in indices}
    else:
        by_index = param_names(state_dict, names)
        pattern = re.compile(strategy.params)
        matched = {i for i in indices if pattern.search(by_index[i])}
        if not matched:
            sample = ", ".join(list(by_index.values())[:6])
            raise OstateError(
                f"strategy '{strategy}': the regex matches no parameter name", hint=f"names: {sample}, ..."
            )
        rest = "fresh" if strategy.name == "reload" else "reload"
        chosen = {i: strategy.name if i in matched else rest for i in indices}
    return {i: (name if state.get(i) else "none") for i, name in chosen.items()}


def apply_strategy(
    state_dict: Mapping[str, Any],
    strategy: str | Strategy,
    *,
    names: Mapping[Any, str] | Sequence[str] | None = None,
    kind: str | None = None,
    explicit_fresh: bool = False,
) -> dict[str, Any]:
    """A new optimizer state dict: ``state_dict`` with ``strategy`` applied (the module docstring
    defines each strategy). ``kind`` is the optimizer family (e.g. :func:`optimizer_kind` of
    the optimizer that will load the result); by default it is detected from the state.
    ``names`` names the parameters for a ``NAME:REGEX`` strategy when the state dict's
    groups carry no ``param_names``. ``explicit_fresh`` writes a ``fresh`` parameter's state
    as the values a new optimizer initialises it with (zeros, ``step`` 0, NAdam's
    ``mu_product`` 1) instead of removing it, for checkpoint formats whose loaders need
    every entry (torch.distributed.checkpoint, DeepSpeed); torch steps both forms alike.
    State whose fresh form is its absence (SGD's momentum buffer) is still removed.

    Example:
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> new = apply_strategy(opt.state_dict(), "reset-v")
        >>> float(new["state"][0]["exp_avg_sq"].abs().sum()), float(new["state"][0]["step"])
        (0.0, 1.0)
        >>> opt.load_state_dict(new)
    """
    strategy = Strategy.parse(strategy)
    actions = plan(state_dict, strategy, names=names)
    kind = kind or detect_kind(state_dict)
    partial = {a for a in actions.values() if a not in ("fresh", "reload", "none")}
    layout = layout_of(kind) if partial else layout_or_none(kind)
    groups = [dict(g) for g in state_dict["param_groups"]]
    group_of = {i: g for g in groups for i in g["params"]}
    for action in sorted(partial):
        assert layout is not None  # partial: layout_of(kind), which raises for a kind without one
        _check_applies(
            action,
            layout,
            kind,
            [group_of[i] for i, a in actions.items() if a == action],
            [state_dict["state"][i] for i, a in actions.items() if a == action],
        )
    new_state: dict[Any, dict[str, Any]] = {}
    for index, saved in state_dict.get("state", {}).items():
        action = actions.get(index, "reload")
        new = _transform(dict(saved), action, layout, group_of.get(index, {}), explicit_fresh)
        if new or not (layout is None or layout.lazy_init):
            new_state[index] = new
    _update_v_age(
        groups, state_dict.get("state", {}), actions, keep_v_needs_age=bool(layout and layout.v_bias_corrected)
    )
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["state"] = new_state
    out["param_groups"] = groups
    return out


def _transform(
    state: dict[str, Any],
    action: str,
    layout: StateLayout | None,
    group: Mapping[str, Any],
    explicit_fresh: bool = False,
) -> dict:
    if action in ("reload", "none"):
        return state
    if action == "fresh":
        if layout is None or (layout.lazy_init and not explicit_fresh):
            return {}
        keys: Sequence[str] = list(state)
    else:
        assert layout is not None
        keys = {
            "reset-m": layout.first_moment,
            "reset-v": layout.second_moment,
            "reset-step": layout.counter,
            "keep-v": layout.first_moment + layout.counter,
        }[action]
    for key in keys:
        if key in state:
            value = layout.fresh[key](state[key], group) if layout is not None else ABSENT
            if value is ABSENT:
                del state[key]
            else:
                state[key] = value
    return state


def _check_applies(
    action: str, layout: StateLayout, kind: str, groups: list[Mapping[str, Any]], states: list[Mapping[str, Any]]
) -> None:
    keys = {k for s in states for k in s}
    role = {
        "reset-m": layout.first_moment,
        "reset-v": layout.second_moment,
        "reset-step": layout.counter,
        "keep-v": layout.second_moment,
    }[action]
    if not states:
        return
    if not set(role) & keys:
        what = {
            "reset-m": "first moment",
            "reset-v": "second moment",
            "reset-step": "step counter",
            "keep-v": "second moment",
        }[action]
        raise OstateError(
            f"strategy '{action}' does not apply to optimizer kind '{kind}': its state has no {what}",
            hint=f"its state keys: {', '.join(sorted(keys)) or '(none)'}",
        )
    if action == "reset-step" and not any(layout.step_in_update(g) for g in groups):
        raise OstateError(
            f"strategy 'reset-step' does not apply to optimizer kind '{kind}': its step count "
            "does not enter the update (with these hyperparameters), so resetting it changes nothing"
        )
    if action == "keep-v":
        if layout.keep_v_refusal:
            raise OstateError(
                f"strategy 'keep-v' does not apply to optimizer kind '{kind}'", hint=layout.keep_v_refusal
            )
        if not set(layout.first_moment) & keys:
            raise OstateError(
                f"strategy 'keep-v' does not apply to optimizer kind '{kind}': its state has no first moment to reset",
                hint="use reset-step to restart its step count",
            )


def _update_v_age(
    groups: list[dict[str, Any]],
    state: Mapping[Any, Mapping[str, Any]],
    actions: Mapping[Any, str],
    *,
    keep_v_needs_age: bool,
) -> None:
    """Write (keep-v), keep (reload, reset-m) or drop (fresh, reset-v, reset-step) each group's
    second-moment age; refuse a group where one age cannot serve every parameter."""
    for number, group in enumerate(groups):
        done = {actions[i] for i in group["params"]}
        if "keep-v" not in done and V_AGE_KEY not in group:
            continue
        if len(done) > 1:
            example = next(i for i in group["params"] if actions[i] != "keep-v")
            raise OstateError(
                f"the bias correction of a kept v is per param group, but group {number} would mix "
                f"{' and '.join(sorted(done))} (e.g. parameter index {example}: {actions[example]}"
                + (", i.e. it has no state: frozen or never stepped" if actions[example] == "none" else "")
                + ")",
                hint="choose a regex that selects whole param groups, or put new or frozen parameters in a group of "
                "their own",
            )
        action = done.pop()
        if action in ("fresh", "reset-v", "reset-step"):
            group.pop(V_AGE_KEY, None)
        elif action == "keep-v" and keep_v_needs_age:
            ages = {_value(state[i]["step"]) for i in group["params"]}
            if len(ages) != 1:
                raise OstateError(
                    f"keep-v: the parameters of group {number} have different step counts {sorted(ages)}",
                    hint="one age of v per param group is needed for its bias correction",
                )
            group[V_AGE_KEY] = ages.pop() + float(group.get(V_AGE_KEY, 0.0))


def _value(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def v_age_factor(group: Mapping[str, Any], step: float) -> float:
    r""":math:`c_s = \sqrt{(1-\beta_2^{T+s})/(1-\beta_2^s)}` for the step ``s`` about to be taken
    (1 for a group without a recorded age).

    Example:
        >>> round(v_age_factor({"betas": (0.9, 0.999), V_AGE_KEY: 10000.0}, 1), 2)
        31.62
    """
    age = float(group.get(V_AGE_KEY, 0.0))
    if age == 0:
        return 1.0
    beta2 = group["betas"][1]
    return ((1 - beta2 ** (age + step)) / (1 - beta2**step)) ** 0.5


@dataclass
class _Saved:
    lr: Any
    eps: Any
    weight_decay: Any


def attach(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Make ``optimizer`` honour ``ostate_v_age`` (written by keep-v) exactly; returns a
    function that detaches the hooks. Groups without the key are not touched.

    Call it once after ``load_state_dict``; it reads the key at every step, so it also
    serves a state loaded later. Each step it scales the group's ``lr`` and ``eps`` by
    :func:`v_age_factor` and a decoupled ``weight_decay`` (AdamW's) by its inverse, and
    restores them after.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(2); opt.step()
        >>> opt.load_state_dict(apply_strategy(opt.state_dict(), "keep-v"))
        >>> detach = attach(opt); p.grad = torch.ones(2); opt.step(); detach()
    """
    saved: dict[int, _Saved] = {}

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for number, group in enumerate(opt.param_groups):
            if not group.get(V_AGE_KEY):
                continue
            steps = [opt.state[p]["step"] for p in group["params"] if "step" in opt.state.get(p, {})]
            c = v_age_factor(group, _value(steps[0]) + 1 if steps else 1.0)
            saved[number] = _Saved(group["lr"], group["eps"], group.get("weight_decay", 0.0))
            group["lr"] = group["lr"] * c
            group["eps"] = group["eps"] * c
            # Decoupled decay (AdamW; NAdam/Adam with decoupled_weight_decay) shrinks the weights
            # by lr * weight_decay, so it gets 1/c back; L2 decay (Adam's default) is added to
            # the gradient, which enters m and v unscaled, so it stays as it is.
            if "weight_decay" in group and group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)):
                group["weight_decay"] = group["weight_decay"] / c

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for number, values in saved.items():
            group = opt.param_groups[number]
            group["lr"], group["eps"] = values.lr, values.eps
            if "weight_decay" in group:
                group["weight_decay"] = values.weight_decay
        saved.clear()

    handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def detach() -> None:
        for handle in handles:
            handle.remove()

    return detach
