"""Checks that fire while training: what ``ostate doctor`` looks for, and what only a sequence of steps shows.

Each check reads the monitor's rows (one view, merged over ranks) at this step and at
the previous monitored step, and returns one line per finding (the monitor raises each
as a :class:`MonitorWarning` when ``checks=True``). The codes are ``ostate doctor``'s
where the check is the same (docs/doctor.md), and new ones for what happens over time:

- ``nonfinite-state``: NaN or ±inf in a row's state (``nonfinite_frac > 0``);
- ``eps-dominated``: eps dominates at least :data:`~ostate.doctor.checks.EPS_WARN` of a
  row's coordinates with :math:`v > 0` (as ``ostate doctor`` counts), newly (it was below at the previous monitored step);
- ``eps-dominated-jump``: the fraction rose by at least :data:`EPS_JUMP` since the previous
  monitored step;
- ``second-moment-collapse``: the median second moment fell by a factor of at least
  :data:`V_COLLAPSE` since the previous monitored step, or the step count went back: the
  state was reset or reloaded (a reset second moment re-grows from
  :math:`(1-\\beta_2)g^2`, so the first steps after it are up to :math:`1/\\sqrt{1-\\beta_2}`
  times larger);
- ``update-jump``: the update-to-weight RMS ratio rose by a factor of at least
  :data:`UPDATE_JUMP` since the previous monitored step (what a lost second moment, or an
  lr spike, does to the weights next).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

from ostate.doctor.checks import EPS_WARN
from ostate.optimizers import get_family

EPS_JUMP = 0.2
V_COLLAPSE = 10.0
UPDATE_JUMP = 10.0


class MonitorWarning(UserWarning):
    """A finding of the monitor's checks while training (``Monitor(..., checks=True)``)."""


Row = Mapping[str, Any]


def check_rows(
    rows: Mapping[str, Row], previous: Mapping[str, Row] | None, kind: str, step: int, where: str = ""
) -> list[str]:
    """One line per finding for the rows of this monitored step (``previous``: the last monitored step's).

    Example:
        >>> before = {"h.0": {"exp_avg_sq_p50": 1e-6, "eps_dominated_frac": 0.0, "step_max": 100}}
        >>> after = {"h.0": {"exp_avg_sq_p50": 1e-9, "eps_dominated_frac": 0.9, "step_max": 1}}
        >>> for line in check_rows(after, before, "adamw", 200): print(line)
        step 200: eps-dominated: eps dominates 90% of h.0's coordinates (0% at the previous check)
        step 200: eps-dominated-jump: eps-dominated fraction of h.0 rose from 0% to 90%
        step 200: second-moment-collapse: h.0's step count went back from 100 to 1 (a reset or reload?)
    """
    second = get_family(kind).second_moment
    prefix = f"step {step}: " + (f"{where}: " if where else "")
    out = []
    for key, row in rows.items():
        before = (previous or {}).get(key)
        bad = _number(row.get("nonfinite_frac"))
        if bad and bad > 0:
            out.append(f"{prefix}nonfinite-state: {bad:.2%} of {key}'s coordinates hold NaN or inf in the state")
        eps, eps_before = _active_eps(row), _active_eps(before or {})
        if eps is not None and eps >= EPS_WARN and (eps_before is None or eps_before < EPS_WARN):
            was = f" ({eps_before:.0%} at the previous check)" if eps_before is not None else ""
            out.append(f"{prefix}eps-dominated: eps dominates {eps:.0%} of {key}'s coordinates{was}")
        if eps is not None and eps_before is not None and eps - eps_before >= EPS_JUMP:
            out.append(
                f"{prefix}eps-dominated-jump: eps-dominated fraction of {key} rose from {eps_before:.0%} to {eps:.0%}"
            )
        if before is None:
            continue
        ratio, ratio_before = _number(row.get("update_to_weight_rms")), _number(before.get("update_to_weight_rms"))
        if ratio is not None and ratio_before and ratio >= UPDATE_JUMP * ratio_before:
            out.append(
                f"{prefix}update-jump: {key}'s update/weight RMS rose from {ratio_before:.3g} to {ratio:.3g} "
                f"({ratio / ratio_before:.0f}x)"
            )
        steps, steps_before = _number(row.get("step_max")), _number(before.get("step_max"))
        if steps is not None and steps_before is not None and steps < steps_before:
            out.append(
                f"{prefix}second-moment-collapse: {key}'s step count went back from {steps_before:g} to {steps:g} "
                "(a reset or reload?)"
            )
        elif second is not None:
            v, v_before = _number(row.get(f"{second}_p50")), _number(before.get(f"{second}_p50"))
            if v is not None and v_before is not None and v_before > 0 and v * V_COLLAPSE <= v_before:
                out.append(
                    f"{prefix}second-moment-collapse: the median {second} of {key} fell from {v_before:.3g} to {v:.3g} "
                    "(a reset? its next steps are larger than before)"
                )
    return out


def warn(lines: list[str]) -> None:
    """Each line as a :class:`MonitorWarning`."""
    for line in lines:
        warnings.warn(line, MonitorWarning, stacklevel=5)


def _active_eps(row: Row) -> float | None:
    """The eps-dominated fraction of the coordinates with v > 0 (as ``ostate doctor`` counts it: a coordinate
    whose second moment is exactly 0 never had a gradient, and eps is all its denominator has)."""
    eps, zero = _number(row.get("eps_dominated_frac")), _number(row.get("second_moment_zero_frac")) or 0.0
    if eps is None or zero >= 1.0:
        return None
    return max(eps - zero, 0.0) / (1.0 - zero)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
