"""Table columns from sketches and additive sums: the same formulas for a parameter and for any merged row.

Every derived column is a ratio of sums that merge by adding, so a group, layer,
kind or model row is computed from its members' merged sums, never by averaging
the members' ratios. The formulas are in docs/columns.md.
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

from ostate.analysis.compress import relative_change
from ostate.analysis.sketch import Sketch, quantiles_of
from ostate.errors import OstateError

QUANTILES = {"p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99}
STATS = ("mean", "rms", "min", "max", *QUANTILES)

# Statistic families beyond the core (every quantity's sketch, the trouble fractions and the
# weights' ratio): each costs about as much as the core again and is computed only when asked for.
OPTIONAL_STATISTICS = {
    "compressibility": "Adam-mini's shared second moment: vmean_tensor/row/head_relchange",
    "q8": "8-bit blockwise quantization error of each moment: {key}_q8_relerr",
}
CORE = "core"


def statistic_of(column: str) -> str:
    """The statistic family a table column belongs to: ``core``, ``compressibility`` or ``q8``.

    Example:
        >>> statistic_of("eff_lr_p50"), statistic_of("vmean_row_relchange"), statistic_of("exp_avg_q8_relerr")
        ('core', 'compressibility', 'q8')
    """
    if column.startswith("vmean_") and column.endswith("_relchange"):
        return "compressibility"
    if column.endswith("_q8_relerr"):
        return "q8"
    return CORE


def optional_statistics(requested: Collection[str] | None) -> frozenset[str]:
    """The optional statistic families named in ``requested`` (``None``: every one).

    Example:
        >>> sorted(optional_statistics(None)), sorted(optional_statistics(["q8"]))
        (['compressibility', 'q8'], ['q8'])
    """
    if requested is None:
        return frozenset(OPTIONAL_STATISTICS)
    chosen = frozenset(requested)
    unknown = sorted(chosen - set(OPTIONAL_STATISTICS))
    if unknown:
        raise OstateError(
            f"unknown statistics {', '.join(unknown)}", hint=f"choose from: {', '.join(OPTIONAL_STATISTICS)}"
        )
    return chosen


def sketch_columns(quantity: str, sketch: Sketch) -> dict[str, float]:
    """``{quantity}_{stat}`` for every statistic in :data:`STATS` (and ``_nonfinite`` when any).

    A sketch without a histogram (the weights) gives mean, rms, min and max only.
    """
    quantiles = sketch.quantiles(QUANTILES.values()) if sketch.with_histogram else None
    return _columns(quantity, sketch, quantiles)


def sketch_columns_of(quantity: str, sketches: list[Sketch]) -> list[dict[str, float]]:
    """``[sketch_columns(quantity, s) for s in sketches]``, with every quantile found in one pass.

    Example:
        >>> import torch
        >>> a, b = Sketch(), Sketch()
        >>> a.add(torch.tensor([1.0, 2.0])); b.add(torch.tensor([3.0]))
        >>> sketch_columns_of("x", [a, b]) == [sketch_columns("x", a), sketch_columns("x", b)]
        True
    """
    quantiles = quantiles_of(sketches, QUANTILES.values())
    return [_columns(quantity, s, q if s.with_histogram else None) for s, q in zip(sketches, quantiles)]


def _columns(quantity: str, sketch: Sketch, quantiles: list[float] | None) -> dict[str, float]:
    out = {
        f"{quantity}_mean": sketch.mean,
        f"{quantity}_rms": sketch.rms,
        f"{quantity}_min": sketch.min if sketch.count else math.nan,
        f"{quantity}_max": sketch.max if sketch.count else math.nan,
    }
    if quantiles is not None:
        out.update({f"{quantity}_{name}": value for name, value in zip(QUANTILES, quantiles)})
    if sketch.nonfinite:
        out[f"{quantity}_nonfinite"] = sketch.nonfinite
    return out


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def derived_columns(sketches: Mapping[str, Sketch], sums: Mapping[str, float], second_moment: str | None) -> dict:
    """Trouble fractions, the update-to-weight ratio, compressibility and 8-bit error columns.

    Example:
        >>> derived_columns({}, {"coords": 10, "nonfinite_coords": 1, "ratio_update_sq": 1e-6,
        ...                      "ratio_weight_sq": 1.0}, None)
        {'nonfinite_frac': 0.1, 'update_to_weight_rms': 0.001}
    """
    out: dict[str, float] = {}
    if second_moment is not None and second_moment in sketches:
        moment = sketches[second_moment]
        out["second_moment_zero_frac"] = _ratio(moment.zeros, moment.values_seen)
    if "eps_coords" in sums:
        out["eps_dominated_frac"] = _ratio(sums["eps_dominated"], sums["eps_coords"])
    if sums.get("coords"):
        out["nonfinite_frac"] = _ratio(sums["nonfinite_coords"], sums["coords"])
    if "ratio_weight_sq" in sums:
        out["update_to_weight_rms"] = (
            math.sqrt(sums["ratio_update_sq"] / sums["ratio_weight_sq"]) if sums["ratio_weight_sq"] else math.nan
        )
    if "vmean_update_sq" in sums:
        out["vmean_tensor_relchange"] = relative_change(sums["vmean_tensor_err_sq"], sums["vmean_update_sq"])
        out["vmean_row_relchange"] = relative_change(sums["vmean_row_err_sq"], sums["vmean_update_sq"])
        out["vmean_head_relchange"] = (
            relative_change(sums["vmean_head_err_sq"], sums["vmean_head_update_sq"])
            if "vmean_head_update_sq" in sums
            else math.nan
        )
    for key in sorted(k[: -len("_q8_norm_sq")] for k in sums if k.endswith("_q8_norm_sq")):
        norm, error = sums[f"{key}_q8_norm_sq"], sums[f"{key}_q8_err_sq"]
        out[f"{key}_q8_relerr"] = math.sqrt(error / norm) if norm else (0.0 if error == 0 else math.nan)
    return out


def merge_sums(many: list[Mapping[str, float]]) -> dict[str, float]:
    """Add sums key by key (a key missing from a member counts as absent, not zero)."""
    out: dict[str, float] = {}
    for sums in many:
        for key, value in sums.items():
            out[key] = out.get(key, 0.0) + value
    return out
