"""Give optimizer parameters their names, and say how each name was found.

torch numbers optimizer parameters by position. When the checkpoint also holds the
model's state dict, the optimizer's parameters (in index order) are matched against
the model's floating-point entries (in order) so that every known shape agrees. The
model may hold more entries than the optimizer (buffers, frozen parameters), so the
match is an order-preserving alignment; a name is given only when exactly one
alignment exists. Otherwise the parameters keep ``param.<index>`` and a warning says
why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence, cast

import numpy as np

# Buffers of torch.nn.BatchNorm*/InstanceNorm*: never parameters, so never optimizer entries.
_NORM_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_MAX_DP_CELLS = 50_000_000
_MAX_GROUP_STATES = 200_000


@dataclass(frozen=True)
class ModelEntry:
    """One entry of a model state dict, as far as naming needs it."""

    name: str
    shape: tuple[int, ...]
    floating: bool = True
    alias_of: str | None = None  # the earlier entry sharing this storage (tied weights)


@dataclass
class Naming:
    """Names for the optimizer's parameters in index order (``None`` where none was found)."""

    names: list[str | None]
    source: str
    shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def match_model_order(
    param_shapes: Sequence[tuple[int, ...] | None],
    entries: Sequence[ModelEntry],
    where: str,
    group_sizes: Sequence[int] | None = None,
) -> Naming:
    """Align optimizer parameters (shapes in index order; ``None`` when unknown) with model entries.

    With several param groups (``group_sizes``, in index order), each group must follow
    the model's order on its own while the groups interleave (as when a training
    script splits ``named_parameters()`` into decay and no-decay groups).

    Example:
        >>> entries = [ModelEntry("fc.weight", (3, 4)), ModelEntry("fc.bias", (3,))]
        >>> match_model_order([(3, 4), (3,)], entries, "model").names
        ['fc.weight', 'fc.bias']
    """
    n = len(param_shapes)
    candidates = [e for e in entries if e.floating and e.alias_of is None]
    unnamed = Naming([None] * n, "none", list(param_shapes))
    if n == 0:
        return Naming([], "model-order", [])
    if n > len(candidates):
        unnamed.warnings.append(
            f"the optimizer has {n} parameters but the model state dict at '{where}' has only "
            f"{len(candidates)} floating-point entries; parameters were not named"
        )
        return unnamed

    sizes = [size for size in (group_sizes or [n]) if size > 0]
    align = _align if len(sizes) == 1 else (lambda shapes, ents: _align_groups(shapes, ents, sizes))
    alignment, count = align(param_shapes, candidates)
    if count > 1:
        without_buffers = [e for e in candidates if not e.name.endswith(_NORM_BUFFER_SUFFIXES)]
        if len(without_buffers) >= n:
            alignment2, count2 = align(param_shapes, without_buffers)
            if count2 == 1:
                alignment, count, candidates = alignment2, count2, without_buffers
    if count == 0:
        detail = (
            _first_mismatch(param_shapes, candidates)
            if len(sizes) == 1
            else (f"each of the {len(sizes)} param groups was tried as a subsequence of the model's entries")
        )
        unnamed.warnings.append(
            f"the optimizer's parameter shapes do not follow the model state dict at '{where}' in order "
            f"({detail}); parameters were not named"
        )
        return unnamed
    if count < 0 or count > 1:
        # Name what every reading agrees on; say which parameters stay open and how to close them.
        without_buffers = [e for e in candidates if not e.name.endswith(_NORM_BUFFER_SUFFIXES)]
        return _partly_named(param_shapes, without_buffers if len(without_buffers) >= n else candidates, sizes, where)
    chosen = [candidates[k] for k in alignment]
    return Naming([e.name for e in chosen], "model-order", [e.shape for e in chosen])


AMBIGUITY_HINT = (
    "to name them, save the names with the optimizer (torch >= 2.6 keeps param_names when the optimizer is "
    "built from model.named_parameters()) or pass the model in Python: ostate.from_state_dict(state_dict, model=module)"
)


