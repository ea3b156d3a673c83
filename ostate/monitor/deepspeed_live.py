"""DeepSpeed's ZeRO optimizers read live: this rank's flat fp32 partitions cut into the model's parameters, as views.

DeepSpeed's ZeRO optimizers hand their inner torch optimizer one flat fp32 tensor per
param group (stages 1 and 2, ``BF16_Optimizer``) or per sub-group (stage 3), this rank's
partition of the master weights, and the inner optimizer's state (``exp_avg``,
``exp_avg_sq``, ...) is flat in the same way. The monitor cuts those flats at the
model's parameter boundaries, computed from the optimizer's own bookkeeping (the
layouts ostate's checkpoint reader rebuilds from the files, ``ostate.formats.deepspeed.zero``):

- stages 1 and 2 (``DeepSpeedZeroOptimizer``): group ``i``'s parameters lie end to end in
  ``round_robin_bit16_groups[i]``'s order (each followed by its
  ``round_robin_bit16_padding`` entry), padded at the tail; rank ``r`` owns elements
  ``[r*P, (r+1)*P)`` with ``P = bit16_groups_flat[i].numel() // W``, held in
  ``single_partition_of_fp32_groups[i]``;
- ``BF16_Optimizer``: the same with ``bf16_groups[i]`` (no padding between parameters)
  and ``fp32_groups_flat_partition[i]``;
- stage 3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split on its own into
  ``W`` pieces of ``partition_numel()`` values; sub-group ``s``'s flat
  ``fp32_partitioned_groups_flat[s]`` lays this rank's pieces of ``fp16_groups[s]`` end to
  end, and rank ``r``'s piece holds the parameter's elements ``[r*p, min((r+1)*p, numel))``.

Each piece is a 1-D view of the flat (never a copy), named from the model; every rank
summarises its pieces and rank 0 merges them per parameter name
(:mod:`ostate.monitor.ranks`), with the whole shapes from the model (``ds_shape`` under
stage 3). deepspeed is never imported: the optimizers are recognised by class name
(:data:`ostate.monitor.live.ZERO_OPTIMIZERS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, cast

import torch
import torch.distributed as dist

from ostate.analysis.params import param_kind
from ostate.errors import OstateError
from ostate.formats.deepspeed.common import configured_kind
from ostate.formats.naming.module_kinds import module_kinds
from ostate.monitor.live import live_checkpoint, parameter_names
from ostate.state import Checkpoint

_WHAT = "see docs/monitor.md, or read its checkpoints instead: ostate inspect SAVE_DIR"


def whole_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A model parameter's whole shape: ``ds_shape`` when ZeRO-3 has partitioned it away, else its own."""
    shape = getattr(param, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


def engine_module(optimizer: Any, model: Any) -> torch.nn.Module | None:
    """The model that names the parameters: a DeepSpeed engine's ``module`` when the engine is given as the model
    (or as the optimizer, without a model); ``model`` itself otherwise.

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> engine_module(None, m) is m
        True
    """
    if model is None and type(optimizer).__name__ == "DeepSpeedEngine":
        model = optimizer
    if type(model).__name__ == "DeepSpeedEngine":
        return cast(torch.nn.Module, model.module)
    return model


@dataclass
class Flat:
    """One flat fp32 partition the inner optimizer steps, and the model parameters' pieces of it.

    ``pieces`` are ``(parameter, start, stop)``: ``flat[start:stop]`` is this rank's part of
    that parameter (empty pieces left out).
    """

    tensor: torch.Tensor
    group: int
    pieces: list[tuple[torch.nn.Parameter, int, int]]


def flats(optimizer: Any) -> list[Flat]:
    """This rank's flat partitions of a ZeRO optimizer and the parameters' pieces of each.

    Raises :class:`~ostate.errors.OstateError` for a layout it cannot read (state swapped
    out to NVMe, a partition that does not add up).
    """
    name = type(optimizer).__name__
    if name == "DeepSpeedZeroOptimizer_Stage3":
        return _stage3(optimizer)
    if name == "BF16_Optimizer":
        return _contiguous(
            optimizer, optimizer.bf16_groups, optimizer.bf16_groups_flat, optimizer.fp32_groups_flat_partition, None
        )
    return _contiguous(
        optimizer,
        optimizer.round_robin_bit16_groups,
        optimizer.bit16_groups_flat,
        optimizer.single_partition_of_fp32_groups,
        getattr(optimizer, "round_robin_bit16_padding", None),
    )


def _contiguous(optimizer: Any, groups: Any, lp_flats: Any, hp_flats: Any, paddings: Any) -> list[Flat]:
    out = []
    for i, (params, lp_flat, hp) in enumerate(zip(groups, lp_flats, hp_flats)):
        process_group = optimizer.real_dp_process_group[i]
        size = lp_flat.numel() // dist.get_world_size(group=process_group)
        begin = dist.get_rank(group=process_group) * size
        _check(hp, size, optimizer, i)
        pieces, offset = [], 0
        for j, p in enumerate(params):
            lo, hi = max(offset, begin), min(offset + p.numel(), begin + size)
            if lo < hi:
                pieces.append((p, lo - begin, hi - begin))
            offset += p.numel() + (paddings[i][j] if paddings else 0)
        out.append(Flat(hp, i, pieces))
    return out


def _stage3(optimizer: Any) -> list[Flat]:
    out = []
    for s, params in enumerate(optimizer.fp16_groups):
        hp = optimizer.fp32_partitioned_groups_flat[s]
        rank = dist.get_rank(group=optimizer.sub_group_process_groups[s])
        pieces, offset = [], 0
        for p in params:
            part = int(p.partition_numel())
            held = max(0, min(part, int(p.ds_numel) - rank * part))
            if held:
                pieces.append((p, offset, offset + held))
            offset += part
        _check(hp, offset, optimizer, s)
        out.append(Flat(hp, int(optimizer.sub_group_to_group_id[s]), pieces))
    return out


def _check(hp: torch.Tensor, expected: int, optimizer: Any, index: int) -> None:
    if hp.numel() != expected:
        raise OstateError(
            f"the monitor cannot read {type(optimizer).__name__}'s fp32 partition {index}: it holds {hp.numel()} "
            f"values where its parameters' pieces add up to {expected} (swapped out to NVMe?)",
            hint=_WHAT,
        )


def zero_checkpoint(optimizer: Any, model: torch.nn.Module | None, *, kind: str | None = None) -> Checkpoint:
    """This rank's share of a ZeRO optimizer's state as a :class:`~ostate.state.Checkpoint`, one parameter per piece.

    Every piece's weight and state tensors are views of the flat partitions; the pieces
    are named from ``model`` (the monitor requires one: unnamed pieces, ``param.<index>``,
    could not be matched across ranks) and keep the whole
    parameter's kind (``embedding``, ``weight``, ... from its whole shape). The family is
    detected from the inner optimizer's groups, or (DeepSpeed's FusedAdam and CPU Adam,
    whose groups do not say) from its ``adam_w_mode`` as the checkpoint reader takes it
    from the config.
    """
    inner = optimizer.optimizer
    names = parameter_names(model)
    groups: list[dict[str, Any]] = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in inner.param_groups
    ]
    state: dict[torch.Tensor, dict[str, Any]] = {}
    piece_names: dict[int, str] = {}
    kinds: dict[str, str] = {}
    known = module_kinds(model) if model is not None else {}
    with torch.no_grad():
        for flat in flats(optimizer):
            entry = inner.state.get(flat.tensor) or {}
            weights = flat.tensor.detach()
            for p, start, stop in flat.pieces:
                piece = weights[start:stop]
                state[piece] = {k: _cut(v, weights, start, stop) for k, v in entry.items()}
                groups[flat.group]["params"].append(piece)
                name = names.get(id(p))
                if name is not None:
                    piece_names[id(piece)] = name
                    kinds[name] = param_kind(name, whole_shape(p), known.get(name))
    view = _Pieces(groups, state)
    configured = None
    if kind is None and hasattr(inner, "adam_w_mode"):
        settings = {"optimizer": {"type": "Adam", "params": {"adam_w_mode": bool(inner.adam_w_mode)}}}
        configured = configured_kind(settings, inner.param_groups)
    checkpoint = live_checkpoint(view, piece_names, kind=kind or configured, kinds=kinds)
    if names:
        checkpoint.optimizers[0].model_order = list(names.values())
    return checkpoint


def _cut(value: Any, flat: torch.Tensor, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor) and value.shape == flat.shape:
        return value[start:stop]
    return value  # a step count, or a 0-d tensor shared by the whole flat


@dataclass
class _Pieces:
    """What :func:`~ostate.monitor.live.live_checkpoint` reads of an optimizer: its groups and state."""

    param_groups: list[dict[str, Any]]
    state: Mapping[torch.Tensor, dict[str, Any]]
