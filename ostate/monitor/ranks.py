"""Several data-parallel ranks: each summarises its own share, and rank 0 merges the sketches.

Replicated training (DDP, or ZeRO-less data parallelism) holds the same optimizer state
on every rank: rank 0 summarises it alone and the other ranks do nothing. Sharded
training (FSDP2's ``DTensor`` shards, torch's ``ZeroRedundancyOptimizer``) holds a
different share on each rank: every rank summarises its share into per-parameter
summaries (sketches and additive sums, never the tensors), ``gather_object`` brings them
to rank 0, and the summaries of the same parameter are merged there (sketches merge
exactly, sums add), so the rows rank 0 logs describe the whole model, by the same
formulas as a single-process analysis of the full tensors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch.distributed as dist

from ostate.analysis import ParamSummary, Sketch
from ostate.analysis.columns import derived_columns, merge_sums, sketch_columns
from ostate.optimizers import get_family

SHARDS = ("auto", "replicated", "sharded")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this together)."""
    _, size = world()
    if size == 1:
        return flag
    flags: list[Any] = [None] * size
    dist.all_gather_object(flags, flag)
    return any(flags)


def gathered(summaries: list[ParamSummary]) -> list[list[ParamSummary]] | None:
    """Every rank's summaries, on rank 0 (``None`` on the others); every rank must call this together."""
    rank, size = world()
    if size == 1:
        return [summaries]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(summaries, out, dst=0)
    return out


def merged(per_rank: list[list[ParamSummary]], kind: str, shapes: dict[str, tuple[int, ...]]) -> list[ParamSummary]:
    """One summary per parameter name from every rank's summaries of its shards.

    ``shapes`` gives the whole parameter's shape by name (a shard's row has its own), in
    the model's order: the summaries come in that order (any others after them).

    Example:
        >>> import torch
        >>> from ostate.analysis import summaries
        >>> from ostate.monitor.live import live_checkpoint
        >>> def shard(rows):
        ...     p = torch.nn.Parameter(rows.clone()); opt = torch.optim.Adam([p])
        ...     p.grad = rows.clone(); opt.step()
        ...     o = live_checkpoint(opt, {id(p): "w"}).optimizers[0]
        ...     return list(summaries(o))
        >>> x = torch.randn(6, 3)
        >>> whole = shard(x)[0]
        >>> both = merged([shard(x[:4]), shard(x[4:])], "adam", {"w": (6, 3)})[0]
        >>> both.row["numel"], both.row["shape"], both.sketches["eff_lr"].count == whole.sketches["eff_lr"].count
        (18, (6, 3), True)
    """
    by_name: dict[str, list[ParamSummary]] = defaultdict(list)
    for summaries in per_rank:
        for s in summaries:
            by_name[s.row["name"]].append(s)
    second_moment = get_family(kind).second_moment
    position = {name: i for i, name in enumerate(shapes)}
    order = sorted(by_name, key=lambda name: position.get(name, len(position)))
    return [_merge(by_name[name], second_moment, shapes.get(name)) for name in order]


def _merge(parts: list[ParamSummary], second_moment: str | None, shape: tuple[int, ...] | None) -> ParamSummary:
    with_state = [p for p in parts if p.row["has_state"]] or parts
    if len(parts) == 1 and shape is None:
        return parts[0]
    row = dict(with_state[0].row)
    names: dict[str, list[Sketch]] = defaultdict(list)
    for p in parts:
        for quantity, sketch in p.sketches.items():
            names[quantity].append(sketch)
    sketches = {quantity: Sketch.merged(group) for quantity, group in names.items()}
    sums = merge_sums([p.sums for p in parts])
    row["numel"] = sum(p.row["numel"] or 0 for p in parts)
    row["state_bytes"] = sum(p.row["state_bytes"] for p in parts)
    row["has_state"] = any(p.row["has_state"] for p in parts)
    if shape is not None:
        row["shape"] = tuple(shape)
    for quantity, sketch in sketches.items():
        row.update(sketch_columns(quantity, sketch))
    row.update(derived_columns(sketches, sums, second_moment))
    return ParamSummary(row, sketches, sums)