def _partly_named(
    param_shapes: Sequence[tuple[int, ...] | None], entries: Sequence[ModelEntry], sizes: Sequence[int], where: str
) -> Naming:
    """The parameters whose model entry is the same in every alignment, named; the others listed as open.

    Every alignment of a group lies between its leftmost and its rightmost alignment, position
    by position, so where the two agree the entry is certain. Each group is aligned on its own
    (an alignment of all groups together is one of each group's), so the names hold for the
    interleaved groups too.
    """
    names: list[str | None] = []
    shapes: list[tuple[int, ...] | None] = []
    start = 0
    for size in sizes:
        group = param_shapes[start : start + size]
        for position in _certain(group, entries):
            names.append(entries[position].name if position is not None else None)
            shapes.append(entries[position].shape if position is not None else None)
        start += size
    named = [name for name in names if name is not None]
    open_ = [i for i, name in enumerate(names) if name is None]
    if len(set(named)) != len(named):  # two groups certain of one entry cannot be: name nothing
        named, open_ = [], list(range(len(names)))
        names = [None] * len(names)
    shown = ", ".join(f"index {i} ({_shape_text(param_shapes[i])})" for i in open_[:6])
    more = f", ... ({len(open_)} in all)" if len(open_) > 6 else ""
    warning = (
        f"the optimizer's parameters fit the model state dict at '{where}' in more than one way (shapes repeat and "
        f"entries not in the optimizer could be any of them); {len(named)} of {len(names)} are the same in every "
        f"reading and were named; {len(open_)} were not: {shown}{more}; {AMBIGUITY_HINT}"
    )
    return Naming(names, "group-order" if named else "none", shapes if named else list(param_shapes), [warning])


def _certain(shapes: Sequence[tuple[int, ...] | None], entries: Sequence[ModelEntry]) -> list[int | None]:
    """Per parameter, its entry when the leftmost and rightmost order-preserving alignments agree, else None."""
    n, k = len(shapes), len(entries)

    def fits(i: int, j: int) -> bool:
        return shapes[i] is None or tuple(shapes[i]) == entries[j].shape  # type: ignore[arg-type]

    left: list[int] = []
    j = 0
    for i in range(n):
        while j < k and not fits(i, j):
            j += 1
        if j >= k:
            return [None] * n
        left.append(j)
        j += 1
    right = [0] * n
    j = k - 1
    for i in range(n - 1, -1, -1):
        while j >= 0 and not fits(i, j):
            j -= 1
        if j < 0:
            return [None] * n
        right[i] = j
        j -= 1
    return [a if a == b else None for a, b in zip(left, right)]


def match_shapes(param_shapes: Sequence[tuple[int, ...] | None], entries: Sequence[ModelEntry], where: str) -> Naming:
    """Name parameters by shape alone, for model files that keep no order (safetensors sorts its keys).

    Every optimizer shape must be available among the model's floating-point entries
    (as many times as the optimizer uses it); then a parameter is named only when its
    shape occurs exactly once in the optimizer and exactly once in the model, so no
    other entry could be it. The rest stay unnamed.

    Example:
        >>> entries = [ModelEntry("b", (3,)), ModelEntry("w", (3, 4)), ModelEntry("v", (3, 4))]
        >>> match_shapes([(3,), (3, 4)], entries, "model.safetensors").names
        ['b', None]
    """
    candidates = [e for e in entries if e.floating and e.alias_of is None]
    n = len(param_shapes)
    unnamed = Naming([None] * n, "none", list(param_shapes))
    need = Counter(tuple(s) for s in param_shapes if s is not None)
    have = Counter(e.shape for e in candidates)
    missing = [s for s, count in need.items() if have[s] < count]
    if missing:
        unnamed.warnings.append(
            f"the optimizer has parameters of shape {_fmt(missing[0])} that the model at '{where}' does not have "
            f"(as many times); parameters were not named"
        )
        return unnamed
    only = {e.shape: e.name for e in candidates if have[e.shape] == 1}
    names = [only.get(tuple(s)) if s is not None and need[tuple(s)] == 1 else None for s in param_shapes]
    naming = Naming(names, "shape-match", list(param_shapes))
    left = sum(name is None for name in names)
    if left:
        naming.warnings.append(
            f"{left} of {n} parameters share their shape with other entries of '{where}', which keeps no "
            "parameter order, and were left unnamed"
        )
    return naming


