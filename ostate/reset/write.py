"""Write a checkpoint again with a strategy applied to its optimizer state, in the format it came in.

The strategies are those of :mod:`ostate.reset.strategies` (``fresh``, ``reload``, ``reset-m``,
``reset-v``, ``reset-step``, ``keep-v``, optionally for the parameters whose names match
a regex), applied by the very functions the fine-tuning harness uses
(:func:`~ostate.reset.strategies.apply_strategy`). Everything that is not the chosen
optimizers' state is kept: the other entries of a ``torch.save`` file (model,
schedulers, epoch, Lightning's loops), the other files of a checkpoint directory (byte
for byte), the model entries of a DCP checkpoint.

================  ==============================================================
format            what is written
================  ==============================================================
torch, lightning  one ``torch.save`` file, every other entry as it was read
hf-trainer,       a copy of the directory; each optimizer file holding a chosen
accelerate        optimizer written again (``optimizer.pt`` / ``optimizer.bin``, or an
                  ``optimizer_<i>/`` DCP folder)
dcp               a new DCP directory saved with ``torch.distributed.checkpoint``
                  (no process group), every entry kept, tensors written whole
deepspeed         a copy of the folder; each rank's optimizer file written again with
                  the strategy applied to its flat partitions (ZeRO 1-3,
                  BF16_Optimizer), the model-state file for ZeRO 0, the per-parameter
                  files of a universal checkpoint
safetensors       ostate's optimizer-state safetensors file
================  ==============================================================

Outputs are written atomically (a file renamed into place, or a directory filled under
a temporary name and renamed), never over or into the input. A ``fresh`` parameter's
state is written as the values a new optimizer starts from (zeros, ``step`` 0), which
torch steps exactly as it steps a missing entry, and which loaders that fill every
entry of a live optimizer (DCP, DeepSpeed) need; SGD's momentum buffer, whose fresh
form is its absence, is removed. ``keep-v`` records the age
of the kept second moment in each param group (``ostate_v_age``): the optimizer that
loads the result needs :func:`ostate.reset.strategies.attach` to honour it (docs/reset.md).

**Learning rates and schedulers.** torch's ``load_state_dict`` restores each param group's
hyperparameters, ``lr`` and ``initial_lr`` included, over those the new optimizer was built
with, and a ``LambdaLR`` built after loading takes ``initial_lr`` as its base. So the saved
``lr`` is the lr of the resumed run's first step, whatever the strategy. ``lr=`` sets it (and
``initial_lr`` where the groups have one; ``initial_lr=`` sets that apart) in every param
group; ``scheduler="drop"`` removes the saved scheduler states where the framework then
starts its own scheduler afresh (a ``torch.save`` file's top-level scheduler entries,
Lightning's ``lr_schedulers``). DeepSpeed restores the groups from its partition files (ZeRO
1-3), the model-state file (ZeRO 0) or ``zero/optimizer_state.pt`` (universal): ``lr=`` is
written there. :func:`lr_lines` says which lr the resumed run will use.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ostate.errors import OstateError
from ostate.formats import accelerate, safetensors_optim
from ostate.formats.dcp.write import rewrite_dcp
from ostate.formats.deepspeed.files import (
    DEEPSPEED_GLOBALS,
    DEEPSPEED_PICKLE,
    is_universal,
    tag_files,
)
from ostate.formats.deepspeed.write import rewrite_partitions, rewrite_universal
from ostate.formats.naming.discover import is_scheduler_state_dict
from ostate.formats.torch_save.write import rewrite_torch_file
from ostate.loading import load, selected_optimizers
from ostate.outputs import atomic_directory, check_output
from ostate.reset.strategies import AGE_MECHANISM, V_AGE_KEY, Strategy, apply_strategy, layout_of, plan
from ostate.state import Checkpoint, OptimizerState, ParamState, TensorRef

FILE_FORMATS = ("torch", "lightning", "safetensors")
DIRECTORY_FORMATS = ("hf-trainer", "accelerate", "dcp", "deepspeed", "deepspeed-universal")
SCHEDULER_CHOICES = ("keep", "drop")
# Why a format's scheduler state cannot be dropped (what its loader does without it), and what to do instead.
_NEW_SCHEDULE = (
    "keep it (scheduler keep); for a new schedule, load the model and optimizer files into your own "
    "optimizer and scheduler instead of resuming (docs/reset.md)"
)
_SCHEDULER_KEPT_BY = {
    "hf-trainer": (
        "the Trainer loads optimizer.pt only when scheduler.pt is beside it (resume_from_checkpoint "
        "would start a new optimizer), and its resume continues the run's schedule at its global step",
        _NEW_SCHEDULE,
    ),
    "accelerate": ("Accelerator.load_state reads a scheduler.bin for every scheduler it prepared", _NEW_SCHEDULE),
    "deepspeed": (
        "engine.load_checkpoint loads the saved lr_scheduler into the engine's scheduler whenever it has one "
        "(a removed state fails to load)",
        "keep it, and pass load_lr_scheduler_states=False to engine.load_checkpoint: the engine then keeps the "
        "scheduler its config built, from its start (docs/reset.md)",
    ),
}
ATTACH_NOTE = (
    "keep-v: load this state with ostate.reset.strategies.attach(optimizer) after load_state_dict, or its first "
    "steps are far too small (see docs/strategies.md)"
)


@dataclass
class OptimizerReset:
    """What happened to one optimizer: each parameter's strategy (``none``: it had no state),
    and the age of ``v`` written to each param group by ``keep-v`` (None where none was)."""

    location: str
    kind: str
    actions: dict[str, str]
    v_ages: list[float | None] = field(default_factory=list)
    # Each param group's lr and initial_lr as written (None: the group has no such key).
    lrs: list[float | None] = field(default_factory=list)
    initial_lrs: list[float | None] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many parameters got each strategy."""
        return dict(Counter(self.actions.values()))


