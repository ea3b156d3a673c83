"""Write a DeepSpeed checkpoint again with a strategy applied to its optimizer state, in DeepSpeed's own layout.

ZeRO keeps each param group's (stage 3: each sub-group's) optimizer state as one flat
tensor per state key, cut into the ranks' partitions (:mod:`ostate.formats.deepspeed.zero`),
with one ``step`` for the whole flat group. The strategies of :mod:`ostate.reset.strategies`
act on moments coordinate by coordinate and on the step per group, so they apply to
the partitions directly:

- a flat group whose parameters all get the same strategy is transformed whole, on
  every rank, as a one-parameter torch state dict (its step, moments and param group);
- a flat group whose parameters get different strategies can only mix ``reload``,
  ``reset-m`` and ``reset-v``: each parameter's slices of each rank's partition are
  transformed as a one-parameter state dict of those slices. Strategies that change
  the step or the age of ``v`` (``fresh``, ``reset-step``, ``keep-v``) must select whole
  param groups, because the group's parameters share one step (DeepSpeed's loaders
  require it); anything else is refused.

The transforms are the caller's (``apply_action``: a small torch state dict and a
strategy name in, the new state dict out); this module only cuts and pastes. Files are
read with the stand-in classes of :mod:`ostate.formats.deepspeed.files` and written
back under DeepSpeed's class names, so DeepSpeed loads them as its own; the model
state files and everything else in the folder are copied unchanged.

Universal checkpoints (``ds_to_universal``) keep one file per parameter and state key,
so each parameter is transformed on its own (the step rule above still holds).

``edit_groups`` (the caller's, e.g. setting ``lr``) changes the saved param groups in every
place DeepSpeed 0.19 restores them from on ``load_checkpoint``: each rank's
``optimizer_state_dict`` → ``base_optimizer_state`` → ``param_groups`` (ZeRO 1-2,
BF16_Optimizer: ``self.optimizer.load_state_dict`` of it), ``optimizer_state_dict`` →
``optimizer_state_dict`` → ``param_groups`` (ZeRO 3, one group per sub-group), and
``zero/optimizer_state.pt``'s ``param_groups`` (universal; ZeRO 3: under
``optimizer_state_dict``). An ``elastic_checkpoint`` keeps no param groups and DeepSpeed
restores none from it, so edits are refused there.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch

from ostate.errors import OstateError
from ostate.formats.deepspeed.common import zero_stage
from ostate.formats.deepspeed.files import (
    DEEPSPEED_PICKLE,
    UNIVERSAL_STATE,
    is_universal,
    load_file,
    tag_files,
)
from ostate.formats.deepspeed.zero import Slot, stage_1_2_slots, stage_3_slots, user_groups_of_subgroups

# A one-parameter torch optimizer state dict and a strategy name -> the new state dict.
ApplyAction = Callable[[Mapping[str, Any], str], Mapping[str, Any]]
# Strategies that leave a parameter as saved.
UNCHANGED = ("reload", "none")
# Strategies that change the step or the age of v, which a flat group's parameters share.
GROUP_WIDE = ("fresh", "reset-step", "keep-v")
# A change of the saved param groups (hyperparameters only; their "params" are kept), in place.
EditGroups = Callable[[list[dict[str, Any]]], None]


def rewrite_partitions(
    tag_dir: str,
    target_tag_dir: str,
    actions: Mapping[str, str],
    apply_action: ApplyAction,
    groups: Sequence[Mapping[str, Any]],
    *,
    trust_pickle: bool = False,
    edit_groups: EditGroups | None = None,
) -> list[str]:
    """Write the transformed optimizer files of a ZeRO (1-3) or BF16_Optimizer tag folder into
    ``target_tag_dir`` (which already holds a copy of the folder); returns the files written.

    ``actions`` maps each trainable parameter's name to its strategy; ``groups`` are the
    param groups' hyperparameters (used where the files keep none: ``elastic_checkpoint``);
    ``edit_groups`` changes every rank's saved param groups after the strategy.
    """
    files = tag_files(tag_dir)
    model_states = load_file(files.model_files[0], trust_pickle=trust_pickle)
    shards = [load_file(f, trust_pickle=trust_pickle) for f in files.optim_files]
    states = [shard["optimizer_state_dict"] for shard in shards]
    stage = zero_stage(states[0], model_states)
    if edit_groups is not None and stage != 3 and isinstance(states[0].get("base_optimizer_state"), list):
        raise OstateError(
            "this DeepSpeed checkpoint (elastic_checkpoint) keeps no param groups: DeepSpeed restores no "
            "learning rate from it",
            where=tag_dir,
            hint="leave out lr/initial_lr: the resumed engine runs with the lr of its config (or set it after "
            "load_checkpoint)",
        )
    param_shapes = model_states["param_shapes"]
    if stage == 3:
        inner = [s["optimizer_state_dict"] for s in states]
        slots = stage_3_slots(param_shapes, len(shards))
        owner = user_groups_of_subgroups(inner[0]["param_groups"], len(param_shapes), files.optim_files[0])
    else:
        slots = stage_1_2_slots(param_shapes, states[0].get("param_alignment_paddings"))
        owner = list(range(len(param_shapes)))
    _check_group_wide(slots, owner, actions)

    written = []
    for rank, (shard, state) in enumerate(zip(shards, states)):
        new_state = _rewrite_rank(
            state,
            rank,
            stage,
            slots,
            owner,
            actions,
            apply_action,
            groups,
            [_flat_lengths(s, stage, len(param_shapes)) for s in states],
            edit_groups,
        )
        if new_state is None:
            continue
        target = os.path.join(target_tag_dir, os.path.basename(files.optim_files[rank]))
        torch.save({**shard, "optimizer_state_dict": new_state}, target, pickle_module=DEEPSPEED_PICKLE)
        written.append(target)
    return written


def _rewrite_rank(
    state: Mapping[str, Any],
    rank: int,
    stage: int,
    slots: list[Slot],
    owner: list[int],
    actions: Mapping[str, str],
    apply_action: ApplyAction,
    groups: Sequence[Mapping[str, Any]],
    lengths: list[list[int]],
    edit_groups: EditGroups | None = None,
) -> dict | None:
    """One rank's new ``optimizer_state_dict``, or None when nothing on it changes."""
    if stage == 3:
        torch_sd = state["optimizer_state_dict"]
        flat_states, saved_groups = dict(torch_sd["state"]), [dict(g) for g in torch_sd["param_groups"]]
    else:
        base = state["base_optimizer_state"]
        elastic = isinstance(base, list)  # elastic_checkpoint: per-group entries, no param groups
        flat_states = dict(enumerate(base)) if elastic else dict(base["state"])
        saved_groups = [dict(g) for g in groups] if elastic else [dict(g) for g in base["param_groups"]]
    originals = [dict(g) for g in saved_groups]
    changed = False
    for flat_group in range(len(owner)):
        members = [s for s in slots if s.flat_group == flat_group]
        chosen = {actions.get(s.name, "reload") for s in members}
        if chosen <= set(UNCHANGED) or flat_group not in flat_states or not flat_states[flat_group]:
            continue
        group = saved_groups[owner[flat_group]]
        original = originals[owner[flat_group]]  # several sub-groups of one group: each from the saved values
        if len(chosen) == 1:
            new, new_group = _whole(flat_states[flat_group], original, chosen.pop(), apply_action)
            before = {k: v for k, v in group.items() if k != "params"}
            if stage != 3 and isinstance(state["base_optimizer_state"], list) and new_group != before:
                raise OstateError(
                    "keep-v cannot be written to an elastic DeepSpeed checkpoint: it keeps no "
                    "param groups to record the age of v in"
                )
            params = group.get("params")
            group.clear()
            group.update(new_group)
            if params is not None:
                group["params"] = params
        else:
            starts = _starts(lengths, rank, flat_group, stage)
            new = _sliced(flat_states[flat_group], original, members, actions, apply_action, starts)
        flat_states[flat_group] = new
        changed = True
    if edit_groups is not None:  # never elastic (refused above): these groups are the saved ones
        edit_groups(saved_groups)
        changed = changed or saved_groups != originals
    if not changed:
        return None
    if stage == 3:
        torch_sd = state["optimizer_state_dict"]
        for saved, new_group in zip(torch_sd["param_groups"], saved_groups):
            new_group["params"] = saved["params"]
        return {**state, "optimizer_state_dict": {**torch_sd, "state": flat_states, "param_groups": saved_groups}}
    base = state["base_optimizer_state"]
    if isinstance(base, list):
        return {**state, "base_optimizer_state": [flat_states[g] for g in range(len(base))]}
    for saved, new_group in zip(base["param_groups"], saved_groups):
        new_group["params"] = saved["params"]
    return {**state, "base_optimizer_state": {**base, "state": flat_states, "param_groups": saved_groups}}


