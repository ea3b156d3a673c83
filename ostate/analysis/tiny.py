"""Many tiny parameters at once: the same rows as :func:`~ostate.analysis.params.summarize_param`, batched.

A checkpoint of 100,000 parameters of a few elements each spends its time in calls,
not arithmetic: each parameter's stream makes about a thousand small torch and numpy
calls. Parameters of at most :data:`TINY` elements (one 8-bit block, one chunk) that
share their optimizer's group, step count, shape, state keys and dtypes go through
the family's math together instead: their state tensors are stacked into one matrix
(a row per parameter), the family computes its per-coordinate quantities once for
the whole matrix (they are elementwise, and every hyperparameter and the step are the
same for the batch), and every per-parameter sum, extreme, histogram and quantile is
taken row by row in a few array passes (:meth:`Sketch.of_rows`,
:func:`~ostate.analysis.sketch.quantiles_of`, :meth:`BlockwiseError.row_sums`,
:func:`~ostate.analysis.compress.shared_sums_of`). Each parameter still gets its own
sketches and sums, equal to the one-parameter path's bit for bit (the row reductions
add in the same order as a one-row tensor's), so groups, layers and the model merge
exactly as before.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch

from ostate.analysis.columns import OPTIONAL_STATISTICS, derived_columns, sketch_columns_of
from ostate.analysis.compress import shared_sums_of
from ostate.analysis.heads import HeadLayout
from ostate.analysis.native import kernels
from ostate.analysis.params import PRECONDITIONER, ParamSummary, base_row, preconditioner
from ostate.analysis.quantize import BLOCK, BlockwiseError
from ostate.analysis.sketch import Sketch
from ostate.optimizers import Family
from ostate.optimizers.family import explain_bad_state
from ostate.state import OptimizerState, ParamState, TensorRef

# Parameters up to this many elements are batched: one 8-bit block (so the block is the whole
# tensor) and far below one chunk of the streaming path.
TINY = BLOCK


def batch_key(
    param: ParamState, family: Family, weight: TensorRef | None, heads: HeadLayout | None, joint: bool
) -> tuple[Hashable, ...] | None:
    """What parameters must share to be summarised together, or None when ``param`` takes the one-parameter path.

    Only the step count and the group reach a family's elementwise math besides the state
    tensors, so a parameter is batched only when every other state entry is a tensor of
    its own shape. Scalars, joint histograms and attention heads stay on the
    one-parameter path.

    Example:
        >>> from ostate.optimizers import get_family
        >>> v = TensorRef.of(torch.ones(4))
        >>> p = ParamState(0, "b", "fqn", 0, (4,), 3.0, {"step": 3.0, "exp_avg": v, "exp_avg_sq": v})
        >>> batch_key(p, get_family("adamw"), None, None, False)
        (0, 3.0, (4,), (('exp_avg', torch.float32), ('exp_avg_sq', torch.float32)), None)
    """
    if joint or not family.chunked or not param.has_state or param.shape is None:
        return None
    refs = [*param.tensors().values(), *([weight] if weight is not None else [])]
    if not all(kernels.on_host(ref) for ref in refs):  # batched rows are read on the host
        return None
    shape = tuple(param.shape)
    # A scalar parameter's 0-d state entries (NAdam's mu_product, ASGD's eta) would count as aligned.
    if not shape or not 1 <= (param.numel or 0) <= TINY:
        return None
    if heads is not None and heads.rows_per_head(param.name, shape) is not None:
        return None
    aligned = []
    for key, value in param.state.items():
        if isinstance(value, TensorRef) and value.shape == shape and value.dtype.is_floating_point:
            aligned.append((key, value.dtype))
        elif key != "step":
            return None
    if not aligned:
        return None
    usable = weight is not None and weight.shape == shape and weight.dtype.is_floating_point
    return (param.group, param.step, shape, tuple(aligned), weight.dtype if usable and weight is not None else None)


def summarize_tiny(
    optimizer: OptimizerState,
    params: Sequence[ParamState],
    family: Family,
    weights: Mapping[str, TensorRef],
    statistics: frozenset[str] = frozenset(OPTIONAL_STATISTICS),
) -> list[ParamSummary]:
    """The summaries of ``params`` (all with the same :func:`batch_key`), in their order
    (``statistics``: the optional statistic families to compute, as for ``summarize_param``)."""
    first = params[0]
    group = optimizer.groups[first.group]
    assert first.shape is not None  # batch_key admits only parameters with a shape
    shape = tuple(first.shape)
    count, numel = len(params), first.numel
    assert numel is not None
    keys = [
        key
        for key, value in first.state.items()
        if key != "step" or (isinstance(value, TensorRef) and value.shape == shape and value.dtype.is_floating_point)
    ]
    key_of_first = batch_key(first, family, weights.get(first.name), None, False)
    assert key_of_first is not None
    with_weight = key_of_first[-1] is not None
    refs = [[p.state[key] for key in keys] + ([weights[p.name]] if with_weight else []) for p in params]
    try:
        stacked = [torch.stack([r[i].read().reshape(-1) for r in refs]) for i in range(len(refs[0]))]
    finally:
        for r in refs:
            for ref in r:
                ref.release()
    chunk = {key: rows.reshape(-1) for key, rows in zip(keys, stacked)}
    sketches: list[dict[str, Sketch]] = [{} for _ in params]
    sums: list[dict[str, float]] = [{} for _ in params]
    with explain_bad_state(first, family, group):  # one group and one step per batch
        quantities = family.quantities(chunk, group, first)
        for quantity, values in quantities.items():
            if isinstance(values, (int, float)):
                for own in sketches:
                    own.setdefault(quantity, Sketch()).add_constant(float(values), numel)
            else:
                for own, sketch in zip(sketches, Sketch.of_rows(values.reshape(count, numel))):
                    own[quantity] = sketch
        if with_weight:
            for own, sketch in zip(sketches, Sketch.of_rows(stacked[-1], with_histogram=False)):
                own["weight"] = sketch
        finite = torch.ones(count, numel, dtype=torch.bool)
        for matrix in stacked[: len(keys)]:
            finite &= torch.isfinite(matrix)
        nonfinite = (numel - finite.sum(1)).tolist()
        for mine, bad in zip(sums, nonfinite):
            mine["coords"] = numel
            mine["nonfinite_coords"] = bad
        if family.preconditioned is not None:
            pre = family.preconditioned(chunk, group, first, quantities)
            if not group.get("lr"):  # as summarize_param does: a finished schedule's preconditioner
                for own, sketch in zip(sketches, Sketch.of_rows(preconditioner(pre).reshape(count, numel))):
                    own[PRECONDITIONER] = sketch
            dominated = (pre.second_moment <= pre.eps**2 / pre.second_moment_scale).reshape(count, numel).sum(1)
            compress = "compressibility" in statistics and pre.numerator is not None
            shared = shared_sums_of(count, shape, pre) if compress else None
            for i, (mine, n) in enumerate(zip(sums, dominated.tolist())):
                mine["eps_dominated"] = n
                mine["eps_coords"] = numel
                if shared is not None:
                    mine.update(shared[i])
    for key, signed in family.quantized_moments.items():
        if key in chunk and "q8" in statistics:
            errors, norms = BlockwiseError(signed).row_sums(chunk[key].reshape(count, numel))
            for mine, error, norm in zip(sums, errors, norms):
                mine[f"{key}_q8_err_sq"] = error
                mine[f"{key}_q8_norm_sq"] = norm
    for mine, own in zip(sums, sketches):
        if "weight" in own and "update" in own:
            mine["ratio_update_sq"] = own["update"].sumsq
            mine["ratio_weight_sq"] = own["weight"].sumsq
    rows: list[dict[str, Any]] = []
    for param in params:
        row = base_row(optimizer, param)
        with explain_bad_state(param, family):
            row.update(family.columns(param, group))
        rows.append(row)
    for quantity in sketches[0]:
        for row, columns in zip(rows, sketch_columns_of(quantity, [own[quantity] for own in sketches])):
            row.update(columns)
    for row, own, mine in zip(rows, sketches, sums):
        row.update(derived_columns(own, mine, family.second_moment))
    return [ParamSummary(row, own, mine) for row, own, mine in zip(rows, sketches, sums)]
