r"""``ostate doctor``: what is wrong, or worth knowing, about a checkpoint's optimizer state.

:func:`diagnose` runs one streaming analysis pass (:func:`ostate.analysis.summarize`:
every tensor read once) and then every check in :data:`CHECKS` over its per-parameter
sums and sketches, the param groups, the schedulers and the model's weights. Each check
is a small function with its threshold as a named constant below, and returns
:class:`Finding`\ s: a severity (``info``, ``warning``, ``error``), a code, a title, the
evidence (which parameters, how many of their coordinates) and what to do.

Thresholds (docs/doctor.md explains each check):

- :data:`V_ZERO_WARN`: a parameter with at least this fraction of its coordinates at
  :math:`v = 0` is a warning (fewer: info);
- :data:`EPS_WARN`: eps dominates at least this fraction of a parameter's coordinates
  that have :math:`v > 0`;
- :data:`LR_DECAYED`: a group's lr at or below this fraction of its ``initial_lr``;
- :data:`AMSGRAD_RATIO`, :data:`AMSGRAD_FRACTION`: AMSGrad's :math:`\sqrt{v^{max}/v}`
  at least this large on at least this fraction of a parameter's coordinates.

The exit code of the command reflects the worst finding (:func:`exit_code`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ostate.analysis import Analysis, ParamSummary, summarize
from ostate.analysis.params import param_kind
from ostate.distributed import RayExecutor, summarize_on_ray
from ostate.errors import OstateError
from ostate.loading import as_checkpoint
from ostate.optimizers import get_family
from ostate.state import Checkpoint, OptimizerState, ParamState, TensorRef

SEVERITIES = ("info", "warning", "error")
# Every finding's code, in the order of docs/doctor.md's table (for --ignore; tested against both).
CODES = (
    "nonfinite-state",
    "nonfinite-weights",
    "shape-mismatch",
    "state-without-param",
    "count-mismatch",
    "lr-nonfinite",
    "lr-zero",
    "schedule-finished",
    "lr-decayed",
    "learned-step-size",
    "empty-state",
    "params-without-state",
    "frozen-params",
    "second-moment-zero",
    "eps-dominated",
    "step-mismatch",
    "nadam-mu-product",
    "weight-decay-on-norms-or-biases",
    "weight-decay-on-embeddings",
    "weight-decay-on-vectors",
    "amsgrad-stale-max",
    "low-precision-moments",
    "state-dtype-differs",
    "unmatched-params",
    "unnamed-params",
    "model-params-without-optimizer",
    "reader-warning",
)
# Exit codes: 0 nothing at or above --fail-on, 3 the worst is a warning, 4 an error. (2 is bad input, 1 a bug.)
EXIT_OK, EXIT_WARNING, EXIT_ERROR = 0, 3, 4
FAIL_ON = ("warning", "error", "never")

V_ZERO_WARN = 0.01
EPS_WARN = 0.5
LR_DECAYED = 1e-3
AMSGRAD_RATIO = 10.0
AMSGRAD_FRACTION = 0.1
# Dtypes whose moments lose precision: an EMA update of relative size 1 - beta2 = 1e-3 is below bf16's 2^-8.
LOW_PRECISION = ("bfloat16", "float16")
# Families that keep no per-parameter state by design (L-BFGS keeps its history on the first parameter).
_NO_PER_PARAMETER_STATE = ("lbfgs",)


@dataclass
class Evidence:
    """One thing a finding points at: a parameter (or a param group, a scheduler), and how much of it."""

    subject: str
    coordinates: int | None = None
    of: int | None = None
    detail: str = ""


@dataclass
class Finding:
    """One finding: how bad, a stable code (for ``--ignore``), what it is, where, and what to do."""

    severity: str
    code: str
    title: str
    evidence: list[Evidence]
    advice: str
    optimizer: str | None = None

    @property
    def coordinates(self) -> int:
        return sum(e.coordinates or 0 for e in self.evidence)


@dataclass
class Diagnosis:
    """Every finding about one checkpoint, worst first."""

    path: str
    format: str
    findings: list[Finding]
    checked: dict[str, int]
    model_location: str | None = None

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def worst(self) -> str | None:
        present = [f.severity for f in self.findings]
        return max(present, key=SEVERITIES.index) if present else None


def exit_code(diagnosis: Diagnosis, fail_on: str = "warning") -> int:
    """The exit code for a CI pipeline: 4 when the worst finding is an error, 3 when it is a warning,
    0 otherwise; findings below ``fail_on`` (``warning``, ``error``, or ``never``) do not count.

    Example:
        >>> d = Diagnosis("x.pt", "torch", [Finding("warning", "lr-zero", "lr is 0", [], "")], {})
        >>> exit_code(d), exit_code(d, fail_on="error")
        (3, 0)
    """
    if fail_on not in FAIL_ON:
        raise OstateError(f"unknown fail_on='{fail_on}'", hint=f"choose one of: {', '.join(FAIL_ON)}")
    if fail_on == "never":
        return EXIT_OK
    floor = SEVERITIES.index(fail_on)
    worst = [SEVERITIES.index(f.severity) for f in diagnosis.findings]
    worst_level = max(worst, default=-1)
    if worst_level < floor:
        return EXIT_OK
    return EXIT_ERROR if worst_level == SEVERITIES.index("error") else EXIT_WARNING


@dataclass
class Context:
    """What the checks look at: the checkpoint, its analysis, and the model's weights to compare with."""

    checkpoint: Checkpoint
    analysis: Analysis
    model: Mapping[str, TensorRef] | None
    model_location: str | None
    model_given: bool  # the user passed --model (the current model), not the checkpoint's own weights

    def parameters(self) -> Iterable[tuple[OptimizerState, ParamState, ParamSummary]]:
        for result in self.analysis.optimizers:
            for param, summary in zip(result.optimizer.params, result.summaries):
                yield result.optimizer, param, summary