def _whole(
    flat_state: Mapping[str, Any], group: Mapping[str, Any], action: str, apply_action: ApplyAction
) -> tuple[dict, dict]:
    """A whole flat group transformed as one parameter: its new state and its new param group."""
    sub = {"state": {0: dict(flat_state)}, "param_groups": [{**group, "params": [0]}]}
    new = apply_action(sub, action)
    state = dict(new["state"].get(0, {}))
    if not state:
        raise OstateError(
            f"strategy '{action}' would remove this optimizer's state entirely, which a DeepSpeed "
            "checkpoint cannot hold",
            hint="DeepSpeed restores every saved key into its optimizer",
        )
    return state, {k: v for k, v in new["param_groups"][0].items() if k != "params"}


def _sliced(
    flat_state: Mapping[str, Any],
    group: Mapping[str, Any],
    members: list[Slot],
    actions: Mapping[str, str],
    apply_action: ApplyAction,
    starts: Callable[[Slot], list[tuple[int, int]]],
) -> dict:
    """A flat group whose parameters get different elementwise strategies: each one's slices transformed."""
    out = dict(flat_state)
    copied: set[str] = set()
    flat_keys = [k for k, v in flat_state.items() if isinstance(v, torch.Tensor) and v.dim() >= 1]
    for slot in members:
        action = actions.get(slot.name, "reload")
        if action in UNCHANGED:
            continue
        for begin, end in starts(slot):
            piece = {k: out[k][begin:end] for k in flat_keys}
            scalars = {k: v for k, v in flat_state.items() if k not in flat_keys}
            sub = {"state": {0: {**scalars, **piece}}, "param_groups": [{**group, "params": [0]}]}
            new = apply_action(sub, action)["state"].get(0, {})
            for key in flat_keys:
                if key in new and new[key] is not piece[key]:
                    if key not in copied:  # never write into the loaded (memory-mapped) tensor
                        out[key] = out[key].clone()
                        copied.add(key)
                    out[key][begin:end] = new[key]
    return out