def _align(shapes: Sequence[tuple[int, ...] | None], entries: Sequence[ModelEntry]) -> tuple[list[int], int]:
    """The leftmost order-preserving alignment and the number of alignments (capped at 2)."""
    n, k_total = len(shapes), len(entries)
    skips = k_total - n
    codes: dict[tuple[int, ...], int] = {}
    entry_code = np.array([codes.setdefault(e.shape, len(codes)) for e in entries], dtype=np.int64)
    param_code = np.array([-1 if s is None else codes.get(tuple(s), -2) for s in shapes], dtype=np.int64)

    # Leftmost greedy alignment: exists iff any alignment exists.
    alignment: list[int] = []
    k = 0
    for i in range(n):
        while k < k_total and not (param_code[i] == -1 or param_code[i] == entry_code[k]):
            k += 1
        if k >= k_total:
            return [], 0
        alignment.append(k)
        k += 1
    if skips == 0:
        return alignment, 1

    # Count alignments (saturating at 2): ways[s] = ways to place parameters 0..i with i at entry i + s.
    if n * (skips + 1) > _MAX_DP_CELLS:
        return alignment, 2
    ways = np.ones(skips + 1, dtype=np.int64)
    for i in range(n):
        window = entry_code[i : i + skips + 1]
        fits = (window == param_code[i]) if param_code[i] != -1 else np.ones(skips + 1, dtype=bool)
        reach = np.minimum(np.cumsum(ways), 2) if i else np.ones(skips + 1, dtype=np.int64)
        ways = np.where(fits, reach, 0)
    return alignment, int(min(ways.sum(), 2))


def _align_groups(
    shapes: Sequence[tuple[int, ...] | None], entries: Sequence[ModelEntry], sizes: Sequence[int]
) -> tuple[list[int], int]:
    """Like :func:`_align`, for several groups that each keep the model's order and interleave.

    Walks the model entries once, keeping every reachable tuple of per-group positions
    with the number of ways to reach it (capped at 2); returns ``count = -1`` when the
    number of live states exceeds the budget.
    """
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    codes: dict[tuple[int, ...], int] = {}
    entry_code = [codes.setdefault(e.shape, len(codes)) for e in entries]
    param_code = [-1 if s is None else codes.get(tuple(s), -2) for s in shapes]
    skips = len(entries) - len(shapes)
    done = tuple(sizes)
    # state: positions reached in each group -> (ways, previous state, group taken or -1 for a skip)
    layers: list[dict[tuple[int, ...], tuple[int, tuple | None, int]]] = [{tuple(0 for _ in sizes): (1, None, -1)}]
    for k, code in enumerate(entry_code):
        nxt: dict[tuple[int, ...], tuple[int, tuple | None, int]] = {}
        for state, (ways, _prev, _g) in layers[-1].items():
            moves = []
            if k - sum(state) < skips:
                moves.append((state, -1))
            for g, pos in enumerate(state):
                if pos < sizes[g] and param_code[starts[g] + pos] in (-1, code):
                    moves.append((state[:g] + (pos + 1,) + state[g + 1 :], g))
            for new, g in moves:
                if new in nxt:
                    old = nxt[new]
                    nxt[new] = (min(old[0] + ways, 2), old[1], old[2])
                else:
                    nxt[new] = (ways, state, g)
        if len(nxt) > _MAX_GROUP_STATES:
            return [], -1
        layers.append(nxt)
    final = layers[-1].get(done)
    if final is None:
        return [], 0
    if final[0] > 1:
        return [], 2
    alignment = [0] * len(shapes)
    state = done
    for k in range(len(entries), 0, -1):
        _ways, prev, g = layers[k][state]
        if g >= 0:
            alignment[starts[g] + state[g] - 1] = k - 1
        state = cast(tuple, prev)  # None only at k == 1, the last step
    return alignment, 1


def _first_mismatch(shapes: Sequence[tuple[int, ...] | None], entries: Sequence[ModelEntry]) -> str:
    for i, (shape, entry) in enumerate(zip(shapes, entries)):
        if shape is not None and tuple(shape) != entry.shape:
            return f"first difference: optimizer index {i} has shape {_fmt(shape)}, model entry '{entry.name}' {_fmt(entry.shape)}"
    return "the model runs out of matching entries"


def _shape_text(shape: Sequence[int] | None) -> str:
    return _fmt(shape) if shape is not None else "shape unknown"


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"
