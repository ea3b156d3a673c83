"""What every optimizer family module provides, and how a family is chosen.

A family module (``adam.py``, ``sgd.py``, ...) writes its math as plain functions
and registers one :class:`Family` record that points at them. Detection scores
every registered family against an optimizer's state keys and group keys; the
highest score wins. A tie between families is settled by the family that declares
itself the more common reading, and the choice is reported as ``assumed``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from ostate.errors import OstateError
from ostate.state import ParamState, TensorRef

Group = Mapping[str, Any]
# Per-coordinate quantities of one chunk of a parameter: a tensor (one value per
# coordinate of the chunk) or a float (the same value for every coordinate).
Quantities = dict[str, "torch.Tensor | float"]
# The value a state entry starts from in a fresh optimizer, given the saved value and the param group.
Fresh = Callable[[Any, Group], Any]

# A fresh value meaning: the entry is absent (the optimizer creates it at its first step).
ABSENT = object()


def fresh_zeros(value: Any, group: Group) -> Any:
    """Zeros like ``value`` (a tensor, or a number of its type)."""
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else type(value)(0)


def fresh_ones(value: Any, group: Group) -> Any:
    """Ones like ``value`` (a tensor, or a number of its type)."""
    return torch.ones_like(value) if isinstance(value, torch.Tensor) else type(value)(1)


def fresh_absent(value: Any, group: Group) -> Any:
    """:data:`ABSENT`: the entry is removed, as a fresh optimizer does not have it."""
    return ABSENT


@dataclass(frozen=True)
class StateLayout:
    """Which state keys of an optimizer family are moments and counters, and how each starts.

    The roles are state keys as saved (``exp_avg``, ``exp_avg_sq``), not the quantity
    names of :attr:`Family.first_moment` and :attr:`Family.second_moment`; the
    strategies of ``ostate reset`` and the fine-tuning harness act on them.
    ``fresh`` gives, per key, the value a fresh optimizer starts from (a function of the
    saved value and the param group; :func:`fresh_absent` where a fresh optimizer has
    no such entry). ``step_in_update(group)`` says whether the counter changes the
    update (bias correction, schedules); ``v_bias_corrected`` whether the second moment
    is divided by :math:`1-\\beta_2^t` (keep-v then corrects for the kept second moment's
    age); ``keep_v_refusal`` explains why keeping the second moment while resetting the
    rest cannot be expressed, when it cannot; ``lazy_init`` whether torch creates the
    state at the first step (a fresh state is then empty) rather than in the constructor.

    ``group_state`` names what the optimizer *learns* into its param groups rather than its
    per-parameter state (Prodigy's and D-Adaptation's step-size estimate ``d`` and the
    sums it is made of, their step counter ``k``); ``fresh_group(group)`` gives those keys'
    values in a new optimizer with the group's hyperparameters (a key it leaves out is one
    a new optimizer does not have yet). A strategy that keeps any parameter's state keeps
    them as saved; one that keeps none (``fresh``) writes ``fresh_group``'s. ``flat`` names
    the state keys the optimizer keeps as flat vectors whatever the parameter's shape
    (Prodigy's ``s`` and ``p0``), which a reader must not reshape to the parameter's shape;
    ``reset_step_refusal`` explains why ``reset-step`` cannot be expressed, when it cannot, and
    ``reset_m_refusal`` the same for ``reset-m``; ``partial_refusal`` why no partial strategy
    (``reset-m``, ``reset-v``, ...) can be, when none can (D-Adaptation's SGD and AdaGrad
    compute the weights from their whole state at every step).

    ``group_state_per_group`` says that each group learns its own values (schedule-free: from
    its own lr) rather than all groups holding the optimizer's one (Prodigy's ``d``): a group
    of parameters new to a checkpoint then starts them as a new group would.
    ``group_mode`` names group keys that say how the weights relate to the state
    (schedule-free's ``train_mode``: the weights are :math:`y` or :math:`x`): they go with
    the weights wherever the weights go, and no strategy changes them.
    """

    first_moment: tuple[str, ...] = ()
    second_moment: tuple[str, ...] = ()
    counter: tuple[str, ...] = ()
    fresh: Mapping[str, Fresh] = field(default_factory=dict)
    step_in_update: Callable[[Group], bool] = lambda group: True
    v_bias_corrected: bool = False
    keep_v_refusal: str | None = None
    lazy_init: bool = True
    group_state: tuple[str, ...] = ()
    fresh_group: Callable[[Group], Mapping[str, Any]] | None = None
    flat: tuple[str, ...] = ()
    reset_step_refusal: str | None = None
    reset_m_refusal: str | None = None
    group_state_per_group: bool = False
    group_mode: tuple[str, ...] = ()
    partial_refusal: str | None = None


# The state an optimizer creates for a parameter at its first step, from the weight and the param group.
InitialState = Callable[[torch.Tensor, Group], dict[str, Any]]


@dataclass(frozen=True)
class FirstStep:
    r"""How a family's optimizer starts a parameter that has no state yet (a new head, an optimizer saved
    before its first step): the hook that lets ``next_update`` and ``effective_lr`` predict the first step.

    ``initial_state(weight, group)`` is the state the optimizer creates for a parameter like
    ``weight`` before stepping it, with its documented initial values (torch: each
    optimizer's ``_init_group``; zeros for moments, ``step`` 0, NAdam's ``mu_product`` 1,
    Rprop's ``step_size`` full of ``lr``, schedule-free's ``z`` a copy of the weights). The
    first step is then the family's own ``next_update`` applied to that state, exactly as the
    optimizer takes it. Only schedule-free reads the weight's values; the others its shape
    and dtype.

    ``effective_lr_refusal`` says why the first step's effective learning rate is not a
    function of the state, when it is not: an adaptive family divides its first step by
    the first gradient itself (Adam: :math:`\Delta\theta = -\gamma g/(|g|+\epsilon)`), so
    only ``next_update``, given the gradient, predicts it. None: ``effective_lr`` is the
    family's formula applied to the initial state (SGD, Lion, Muon, Rprop, ...).

    ``refusal`` (with no ``initial_state``; see :func:`unpredictable_first_step`) says why
    the first step cannot be predicted at all: it depends on something neither the saved
    state, the param group nor the gradient holds (Adam-mini's block split: the
    optimizer's name lists, not saved). ``next_update`` and ``effective_lr`` then refuse
    such a parameter with that reason.
    """

    initial_state: InitialState | None
    effective_lr_refusal: str | None = None
    refusal: str | None = None

    def __post_init__(self) -> None:
        if (self.initial_state is None) == (self.refusal is None):
            raise ValueError("a FirstStep has either an initial_state or a refusal")


def adaptive_first_step(initial_state: InitialState, formula: str) -> FirstStep:
    """The :class:`FirstStep` of a family whose first update divides by the first gradient (``formula``)."""
    return FirstStep(
        initial_state,
        effective_lr_refusal=f"its first step is {formula}: the effective learning rate of a first step is "
        "the first gradient's, not a function of the state",
    )


def unpredictable_first_step(reason: str) -> FirstStep:
    """The :class:`FirstStep` of a family whose first step depends on what no saved state holds (``reason``)."""
    return FirstStep(None, refusal=reason)


def zeros_for(weight: torch.Tensor, *keys: str) -> dict[str, torch.Tensor]:
    """One zero tensor like ``weight`` per key, as torch's ``torch.zeros_like(p)`` initialises moments."""
    return {key: torch.zeros_like(weight, memory_format=torch.preserve_format) for key in keys}


@dataclass(frozen=True)
class Family:
    r"""One optimizer family: how to recognise it and the math to apply to its state.

    - ``match(state_keys, group)`` scores how well an optimizer's keys fit (0: not at all).
    - ``effective_lr(param, group)`` is the per-coordinate effective learning rate.
    - ``next_update(param, group, grad, weight)`` is the next step's change of the weights.
    - ``quantities(chunk, group, param)`` gives the per-coordinate values to summarise,
      for one chunk of the coordinate-aligned state tensors (``chunk`` maps state keys to
      equal-length 1-D slices; the parameter's other state is read from ``param``).
    - ``columns(param, group)`` gives per-parameter scalar columns (bias corrections, ...).
    - ``display`` names the columns the inspect table shows by default.

    Standard quantity names, which views, plots and comparisons rely on (a family
    returns those that make sense for it):

    - ``eff_lr``: the per-coordinate effective learning rate (see each family's docstring);
    - ``update``: the signed change of each coordinate in the next step *with a zero
      gradient and no weight decay* (the momentum part of the next update);
    - ``snr``: the first moment's signal-to-noise ratio (Adam family:
      :math:`|\hat m|/\sqrt{\hat v}`, 0 where :math:`v = 0`);
    - the quantity named by ``first_moment`` (e.g. ``exp_avg_abs``: absolute values)
      and by ``second_moment`` (e.g. ``exp_avg_sq``).

    ``chunked=False`` makes the analysis pass the whole (flattened) state tensors in one
    call, for families whose math is not elementwise (factored second moments,
    per-matrix orthogonalisation).

    Optional, for the statistics that only some families have (docs/columns.md):

    - ``preconditioned(chunk, group, param, quantities)`` describes an adaptive family's
      update as :math:`n / (\sqrt{\hat s} + \epsilon)` elementwise (a
      :class:`Preconditioned`; ``quantities`` is what
      ``quantities()`` returned for the same chunk, to reuse). It gives the
      ``eps_dominated_frac`` column, and the Adam-mini ``vmean_*_relchange`` columns
      when the numerator is a moment in the state (not the gradient).
    - ``signed_first_moment(chunk, group, param)`` gives the first moment with its sign
      for one chunk (``ostate compare``'s cosine); by default it is the state key that
      ``first_moment`` names without ``_abs`` (``exp_avg_abs`` -> ``exp_avg``).
    - ``quantized_moments`` maps the state keys an 8-bit optimizer (bitsandbytes) would
      store quantized to whether their values are signed (signed map) or not (unsigned
      map); each gets a ``{key}_q8_relerr`` column.
    - ``moments`` says how an Adam-style family's state gives the bias-corrected moments
      :math:`\hat m` and :math:`\hat v` (a :class:`Moments`): the analysis then counts
      :math:`(\sqrt{\hat v}, |\hat m|)` per coordinate in a joint histogram when asked
      (``summarize(..., joint=True)``), for the moments plot.
    - ``layout`` says which state keys are the first and second moments and the step
      counters, and how a fresh optimizer starts each (a :class:`StateLayout`); the
      strategies that reset part of a state (``reset-m``, ``reset-v``, ...) need it, and
      refuse a family without one.
    - ``first_step`` says how the optimizer starts a parameter that has no state yet (a
      :class:`FirstStep`): ``next_update`` and ``effective_lr`` then predict its first
      step. Without it they refuse such a parameter (as for a state they cannot read).
    - ``lr_scale`` names the param-group key of a learned step size that multiplies the
      lr (Prodigy's and D-Adaptation's ``d``); ``ostate doctor`` reports it per group.
    """

    name: str
    label: str
    match: Callable[[frozenset[str], Group], int]
    quantities: Callable[[Mapping[str, torch.Tensor], Group, ParamState], Quantities]
    effective_lr: Callable[[ParamState, Group], torch.Tensor] | None = None
    next_update: Callable[[ParamState, Group, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    columns: Callable[[ParamState, Group], dict[str, Any]] = lambda param, group: {}
    display: tuple[str, ...] = ()
    # Prefer this family when another one matches equally well (the more common reading).
    preferred: bool = False
    # Which group hyperparameters the header shows, in order.
    hyperparameters: tuple[str, ...] = ("lr", "initial_lr", "weight_decay")
    notes: tuple[str, ...] = field(default=())
    first_moment: str | None = None
    second_moment: str | None = None
    chunked: bool = True
    preconditioned: Callable[[Mapping[str, torch.Tensor], Group, ParamState, Quantities], Preconditioned] | None = None
    quantized_moments: Mapping[str, bool] = field(default_factory=dict)
    moments: Moments | None = None
    signed_first_moment: Callable[[Mapping[str, torch.Tensor], Group, ParamState], torch.Tensor] | None = None
    layout: StateLayout | None = None
    first_step: FirstStep | None = None
    lr_scale: str | None = None

    def first_moment_values(
        self, chunk: Mapping[str, torch.Tensor], group: Group, param: ParamState
    ) -> torch.Tensor | None:
        """The signed first moment of one chunk, or None when the family keeps none (or the state lacks it)."""
        if self.signed_first_moment is not None:
            return self.signed_first_moment(chunk, group, param)
        if self.first_moment is None:
            return None
        return chunk.get(self.first_moment.removesuffix("_abs"))


@dataclass(frozen=True)
class Moments:
    r"""Where an Adam-style family keeps exponential moving averages of :math:`g` and :math:`g^2`.

    - ``estimates(chunk, group, param, quantities)`` gives :math:`|\hat m|` and
      :math:`\sqrt{\hat v}` per coordinate of one chunk (float32 tensors; ``quantities``
      is what the family's ``quantities()`` returned for the same chunk, to reuse), with
      :math:`\hat m = m/(1-\beta_1^t)` and :math:`\hat v = v/(1-\beta_2^t)`.
    - ``betas(group)`` gives :math:`(\beta_1, \beta_2)` of the two averages.
    - ``eps_root(group, step)`` gives the value of :math:`\sqrt{\hat v}` at which the
      update's :math:`\epsilon` equals the other term of its denominator (Adam: :math:`\epsilon`;
      RAdam, which adds :math:`\epsilon` to the uncorrected :math:`\sqrt v`:
      :math:`\epsilon/\sqrt{1-\beta_2^t}`).
    """

    estimates: Callable[[Mapping[str, torch.Tensor], Group, ParamState, Quantities], tuple[torch.Tensor, torch.Tensor]]
    betas: Callable[[Group], tuple[float, float]]
    eps_root: Callable[[Group, float], float]


@dataclass
class Preconditioned:
    r"""One chunk of an adaptive update :math:`u = n / (\sqrt{\hat s} + \epsilon)`, elementwise.

    ``numerator`` is :math:`n` up to a positive constant factor (Adam: :math:`m`), or
    None when :math:`n` is the gradient itself (Adagrad, RMSprop), which the state does
    not hold;
    ``second_moment * second_moment_scale`` is :math:`\hat s` (Adam: the bias-corrected
    :math:`\hat v`, whose block mean an Adam-mini-style optimizer would keep);
    ``inverse_denominator * inverse_denominator_scale`` is
    :math:`1/(\sqrt{\hat s} + \epsilon)`; ``eps`` is :math:`\epsilon`. The scales let a
    family hand over tensors it already has (Adam: :math:`v` and the effective lr)
    without another pass over them.
    """

    numerator: torch.Tensor | None
    second_moment: torch.Tensor
    inverse_denominator: torch.Tensor
    eps: float
    second_moment_scale: float = 1.0
    inverse_denominator_scale: float = 1.0


def plain_preconditioned(
    numerator: torch.Tensor | None, second_moment: torch.Tensor, eps: float, scale: float = 1.0
) -> Preconditioned:
    r"""An update :math:`n / (\sqrt{s \cdot scale} + \epsilon)` with its inverse denominator computed here.

    For families whose :math:`\epsilon` is added to an uncorrected (``scale=1``) or
    corrected square root of the second moment, and which have no effective lr to reuse.

    Example:
        >>> pre = plain_preconditioned(None, torch.tensor([0.0, 4.0]), eps=1.0)
        >>> pre.inverse_denominator.tolist()
        [1.0, 0.3333333432674408]
    """
    s = second_moment.float()
    inverse = s.mul(scale).sqrt_().add_(eps).reciprocal_() if scale != 1.0 else s.sqrt().add_(eps).reciprocal_()
    return Preconditioned(
        numerator=numerator, second_moment=s, inverse_denominator=inverse, eps=float(eps), second_moment_scale=scale
    )


def initial_param(param: ParamState, first_step: FirstStep, group: Group, weight: torch.Tensor) -> ParamState:
    """``param`` (which has no state) with the state its optimizer creates at the first step.

    Example:
        >>> p = ParamState(0, "head.bias", "fqn", 0, (2,), None)
        >>> start = initial_param(p, FirstStep(lambda w, g: {"step": torch.tensor(0.0), **zeros_for(w, "m")}), {}, torch.ones(2))
        >>> start.step, start.read("m").tolist()
        (0.0, [0.0, 0.0])
    """
    if first_step.initial_state is None:
        raise OstateError(f"'{param.name}' has no state yet (first step): {first_step.refusal}")
    state = first_step.initial_state(weight, group)
    step = state.get("step")
    return ParamState(
        param.index,
        param.name,
        param.name_source,
        param.group,
        tuple(weight.shape),
        None if step is None else float(step),
        {k: TensorRef.of(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()},
        frozen=param.frozen,
    )


def group_has(group: Group, *keys: str) -> bool:
    return all(k in group for k in keys)


def step_of(param: ParamState) -> float:
    """The parameter's step count; a clear error when the state has none."""
    if param.step is None:
        raise OstateError(f"parameter '{param.name}' has no step count in its state")
    return float(param.step)


def scalar_of(param: ParamState, key: str) -> float:
    """A scalar state entry (a 0-d tensor or a number, e.g. NAdam's ``mu_product``) as a float."""
    if key not in param.state:
        raise OstateError(f"parameter '{param.name}' has no '{key}' in its state")
    return float(param.read(key).reshape(-1)[0])


@contextmanager
def explain_bad_state(param: ParamState, family: Family, group: Group | None = None) -> Iterator[None]:
    """Turn state or hyperparameters that ``family``'s math cannot use into one clear error.

    A state or group key the math needs but does not find: ``--optimizer`` names a
    family the state does not come from, or a parameter never stepped. A step count or
    ``betas`` (checked when ``group`` is given) that no torch optimizer can have: a
    negative step, a beta outside [0, 1] (the file is damaged). Scalar
    arithmetic that overflows on such values is reported the same way.
    """
    if group is not None:
        _check_ranges(param, group)
    try:
        yield
    except KeyError as e:
        raise OstateError(
            f"'{param.name}': optimizer kind '{family.name}' needs '{e.args[0]}', which is in neither its state "
            "nor its param group",
            hint="it may never have stepped, or the state is another optimizer's (see optimizer=); "
            f"its state keys: {', '.join(sorted(param.state)) or 'none'}",
        ) from None
    except (OverflowError, ZeroDivisionError) as e:
        raise OstateError(
            f"'{param.name}': its state or hyperparameters are out of range ({e})",
            hint="the file may be damaged; `ostate doctor` lists what is wrong",
        ) from None


def _check_ranges(param: ParamState, group: Group) -> None:
    if param.step is not None:
        try:
            step = float(param.step)
        except (OverflowError, TypeError, ValueError):
            step = math.nan
        # A negative step makes 1 - beta^t negative and its square root complex. NaN and
        # +inf give NaN or plain numbers and are reported as such (doctor: nonfinite-state).
        if step < 0:
            raise OstateError(
                f"'{param.name}': step {param.step} is not a step count (a number >= 0)",
                hint="the file is damaged or was not written by a torch optimizer",
            )
    betas = group.get("betas")
    if isinstance(betas, (list, tuple)):
        for beta in betas:
            try:
                ok = 0.0 <= float(beta) <= 1.0
            except (OverflowError, TypeError, ValueError):
                ok = False
            if not ok:
                raise OstateError(
                    f"param group {param.group}: betas {tuple(betas)} are not in [0, 1]",
                    hint="the file is damaged or was not written by a torch optimizer",
                )
