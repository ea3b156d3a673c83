"""Per-parameter statistics: stream a parameter's state through its family's math into sketches.

For each parameter the state tensors that have the parameter's shape (and the
parameter's weights, when the checkpoint has them) are read in flat chunks at the
same offsets; the family turns each chunk into per-coordinate quantities (effective
learning rate, |m|, v, ...) and every quantity is summarised in a :class:`Sketch`.
Whole-tensor figures (trouble fractions, Adam-mini compressibility, 8-bit
quantization error) are kept as additive sums. Only sketches and sums are kept, so
memory stays at a few chunks whatever the tensor's size, and the pages of the
memory-mapped file are given back as the stream moves on. When asked (``joint=True``)
an Adam-style family's (sqrt(v̂), |m̂|) pairs are also counted in a
2-D histogram (:mod:`ostate.analysis.joint`), under the key ``moments``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ostate.analysis.columns import OPTIONAL_STATISTICS, derived_columns, sketch_columns
from ostate.analysis.compress import SharedSecondMoment
from ostate.analysis.heads import HeadLayout
from ostate.analysis.joint import JointHistogram
from ostate.analysis.native import kernels
from ostate.analysis.quantize import BLOCK, BlockwiseError
from ostate.analysis.sketch import Sketch
from ostate.optimizers import Family
from ostate.optimizers.family import Preconditioned, explain_bad_state
from ostate.state import OptimizerState, ParamState, TensorRef

# Elements per chunk: a multiple of the 8-bit block, and small enough (1 MiB of float32)
# that one chunk's temporaries stay in the CPU caches (measured: docs/performance.md).
READ_CHUNK = 1 << 18
# Pages of the memory-mapped file are given back every this many elements of a tensor.
RELEASE_EVERY = 1 << 22
assert READ_CHUNK % BLOCK == 0 and RELEASE_EVERY % READ_CHUNK == 0


@dataclass(slots=True)
class ParamSummary:
    """One parameter's table row, the sketches behind its statistics, its additive sums, and
    its joint histograms (``moments``: (sqrt(v̂), |m̂|), only when asked for)."""

    row: dict[str, Any]
    sketches: dict[str, Sketch] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    joints: dict[str, JointHistogram] = field(default_factory=dict)


ROOT_LAYER = "(root)"


def layer_of(name: str, name_source: str = "param_names") -> str:
    """The module a parameter belongs to: its name without the last component.

    A parameter of the top-level module belongs to ``(root)``; an unnamed parameter
    (``param.<index>``) is a layer of its own.
    """
    if name_source == "none":
        return name
    return name.rsplit(".", 1)[0] if "." in name else ROOT_LAYER


PARAM_KINDS = ("embedding", "weight", "norm", "bias", "other")


def param_kind(name: str, shape: tuple[int, ...] | None, known: str | None = None) -> str:
    """``embedding``, ``norm``, ``bias``, ``weight`` or ``other``, from the name and the shape.

    ``known`` is the kind the model's module types give (:attr:`OptimizerState.param_kinds`,
    when the model was at hand): it is used as it is, and the name rule only otherwise.

    A name-based rule (documented in docs/columns.md): ``embed``/``wte``/``wpe`` in the
    name is an embedding; ``norm``, ``ln_`` or a last module named ``ln``/``ln<digit>``
    is a normalisation layer; a name ending in ``bias`` is a bias; any other tensor of
    two or more dimensions is a weight; the rest (1-D scales, scalars, unnamed
    parameters of unknown shape) is ``other``.

    Example:
        >>> param_kind("model.embed_tokens.weight", (100, 8)), param_kind("h.0.ln_1.weight", (8,))
        ('embedding', 'norm')
        >>> param_kind("h.0.mlp.c_fc.bias", (32,)), param_kind("h.0.mlp.c_fc.weight", (8, 32))
        ('bias', 'weight')
    """
    if known is not None:
        return known
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
        "param_kind": param_kind(param.name, param.shape, optimizer.param_kinds.get(param.name))
        if param.name_source != "none"
        else ("weight" if param.shape is not None and len(param.shape) >= 2 else "other"),
        "shape": tuple(param.shape) if param.shape is not None else None,
        "numel": param.numel,
        "step": param.step,
        "has_state": param.has_state,
        "dtype": ",".join(dtypes) if dtypes else None,
        "state_bytes": param.state_bytes,
    }


def summarize_param(
    optimizer: OptimizerState,
    param: ParamState,
    family: Family,
    *,
    weight: TensorRef | None = None,
    heads: HeadLayout | None = None,
    joint: bool = False,
    statistics: frozenset[str] = frozenset(OPTIONAL_STATISTICS),
) -> ParamSummary:
    """The row, sketches and sums of one parameter.

    ``weight`` is the parameter's tensor from the checkpoint's model (used only when
    its shape is the parameter's); ``heads`` says how to split attention projections
    into heads for ``vmean_head_relchange``; ``joint`` also counts the family's moment
    pairs in a joint histogram (families that declare ``moments`` only);
    ``statistics`` are the optional statistic families to compute besides the core
    (:data:`~ostate.analysis.columns.OPTIONAL_STATISTICS`).
    """
    group = optimizer.groups[param.group]
    row = base_row(optimizer, param)
    sketches: dict[str, Sketch] = {}
    sums: dict[str, float] = {}
    joints: dict[str, JointHistogram] = {}
    with explain_bad_state(param, family, group):
        if param.has_state:
            row.update(family.columns(param, group))
        if param.has_state and param.shape is not None:
            shape = tuple(param.shape)
            aligned = {
                k: ref for k, ref in param.tensors().items() if ref.shape == shape and ref.dtype.is_floating_point
            }
            if weight is not None and (weight.shape != shape or not weight.dtype.is_floating_point):
                weight = None
            # An unchunked family reads state that is not shaped like the parameter (factored
            # second moments) from ``param`` itself, so it is asked even when nothing is aligned.
            if aligned or not family.chunked:
                rows_per_head = heads.rows_per_head(param.name, shape) if heads is not None else None
                if joint and family.moments is not None:
                    joints["moments"] = JointHistogram()
                _stream(
                    param,
                    group,
                    family,
                    aligned,
                    weight,
                    rows_per_head,
                    sketches,
                    sums,
                    joints.get("moments"),
                    statistics,
                )
    for quantity, sketch in sketches.items():
        row.update(sketch_columns(quantity, sketch))
    row.update(derived_columns(sketches, sums, family.second_moment))
    return ParamSummary(row, sketches, sums, joints)


def _stream(
    param: ParamState,
    group: Mapping[str, Any],
    family: Family,
    aligned: dict[str, TensorRef],
    weight: TensorRef | None,
    rows_per_head: int | None,
    sketches: dict[str, Sketch],
    sums: dict[str, float],
    moments: JointHistogram | None,
    statistics: frozenset[str],
) -> None:
    assert param.shape is not None  # summarize_param streams only parameters with a shape
    refs = list(aligned.values()) + ([weight] if weight is not None else [])
    numel = param.numel or 0
    step = READ_CHUNK if family.chunked else max(numel, 1)
    shared = SharedSecondMoment.for_shape(tuple(param.shape)) if family.preconditioned is not None else None
    compress = "compressibility" in statistics
    quantized = {
        key: BlockwiseError(signed)
        for key, signed in family.quantized_moments.items()
        if key in aligned and "q8" in statistics
    }
    nonfinite = eps_dominated = 0
    released = 0
    compressible = False
    try:
        flat = {k: ref.read().reshape(-1) for k, ref in aligned.items()}
        weights = weight.read().reshape(-1) if weight is not None else None
        for start in range(0, numel, step):
            chunk = {k: t[start : start + step] for k, t in flat.items()}
            length = min(step, numel - start)
            quantities = family.quantities(chunk, group, param)
            for quantity, values in quantities.items():
                sketch = sketches.setdefault(quantity, Sketch())
                if isinstance(values, (int, float)):
                    sketch.add_constant(float(values), length)
                else:
                    sketch.add(values)
            if weights is not None:  # only the weights' RMS is needed: no histogram
                sketches.setdefault("weight", Sketch(with_histogram=False)).add(weights[start : start + step])
            nonfinite += _nonfinite_coordinates(chunk.values())
            if moments is not None:
                assert family.moments is not None  # a joint histogram is kept only for families with moments
                first, second_root = family.moments.estimates(chunk, group, param, quantities)
                moments.add(second_root, first)
            if shared is not None:
                assert family.preconditioned is not None  # shared exists only for preconditioned families
                pre = family.preconditioned(chunk, group, param, quantities)
                if not group.get("lr"):  # a finished schedule: eff_lr is 0, the preconditioner still tells
                    sketches.setdefault(PRECONDITIONER, Sketch()).add(preconditioner(pre))
                # sqrt(s_hat) <= eps, with s_hat = second_moment * scale
                eps_dominated += _count_at_most(pre.second_moment, pre.eps**2 / pre.second_moment_scale)
                if (
                    compress and pre.numerator is not None
                ):  # a gradient numerator (Adagrad, RMSprop) is not in the state
                    shared.add(start, pre)
                    compressible = True
            for key, accumulator in quantized.items():
                accumulator.add(chunk[key])
            if start + length - released >= RELEASE_EVERY:
                for ref in refs:
                    ref.release(released, start + length)
                released = start + length
    finally:
        for ref in refs:
            ref.release()
    for sketch in sketches.values():
        sketch.compact()
    if moments is not None:
        moments.compact()
    sums["coords"] = numel
    sums["nonfinite_coords"] = nonfinite
    if shared is not None:
        sums["eps_dominated"] = eps_dominated
        sums["eps_coords"] = numel
        if compressible:
            sums.update(shared.sums(rows_per_head))
    for key, accumulator in quantized.items():
        sums[f"{key}_q8_err_sq"] = accumulator.error_sq
        sums[f"{key}_q8_norm_sq"] = accumulator.norm_sq
    if "weight" in sketches and "update" in sketches:
        sums["ratio_update_sq"] = sketches["update"].sumsq
        sums["ratio_weight_sq"] = sketches["weight"].sumsq


# The quantity 1/(sqrt(s_hat) + eps) of an adaptive family, summarised where a group's lr is 0 (docs/columns.md).
PRECONDITIONER = "precond"


def preconditioner(pre: Preconditioned) -> torch.Tensor:
    r"""The update's preconditioner :math:`1/(\sqrt{\hat s} + \epsilon)` per coordinate: the effective lr without the lr."""
    return pre.inverse_denominator * pre.inverse_denominator_scale


def _count_at_most(values: torch.Tensor, threshold: float) -> int:
    """How many of ``values`` are ``<= threshold`` (the threshold rounded to the values' float32 first)."""
    if kernels.usable(values) and values.dtype == torch.float32:
        return kernels.count_at_most(values, threshold)
    return int(torch.count_nonzero(values <= threshold))


def _nonfinite_coordinates(tensors) -> int:
    """Coordinates at which any of ``tensors`` holds NaN or ±inf (a sum is checked first: cheap)."""
    bad = None
    for t in tensors:
        if math.isfinite(float(t.sum())):
            continue
        mask = ~torch.isfinite(t)
        bad = mask if bad is None else bad | mask
    return int(bad.sum()) if bad is not None else 0