def check_codes(codes: Iterable[str]) -> set[str]:
    """``codes`` as a set; a clear error naming any that is not a finding's code (a typo in a CI
    configuration would otherwise silently ignore nothing).

    Example:
        >>> sorted(check_codes(["lr-zero", "eps-dominated"]))
        ['eps-dominated', 'lr-zero']
    """
    chosen = set(codes)
    unknown = sorted(chosen - set(CODES))
    if unknown:
        raise OstateError(
            f"unknown finding code{'s' if len(unknown) > 1 else ''} to ignore: {', '.join(unknown)}",
            hint=f"the codes are: {', '.join(CODES)}",
        )
    return chosen


def diagnose(
    checkpoint: Checkpoint | str | os.PathLike,
    *,
    model: Mapping[str, TensorRef] | None = None,
    model_location: str | None = None,
    ignore: Iterable[str] = (),
    workers: int | None = None,
    progress: bool = False,
    executor: RayExecutor | None = None,
) -> Diagnosis:
    """Run every check on ``checkpoint`` (loaded, or its path), reading each tensor once.

    ``model`` is the model to check the optimizer against (the current model's weights,
    e.g. from :func:`ostate.formats.naming.weights.read_model`); by default the checkpoint's own.
    Findings whose code is in ``ignore`` are left out. ``executor`` runs the analysis on
    Ray (:mod:`ostate.distributed`) with the same findings.

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        >>> m(torch.randn(2, 4)).square().sum().backward(); opt.step()
        >>> d = diagnose(ostate.from_state_dict(opt.state_dict(), model=m))
        >>> [(f.severity, f.code) for f in d.findings]
        [('warning', 'weight-decay-on-norms-or-biases')]
    """
    checkpoint = as_checkpoint(checkpoint)
    skip = check_codes(ignore)
    weights = model if model is not None else checkpoint.weights
    location = model_location if model is not None else checkpoint.weights_location
    # The checks read core statistics only: compressibility and the 8-bit error are not computed.
    if executor is not None:  # the same analysis on Ray (ostate.distributed)
        if model is not None:
            raise OstateError(
                "--executor ray checks against the checkpoint's own model only",
                hint="leave out --model, or run locally",
            )
        analysis = summarize_on_ray(checkpoint, executor, statistics=())
    else:
        analysis = summarize(checkpoint, weights=weights, workers=workers, progress=progress, statistics=())
    context = Context(checkpoint, analysis, weights, location, model is not None)
    findings = [f for check in CHECKS for f in check(context) if f.code not in skip]
    findings.sort(key=lambda f: -SEVERITIES.index(f.severity))  # stable: checks keep their order within a severity
    with_state = [p for o in checkpoint.optimizers for p in o.params if p.has_state]
    checked = {
        "optimizers": len(checkpoint.optimizers),
        "parameters": sum(len(o.params) for o in checkpoint.optimizers),
        "parameters_with_state": len(with_state),
        "coordinates": sum(p.numel or 0 for p in with_state),
    }
    return Diagnosis(checkpoint.path, checkpoint.format, findings, checked, location)