def _flat_lengths(state: Mapping[str, Any], stage: int, count: int) -> list[int]:
    """The length of each flat group's state tensors on one rank (0 for a group without state)."""
    if stage == 3:
        entries = state["optimizer_state_dict"]["state"]
    else:
        base = state["base_optimizer_state"]
        entries = dict(enumerate(base)) if isinstance(base, list) else base["state"]
    out = []
    for g in range(count):
        tensors = [v for v in (entries.get(g) or {}).values() if isinstance(v, torch.Tensor) and v.dim() >= 1]
        out.append(tensors[0].numel() if tensors else 0)
    return out


def _starts(
    lengths: list[list[int]], rank: int, flat_group: int, stage: int
) -> Callable[[Slot], list[tuple[int, int]]]:
    """For a parameter, the ``(begin, end)`` ranges of its values within this rank's flat tensor."""
    mine = lengths[rank][flat_group]
    if stage == 3:
        return lambda slot: [(slot.offset, min(slot.offset + slot.length, mine))] if slot.offset < mine else []
    start = sum(lengths[r][flat_group] for r in range(rank))  # this rank's piece in the joined buffer

    def ranges(slot: Slot) -> list[tuple[int, int]]:
        begin, end = max(slot.offset, start), min(slot.offset + slot.length, start + mine)
        return [(begin - start, end - start)] if begin < end else []

    return ranges


def _check_group_wide(slots: list[Slot], owner: list[int], actions: Mapping[str, str]) -> None:
    by_group: dict[int, set[str]] = {}
    for slot in slots:
        by_group.setdefault(owner[slot.flat_group], set()).add(actions.get(slot.name, "reload"))
    for group, chosen in by_group.items():
        wide = chosen & set(GROUP_WIDE)
        if wide and len(chosen) > 1:
            raise OstateError(
                f"strategy '{sorted(wide)[0]}' would apply to only some parameters of param group {group}, whose "
                "parameters share one step in a DeepSpeed checkpoint",
                hint="choose params= to select whole param groups, or use reset-m / reset-v, which act on "
                "each coordinate",
            )


