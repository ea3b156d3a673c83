r"""Compare the optimizer state of two (or more) checkpoints, parameter by parameter.

Parameters are matched by name. For each parameter present in both, the state
tensors of both checkpoints are read in chunks at the same offsets, one parameter at
a time (never the whole checkpoint), and only sums and sketches are kept:

- ``step_delta``: :math:`t_B - t_A`;
- ``m_cosine``: the cosine similarity of the first moments,
  :math:`\sum m_A m_B / \sqrt{\sum m_A^2 \sum m_B^2}`, from sums of products and squares
  (float64);
- ``log10_v_ratio_*``: quantiles of :math:`\log_{10}(v_B/v_A)` over the coordinates
  where both second moments are :math:`> 0` (a sketch), with ``v_zero_a``/``v_zero_b``
  counting the coordinates where one of them is 0; ``log10_v_ratio_iqr`` is the spread
  (p75 - p25);
- ``eff_lr_relchange_*``: quantiles of :math:`\eta_B/\eta_A - 1`, the relative change of
  the effective learning rate (each checkpoint's family computes its own :math:`\eta`),
  taken from a sketch of :math:`\log_{10}(\eta_B/\eta_A)` (quantiles commute with the
  monotone map :math:`10^x - 1`); ``eff_lr_log10_rms`` is
  :math:`\sqrt{\mathrm{mean}(\log_{10}(\eta_B/\eta_A)^2)}`, the typical change in decades
  (0.3 is a factor of 2);
- ``precond_relchange_*`` and ``precond_log10_rms``: the same for the preconditioner
  :math:`1/(\sqrt{\hat v}+\epsilon)` (adaptive families), the effective learning rate
  without the lr: what carries over when fine-tuning resets the lr, and what still
  compares when one checkpoint's lr is 0 (a finished schedule: its :math:`\eta` is 0,
  so its ratios are undefined, shown ``-``, and the movers are ranked by this instead);
- ``unchanged_frac``: the fraction of coordinates at which every state tensor both
  checkpoints hold is bit-for-bit equal (NaN equal to NaN).

**Largest movers** are ranked by ``eff_lr_log10_rms`` (how far the step size of a
typical coordinate moved), largest first, ties broken by ``m_cosine`` (smallest first).

With several checkpoints, consecutive pairs are compared (A→B, B→C) or each one
against the first (``against="first"``).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ostate.analysis.columns import QUANTILES
from ostate.analysis.engine import default_workers
from ostate.analysis.native.tuning import tuned_process
from ostate.analysis.params import READ_CHUNK, RELEASE_EVERY, preconditioner
from ostate.analysis.sketch import Sketch
from ostate.distributed import RayExecutor, cluster_cpus, map_on_ray, slices
from ostate.errors import OstateError
from ostate.loading import load, selected_optimizers
from ostate.optimizers import Family, get_family
from ostate.optimizers.family import explain_bad_state
from ostate.state import Checkpoint, OptimizerState, ParamState, TensorRef

AGAINST = ("consecutive", "first")
MOVER_METRIC = "eff_lr_log10_rms"
# Movers when the effective lr cannot rank them (a side's lr is 0): the preconditioner's change.
PRECOND_MOVER_METRIC = "precond_log10_rms"
STATUSES = ("both", "only in A", "only in B", "shape differs", "no state in A", "no state in B", "no state")
_REPORTED = ("p5", "p25", "p50", "p75", "p95")


@dataclass
class ParamComparison:
    """One parameter's comparison: its table row, and the sketches and sums behind it (they merge)."""

    row: dict[str, Any]
    sketches: dict[str, Sketch] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)