# ------------------------------------------------------------------------------ helpers
def _evidence(param: ParamState, coordinates: int | None = None, detail: str = "") -> Evidence:
    return Evidence(param.name, coordinates, param.numel, detail)


def _by_optimizer(
    items: list[tuple[OptimizerState, Evidence]], make: Callable[[str, list[Evidence]], Finding]
) -> list[Finding]:
    """One finding per optimizer that has evidence."""
    out = []
    for location in dict.fromkeys(o.location for o, _ in items):
        found = make(location, [e for o, e in items if o.location == location])
        found.optimizer = location
        out.append(found)
    return out


def _second_moment(optimizer: OptimizerState) -> str | None:
    return get_family(optimizer.kind).second_moment


def _keeps_state(optimizer: OptimizerState, param: ParamState) -> bool:
    """False where the family keeps no state for this parameter by design (SGD without momentum, L-BFGS)."""
    group = optimizer.groups[param.group]
    if optimizer.kind in _NO_PER_PARAMETER_STATE or param.frozen:
        return False
    return not (optimizer.kind == "sgd" and not group.get("momentum", 0.0))


# ------------------------------------------------------------------------------ the checks
def check_nonfinite(ctx: Context) -> list[Finding]:
    """NaN or ±inf in the state (error), in the saved weights (error), or as a step count (error)."""
    state, weights = [], []
    for o, p, s in ctx.parameters():
        moments = [
            s.sketches[q].nonfinite for q in (_second_moment(o), get_family(o.kind).first_moment) if q in s.sketches
        ]
        bad = max([int(s.sums.get("nonfinite_coords", 0)), *moments])
        if bad or (p.step is not None and not math.isfinite(p.step)):
            detail = "" if p.step is None or math.isfinite(p.step) else f"step is {p.step}"
            state.append((o, _evidence(p, bad, detail)))
        if "weight" in s.sketches and s.sketches["weight"].nonfinite:
            weights.append((o, _evidence(p, s.sketches["weight"].nonfinite)))
    out = _by_optimizer(
        state,
        lambda loc, ev: Finding(
            "error",
            "nonfinite-state",
            "NaN or infinite values in the optimizer state",
            ev,
            "The next step writes NaN into these weights. Do not resume from this state: go back to an earlier "
            "checkpoint, or start the affected parameters fresh (ostate reset PATH --strategy fresh --params REGEX -o OUT) "
            "if their weights are finite; then look for the cause (an lr spike, fp16 overflow, a division by zero).",
        ),
    )
    out += _by_optimizer(
        weights,
        lambda loc, ev: Finding(
            "error",
            "nonfinite-weights",
            "NaN or infinite values in the model's weights",
            ev,
            "The model itself is broken at these coordinates; resetting the optimizer state does not repair it. "
            "Go back to an earlier checkpoint.",
        ),
    )
    return out


def check_empty_or_missing_state(ctx: Context) -> list[Finding]:
    """An optimizer with no state at all (warning); parameters listed in a group but without state:
    warning, or info when the checkpoint marks them frozen."""
    out = []
    for result in ctx.analysis.optimizers:
        o = result.optimizer
        listed = [p for p in o.params if _keeps_state(o, p)]
        if listed and not any(p.has_state for p in o.params):
            out.append(
                Finding(
                    "warning",
                    "empty-state",
                    "the optimizer has no state at all",
                    [Evidence(f"{len(listed)} parameters", sum(p.numel or 0 for p in listed), None)],
                    "It never stepped, or its state was not saved (torch.distributed.checkpoint saved empty state "
                    "when the optimizer was not initialised first, pytorch/pytorch#140898). Resuming from it is "
                    "the same as a fresh optimizer.",
                    o.location,
                )
            )
            continue
        missing = [p for p in listed if not p.has_state]
        if missing:
            out.append(
                Finding(
                    "warning",
                    "params-without-state",
                    "parameters in the optimizer's groups have no state (frozen, unused, or never stepped)",
                    [_evidence(p, p.numel) for p in missing],
                    "A parameter that is frozen (requires_grad=False) or gets no gradient (not used in the forward "
                    "pass) never gets state. If it should train, check requires_grad and the forward pass; if it is "
                    "frozen on purpose, leave it out of the optimizer (or pass --ignore params-without-state).",
                    o.location,
                )
            )
        frozen = [p for p in o.params if p.frozen]
        if frozen:
            out.append(
                Finding(
                    "info",
                    "frozen-params",
                    "frozen parameters (saved by DeepSpeed outside the optimizer)",
                    [_evidence(p, p.numel) for p in frozen],
                    "Nothing to do if they are meant to stay frozen.",
                    o.location,
                )
            )
    return out


