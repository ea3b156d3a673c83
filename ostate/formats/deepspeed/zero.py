"""Rebuild each parameter's optimizer state from the per-rank partitions of a ZeRO checkpoint.

ZeRO keeps one flat fp32 buffer per param group (stages 1 and 2, and the
BF16_Optimizer) or per sub-group (stage 3), split across the ``W`` data-parallel
ranks; each rank saves its piece of the master weights and of every optimizer
state tensor (``exp_avg``, ``exp_avg_sq``). The parameters' names and shapes, in
the buffer's order, are in the model state file's ``param_shapes``.

Stages 1 and 2 (runtime/zero/stage_1_and_2.py, runtime/bf16_optimizer.py): a group's
parameters are laid end to end (each followed by its ``param_alignment_paddings``
entry, zero unless alignment was asked for), the buffer is padded at its tail to a
multiple of ``2W`` and cut into ``W`` equal pieces, rank ``r`` holding the ``r``-th.
Some pieces are saved with their padding stripped and some not; since all padding
sits at the tail, joining the pieces in rank order gives the parameters at the same
offsets either way:

    param i = join_r(piece_r)[o_i : o_i + numel_i].view(shape_i),  o_{i+1} = o_i + numel_i + pad_i

Stage 3 (runtime/zero/stage3.py): every parameter is split on its own into ``W``
pieces of ``ceil(numel/W)`` values (the last padded); rank ``r`` lays its pieces of a
sub-group's parameters end to end:

    param i = join_r(flat_r[o_i : o_i + ceil(numel_i/W)])[:numel_i].view(shape_i),  o_{i+1} = o_i + ceil(numel_i/W)

Nothing is joined until a tensor is read: each :class:`~ostate.state.TensorRef`
copies only its parameter's slices out of the memory-mapped rank files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ostate.errors import OstateError
from ostate.state import TensorRef


@dataclass
class FlatParam:
    """One trainable parameter rebuilt from the partitions.

    ``group`` is the user's param group; ``step`` is the group's step as saved (a
    0-d tensor, or a Python int for DeepSpeed's FusedAdam); ``state`` holds the
    optimizer's per-coordinate tensors by their own keys; ``fp32`` the master weight.
    """

    name: str
    group: int
    shape: tuple[int, ...]
    step: Any
    state: dict[str, TensorRef] = field(default_factory=dict)
    fp32: TensorRef | None = None


class RankPieces:
    """A flat buffer stored as pieces in rank order; reads copy only the overlapping slices.

    Example:
        >>> joined = RankPieces([torch.arange(4.0), torch.arange(4.0, 6.0)])
        >>> joined.numel, joined.read(3, 2).tolist()
        (6, [3.0, 4.0])
    """

    def __init__(self, pieces: Sequence[torch.Tensor]):
        self.pieces = [p.reshape(-1) for p in pieces]
        self.starts = [0]
        for p in self.pieces:
            self.starts.append(self.starts[-1] + p.numel())
        self.dtype = self.pieces[0].dtype if self.pieces else torch.float32

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def read(self, start: int, numel: int) -> torch.Tensor:
        end = start + numel
        parts = [
            p[max(start - s, 0) : min(end, s + p.numel()) - s]
            for p, s in zip(self.pieces, self.starts)
            if s < end and s + p.numel() > start
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype)

    def ref(self, start: int, shape: tuple[int, ...]) -> TensorRef:
        numel = math.prod(shape)
        return TensorRef(shape, self.dtype, lambda: self.read(start, numel).view(shape))


def partitioned_state(base: Any, group: int) -> Mapping[str, Any]:
    """A rank's optimizer state entry for one flat group (``{}`` before the first step).

    ``base_optimizer_state`` is a torch state dict, or with ``elastic_checkpoint`` a list
    of per-group entries.
    """
    if isinstance(base, list):
        return base[group] if group < len(base) else {}
    return base["state"].get(group, {})


@dataclass(frozen=True)
class Slot:
    """Where one parameter lies in its flat group's buffer.

    Stages 1/2: ``offset`` and ``length`` (= numel) are in the buffer joined from the
    ranks' pieces. Stage 3: every rank holds ``length`` (= ceil(numel/W)) values of the
    parameter at ``offset`` of its own flat sub-group buffer.
    """

    name: str
    flat_group: int  # the param group (stages 1/2) or the sub-group (stage 3)
    shape: tuple[int, ...]
    offset: int
    length: int


def stage_1_2_slots(param_shapes: Sequence[Mapping[str, Sequence[int]]], paddings: Any = None) -> list[Slot]:
    """Each parameter's place in its group's joined buffer (``paddings``: ``param_alignment_paddings``)."""
    slots = []
    for g, shapes in enumerate(param_shapes):
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            shape = tuple(int(d) for d in shape)
            numel = math.prod(shape)
            slots.append(Slot(name, g, shape, offset, numel))
            offset += numel + (int(paddings[g][i]) if paddings else 0)
    return slots


def stage_3_slots(param_shapes: Sequence[Mapping[str, Sequence[int]]], world: int) -> list[Slot]:
    """Each parameter's place in every rank's flat sub-group buffer."""
    slots = []
    for sg, shapes in enumerate(param_shapes):
        offset = 0
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            piece = math.ceil(math.prod(shape) / world)
            slots.append(Slot(name, sg, shape, offset, piece))
            offset += piece
    return slots


def stage_1_2_params(
    param_shapes: Sequence[Mapping[str, Sequence[int]]],
    shards: Sequence[Mapping[str, Any]],
    where: str,
) -> list[FlatParam]:
    """Parameters of a ZeRO stage 1/2 or BF16_Optimizer checkpoint, in flat order group by group.

    ``shards`` are the ranks' ``optimizer_state_dict`` entries in rank order.
    """
    out: list[FlatParam] = []
    slots = stage_1_2_slots(param_shapes, shards[0].get("param_alignment_paddings"))
    for g in range(len(param_shapes)):
        states = [partitioned_state(s["base_optimizer_state"], g) for s in shards]
        keys = [k for k, v in states[0].items() if isinstance(v, torch.Tensor) and v.dim() >= 1]
        joined = {k: RankPieces([st[k] for st in states]) for k in keys if all(k in st for st in states)}
        fp32 = RankPieces([s["single_partition_of_fp32_groups"][g] for s in shards])
        step = states[0].get("step")
        for slot in (s for s in slots if s.flat_group == g):
            _check_fits(slot.offset + slot.length, {"fp32": fp32, **joined}, slot.name, g, where)
            out.append(
                FlatParam(
                    slot.name,
                    g,
                    slot.shape,
                    step,
                    {k: j.ref(slot.offset, slot.shape) for k, j in joined.items()},
                    fp32.ref(slot.offset, slot.shape),
                )
            )
    return out


def stage_3_params(
    param_shapes: Sequence[Mapping[str, Sequence[int]]],
    shards: Sequence[Mapping[str, Any]],
    where: str,
) -> list[FlatParam]:
    """Parameters of a ZeRO stage 3 checkpoint in flat order (sub-group by sub-group).

    ``shards`` are the ranks' ``optimizer_state_dict`` entries in rank order.
    """
    world = len(shards)
    inner = [s["optimizer_state_dict"] for s in shards]
    group_of_sub = user_groups_of_subgroups(inner[0]["param_groups"], len(param_shapes), where)
    out: list[FlatParam] = []
    slots = stage_3_slots(param_shapes, world)
    for sg in range(len(param_shapes)):
        flats = [s["fp32_flat_groups"][sg].reshape(-1) for s in shards]
        states = [st["state"].get(sg, {}) for st in inner]
        keys = [k for k, v in states[0].items() if isinstance(v, torch.Tensor) and v.dim() >= 1]
        flat_state = {k: [st[k].reshape(-1) for st in states] for k in keys if all(k in st for st in states)}
        for slot in (s for s in slots if s.flat_group == sg):
            if any(slot.offset + slot.length > f.numel() for f in flats):
                raise OstateError(
                    f"param_shapes do not fit the ranks' fp32 partitions of sub-group {sg} at '{slot.name}' "
                    f"(needs {slot.offset + slot.length} values per rank, a rank holds {min(f.numel() for f in flats)})",
                    where=where,
                    hint="the model and optimizer files may come from different saves or world sizes",
                )
            state = {k: _stage3_ref(ranks, slot.offset, slot.shape) for k, ranks in flat_state.items()}
            fp32 = _stage3_ref(flats, slot.offset, slot.shape)
            out.append(FlatParam(slot.name, group_of_sub[sg], slot.shape, states[0].get("step"), state, fp32))
    return out


def stage_3_fragments(
    frozen_shapes: Mapping[str, Sequence[int]], fragments: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, TensorRef]:
    """Frozen parameters of a stage 3 checkpoint, joined from each rank's ``frozen_param_fragments``."""
    return {
        name: _stage3_ref([f[name].reshape(-1) for f in fragments], 0, tuple(int(d) for d in shape))
        for name, shape in frozen_shapes.items()
    }


def _stage3_ref(flats: list[torch.Tensor], offset: int, shape: tuple[int, ...]) -> TensorRef:
    """A parameter whose ``ceil(numel/W)`` values start at ``offset`` in every rank's flat buffer.

    The rank slices are taken only when read: a checkpoint of many ranks and
    parameters costs nothing per (rank, parameter) pair until a parameter is asked for.
    """
    numel = math.prod(shape)
    piece = math.ceil(numel / len(flats))

    def read() -> torch.Tensor:
        return RankPieces([f[offset : offset + piece] for f in flats]).read(0, numel).view(shape)

    return TensorRef(shape, flats[0].dtype, read)


def user_groups_of_subgroups(param_groups: Sequence[Mapping[str, Any]], count: int, where: str) -> list[int]:
    """The user's param group of each stage 3 sub-group (its ``params`` list sub-group indices)."""
    owner: dict[int, int] = {}
    for g, group in enumerate(param_groups):
        for sg in group.get("params", []):
            owner[int(sg)] = g
    missing = [sg for sg in range(count) if sg not in owner]
    if missing:
        raise OstateError(
            f"sub-group {missing[0]} of param_shapes is in no param group of the optimizer",
            where=where,
            hint="the model and optimizer files may come from different saves",
        )
    return [owner[sg] for sg in range(count)]


def _check_fits(end: int, joined: Mapping[str, RankPieces], name: str, group: int, where: str) -> None:
    short = {k: j.numel for k, j in joined.items() if j.numel < end}
    if short:
        key, have = next(iter(short.items()))
        raise OstateError(
            f"param_shapes do not fit the joined partitions of param group {group} at '{name}' "
            f"(needs {end} values, the ranks' '{key}' pieces hold {have})",
            where=where,
            hint="the model and optimizer files may come from different saves or world sizes",
        )
