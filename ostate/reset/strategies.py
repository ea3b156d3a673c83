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

**Learned step sizes.** Prodigy and D-Adaptation keep their step-size estimate ``d`` (which
multiplies lr), the sums it is learned from and their counter ``k`` in the *param groups*
(the layout's ``group_state``). A strategy that keeps any parameter's state keeps them as
saved (the saved moments carry ``d``); ``fresh`` (no state kept) puts them back to a new
optimizer's (:func:`reset_group_state`: ``d = d0``). See :mod:`ostate.optimizers.dadapt`.
Schedule-free AdamW, SGD and RAdam learn their counter ``k``, ``weight_sum`` and ``lr_max`` into each
group alike (:mod:`ostate.optimizers.schedulefree`, :mod:`ostate.optimizers.schedulefree_variants`); their ``train_mode`` (whether the weights are ``x`` or
``y``) is the layout's ``group_mode``, which no strategy changes.

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
scaled at all. The correction is per parameter, from its own step count
(:func:`attach`). Adamax's infinity norm has no bias correction, so keep-v needs no
hook there; on RAdam the hook runs the step at v's age, so its rectification follows
v's age.

**Age-correct strategies.** ``reset-m-ac`` and ``reset-v-ac`` restart one moment and
bias-correct each moment by its own age (a restarted one from 0, a kept one from its
saved age), so that the comparison with ``reload`` is not also a comparison of
effective learning rates; ``keep-v`` is the age-correct form of resetting m and the
step. The ages are recorded in the param groups (:data:`V_AGE_KEY`,
:data:`AGE_OFFSETS_KEY`) and applied by :func:`attach`; docs/strategies.md gives the
first-step arithmetic. ``adam-rel`` (Ellis et al. 2024) is another name of
``reset-step``; ``fresh`` is the full reset of Asadi et al. 2023.
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
# The age-correct variants (each moment bias-corrected by its own age; see "Age-correct
# strategies" below). keep-v is the age-correct form of resetting m and the step.
AGE_CORRECT_STRATEGIES = ("reset-m-ac", "reset-v-ac")
ALL_STRATEGIES = STRATEGIES + AGE_CORRECT_STRATEGIES
# Other names of the same strategies: reset-step is Adam-Rel (Ellis et al. 2024); fresh is
# the full reset of Asadi et al. 2023.
ALIASES = {"adam-rel": "reset-step", "reset-m-age-correct": "reset-m-ac", "reset-v-age-correct": "reset-v-ac"}

# The param-group key that records the age of a kept second moment (see keep-v above).
V_AGE_KEY = "ostate_v_age"
# The param-group key with per-parameter age offsets, ``{"m": [...], "v": [...]}`` in the
# order of the group's ``params``: a moment's age is the step counter plus its offset. Written
# where one group-wide ``ostate_v_age`` cannot say it (age-correct variants, parameters of one
# group with different step counts); read by :func:`attach`.
AGE_OFFSETS_KEY = "ostate_age_offsets"
# How :func:`attach` corrects ages, per optimizer kind: "adam" scales lr, eps and decoupled decay;
# "nadam" the same with m's correction left to mu_product; "radam" runs the step at v's age
# (its rectification) and scales lr for m's age.
AGE_MECHANISM = {"adam": "adam", "adamw": "adam", "nadam": "nadam", "radam": "radam"}


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
        if self.name in ALIASES:
            object.__setattr__(self, "name", ALIASES[self.name])
        if self.name not in ALL_STRATEGIES:
            raise OstateError(
                f"unknown strategy '{self.name}'",
                hint=f"choose one of: {', '.join(ALL_STRATEGIES)} (or {', '.join(ALIASES)}), "
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
        with_layout = sorted(
            name for name, f in families().items() if f.layout is not None and f.layout.partial_refusal is None
        )
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
    new_groups: Sequence[Mapping[str, Any]] | None = None,
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
    ``new_groups`` are the param groups of a new optimizer like the one that will load the
    result (the harness's trial optimizer, before it loads anything): ``fresh`` takes what
    an optimizer learns into its groups (Prodigy's ``d``) from them, group by group; by
    default from the family's ``fresh_group`` (:func:`reset_group_state`).

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
    if layout is not None and layout.fresh_group is not None and keeps_no_state(actions, strategy):
        for k, group in enumerate(groups):  # the learned step size starts again with the state
            reset_group_state(group, layout, new_groups[k] if new_groups is not None else None)
    _update_v_age(groups, state_dict.get("state", {}), actions, kind=kind)
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["state"] = new_state
    out["param_groups"] = groups
    return out


def keeps_no_state(actions: Mapping[Any, str], strategy: Strategy) -> bool:
    """Whether a plan keeps no parameter's saved state: ``fresh`` (every parameter fresh, or without
    state). A ``NAME:REGEX`` plan that keeps some parameters' state keeps the groups' learned values."""
    kept = any(a not in ("fresh", "none") for a in actions.values())
    return not kept and (strategy.name == "fresh" or "fresh" in actions.values())


def reset_group_state(group: dict[str, Any], layout: StateLayout, new: Mapping[str, Any] | None = None) -> None:
    """Put what the optimizer learned into ``group`` (:attr:`~ostate.optimizers.family.StateLayout.group_state`:
    Prodigy's and D-Adaptation's estimate ``d`` and its sums, their counter ``k``) back to a new optimizer's:
    those of ``new`` (a new optimizer's group) when given, else the family's ``fresh_group``.

    Example:
        >>> from ostate.optimizers import families
        >>> g = {"d0": 1e-6, "d": 3e-3, "d_max": 3e-3, "d_numerator": 0.2, "d_denom": 4.0, "d_hat": 3e-3, "k": 9}
        >>> reset_group_state(g, families()["prodigy"].layout); g
        {'d0': 1e-06, 'd': 1e-06, 'd_max': 1e-06, 'd_numerator': 0.0, 'k': 0}
    """
    assert layout.fresh_group is not None
    fresh = layout.fresh_group(group) if new is None else {k: new[k] for k in layout.group_state if k in new}
    for key in layout.group_state:
        group.pop(key, None)
    group.update(fresh)


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
        # A state with a key that has no fresh value to write (Prodigy's p0: the weights at the first step)
        # starts fresh as no entry at all, as a lazily initialising optimizer's state does unless written out.
        if layout is None or (layout.lazy_init and (not explicit_fresh or any(k not in layout.fresh for k in state))):
            return {}
        keys: Sequence[str] = list(state)
    else:
        assert layout is not None
        keys = {
            "reset-m": layout.first_moment,
            "reset-v": layout.second_moment,
            "reset-step": layout.counter,
            "keep-v": layout.first_moment + layout.counter,
            # m restarts with its own age: NAdam's mu_product (its m correction) goes with it
            "reset-m-ac": layout.first_moment + tuple(k for k in layout.counter if k != "step"),
            "reset-v-ac": layout.second_moment,
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
        "reset-m-ac": layout.first_moment,
        "reset-v-ac": layout.second_moment,
    }[action]
    if not states:
        return
    if layout.partial_refusal:
        raise OstateError(f"strategy '{action}' does not apply to optimizer kind '{kind}'", hint=layout.partial_refusal)
    # A family's own reason first: it says more than "its state has no ..." (schedule-free has no step at all).
    refusal = {
        "reset-m": layout.reset_m_refusal,
        "reset-m-ac": layout.reset_m_refusal,
        "reset-step": layout.reset_step_refusal,
        "keep-v": layout.keep_v_refusal,
    }.get(action)
    if refusal:
        raise OstateError(f"strategy '{action}' does not apply to optimizer kind '{kind}'", hint=refusal)
    if action in AGE_CORRECT_STRATEGIES and kind not in AGE_MECHANISM:
        raise OstateError(
            f"strategy '{action}' does not apply to optimizer kind '{kind}': its moments have no "
            "bias correction by age to make correct",
            hint=f"the age-correct strategies apply to: {', '.join(sorted(AGE_MECHANISM))} (AMSGrad too); "
            f"use {action.removesuffix('-ac')} here",
        )
    if not set(role) & keys:
        what = {
            "reset-m": "first moment",
            "reset-v": "second moment",
            "reset-step": "step counter",
            "keep-v": "second moment",
            "reset-m-ac": "first moment",
            "reset-v-ac": "second moment",
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
    kind: str,
) -> None:
    """Each parameter's moment ages after the strategy, written into its group.

    A moment's age is the step counter plus an offset. Per action, from the offsets the
    state had (``m0``, ``v0``) and the parameter's saved step ``T``: reload keeps both;
    fresh, reset-step (its bias correction restarts with the counter: Adam-Rel) and a
    parameter with no state get none; reset-m keeps ``v0`` (torch's one counter then
    corrects m), reset-v keeps ``m0``; keep-v gives v ``T + v0`` (the counter restarts
    at 0, v keeps its age); reset-m-ac gives m ``-T`` and reset-v-ac gives v ``-T`` (the
    counter goes on from ``T``, the reset moment starts at age 0). NAdam's m age is its
    own ``mu_product`` (reset with m by reset-m-ac), so its m offset stays 0.

    Where every parameter of a group has m offset 0 and one v offset, the group gets
    ``ostate_v_age`` (the form keep-v always wrote); otherwise ``ostate_age_offsets``.
    Kinds without bias correction by age (SGD, Adamax, ...) get neither.
    """
    mechanism = AGE_MECHANISM.get(kind)
    for group in groups:
        old = age_offsets(group)
        new: list[tuple[float, float]] = []
        for k, index in enumerate(group["params"]):
            m0, v0 = old[k]
            action = actions[index]
            saved_step = _value(state[index]["step"]) if "step" in state.get(index, {}) else 0.0
            if action in ("reload",):
                offsets = (m0, v0)
            elif action == "reset-m":
                offsets = (0.0, v0)
            elif action == "reset-v":
                offsets = (m0, 0.0)
            elif action == "keep-v":
                offsets = (0.0, saved_step + v0)
            elif action == "reset-m-ac":
                offsets = (0.0 if mechanism == "nadam" else m0 - saved_step, v0)
            elif action == "reset-v-ac":
                offsets = (m0, v0 - saved_step)
            else:  # fresh, reset-step, none
                offsets = (0.0, 0.0)
            new.append(offsets)
        group.pop(V_AGE_KEY, None)
        group.pop(AGE_OFFSETS_KEY, None)
        if mechanism is None or all(o == (0.0, 0.0) for o in new):
            continue
        if all(m == 0 for m, _ in new) and len({v for _, v in new}) == 1:
            group[V_AGE_KEY] = new[0][1]
        else:
            group[AGE_OFFSETS_KEY] = {"m": [m for m, _ in new], "v": [v for _, v in new]}


def age_offsets(group: Mapping[str, Any]) -> list[tuple[float, float]]:
    """Each parameter's ``(m, v)`` age offsets in ``group`` (zeros where none are recorded).

    Example:
        >>> age_offsets({"params": [0, 1], V_AGE_KEY: 20.0})
        [(0.0, 20.0), (0.0, 20.0)]
    """
    n = len(group["params"])
    base = float(group.get(V_AGE_KEY, 0.0) or 0.0)
    table = group.get(AGE_OFFSETS_KEY) or {}
    ms = [float(x) for x in table.get("m", [0.0] * n)]
    vs = [float(x) for x in table.get("v", [0.0] * n)]
    return [(m, base + v) for m, v in zip(ms, vs)]


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


def attach(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Make ``optimizer`` bias-correct each moment by its own age (the ages keep-v and the
    age-correct strategies record in the param groups); returns a function that detaches
    the hooks. Parameters without a recorded age are stepped exactly as torch steps them.

    Call it once after ``load_state_dict``; it reads the ages at every step, so it also
    serves a state loaded later. For each parameter, with torch's counter ``t`` for the
    step about to be taken and ages ``a_m = t + m offset``, ``a_v = t + v offset``
    (:func:`age_offsets`), the step runs in a temporary param group of its own with
    (Adam, AdamW, AMSGrad) ``lr * k * c``, ``eps * c`` and a decoupled ``weight_decay / (k c)``
    where ``k = (1 - beta1^t) / (1 - beta1^a_m)`` and ``c = sqrt((1 - beta2^a_v) / (1 - beta2^t))``;
    NAdam the same with ``k = 1`` (its m is corrected by its own ``mu_product``); RAdam
    with its counter set to ``a_v`` for the step (so the rectification follows v's age),
    ``lr * (1 - beta1^a_v) / (1 - beta1^a_m)`` and the decoupled decay divided by the same.
    The groups and counters are restored after the step. See docs/strategies.md.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(2); opt.step()
        >>> opt.load_state_dict(apply_strategy(opt.state_dict(), "keep-v"))
        >>> detach = attach(opt); p.grad = torch.ones(2); opt.step(); detach()
    """
    mechanism = AGE_MECHANISM.get(optimizer_kind(optimizer))
    saved_groups: list[list[dict[str, Any]]] = []
    counters: list[tuple[Any, float]] = []

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if mechanism is None or not any(V_AGE_KEY in g or AGE_OFFSETS_KEY in g for g in opt.param_groups):
            return
        decoupled_default = isinstance(opt, torch.optim.AdamW)
        new_groups: list[dict[str, Any]] = []
        for group in opt.param_groups:
            if not (group.get(V_AGE_KEY) or group.get(AGE_OFFSETS_KEY)):
                new_groups.append(group)
                continue
            beta1, beta2 = group["betas"]
            parts: dict[tuple[float, float], list[Any]] = {}
            for p, (m_off, v_off) in zip(group["params"], age_offsets(group)):
                state = opt.state.get(p, {})
                t = _value(state["step"]) + 1 if "step" in state else 1.0
                a_m, a_v = t + m_off, t + v_off
                if mechanism == "radam":
                    if a_v != t:
                        counters.append((p, t - 1))
                        _set_step(state, a_v - 1)
                    k, c = (1 - beta1**a_v) / (1 - beta1**a_m), 1.0
                else:
                    k = 1.0 if mechanism == "nadam" else (1 - beta1**t) / (1 - beta1**a_m)
                    c = ((1 - beta2**a_v) / (1 - beta2**t)) ** 0.5
                parts.setdefault((k, c), []).append(p)
            for (k, c), params in parts.items():
                part = {**group, "params": params, "lr": group["lr"] * k * c, "eps": group["eps"] * c}
                # Decoupled decay (AdamW; decoupled_weight_decay=True) shrinks the weights by lr * weight_decay,
                # so it gets 1/(k c) back; L2 decay (Adam's default) is added to the gradient, which enters
                # m and v unscaled, so it stays as it is.
                if "weight_decay" in group and group.get("decoupled_weight_decay", decoupled_default):
                    part["weight_decay"] = group["weight_decay"] / (k * c)
                new_groups.append(part)
        saved_groups.append(opt.param_groups)
        opt.param_groups = new_groups

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if saved_groups:
            opt.param_groups = saved_groups.pop()
        for p, step in counters:
            _set_step(opt.state[p], step + 1)
        counters.clear()

    handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def detach() -> None:
        for handle in handles:
            handle.remove()

    return detach


def _set_step(state: dict[str, Any], value: float) -> None:
    if isinstance(state["step"], torch.Tensor):
        state["step"].fill_(value)
    else:
        state["step"] = value