def check_second_moment_zero(ctx: Context) -> list[Finding]:
    """Coordinates whose second moment is exactly 0 after at least one step: a warning where a parameter
    has at least V_ZERO_WARN of them, info otherwise."""
    warn: list[tuple[OptimizerState, Evidence]] = []
    info: list[tuple[OptimizerState, Evidence]] = []
    for o, p, s in ctx.parameters():
        moment = s.sketches.get(_second_moment(o) or "")
        if moment is None or not moment.zeros or not p.step:
            continue
        item = (o, _evidence(p, moment.zeros))
        (warn if moment.zeros >= V_ZERO_WARN * moment.values_seen else info).append(item)
    advice = (
        "These coordinates never had a non-zero gradient (unused embedding rows such as new or rare tokens, "
        "dead units, masked inputs). Their first gradient moves them by about lr*(1-beta1)/sqrt(1-beta2) "
        "(3.16*lr with Adam's defaults): a jump when fine-tuning starts to use them. Warm the lr up, or "
        "check why they get no gradient."
    )
    out = _by_optimizer(
        warn,
        lambda loc, ev: Finding(
            "warning",
            "second-moment-zero",
            f"second moment exactly 0 on at least {V_ZERO_WARN:.0%} of a parameter's coordinates",
            ev,
            advice,
        ),
    )
    out += _by_optimizer(
        info,
        lambda loc, ev: Finding(
            "info", "second-moment-zero", "a few coordinates with second moment exactly 0", ev, advice
        ),
    )
    return out


def check_eps_dominated(ctx: Context) -> list[Finding]:
    """eps at least as large as sqrt(v_hat) on at least EPS_WARN of a parameter's coordinates with v > 0."""
    items = []
    for o, p, s in ctx.parameters():
        if "eps_coords" not in s.sums or not p.step:
            continue
        moment = s.sketches.get(_second_moment(o) or "")
        zeros = moment.zeros if moment is not None else 0
        dominated = max(int(s.sums["eps_dominated"]) - zeros, 0)
        active = int(s.sums["eps_coords"]) - zeros
        if active > 0 and dominated >= EPS_WARN * active:
            items.append((o, Evidence(p.name, dominated, active, f"of the {active:,} coordinates with v > 0")))
    return _by_optimizer(
        items,
        lambda loc, ev: Finding(
            "warning",
            "eps-dominated",
            f"eps dominates the denominator on at least {EPS_WARN:.0%} of a parameter's coordinates",
            ev,
            "Where sqrt(v_hat) <= eps the step size is set by eps, not by the gradient history, so these parameters "
            "take smaller, less adaptive steps than the others. Gradients this small are typical of large models and "
            "low-precision gradients; lower eps (Wortsman et al. 2023; Everett et al. 2024 scale it with the model) "
            "or check whether gradients underflow.",
        ),
    )


