"""Per-parameter statistics: stream a parameter's state through its family's math into sketches.

For each parameter the state tensors that have the parameter's shape are read in
flat chunks; the family turns each chunk into per-coordinate quantities (effective
learning rate, |m|, v, ...) and every quantity is summarised in a :class:`Sketch`.
Only the sketches are kept, so memory stays at a few chunks whatever the tensor's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ostate.analysis.sketch import CHUNK, Sketch
from ostate.optimizers import Family
from ostate.optimizers.family import explain_missing_keys
from ostate.state import OptimizerState, ParamState

QUANTILES = {"p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99}
STATS = ("mean", "rms", "min", "max", *QUANTILES)


@dataclass
class ParamSummary:
    """One parameter's table row and the sketches behind its statistics."""

    row: dict[str, Any]
    sketches: dict[str, Sketch] = field(default_factory=dict)


ROOT_LAYER = "(root)"


def layer_of(name: str, name_source: str = "param_names") -> str:
    """The module a parameter belongs to: its name without the last component.

    A parameter of the top-level module belongs to ``(root)``; an unnamed parameter
    (``param.<index>``) is a layer of its own.
    """
    if name_source == "none":
        return name
    return name.rsplit(".", 1)[0] if "." in name else ROOT_LAYER


def param_kind(name: str, shape: tuple[int, ...] | None) -> str:
    """``embedding``, ``norm``, ``bias``, ``weight`` or ``other``, from the name and the shape.

    A name-based rule (documented in docs/columns.md): ``embed``/``wte``/``wpe`` in the
    name is an embedding; ``norm``, ``ln_`` or a last module named ``ln``/``ln<digit>``
    is a normalisation layer; a name ending in ``bias`` is a bias; any other tensor of
    two or more dimensions is a weight; the rest (1-D scales, scalars, unnamed
    parameters of unknown shape) is ``other``.
    """
    lowered = name.lower()
    parts = lowered.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    if any(key in lowered for key in ("embed", "wte", "wpe")):
        return "embedding"
    if "norm" in lowered or "ln_" in lowered or module == "ln" or (module.startswith("ln") and module[2:].isdigit()):
        return "norm"
    if parts[-1] == "bias" or lowered.endswith("_bias"):
        return "bias"
    if shape is not None and len(shape) >= 2:
        return "weight"
    return "other"


def sketch_columns(quantity: str, sketch: Sketch) -> dict[str, float]:
    """``{quantity}_{stat}`` for every statistic in :data:`STATS`."""
    quantiles = sketch.quantiles(QUANTILES.values())
    out = {f"{quantity}_mean": sketch.mean, f"{quantity}_rms": sketch.rms,
           f"{quantity}_min": sketch.min if sketch.count else float("nan"),
           f"{quantity}_max": sketch.max if sketch.count else float("nan")}
    out.update({f"{quantity}_{name}": value for name, value in zip(QUANTILES, quantiles)})
    if sketch.nonfinite:
        out[f"{quantity}_nonfinite"] = sketch.nonfinite
    return out


def base_row(optimizer: OptimizerState, param: ParamState) -> dict[str, Any]:
    tensors = param.tensors()
    aligned = [t for t in tensors.values() if param.shape is not None and t.shape == tuple(param.shape)]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in (aligned or tensors.values())})
    return {
        "optimizer": optimizer.location,
        "name": param.name,
        "name_source": param.name_source,
        "index": param.index,
        "group": param.group,
        "layer": layer_of(param.name, param.name_source),
        "param_kind": param_kind(param.name, param.shape) if param.name_source != "none" else (
            "weight" if param.shape is not None and len(param.shape) >= 2 else "other"),
        "shape": tuple(param.shape) if param.shape is not None else None,
        "numel": param.numel,
        "step": param.step,
        "has_state": param.has_state,
        "dtype": ",".join(dtypes) if dtypes else None,
        "state_bytes": param.state_bytes,
    }


def summarize_param(optimizer: OptimizerState, param: ParamState, family: Family) -> ParamSummary:
    """The row and sketches of one parameter."""
    group = optimizer.groups[param.group]
    row = base_row(optimizer, param)
    with explain_missing_keys(param, family):
        if param.has_state:
            row.update(family.columns(param, group))
        sketches = quantity_sketches(param, group, family)
    for quantity, sketch in sketches.items():
        row.update(sketch_columns(quantity, sketch))
    return ParamSummary(row, sketches)


def quantity_sketches(param: ParamState, group: dict, family: Family) -> dict[str, Sketch]:
    """Sketches of the family's per-coordinate quantities over the whole parameter."""
    if not param.has_state or param.shape is None:
        return {}
    shape = tuple(param.shape)
    aligned = {k: ref for k, ref in param.tensors().items() if ref.shape == shape}
    # An unchunked family reads state that is not shaped like the parameter (factored
    # second moments) from ``param`` itself, so it is asked even when nothing is aligned.
    if not aligned and family.chunked:
        return {}
    sketches: dict[str, Sketch] = {}
    flat = {k: ref.read().reshape(-1) for k, ref in aligned.items()}
    numel = param.numel or 0
    step = CHUNK if family.chunked else max(numel, 1)
    try:
        for start in range(0, numel, step):
            chunk = {k: t[start : start + step] for k, t in flat.items()}
            length = min(step, numel - start)
            for quantity, values in family.quantities(chunk, group, param).items():
                sketch = sketches.setdefault(quantity, Sketch())
                if isinstance(values, (int, float)):
                    sketch.add_constant(float(values), length)
                else:
                    sketch.add(values)
    finally:
        for ref in aligned.values():
            ref.release()
    return sketches