@dataclass
class PairComparison:
    """Checkpoint ``a`` against checkpoint ``b``: a row per parameter, the whole model, the largest movers."""

    a: str
    b: str
    optimizer_a: str
    optimizer_b: str
    kind_a: str
    kind_b: str
    params: list[ParamComparison]
    model: ParamComparison
    warnings: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per parameter (both checkpoints' parameters, in B's order then A's leftovers)."""
        return pd.DataFrame([p.row for p in self.params])

    def no_common_parameter(self) -> str | None:
        """What to say when no parameter name is in both optimizers (nothing was compared), else None."""
        statuses = [p.row["status"] for p in self.params]
        if any(s not in ("only in A", "only in B") for s in statuses):
            return None
        only_a = [p.row["name"] for p in self.params if p.row["status"] == "only in A"]
        only_b = [p.row["name"] for p in self.params if p.row["status"] == "only in B"]

        def sample(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "") or "none"

        return (
            f"{self.a} and {self.b} have no parameter name in common (A: {sample(only_a)}; B: {sample(only_b)}); "
            "nothing was compared: are they checkpoints of the same model?"
        )

    def movers(self, top: int = 10) -> pd.DataFrame:
        """The ``top`` parameters whose state moved most (see the module docstring for the ranking)."""
        table = self.table()
        metric = self.mover_metric()
        if table.empty or metric not in table.columns:
            return table.head(0)
        ranked = table[table["status"] == "both"].sort_values(
            [metric, "m_cosine"], ascending=[False, True], na_position="last", kind="stable"
        )
        return ranked.head(top).reset_index(drop=True)

    def mover_metric(self) -> str:
        """What ranks the movers: the effective lr's change, or the preconditioner's where no lr ratio is defined."""
        table = self.table()
        for metric in (MOVER_METRIC, PRECOND_MOVER_METRIC):
            if metric in table.columns and np.isfinite(table[metric].to_numpy(dtype=float)).any():
                return metric
        return MOVER_METRIC


@dataclass
class Comparison:
    """What :func:`compare` returns: the checkpoints, how they were paired, and each pair's comparison."""

    paths: list[str]
    against: str
    pairs: list[PairComparison]

    def table(self) -> pd.DataFrame:
        """Every pair's parameter rows, with ``a`` and ``b`` naming the pair."""
        frames = [pair.table().assign(a=pair.a, b=pair.b) for pair in self.pairs]
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame()
        table = pd.concat(frames, ignore_index=True)
        return table[["a", "b", *[c for c in table.columns if c not in ("a", "b")]]]


def compare(
    *paths: str | os.PathLike,
    against: str = "consecutive",
    optimizer_index: int | None = None,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    executor: RayExecutor | None = None,
) -> Comparison:
    """Compare the optimizer state of two or more checkpoints (any format :func:`ostate.load` reads).

    Args:
        paths: the checkpoints, oldest first.
        against: ``consecutive`` (A→B, B→C, ...) or ``first`` (A→B, A→C, ...).
        optimizer_index: the optimizer to compare when the checkpoints hold several
            (by default optimizer ``i`` of one is compared with optimizer ``i`` of the other).
        workers: threads working on different parameters (default ``min(4, cores)``).
        executor: compare on Ray instead (:mod:`ostate.distributed`: each task reads its
            share of the parameters from both checkpoints); the result is the same.

    Example:
        >>> import ostate, torch, tempfile, os
        >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters())
        >>> d = tempfile.mkdtemp(); paths = []
        >>> for step in range(2):
        ...     m(torch.randn(8, 4)).square().sum().backward(); opt.step(); opt.zero_grad()
        ...     paths.append(os.path.join(d, f"step{step}.pt"))
        ...     torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, paths[-1])
        >>> result = compare(*paths)
        >>> table = result.pairs[0].table().set_index("name")
        >>> float(table.loc["weight", "step_delta"]), bool(table.loc["weight", "m_cosine"] > 0)
        (1.0, True)
    """
    if len(paths) < 2:
        raise OstateError("compare needs at least two checkpoints", hint="give two or more paths, oldest first")
    if against not in AGAINST:
        raise OstateError(f"unknown against='{against}'", hint=f"choose one of: {', '.join(AGAINST)}")
    texts = [os.fspath(p) for p in paths]
    pairs = [(0, i) for i in range(1, len(texts))] if against == "first" else [(i - 1, i) for i in range(1, len(texts))]
    loaded: dict[int, Checkpoint] = {}

    def checkpoint(i: int) -> Checkpoint:
        if i not in loaded:
            loaded[i] = load(texts[i], trust_pickle=trust_pickle, format_hint=format_hint)
        return loaded[i]

    results = []
    for i, j in pairs:
        a, b = checkpoint(i), checkpoint(j)
        for oa, ob in _paired_optimizers(a, b, optimizer_index):
            if executor is not None:
                results.append(_compare_on_ray(a, b, oa, ob, texts[i], texts[j], executor))
            else:
                results.append(
                    compare_optimizers(oa, ob, a_label=texts[i], b_label=texts[j], workers=workers, progress=progress)
                )
    return Comparison(texts, against, results)


def _paired_optimizers(a: Checkpoint, b: Checkpoint, index: int | None) -> list[tuple[OptimizerState, OptimizerState]]:
    if index is not None:
        return [(selected_optimizers(a, index)[0], selected_optimizers(b, index)[0])]
    if len(a.optimizers) != len(b.optimizers):
        raise OstateError(
            f"the checkpoints hold {len(a.optimizers)} and {len(b.optimizers)} optimizers",
            where=f"{a.path}, {b.path}",
            hint="choose one with optimizer_index=K",
        )
    return list(zip(a.optimizers, b.optimizers))


def compare_optimizers(
    a: OptimizerState,
    b: OptimizerState,
    *,
    a_label: str | None = None,
    b_label: str | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> PairComparison:
    """Compare two optimizers' state parameter by parameter (matched by name), one parameter at a time.

    ``a_label`` and ``b_label`` name the two sides in the result (default: the optimizers' locations).

    Example:
        >>> import ostate, torch, copy
        >>> m = torch.nn.Linear(3, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        >>> m(torch.ones(2, 3)).sum().backward(); opt.step(); before = copy.deepcopy(opt.state_dict())
        >>> opt.step()  # the same gradient again: the buffer grows, its direction stays
        >>> a, b = (ostate.from_state_dict(sd, model=m).optimizers[0] for sd in (before, opt.state_dict()))
        >>> row = compare_optimizers(a, b, workers=1).params[0].row
        >>> round(row["m_cosine"], 6), row["unchanged_frac"]
        (1.0, 0.0)
    """
    label_a, label_b = a_label or a.location, b_label or b.location
    family_a, family_b = get_family(a.kind), get_family(b.kind)
    by_name_a = {p.name: p for p in a.params}
    by_name_b = {p.name: p for p in b.params}
    order = _order(a, b)
    workers = default_workers() if workers is None else workers
    total = sum((by_name_a[n].numel or 0) for n in order if n in by_name_a and n in by_name_b)

    def one(name: str) -> ParamComparison:
        pa, pb = by_name_a.get(name), by_name_b.get(name)
        result = _compare_param(name, pa, pb, a, b, family_a, family_b)
        bar.update(pa.numel or 0 if pa is not None and pb is not None else 0)
        return result

    with tqdm(
        total=total, unit="coord", unit_scale=True, desc="comparing", disable=not progress, delay=1.0, leave=False
    ) as bar:
        if workers == 1:
            params = [one(n) for n in order]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ostate-compare") as pool:
                params = list(pool.map(one, order))
    return _pair(a, b, label_a, label_b, params)


def _order(a: OptimizerState, b: OptimizerState) -> list[str]:
    """The parameters compared, by name: B's in B's order, then A's that B lacks."""
    in_b = {p.name for p in b.params}
    return [p.name for p in b.params] + [p.name for p in a.params if p.name not in in_b]


def _pair(
    a: OptimizerState, b: OptimizerState, label_a: str, label_b: str, params: list[ParamComparison]
) -> PairComparison:
    warnings = []
    if a.kind != b.kind:
        warnings.append(
            f"the optimizers are of different kinds ({a.kind}, {b.kind}): each one's effective lr and "
            "moments follow its own family"
        )
    if any(p.name_source == "none" for p in [*a.params, *b.params]):
        warnings.append("some parameters have no name: they are matched by their position (param.<index>)")
    stopped = [label for label, o in ((label_a, a), (label_b, b)) if _has_zero_lr(o)]
    if stopped:
        warnings.append(
            f"the lr of {' and '.join(stopped)} is 0 in some param group (a finished schedule): its effective lr is 0 "
            "there, so the effective-lr changes are '-'; precond_relchange_* compares the preconditioner "
            "1/(sqrt(v_hat)+eps) without the lr, which is what carries over when fine-tuning resets the lr"
        )
    model = _merged("(model)", [p for p in params if p.row["status"] == "both"])
    pair = PairComparison(label_a, label_b, a.location, b.location, a.kind, b.kind, params, model, warnings)
    if (nothing := pair.no_common_parameter()) is not None:
        pair.warnings.append(nothing)
    return pair


def _has_zero_lr(optimizer: OptimizerState) -> bool:
    return any("lr" in g and not g["lr"] for i, g in enumerate(optimizer.groups) if not optimizer.is_frozen_group(i))


def _compare_on_ray(
    a: Checkpoint,
    b: Checkpoint,
    oa: OptimizerState,
    ob: OptimizerState,
    label_a: str,
    label_b: str,
    executor: RayExecutor,
) -> PairComparison:
    """:func:`compare_optimizers` of ``oa`` and ``ob`` with the parameters shared out among Ray tasks."""
    position_a = next(i for i, o in enumerate(a.optimizers) if o is oa)
    position_b = next(i for i, o in enumerate(b.optimizers) if o is ob)
    order = _order(oa, ob)
    sizes_by_name = {p.name: p.numel or 0 for p in oa.params}
    sizes = [sizes_by_name.get(name, 0) for name in order]
    calls = [
        (executor, os.path.abspath(a.path), os.path.abspath(b.path), position_a, position_b, tuple(order[i:j]))
        for i, j in slices(sizes, cluster_cpus(executor))
    ]
    params = [p for part in map_on_ray(compare_slice, calls, executor) for p in part]
    return _pair(oa, ob, label_a, label_b, params)


def compare_slice(
    executor: RayExecutor, path_a: str, path_b: str, position_a: int, position_b: int, names: tuple[str, ...]
) -> list[ParamComparison]:
    """On a Ray worker: the comparisons of the parameters ``names`` (one thread, as the program runs)."""
    with tuned_process():
        a, b = executor.load(path_a).optimizers, executor.load(path_b).optimizers
        if position_a >= len(a) or position_b >= len(b):
            raise OstateError("a Ray worker read other checkpoints than the driver's", where=f"{path_a}, {path_b}")
        oa, ob = a[position_a], b[position_b]
        by_name_a = {p.name: p for p in oa.params}
        by_name_b = {p.name: p for p in ob.params}
        family_a, family_b = get_family(oa.kind), get_family(ob.kind)
        return [_compare_param(n, by_name_a.get(n), by_name_b.get(n), oa, ob, family_a, family_b) for n in names]


# ------------------------------------------------------------------------------ one parameter
def _compare_param(
    name: str,
    pa: ParamState | None,
    pb: ParamState | None,
    a: OptimizerState,
    b: OptimizerState,
    family_a: Family,
    family_b: Family,
) -> ParamComparison:
    ref = pb if pb is not None else pa
    row: dict[str, Any] = {
        "name": name,
        "status": _status(pa, pb),
        "shape": tuple(ref.shape) if ref is not None and ref.shape is not None else None,
        "numel": ref.numel if ref is not None else None,
        "group_a": pa.group if pa is not None else None,
        "group_b": pb.group if pb is not None else None,
        "step_a": pa.step if pa is not None else None,
        "step_b": pb.step if pb is not None else None,
        "step_delta": pb.step - pa.step
        if pa is not None and pb is not None and pa.step is not None and pb.step is not None
        else None,
    }
    if row["status"] != "both":
        return ParamComparison(row)
    assert pa is not None and pb is not None  # "both": each side has the parameter
    sketches = {"log10_v_ratio": Sketch(), "log10_eff_lr_ratio": Sketch(), "log10_precond_ratio": Sketch()}
    sums = {
        "dot": 0.0,
        "norm_a": 0.0,
        "norm_b": 0.0,
        "v_zero_a": 0,
        "v_zero_b": 0,
        "unchanged": 0,
        "coords": pa.numel or 0,
        "compared_keys": 0,
    }
    group_a, group_b = a.groups[pa.group], b.groups[pb.group]
    with explain_bad_state(pa, family_a, group_a), explain_bad_state(pb, family_b, group_b):
        _stream_pair(pa, pb, group_a, group_b, family_a, family_b, sketches, sums)
    row.update(_columns(sketches, sums))
    return ParamComparison(row, sketches, sums)


def _status(pa: ParamState | None, pb: ParamState | None) -> str:
    if pa is None:
        return "only in B"
    if pb is None:
        return "only in A"
    if pa.shape is not None and pb.shape is not None and tuple(pa.shape) != tuple(pb.shape):
        return "shape differs"
    if not pa.has_state and not pb.has_state:
        return "no state"
    if not pa.has_state:
        return "no state in A"
    if not pb.has_state:
        return "no state in B"
    return "both" if pa.shape is not None else "shape differs"


def _aligned(param: ParamState) -> dict[str, TensorRef]:
    assert param.shape is not None  # only parameters compared as "both", which have a shape
    shape = tuple(param.shape)
    return {k: ref for k, ref in param.tensors().items() if ref.shape == shape}


def _stream_pair(
    pa: ParamState,
    pb: ParamState,
    group_a: Mapping,
    group_b: Mapping,
    family_a: Family,
    family_b: Family,
    sketches: dict[str, Sketch],
    sums: dict[str, float],
) -> None:
    refs_a, refs_b = _aligned(pa), _aligned(pb)
    common = [k for k in refs_a if k in refs_b]
    sums["compared_keys"] = len(common)
    numel = pa.numel or 0
    step = READ_CHUNK if family_a.chunked and family_b.chunked else max(numel, 1)
    refs = [*refs_a.values(), *refs_b.values()]
    released = 0
    try:
        flat_a = {k: r.read().reshape(-1) for k, r in refs_a.items()}
        flat_b = {k: r.read().reshape(-1) for k, r in refs_b.items()}
        floating_a = {k: t for k, t in flat_a.items() if t.is_floating_point()}
        floating_b = {k: t for k, t in flat_b.items() if t.is_floating_point()}
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            chunk_a = {k: t[start:stop] for k, t in floating_a.items()}
            chunk_b = {k: t[start:stop] for k, t in floating_b.items()}
            qa = family_a.quantities(chunk_a, group_a, pa)
            qb = family_b.quantities(chunk_b, group_b, pb)
            _add_first_moments(
                family_a.first_moment_values(chunk_a, group_a, pa),
                family_b.first_moment_values(chunk_b, group_b, pb),
                sums,
            )
            _add_second_moments(
                qa.get(family_a.second_moment or ""),
                qb.get(family_b.second_moment or ""),
                sketches["log10_v_ratio"],
                sums,
            )
            _add_ratio(qa.get("eff_lr"), qb.get("eff_lr"), stop - start, sketches["log10_eff_lr_ratio"])
            if family_a.preconditioned is not None and family_b.preconditioned is not None:
                # The lr left out: what carries over when fine-tuning resets the lr (and all a finished schedule's lr of 0 leaves).
                _add_ratio(
                    preconditioner(family_a.preconditioned(chunk_a, group_a, pa, qa)),
                    preconditioner(family_b.preconditioned(chunk_b, group_b, pb, qb)),
                    stop - start,
                    sketches["log10_precond_ratio"],
                )
            if common:
                sums["unchanged"] += _unchanged(flat_a, flat_b, common, start, stop)
            if stop - released >= RELEASE_EVERY:
                for ref in refs:
                    ref.release(released, stop)
                released = stop
    finally:
        for ref in refs:
            ref.release()
    for sketch in sketches.values():
        sketch.compact()


def _add_first_moments(m_a: torch.Tensor | None, m_b: torch.Tensor | None, sums: dict[str, float]) -> None:
    if m_a is None or m_b is None:
        sums["no_first_moment"] = 1
        return
    a, b = m_a.reshape(-1).double(), m_b.reshape(-1).double()
    sums["dot"] += float(torch.dot(a, b))
    sums["norm_a"] += float(torch.dot(a, a))
    sums["norm_b"] += float(torch.dot(b, b))


def _add_second_moments(v_a: Any, v_b: Any, sketch: Sketch, sums: dict[str, float]) -> None:
    if not isinstance(v_a, torch.Tensor) or not isinstance(v_b, torch.Tensor):
        sums["no_second_moment"] = 1
        return
    v_a, v_b = v_a.reshape(-1).float(), v_b.reshape(-1).float()
    zero_a, zero_b = v_a == 0, v_b == 0
    sums["v_zero_a"] += int(zero_a.sum())
    sums["v_zero_b"] += int(zero_b.sum())
    both = ~(zero_a | zero_b)
    if bool(both.all()):
        sketch.add(torch.log10(v_b.double() / v_a.double()))
    else:
        sketch.add(torch.log10(v_b[both].double() / v_a[both].double()))


def _add_ratio(eff_a: Any, eff_b: Any, length: int, sketch: Sketch) -> None:
    if eff_a is None or eff_b is None:
        return
    if not isinstance(eff_a, torch.Tensor) and not isinstance(eff_b, torch.Tensor):
        ratio = float(eff_b) / float(eff_a) if float(eff_a) else math.nan
        sketch.add_constant(math.log10(ratio) if ratio > 0 else math.nan, length)
        return
    a = eff_a.reshape(-1).double() if isinstance(eff_a, torch.Tensor) else float(eff_a)
    b = eff_b.reshape(-1).double() if isinstance(eff_b, torch.Tensor) else float(eff_b)
    sketch.add(torch.log10(torch.as_tensor(b, dtype=torch.float64) / a).expand(length))


def _unchanged(
    flat_a: Mapping[str, torch.Tensor], flat_b: Mapping[str, torch.Tensor], keys: Sequence[str], start: int, stop: int
) -> int:
    same = None
    for key in keys:
        a, b = flat_a[key][start:stop], flat_b[key][start:stop]
        if a.dtype == b.dtype and a.dtype.itemsize in (1, 2, 4, 8):
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
            equal = a.view(bits) == b.view(bits)  # bit for bit: NaN equals the same NaN, -0.0 differs from 0.0
        else:
            equal = a.double() == b.double()
        same = equal if same is None else same & equal
    return int(same.sum()) if same is not None else 0


# ------------------------------------------------------------------------------ columns
def _columns(sketches: Mapping[str, Sketch], sums: Mapping[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    norm = math.sqrt(sums.get("norm_a", 0.0) * sums.get("norm_b", 0.0))
    out["m_cosine"] = sums["dot"] / norm if norm and not sums.get("no_first_moment") else math.nan
    v = sketches["log10_v_ratio"]
    quantiles = dict(zip(QUANTILES, v.quantiles(QUANTILES.values())))
    for q in _REPORTED:
        out[f"log10_v_ratio_{q}"] = quantiles[q] if not sums.get("no_second_moment") else math.nan
    out["log10_v_ratio_iqr"] = out["log10_v_ratio_p75"] - out["log10_v_ratio_p25"]
    out["v_zero_a"] = int(sums.get("v_zero_a", 0))
    out["v_zero_b"] = int(sums.get("v_zero_b", 0))
    eff = sketches["log10_eff_lr_ratio"]
    eff_quantiles = dict(zip(QUANTILES, eff.quantiles(QUANTILES.values())))
    for q in ("p5", "p50", "p95"):
        out[f"eff_lr_relchange_{q}"] = 10.0 ** eff_quantiles[q] - 1.0 if eff.count else math.nan
    out[MOVER_METRIC] = eff.rms
    pre = sketches.get("log10_precond_ratio")
    pre_quantiles = dict(zip(QUANTILES, pre.quantiles(QUANTILES.values()))) if pre is not None and pre.count else {}
    for q in ("p5", "p50", "p95"):
        out[f"precond_relchange_{q}"] = 10.0 ** pre_quantiles[q] - 1.0 if pre_quantiles else math.nan
    out[PRECOND_MOVER_METRIC] = pre.rms if pre is not None and pre.count else math.nan
    coords = sums.get("coords", 0)
    out["unchanged_frac"] = sums["unchanged"] / coords if coords and sums.get("compared_keys") else math.nan
    return out


def _merged(name: str, members: list[ParamComparison]) -> ParamComparison:
    """One row for several parameters: sketches merged, sums added (never an average of the rows)."""
    sketches = {
        key: Sketch.merged([m.sketches[key] for m in members if key in m.sketches])
        for key in ("log10_v_ratio", "log10_eff_lr_ratio", "log10_precond_ratio")
    }
    sums: dict[str, float] = {}
    for m in members:
        for key, value in m.sums.items():
            if key in ("no_first_moment", "no_second_moment", "compared_keys"):
                sums[key] = max(sums.get(key, 0), value)
            else:
                sums[key] = sums.get(key, 0) + value
    sums.setdefault("dot", 0.0)
    sums.setdefault("unchanged", 0)
    row = {"name": name, "status": "both", "params": len(members), "numel": sum(m.row["numel"] or 0 for m in members)}
    if members:
        row.update(_columns(sketches, sums))
    return ParamComparison(row, sketches, sums)