def check_learning_rate(ctx: Context) -> list[Finding]:
    """lr not finite (error); lr 0 (warning); a finished schedule (warning); an lr decayed to
    LR_DECAYED of its initial value or less (info)."""
    out = []
    for result in ctx.analysis.optimizers:
        o = result.optimizer
        for g, group in enumerate(o.groups):
            if o.is_frozen_group(g) or "lr" not in group or not isinstance(group["lr"], (int, float)):
                continue
            members = [p for p in o.params if p.group == g and p.has_state]
            subject = [
                Evidence(
                    f"group {g}",
                    sum(p.numel or 0 for p in members),
                    None,
                    f"lr={group['lr']:g}"
                    + (
                        f", initial_lr={group['initial_lr']:g}"
                        if isinstance(group.get("initial_lr"), (int, float))
                        else ""
                    ),
                )
            ]
            lr, initial = float(group["lr"]), group.get("initial_lr")
            if not math.isfinite(lr):
                out.append(
                    Finding(
                        "error",
                        "lr-nonfinite",
                        "a param group's learning rate is not finite",
                        subject,
                        "Every step of this group writes NaN; fix the schedule before resuming.",
                        o.location,
                    )
                )
            elif lr == 0 and members:
                out.append(
                    Finding(
                        "warning",
                        "lr-zero",
                        "a param group's learning rate is 0",
                        subject,
                        "Resuming as saved moves none of these parameters: the schedule has ended (or "
                        "not begun). Set a new schedule to continue training (re-warm the lr).",
                        o.location,
                    )
                )
            elif isinstance(initial, (int, float)) and initial > 0 and 0 < lr <= LR_DECAYED * initial and members:
                out.append(
                    Finding(
                        "info",
                        "lr-decayed",
                        f"the schedule has decayed a group's lr to {lr / initial:.2g} of its initial value",
                        subject,
                        "The schedule is near its end; continuing with it barely moves the weights.",
                        o.location,
                    )
                )
    out += _finished_schedules(ctx)
    return out


def check_learned_step_size(ctx: Context) -> list[Finding]:
    """The learned step size (Prodigy's and D-Adaptation's d) of every param group (info)."""
    out = []
    for result in ctx.analysis.optimizers:
        o = result.optimizer
        family = get_family(o.kind) if o.kind else None
        key = family.lr_scale if family is not None else None
        if family is None or key is None:
            continue
        evidence = []
        for g, group in enumerate(o.groups):
            value = group.get(key)
            if o.is_frozen_group(g) or not isinstance(value, (int, float)):
                continue
            members = [p for p in o.params if p.group == g and p.has_state]
            # the step size as the family's own column gives it (DAdaptSGD divides d*lr by g0_norm)
            step = family.columns(members[0], group).get(f"{key}_lr") if members else None
            lr = group.get("lr")
            if not isinstance(step, (int, float)) and isinstance(lr, (int, float)):
                step = value * lr
            detail = f"{key}={value:.4g}" + (
                f", step size {key}_lr={step:.4g}" if isinstance(step, (int, float)) else ""
            )
            if isinstance(group.get(f"{key}0"), (int, float)) and group[f"{key}0"]:
                detail += f", {value / group[f'{key}0']:.3g} x its start {key}0={group[f'{key}0']:.3g}"
            evidence.append(Evidence(f"group {g}", sum(p.numel or 0 for p in members), None, detail))
        if evidence:
            out.append(
                Finding(
                    "info",
                    "learned-step-size",
                    f"the optimizer learned a step size {key} that multiplies lr",
                    evidence,
                    f"It lives in the param groups and sets the step size more than lr does; a fresh optimizer "
                    f"starts again from {key}0 and re-learns it over its first steps. Keep the saved groups to "
                    f"continue with it.",
                    o.location,
                )
            )
    return out


def _finished_schedules(ctx: Context) -> list[Finding]:
    evidence = []
    meta = ctx.checkpoint.metadata
    steps, total = meta.get("global_step"), meta.get("max_steps")
    if isinstance(steps, (int, float)) and isinstance(total, (int, float)) and total > 0 and steps >= total:
        evidence.append(Evidence("trainer_state.json", None, None, f"global_step {steps:g} of max_steps {total:g}"))
    for s in ctx.checkpoint.schedulers:
        last = s.get("last_epoch")
        if not isinstance(last, (int, float)):
            continue
        where = str(s.get("_location", "scheduler"))
        if isinstance(s.get("total_steps"), (int, float)) and last >= s["total_steps"]:  # OneCycleLR
            evidence.append(
                Evidence(
                    where,
                    None,
                    None,
                    f"OneCycleLR at step {last:g} of total_steps {s['total_steps']:g} (a further step raises an error)",
                )
            )
        elif isinstance(s.get("T_max"), (int, float)) and s["T_max"] > 0 and last >= s["T_max"]:
            evidence.append(
                Evidence(
                    where,
                    None,
                    None,
                    f"cosine schedule at step {last:g} of T_max {s['T_max']:g} (further steps raise the lr again)",
                )
            )
    if not evidence:
        return []
    return [
        Finding(
            "warning",
            "schedule-finished",
            "the learning-rate schedule has run to its end",
            evidence,
            "Resuming continues past the planned end. To train further, start a new schedule (re-warming "
            "and re-decaying the lr recovers well: Gupta et al. 2023, Ibrahim et al. 2024); for "
            "fine-tuning, give the new run its own schedule.",
        )
    ]