@dataclass
class ResetResult:
    """What :func:`reset` wrote."""

    source: str
    out: str
    format: str
    strategy: str
    optimizers: list[OptimizerReset]
    notes: list[str] = field(default_factory=list)
    # The scheduler states written to ``out`` (as ``ostate.load`` reads them) and those dropped.
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    dropped_schedulers: list[str] = field(default_factory=list)
    lr_set: bool = False

    @property
    def needs_attach(self) -> bool:
        """True when a param group records an age of ``v``: load it with :func:`ostate.reset.strategies.attach`.

        Only keep-v of a family whose ``v`` is bias-corrected records one (Adamax's infinity
        norm and RMSprop's average have no bias correction: nothing to attach)."""
        aged = {"keep-v", "reset-m-ac", "reset-v-ac"}
        return any(aged & set(o.actions.values()) and o.kind in AGE_MECHANISM for o in self.optimizers)


def _records_v_age(kind: str) -> bool:
    try:
        return layout_of(kind).v_bias_corrected
    except OstateError:  # a kind without a layout takes only fresh and reload
        return False


def reset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    strategy: str | Strategy,
    *,
    params: str | None = None,
    optimizer_index: int | None = None,
    optimizer: str | None = None,
    trust_pickle: bool = False,
    format_hint: str | None = None,
    overwrite: bool = False,
    lr: float | None = None,
    initial_lr: float | None = None,
    scheduler: str = "keep",
    base_config: str | os.PathLike | None = None,
) -> ResetResult:
    """Write the checkpoint at ``source`` to ``out`` with ``strategy`` applied to its optimizer state.

    Args:
        source: any checkpoint :func:`ostate.load` reads (a file or a directory).
        out: where to write the result, in the same format (a file for a file, a
            directory for a directory); never the input, nor inside or around it.
        strategy: ``fresh``, ``reload``, ``reset-m``, ``reset-v``, ``reset-step``,
            ``keep-v``, or ``NAME:REGEX`` (see docs/strategies.md).
        params: a regex of parameter names the strategy is restricted to (the same as
            ``NAME:REGEX``; the others are reloaded).
        optimizer_index: only this optimizer (0-based) of a checkpoint that holds several;
            by default every optimizer.
        optimizer: the optimizer family, instead of detecting it.
        overwrite: replace an existing ``out`` (never ``source``).
        lr: the lr written to every param group of the chosen optimizers: the lr of the
            resumed run's first step (``load_state_dict`` restores it over the new
            optimizer's). Groups that have an ``initial_lr`` get it too, so a scheduler
            built after loading starts from it. None keeps the saved ones. In a DeepSpeed
            folder it goes wherever ``engine.load_checkpoint`` restores the groups from
            (every rank's partition file; refused for an ``elastic_checkpoint``, which keeps none).
        initial_lr: the ``initial_lr`` written to every param group (the base a
            ``LambdaLR`` built after loading takes), when it should differ from ``lr``.
        scheduler: ``keep`` the saved scheduler states, or ``drop`` them where the
            framework then starts its own scheduler afresh (a ``torch.save`` file's
            top-level scheduler entries, Lightning's ``lr_schedulers``); refused where the
            loader needs them (Trainer, accelerate, DeepSpeed folders).

    Example:
        >>> import ostate, torch, tempfile, os
        >>> m = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(m.parameters())
        >>> m(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> d = tempfile.mkdtemp(); src, dst = os.path.join(d, "ckpt.pt"), os.path.join(d, "reset.pt")
        >>> torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 7}, src)
        >>> result = reset(src, dst, "reset-v", params="bias")
        >>> result.optimizers[0].actions
        {'weight': 'reload', 'bias': 'reset-v'}
        >>> saved = torch.load(dst, weights_only=True)
        >>> float(saved["optimizer"]["state"][1]["exp_avg_sq"].abs().sum()), saved["epoch"]
        (0.0, 7)
    """
    source, out = os.fspath(source), os.fspath(out)
    chosen_strategy = _strategy(strategy, params)
    rates = _LearningRates(_positive("lr", lr), _positive("initial_lr", initial_lr))
    if scheduler not in SCHEDULER_CHOICES:
        raise OstateError(f"scheduler='{scheduler}' is not one of: {', '.join(SCHEDULER_CHOICES)}")
    checkpoint = load(
        source, trust_pickle=trust_pickle, optimizer=optimizer, format_hint=format_hint, base_config=base_config
    )
    if checkpoint.format not in FILE_FORMATS + DIRECTORY_FORMATS:
        raise OstateError(
            f"ostate cannot write checkpoints in the '{checkpoint.format}' layout",
            where=source,
            hint=f"write its optimizer state with `ostate convert {source} OUT.safetensors` and reset that",
        )
    chosen = selected_optimizers(checkpoint, optimizer_index)
    _check_regex_matches(chosen_strategy, chosen)
    _check_scheduler(checkpoint, scheduler)
    check_output(out, [source], overwrite=overwrite, out_is_directory=checkpoint.format in DIRECTORY_FORMATS)
    result = ResetResult(source, out, checkpoint.format, str(chosen_strategy), [], lr_set=rates.lr is not None)
    if scheduler == "drop":
        result.dropped_schedulers = [_scheduler_location(s) for s in checkpoint.schedulers]
    else:
        result.schedulers = list(checkpoint.schedulers)
    if checkpoint.format in ("torch", "lightning"):
        transform = _Transform(chosen, chosen_strategy, result, rates=rates)
        finish = _without_schedulers if scheduler == "drop" else None
        rewrite_torch_file(source, out, transform, trust_pickle=trust_pickle, finish=finish)
    elif checkpoint.format == "safetensors":
        _reset_safetensors(checkpoint, chosen[0], chosen_strategy, out, result, rates)
    else:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            if checkpoint.format in ("hf-trainer", "accelerate"):
                _reset_optimizer_files(source, tmp, chosen, chosen_strategy, result, trust_pickle, rates)
            elif checkpoint.format == "dcp":
                _reset_dcp(source, tmp, chosen, chosen_strategy, result, trust_pickle, rates)
            else:
                _reset_deepspeed(checkpoint, source, tmp, chosen[0], chosen_strategy, result, trust_pickle, rates)
    if result.needs_attach:
        result.notes.append(ATTACH_NOTE)
    return result