def rewrite_universal(
    tag_dir: str,
    target_tag_dir: str,
    actions: Mapping[str, str],
    apply_action: ApplyAction,
    groups: Sequence[Mapping[str, Any]],
    *,
    trust_pickle: bool = False,
    edit_groups: EditGroups | None = None,
) -> list[str]:
    """Write the transformed per-parameter files of a universal checkpoint into ``target_tag_dir``
    (a copy of the folder); returns the files written. ``edit_groups`` changes the param groups
    of ``zero/optimizer_state.pt`` (those DeepSpeed sets the live groups' hyperparameters from)."""
    if not is_universal(tag_dir):
        raise OstateError("not a DeepSpeed universal checkpoint", where=tag_dir)
    files = tag_files(tag_dir)
    model_states = load_file(files.model_files[0], trust_pickle=trust_pickle)
    settings_path = os.path.join(tag_dir, UNIVERSAL_STATE)
    settings = load_file(settings_path, trust_pickle=trust_pickle)
    stage = zero_stage(settings, model_states)
    param_shapes = model_states["param_shapes"]
    inner = settings.get("optimizer_state_dict") or {}
    saved_groups = (
        inner.get("param_groups") if stage == 3 and inner.get("param_groups") else settings.get("param_groups")
    )
    if stage == 3:
        owner = user_groups_of_subgroups(saved_groups or [], len(param_shapes), settings_path)
    else:
        owner = list(range(len(param_shapes)))
    slots = stage_1_2_slots(param_shapes)
    _check_group_wide(slots, owner, actions)
    if stage == 3 and any(a in GROUP_WIDE for a in actions.values()):
        raise OstateError(
            "a stage 3 universal checkpoint keeps its steps per sub-group in zero/optimizer_state.pt; "
            "fresh, reset-step and keep-v are not written to it",
            where=tag_dir,
            hint="apply the strategy to the ZeRO checkpoint, then run ds_to_universal",
        )
    if edit_groups is not None and not saved_groups:
        raise OstateError(
            f"this universal checkpoint's {UNIVERSAL_STATE} keeps no param groups: DeepSpeed restores no "
            "learning rate from it",
            where=tag_dir,
            hint="leave out lr/initial_lr and set the lr in the DeepSpeed config",
        )
    new_groups = [dict(g) for g in (saved_groups or groups)]
    written = []
    for slot in slots:
        action = actions.get(slot.name, "reload")
        if action in UNCHANGED:
            continue
        folder = os.path.join(tag_dir, "zero", slot.name)
        saved = {
            name[:-3]: load_file(os.path.join(folder, name), trust_pickle=trust_pickle)
            for name in sorted(os.listdir(folder))
            if name.endswith(".pt") and name != "fp32.pt"
        }
        values = {key: (obj["param"] if isinstance(obj, Mapping) else obj) for key, obj in saved.items()}
        group = new_groups[owner[slot.flat_group]]
        original = (saved_groups or groups)[owner[slot.flat_group]]  # each parameter from the saved values
        sub = {"state": {0: values}, "param_groups": [{**original, "params": [0]}]}
        new = apply_action(sub, action)
        state = new["state"].get(0, {})
        for key, obj in saved.items():
            value = state.get(key)
            if value is None:
                raise OstateError(
                    f"strategy '{action}' would remove '{key}' of '{slot.name}', which a universal "
                    "checkpoint cannot leave out",
                    where=folder,
                )
            if value is values[key]:
                continue
            target = os.path.join(target_tag_dir, "zero", slot.name, f"{key}.pt")
            torch.save(
                {**obj, "param": value} if isinstance(obj, Mapping) else value, target, pickle_module=DEEPSPEED_PICKLE
            )
            written.append(target)
        new_group = {k: v for k, v in new["param_groups"][0].items() if k != "params"}
        group.update(new_group)
        for key in set(group) - set(new_group) - {"params"}:
            del group[key]
    if edit_groups is not None:
        edit_groups(new_groups)
    if saved_groups is not None and any(dict(a) != dict(b) for a, b in zip(saved_groups, new_groups)):
        if stage == 3:
            settings = {**settings, "optimizer_state_dict": {**inner, "param_groups": new_groups}}
        else:
            settings = {**settings, "param_groups": new_groups}
        target = os.path.join(target_tag_dir, UNIVERSAL_STATE)
        torch.save(settings, target, pickle_module=DEEPSPEED_PICKLE)
        written.append(target)
    return written