def check_step_counts(ctx: Context) -> list[Finding]:
    """Parameters of one param group at different step counts (warning), and NAdam's mu_product
    disagreeing with its step (warning)."""
    out = []
    for result in ctx.analysis.optimizers:
        o = result.optimizer
        evidence = []
        for g in range(len(o.groups)):
            steps = [(p, p.step) for p in o.params if p.group == g and p.step is not None]
            counts = Counter(step for _, step in steps)
            if len(counts) > 1:
                usual = counts.most_common(1)[0][0]
                evidence += [
                    _evidence(p, p.numel, f"step {step:g}, most of group {g} at {usual:g}")
                    for p, step in steps
                    if step != usual
                ]
        if evidence:
            out.append(
                Finding(
                    "warning",
                    "step-mismatch",
                    "parameters of one param group are at different step counts",
                    evidence,
                    "They were frozen for a while, added later, or restored from different checkpoints; their bias "
                    "corrections differ, so their next steps are not alike. If that is not intended, restart their "
                    "counters (ostate reset PATH --strategy reset-step --params REGEX -o OUT).",
                    o.location,
                )
            )
        inconsistent = [s for s in result.summaries if s.row.get("mu_product_consistent") is False]
        if inconsistent:
            params = {p.name: p for p in o.params}
            out.append(
                Finding(
                    "warning",
                    "nadam-mu-product",
                    "NAdam's mu_product does not match its step count",
                    [
                        _evidence(params[s.row["name"]], None, f"mu_product {s.row['mu_product']:.4g}")
                        for s in inconsistent
                    ],
                    "step was changed without mu_product (or the reverse): NAdam's momentum schedule is inconsistent. "
                    "Reset both together (ostate reset --strategy reset-step does).",
                    o.location,
                )
            )
    return out


def check_weight_decay_targets(ctx: Context) -> list[Finding]:
    """Weight decay on norm layers and biases (warning) and on embeddings (info)."""
    norms, embeddings, by_shape = [], [], []
    for o, p, _s in ctx.parameters():
        decay = o.groups[p.group].get("weight_decay")
        if not isinstance(decay, (int, float)) or decay <= 0:
            continue
        detail = f"group {p.group}, weight_decay={decay:g}"
        if p.name_source == "none":
            if p.shape is not None and len(p.shape) <= 1:
                by_shape.append((o, _evidence(p, p.numel, detail)))
            continue
        kind = param_kind(p.name, p.shape, o.param_kinds.get(p.name))
        if kind in ("norm", "bias"):
            norms.append((o, _evidence(p, p.numel, f"{kind}, {detail}")))
        elif kind == "embedding":
            embeddings.append((o, _evidence(p, p.numel, detail)))
    out = _by_optimizer(
        norms,
        lambda loc, ev: Finding(
            "warning",
            "weight-decay-on-norms-or-biases",
            "weight decay is applied to norm layers or biases",
            ev,
            "Decay pulls normalisation gains and biases towards 0, which they are not meant to be; the usual practice "
            "(Hugging Face's Trainer, nanoGPT, timm) puts them in a param group with weight_decay=0.",
        ),
    )
    out += _by_optimizer(
        embeddings,
        lambda loc, ev: Finding(
            "info",
            "weight-decay-on-embeddings",
            "weight decay is applied to embeddings",
            ev,
            "Practice differs (the Hugging Face Trainer decays embeddings, nanoGPT does too, others do not); decay "
            "shrinks the rows of rare tokens, which get few gradients to push back.",
        ),
    )
    out += _by_optimizer(
        by_shape,
        lambda loc, ev: Finding(
            "info",
            "weight-decay-on-vectors",
            "weight decay on unnamed 1-D parameters (biases or norm gains, by shape)",
            ev,
            "Give ostate the model (--model, or the model's state dict in the checkpoint) to name them.",
        ),
    )
    return out