@dataclass(frozen=True)
class _LearningRates:
    """What to write to the param groups' ``lr`` and ``initial_lr`` (None: keep the saved value)."""

    lr: float | None = None
    initial_lr: float | None = None

    def apply(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            if self.lr is not None:
                group["lr"] = self.lr
                if "initial_lr" in group and self.initial_lr is None:
                    group["initial_lr"] = self.lr
            if self.initial_lr is not None:
                group["initial_lr"] = self.initial_lr


def _positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OstateError(f"{name}={value!r} is not a learning rate", hint="give a finite number > 0")
    return float(value)


def reset_state_dict(
    state_dict: Mapping[str, Any],
    optimizer: OptimizerState,
    strategy: Strategy,
    *,
    explicit_fresh: bool = True,
    lr: float | None = None,
    initial_lr: float | None = None,
) -> tuple[dict[str, Any], OptimizerReset]:
    """``state_dict`` (the saved form of ``optimizer``) with ``strategy`` applied, and the record of it.

    Parameter names come from ``optimizer`` (however ostate found them); an optimizer
    none of whose names the strategy's regex matches gets the strategy's rule for the
    other parameters throughout (``reload``; ``fresh`` for ``reload:REGEX``). A fresh
    parameter's state is written as the values a new optimizer starts from (torch steps
    it exactly as a missing entry, and loaders that need every entry, and ostate's own
    naming by shape, still find it); see :func:`~ostate.reset.strategies.apply_strategy`.
    ``lr`` and ``initial_lr`` are written to every param group as :func:`reset` does.

    Example:
        >>> import ostate, torch
        >>> m = torch.nn.Linear(2, 2); opt = torch.optim.Adam(m.parameters())
        >>> m(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> optimizer = ostate.from_state_dict(opt.state_dict(), model=m).optimizers[0]
        >>> new, record = reset_state_dict(opt.state_dict(), optimizer, Strategy("reset-m", "bias"))
        >>> record.actions, float(new["state"][1]["exp_avg"].abs().sum())
        ({'weight': 'reload', 'bias': 'reset-m'}, 0.0)
    """
    names = {p.index: p.name for p in optimizer.params}
    applied = _for_optimizer(strategy, optimizer)
    actions = plan(state_dict, applied, names=names)
    new = apply_strategy(state_dict, applied, names=names, kind=optimizer.kind, explicit_fresh=explicit_fresh)
    _LearningRates(_positive("lr", lr), _positive("initial_lr", initial_lr)).apply(new["param_groups"])
    record = OptimizerReset(
        location=optimizer.location,
        kind=optimizer.kind,
        actions={names.get(i, str(i)): a for i, a in actions.items()},
        v_ages=[g.get(V_AGE_KEY) for g in new["param_groups"]],
        lrs=[_number(g.get("lr")) for g in new["param_groups"]],
        initial_lrs=[_number(g.get("initial_lr")) for g in new["param_groups"]],
    )
    return new, record


class _Transform:
    """The transform a format writer calls for each optimizer state dict it finds, by location."""

    def __init__(
        self,
        optimizers: list[OptimizerState],
        strategy: Strategy,
        result: ResetResult,
        *,
        rates: _LearningRates,
        prefix: Any = None,
    ):
        self.by_location = {o.location: o for o in optimizers}
        self.strategy = strategy
        self.result = result
        self.rates = rates
        self.prefix = prefix  # the location an inner location has in the checkpoint (a file in a directory)

    def __call__(self, location: str, state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
        optimizer = self.by_location.get(self.prefix(location) if self.prefix else location)
        if optimizer is None:
            return None
        new, record = reset_state_dict(
            state_dict, optimizer, self.strategy, lr=self.rates.lr, initial_lr=self.rates.initial_lr
        )
        self.result.optimizers.append(record)
        return new


# ------------------------------------------------------------------------------ formats
def _reset_safetensors(
    checkpoint: Checkpoint,
    optimizer: OptimizerState,
    strategy: Strategy,
    out: str,
    result: ResetResult,
    rates: _LearningRates,
) -> None:
    if not out.lower().endswith(".safetensors"):
        raise OstateError("the input is optimizer state in safetensors; name the output *.safetensors", where=out)
    groups = [
        {**g, "params": [p.index for p in optimizer.params if p.group == i]} for i, g in enumerate(optimizer.groups)
    ]
    state = {
        p.index: {k: v.read() if isinstance(v, TensorRef) else v for k, v in p.state.items()}
        for p in optimizer.params
        if p.has_state
    }
    new, record = reset_state_dict(
        {"state": state, "param_groups": groups}, optimizer, strategy, lr=rates.lr, initial_lr=rates.initial_lr
    )
    params = [
        ParamState(
            p.index,
            p.name,
            p.name_source,
            p.group,
            p.shape,
            p.step,
            {
                k: TensorRef.of(v) if isinstance(v, torch.Tensor) else v
                for k, v in new["state"].get(p.index, {}).items()
            },
            frozen=p.frozen,
        )
        for p in optimizer.params
    ]
    written = OptimizerState(
        optimizer.location,
        optimizer.kind,
        optimizer.kind_source,
        [{k: v for k, v in g.items() if k != "params"} for g in new["param_groups"]],
        params,
    )
    origin = checkpoint.metadata.get("source") or checkpoint.path
    safetensors_optim.write(written, out, source=f"{origin}, reset with {strategy}")
    result.optimizers.append(record)


def _reset_optimizer_files(
    source: str,
    target: str,
    chosen: list[OptimizerState],
    strategy: Strategy,
    result: ResetResult,
    trust_pickle: bool,
    rates: _LearningRates,
) -> None:
    """A Trainer or accelerate directory: copy it, then write each optimizer file holding a chosen optimizer."""
    wanted = {o.location for o in chosen}
    rewritten = []
    for src in accelerate.optimizer_sources(source):
        if any(loc == src.name or loc.startswith((src.name + ":", src.name + "/")) for loc in wanted):
            rewritten.append(src)
    names = {src.name for src in rewritten}
    shutil.copytree(
        source,
        target,
        symlinks=True,
        dirs_exist_ok=True,
        ignore=lambda folder, entries: [e for e in entries if folder == source and e in names],
    )
    for src in rewritten:
        transform = _Transform(
            chosen, strategy, result, rates=rates, prefix=lambda inner, s=src: accelerate.located(s, inner)
        )
        if src.is_dcp:
            rewrite_dcp(src.path, os.path.join(target, src.name), transform, trust_pickle=trust_pickle)
        else:
            rewrite_torch_file(src.path, os.path.join(target, src.name), transform, trust_pickle=trust_pickle)


def _reset_dcp(
    source: str,
    target: str,
    chosen: list[OptimizerState],
    strategy: Strategy,
    result: ResetResult,
    trust_pickle: bool,
    rates: _LearningRates,
) -> None:
    rewrite_dcp(source, target, _Transform(chosen, strategy, result, rates=rates), trust_pickle=trust_pickle)


def _reset_deepspeed(
    checkpoint: Checkpoint,
    source: str,
    target: str,
    optimizer: OptimizerState,
    strategy: Strategy,
    result: ResetResult,
    trust_pickle: bool,
    rates: _LearningRates,
) -> None:
    """A DeepSpeed folder: copy it, then write the chosen tag's optimizer files (see deepspeed_write).

    ``rates`` go where ``engine.load_checkpoint`` restores the param groups from: the model-state
    file's optimizer for ZeRO 0, every rank's partition file for ZeRO 1-3 and the BF16_Optimizer,
    ``zero/optimizer_state.pt`` for a universal checkpoint."""
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    tag_dir = checkpoint.path
    target_tag = os.path.normpath(os.path.join(target, os.path.relpath(tag_dir, source)))
    files = tag_files(tag_dir)
    if not is_universal(tag_dir) and not files.optim_files:  # ZeRO disabled: the optimizer is in the model file
        model_file = files.model_files[0]
        transform = _Transform([optimizer], strategy, result, rates=rates)
        rewrite_torch_file(
            model_file,
            os.path.join(target_tag, os.path.basename(model_file)),
            transform,
            trust_pickle=trust_pickle,
            allowed_globals=DEEPSPEED_GLOBALS,
            pickle_module=DEEPSPEED_PICKLE,
        )
        return
    names = {p.index: p.name for p in optimizer.params}
    applied = _for_optimizer(strategy, optimizer)
    synthetic = {
        "state": {p.index: p.state for p in optimizer.params if p.has_state},
        "param_groups": [
            {**g, "params": [p.index for p in optimizer.params if p.group == i]} for i, g in enumerate(optimizer.groups)
        ],
    }
    actions = {names[i]: a for i, a in plan(synthetic, applied, names=names).items()}

    def apply_action(sub: Mapping[str, Any], action: str) -> Mapping[str, Any]:
        return apply_strategy(sub, action, kind=optimizer.kind, explicit_fresh=True)

    writer = rewrite_universal if is_universal(tag_dir) else rewrite_partitions
    trained_groups = [g for i, g in enumerate(optimizer.groups) if not optimizer.is_frozen_group(i)]
    edit_groups = rates.apply if rates.lr is not None or rates.initial_lr is not None else None
    writer(
        tag_dir, target_tag, actions, apply_action, trained_groups, trust_pickle=trust_pickle, edit_groups=edit_groups
    )
    written = [dict(g) for g in trained_groups]
    rates.apply(written)
    result.optimizers.append(
        OptimizerReset(
            optimizer.location,
            optimizer.kind,
            actions,
            lrs=[_number(g.get("lr")) for g in written],
            initial_lrs=[_number(g.get("initial_lr")) for g in written],
        )
    )


# ------------------------------------------------------------------- learning rates, schedulers
def _check_scheduler(checkpoint: Checkpoint, scheduler: str) -> None:
    if scheduler != "drop" or not checkpoint.schedulers:
        return
    kept_by = _SCHEDULER_KEPT_BY.get("deepspeed" if checkpoint.format.startswith("deepspeed") else checkpoint.format)
    if kept_by is not None:
        why, hint = kept_by
        raise OstateError(
            f"cannot drop the scheduler state of a {checkpoint.format} checkpoint: {why}",
            where=checkpoint.path,
            hint=hint,
        )
    if checkpoint.format not in ("torch", "lightning"):
        raise OstateError(
            f"ostate reset cannot drop scheduler states from a {checkpoint.format} checkpoint",
            where=checkpoint.path,
            hint="keep them, and build your scheduler anew after loading",
        )
    nested = [
        location
        for location in map(_scheduler_location, checkpoint.schedulers)
        if not location.startswith("lr_schedulers[") and ("." in location or "[" in location)
    ]
    if checkpoint.format == "torch" and nested:
        raise OstateError(
            f"the scheduler state at '{nested[0]}' is not a top-level entry; ostate drops only those",
            where=checkpoint.path,
            hint="keep the schedulers and do not load them",
        )


def _without_schedulers(obj: Any) -> Any:
    """The loaded object without its scheduler states: Lightning's ``lr_schedulers`` emptied (Lightning then
    restores none and keeps the ones ``configure_optimizers`` built), a torch file's top-level scheduler entries removed."""
    if not isinstance(obj, Mapping):
        return obj
    out = dict(obj)
    for key, value in obj.items():
        if key == "lr_schedulers" and isinstance(value, list):
            out[key] = []
        elif is_scheduler_state_dict(value):
            del out[key]
    return out


def _scheduler_location(scheduler: Mapping[str, Any]) -> str:
    """Where a scheduler state of ``Checkpoint.schedulers`` was found (the readers' ``_location``)."""
    return str(scheduler.get("_location", "?"))


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def lr_lines(result: ResetResult) -> list[str]:
    """What the resumed run's learning rate will be, in words: one line per optimizer, and one per scheduler kept.

    Example:
        >>> r = ResetResult("a.pt", "b.pt", "torch", "fresh", [OptimizerReset("optimizer", "adamw", {}, [], [1e-4], [3e-4])])
        >>> print("\\n".join(lr_lines(r)))
        first step's lr after load_state_dict: 0.0001 (optimizer at 'optimizer', as saved: it replaces the lr the new optimizer was built with)
        a LambdaLR built after loading takes initial_lr 0.0003 as its base (not the lr the optimizer was built with)
    """

    def listed(values: list[float | None]) -> str:
        shown = [f"{v:g}" if v is not None else "-" for v in values]
        return shown[0] if len(set(shown)) == 1 else ", ".join(f"group {i} {v}" for i, v in enumerate(shown))

    how = "as set" if result.lr_set else "as saved: it replaces the lr the new optimizer was built with"
    loader = "engine.load_checkpoint" if result.format.startswith("deepspeed") else "load_state_dict"
    lines = []
    for o in result.optimizers:
        if not o.lrs:
            continue
        lines.append(f"first step's lr after {loader}: {listed(o.lrs)} (optimizer at '{o.location}', {how})")
        if any(v is not None for v in o.initial_lrs):
            lines.append(
                f"a LambdaLR built after loading takes initial_lr {listed(o.initial_lrs)} as its base "
                "(not the lr the optimizer was built with)"
            )
    for s in result.schedulers:
        base = s.get("base_lrs")
        lines.append(
            f"scheduler state kept at '{_scheduler_location(s)}' (last_epoch={s.get('last_epoch')}"
            + (f", base_lrs={listed([_number(b) for b in base])}" if isinstance(base, (list, tuple)) else "")
            + "): loading it continues the saved schedule, which sets the lr from its first step() on"
        )
    for location in result.dropped_schedulers:
        lines.append(f"scheduler state dropped at '{location}': a scheduler built for the resumed run starts afresh")
    return lines


# ------------------------------------------------------------------------------ choices
def _strategy(strategy: str | Strategy, params: str | None) -> Strategy:
    parsed = Strategy.parse(strategy)
    if params is None:
        return parsed
    if parsed.params is not None:
        raise OstateError(f"the strategy '{parsed}' already names its parameters; drop params= or the ':REGEX'")
    return Strategy(parsed.name, params)


# The readers' warnings that say why parameters were left unnamed.
_NAMING_WARNING = re.compile(r"order was not rebuilt|were not named|left unnamed|were not used for names")


def _check_regex_matches(strategy: Strategy, optimizers: list[OptimizerState]) -> None:
    if strategy.params is None:
        return
    pattern = re.compile(strategy.params)
    unnamed = [p.name for o in optimizers for p in o.params if p.name_source == "none"]
    if unnamed:
        # Why the names are missing, as the reader said it (transformers not installed, no base model for
        # an adapter, shapes that fit more than one way), before the general advice.
        why = [w for o in optimizers for w in o.warnings if _NAMING_WARNING.search(w)]
        raise OstateError(
            f"cannot choose parameters by name: {len(unnamed)} parameters have no name (e.g. {unnamed[0]})",
            hint=(f"{why[0]}; " if why else "")
            + "`ostate inspect` shows how names were looked for; "
            + ("" if why else "save the model beside the optimizer, or ")
            + "apply the strategy to every parameter",
        )
    if not any(pattern.search(p.name) for o in optimizers for p in o.params):
        sample = ", ".join(p.name for o in optimizers for p in o.params[:6])
        raise OstateError(f"strategy '{strategy}': the regex matches no parameter name", hint=f"names: {sample}, ...")


def _for_optimizer(strategy: Strategy, optimizer: OptimizerState) -> Strategy:
    """The strategy for one optimizer: as given, or its rule for the unmatched parameters when the
    regex matches none of this optimizer's names (another optimizer of the checkpoint has them)."""
    if strategy.params is None:
        return strategy
    if any(re.search(strategy.params, p.name) for p in optimizer.params):
        return strategy
    return Strategy("fresh" if strategy.name == "reload" else "reload")