def check_amsgrad(ctx: Context) -> list[Finding]:
    """AMSGrad's running maximum of v far above the current v."""
    items = []
    for o, p, s in ctx.parameters():
        ratio = s.sketches.get("amsgrad_ratio")
        if ratio is None or not ratio.values_seen:
            continue
        far = (
            round((1.0 - ratio.fraction_at_most(AMSGRAD_RATIO)) * ratio.count) + ratio.posinf
            if ratio.count
            else ratio.posinf
        )
        if far >= AMSGRAD_FRACTION * ratio.values_seen:
            items.append((o, _evidence(p, far, f"median sqrt(v_max/v) = {ratio.quantile(0.5):.3g}")))
    return _by_optimizer(
        items,
        lambda loc, ev: Finding(
            "warning",
            "amsgrad-stale-max",
            f"AMSGrad's max of v is at least {AMSGRAD_RATIO:g}x the current v (in "
            f"square root) on at least {AMSGRAD_FRACTION:.0%} of a parameter's coordinates",
            ev,
            "AMSGrad divides by the running maximum of v: where it is far above the current v (often left by a "
            "gradient spike long ago) the steps are that many times smaller than Adam's. When fine-tuning, consider "
            "resetting it (ostate reset --strategy reset-v resets v and its maximum) or turning AMSGrad off.",
        ),
    )


def check_moment_precision(ctx: Context) -> list[Finding]:
    """Moments kept in bfloat16 or float16 (warning)."""
    items = []
    for o, p, s in ctx.parameters():
        dtypes = [d for d in (s.row.get("dtype") or "").split(",") if d in LOW_PRECISION]
        if dtypes and p.has_state:
            items.append((o, _evidence(p, p.numel, "/".join(dtypes))))
    return _by_optimizer(
        items,
        lambda loc, ev: Finding(
            "warning",
            "low-precision-moments",
            "optimizer moments are stored in bfloat16 or float16",
            ev,
            "An EMA update of relative size 1-beta2 (1e-3 for 0.999) is below bfloat16's resolution (2^-8), so v "
            "stops following the gradients; float16 underflows for the squares of small gradients. Keep the "
            "optimizer state in float32 (fp32 master weights, or a mixed-precision optimizer), or use larger "
            "1-beta2 / stochastic rounding if low-precision state is intended.",
        ),
    )


def check_state_dtype(ctx: Context) -> list[Finding]:
    """State dtype unlike the weights' dtype (warning): load_state_dict casts the state to the weights' dtype."""
    if not ctx.model:
        return []
    items = []
    for o, p, _s in ctx.parameters():
        weight = ctx.model.get(p.name)
        if weight is None or not p.has_state or not weight.dtype.is_floating_point:
            continue
        state = {
            str(t.dtype).removeprefix("torch.")
            for t in p.tensors().values()
            if t.dtype.is_floating_point and p.shape is not None and t.shape == tuple(p.shape)
        }
        wanted = str(weight.dtype).removeprefix("torch.")
        if state and state != {wanted}:
            items.append((o, _evidence(p, p.numel, f"state {'/'.join(sorted(state))}, weights {wanted}")))
    return _by_optimizer(
        items,
        lambda loc, ev: Finding(
            "warning",
            "state-dtype-differs",
            "the optimizer state's dtype differs from the weights'",
            ev,
            "torch's Optimizer.load_state_dict casts floating-point state to each parameter's dtype: float32 moments "
            "loaded into a bfloat16 model silently become bfloat16 (pytorch/pytorch#43706), bfloat16 moments loaded "
            "into a float32 model are promoted. Load into a model of the dtype the state was saved with, or keep a "
            "float32 copy of the state.",
        ),
    )


def check_model_agreement(ctx: Context) -> list[Finding]:
    """The optimizer and the model disagree: shapes (error), state for parameters the model does not have
    (error), more optimizer parameters than the model has (error), unmatched parameters (warning), model
    parameters the optimizer does not have (info)."""
    if not ctx.model:
        return []
    model = ctx.model
    where = ctx.model_location or "the model"
    out = []
    for result in ctx.analysis.optimizers:
        o = result.optimizer
        trained = [p for p in o.params if not p.frozen]
        named = [p for p in trained if p.name_source != "none"]
        shapes = [
            _evidence(p, p.numel, f"optimizer {_shape(p.shape)}, model {_shape(model[p.name].shape)}")
            for p in named
            if p.name in model and p.shape is not None and tuple(model[p.name].shape) != tuple(p.shape)
        ]
        if shapes:
            out.append(
                Finding(
                    "error",
                    "shape-mismatch",
                    f"parameters whose optimizer state and {where} differ in shape",
                    shapes,
                    "The state cannot be loaded into this model (load_state_dict pairs parameters "
                    "by position and fails, or pairs the wrong ones). Start the changed parameters fresh: "
                    "ostate reset PATH --strategy fresh --params REGEX -o OUT.",
                    o.location,
                )
            )
        gone = [_evidence(p, p.numel) for p in named if p.name not in model and p.has_state]
        if gone:
            out.append(
                Finding(
                    "error",
                    "state-without-param",
                    f"optimizer state for parameters {where} does not have",
                    gone,
                    "The model no longer has these parameters (renamed or removed). torch pairs "
                    "saved state with parameters by position, so loading this state into the current "
                    "model would give every later parameter the wrong state. Rebuild the optimizer state "
                    "by name (the fine-tuning harness does: docs/harness.md) or start fresh.",
                    o.location,
                )
            )
        floating = [n for n, t in model.items() if t.dtype.is_floating_point]
        if not named and len(trained) > len(floating):
            out.append(
                Finding(
                    "error",
                    "count-mismatch",
                    f"the optimizer has more parameters than {where} has tensors",
                    [
                        Evidence(
                            "optimizer",
                            None,
                            None,
                            f"{len(trained)} parameters; model: {len(floating)} floating-point tensors",
                        )
                    ],
                    "This state belongs to another model.",
                    o.location,
                )
            )
        unnamed = [p for p in trained if p.name_source == "none"]
        if unnamed and named:
            out.append(
                Finding(
                    "warning",
                    "unmatched-params",
                    f"parameters that could not be matched to {where}",
                    [_evidence(p, p.numel) for p in unnamed],
                    "Their shapes fit no entry of the model in order; check that the model is the one "
                    "this optimizer trained (`ostate inspect` shows how names were looked for).",
                    o.location,
                )
            )
        elif unnamed and len(trained) <= len(floating):
            out.append(
                Finding(
                    "info",
                    "unnamed-params",
                    f"the optimizer's parameters could not be named from {where}",
                    [Evidence(f"{len(unnamed)} parameters", sum(p.numel or 0 for p in unnamed), None)],
                    "Checks by name (shapes, dtypes, weight decay) were skipped for them.",
                    o.location,
                )
            )
        in_optimizer = {p.name for p in o.params}
        if named and len(ctx.analysis.optimizers) == 1:
            extra = [Evidence(n, _numel(model[n].shape), None) for n in floating if n not in in_optimizer]
            if extra:
                out.append(
                    Finding(
                        "info",
                        "model-params-without-optimizer",
                        f"entries of {where} that the optimizer does not have",
                        extra,
                        "Frozen parameters left out of the optimizer, or floating-point buffers "
                        "(BatchNorm statistics): nothing to do if that is intended.",
                        o.location,
                    )
                )
    return out


def check_reader_warnings(ctx: Context) -> list[Finding]:
    """What the reader noticed while loading (naming ambiguities, orphaned state entries): info."""
    out = []
    if ctx.checkpoint.warnings:
        out.append(
            Finding(
                "info",
                "reader-warning",
                "the checkpoint's reader noticed something",
                [Evidence("checkpoint", None, None, w) for w in ctx.checkpoint.warnings],
                "See the details; `ostate inspect` shows them in context.",
            )
        )
    for result in ctx.analysis.optimizers:
        o = result.optimizer
        if o.warnings:
            out.append(
                Finding(
                    "info",
                    "reader-warning",
                    "the optimizer's reader noticed something",
                    [Evidence(o.location, None, None, w) for w in o.warnings],
                    "See the details; `ostate inspect` shows them in context.",
                    o.location,
                )
            )
    return out


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape is not None and len(shape) else "scalar"


def _numel(shape) -> int:
    return math.prod(shape)


# Every check, in the order their findings are listed within one severity.
CHECKS: tuple[Callable[[Context], list[Finding]], ...] = (
    check_nonfinite,
    check_model_agreement,
    check_learning_rate,
    check_learned_step_size,
    check_empty_or_missing_state,
    check_second_moment_zero,
    check_eps_dominated,
    check_step_counts,
    check_weight_decay_targets,
    check_amsgrad,
    check_moment_precision,
    check_state_dtype,
    check_reader_warnings,
)
