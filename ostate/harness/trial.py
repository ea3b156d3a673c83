"""One trial: load the source, build the optimizer, apply the strategy, fine-tune, evaluate.

:func:`run_trial` is the whole procedure, top to bottom; everything it calls is a
swappable part (the task's callables, the strategy, the schedule).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ostate.errors import OstateError
from ostate.harness.device import AUTO, device_key, resolve_device, to_device
from ostate.harness.metrics import (
    ALL,
    Record,
    evaluation_records,
    gradient_to_second_moment,
    median_effective_lr,
    rms_by_group,
)
from ostate.harness.source import Source, load_source
from ostate.harness.task import Task
from ostate.harness.transfer import load_weights, optimizer_like_source, transfer_state
from ostate.reset.strategies import Strategy, apply_strategy, attach, layout_or_none, optimizer_kind, plan

SCHEDULES = ("cosine", "constant", "wsd", "continue")
COSINE_FLOOR = 0.1
WSD_DECAY = 0.2  # warmup-stable-decay: the last fifth of the steps decays linearly to the floor


@dataclass(frozen=True)
class TrialConfig:
    """One point of the sweep.

    ``lr`` is the peak learning rate, reached after ``warmup`` steps of linear warmup;
    then ``schedule``: ``cosine`` decays to a tenth of the peak at the last step,
    ``constant`` stays at the peak, ``wsd`` (warmup-stable-decay, Hägele et al. 2024)
    stays at the peak and decays linearly to a tenth over the last fifth of the steps,
    ``continue`` ignores ``lr`` and ``warmup`` and keeps each group at the learning rate
    the source's optimizer had reached (its saved ``lr``): the "carry on as if nothing
    changed" baseline. The model is evaluated before the first step and every
    ``eval_every`` steps (and after the last).

    Knobs: ``grad_clip`` clips the gradients' global norm (HF Trainer clips at 1.0);
    ``beta2`` sets the fine-tuning optimizer's second beta (LLM practice: 0.95);
    ``replay`` is the fraction of steps that train on a batch of *source* data
    (the task's ``source_batches``) instead of target data, drawn per step with the
    trial's seed.
    """

    strategy: str
    seed: int
    lr: float
    warmup: int = 0
    batch_size: int = 32
    steps: int = 200
    eval_every: int = 20
    schedule: str = "cosine"
    grad_clip: float = 0.0
    beta2: float = 0.0
    replay: float = 0.0

    def __post_init__(self) -> None:
        Strategy.parse(self.strategy)
        if self.schedule not in SCHEDULES:
            raise OstateError(f"unknown schedule '{self.schedule}'", hint=f"choose one of: {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1 or self.warmup < 0 or not self.lr > 0:
            raise OstateError(
                f"invalid trial settings: {self}", hint="steps, eval_every and batch_size >= 1; warmup >= 0; lr > 0"
            )
        if self.grad_clip < 0 or not 0 <= self.beta2 < 1 or not 0 <= self.replay <= 1:
            raise OstateError(
                f"invalid trial settings: {self}",
                hint="grad_clip >= 0 (0: no clipping); beta2 in [0, 1) (0: the optimizer's own); replay in [0, 1]",
            )

    def trial_id(self, task: str, source_fingerprint: str, context: Mapping[str, Any] | None = None) -> str:
        """A stable identifier of this trial of this task on this source (16 hex digits), with
        ``context`` (:func:`trial_context`: the task's code, the optimizer's hyperparameters,
        torch threads and version): everything that changes the trial's numbers."""
        fields = asdict(self)
        for knob in ("grad_clip", "beta2", "replay"):  # off: the id of a trial from before the knobs
            if not fields[knob]:
                del fields[knob]
        text = json.dumps(
            {"task": task, "source": source_fingerprint, **fields, **dict(context or {})}, sort_keys=True, default=str
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_code_hash(task: Task) -> str:
    """A hash of the source code of the modules that define the task's parts (12 hex digits):
    a change of the task's code gives its trials new ids (``''`` for parts without a file)."""
    digest = hashlib.sha256()
    files: set[str] = set()
    for part in (
        task.model,
        task.train_batches,
        task.loss,
        task.evaluate,
        task.optimizer,
        task.source_evaluate,
        task.source_batches,
        task.validate,
        task.pretrain,
        task.trainer,
    ):
        while isinstance(part, functools.partial):
            part = part.func
        module = sys.modules.get(getattr(part, "__module__", "") or "")
        try:
            path = inspect.getsourcefile(module) if module is not None else None
        except TypeError:
            path = None
        if path:
            files.add(path)
    for path in sorted(files):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12] if files else ""


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer | None) -> list[dict[str, Any]]:
    """The fine-tuning optimizer's param groups without their parameters and learning rates
    (the hyperparameters a trial id covers: betas, eps, weight decay, ...); none for a trainer
    task, whose trainer builds its optimizer."""
    if optimizer is None:
        return []
    skip = {"params", "param_names", "lr", "initial_lr"}
    return [{k: v for k, v in group.items() if k not in skip} for group in optimizer.param_groups]


def trial_context(
    task: Task, optimizer: torch.optim.Optimizer | None, threads: int, device: torch.device | None = None
) -> dict[str, Any]:
    """What besides its settings changes a trial's numbers: the task's code, the optimizer's
    hyperparameters (before a trial's ``beta2``), torch's thread count and version, and the
    device type unless it is the CPU (:func:`~ostate.harness.device.device_key`)."""
    return {
        "task_code": task_code_hash(task),
        "optimizer_hyperparameters": optimizer_hyperparameters(optimizer),
        "threads": threads,
        "torch_version": torch.__version__,
        **device_key(device or torch.device("cpu")),
    }


def lr_factor(step: int, config: TrialConfig) -> float:
    """The fraction of the peak lr at 1-based ``step``.

    Example:
        >>> c = TrialConfig("reload", 0, 1e-3, warmup=4, steps=10)
        >>> [round(lr_factor(s, c), 3) for s in (1, 4, 5, 10)]
        [0.25, 1.0, 1.0, 0.1]
        >>> w = TrialConfig("reload", 0, 1e-3, steps=20, schedule="wsd")
        >>> [round(lr_factor(s, w), 3) for s in (1, 16, 17, 20)]
        [1.0, 1.0, 0.775, 0.1]
    """
    if config.schedule == "continue":
        return 1.0
    if step <= config.warmup:
        return step / config.warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "wsd":
        decay = max(1, round(WSD_DECAY * (config.steps - config.warmup)))
        start = config.steps - decay  # the last stable step
        if step <= start:
            return 1.0
        return 1.0 - (1.0 - COSINE_FLOOR) * (step - start) / decay
    progress = (step - config.warmup - 1) / max(1, config.steps - config.warmup - 1)
    return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrialResult:
    """A finished trial: its settings, its records and what happened (``info``)."""

    trial_id: str
    task: str
    config: TrialConfig
    records: list[Record]
    info: dict[str, Any] = field(default_factory=dict)


def run_trial(
    task: Task,
    source: Source | str,
    config: TrialConfig,
    *,
    threads: int | None = None,
    device: str | torch.device | None = AUTO,
) -> TrialResult:
    """Fine-tune ``task``'s model from ``source`` under ``config``; every record in the result.

    With the same ``threads`` (torch's intra-op threads) the result is the same on every run.
    ``device``: where the model trains (:mod:`ostate.harness.device`; ``auto``: the GPU when
    there is one); a trainer task's trainer picks its own.
    ``info`` holds what happened, with ``g2_over_v``: each parameter's new gradient square
    over its loaded second moment at the first step (:func:`gradient_to_second_moment`).
    """
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    source = load_source(source, optimizer_index=task.source_optimizer) if isinstance(source, str) else source
    if task.trainer is not None:  # the user's own Trainer runs the trial (start-up time: imported when used)
        from ostate.harness.trainers import run_with_trainer

        context = trial_context(task, None, torch.get_num_threads())
        done = run_with_trainer(task, source.path, config, evaluate)
        done["info"].update(context)
        return TrialResult(config.trial_id(task.name, source.fingerprint, context), task.name, config, **done)
    if config.replay and task.source_batches is None:
        raise OstateError(
            f"replay {config.replay:g} needs source data, but task '{task.name}' has no source_batches",
            hint="give the task source_batches(batch_size, generator) (TOML: source_batches = 'module:function')",
        )

    on = resolve_device(device)
    model = task.model()
    new_weights = load_weights(model, source)
    model.to(on)  # before the optimizer: torch puts the loaded state beside the parameters
    optimizer = (task.optimizer or optimizer_like_source(source))(model, config.lr)
    context = trial_context(task, optimizer, torch.get_num_threads(), on)
    if config.beta2:
        for group in optimizer.param_groups:
            if "betas" not in group:
                raise OstateError(f"beta2 {config.beta2:g}: the fine-tuning optimizer has no betas")
            group["betas"] = (group["betas"][0], config.beta2)
    kind = optimizer_kind(optimizer)
    transfer = transfer_state(source, optimizer, model)
    actions = plan(transfer.state_dict, config.strategy, names=transfer.names)
    optimizer.load_state_dict(
        apply_strategy(
            transfer.state_dict, config.strategy, names=transfer.names, kind=kind, new_groups=transfer.new_groups
        )
    )
    attach(optimizer)
    if config.schedule == "continue":  # each group at the saved lr of the source group its parameters were in
        source_lrs = [float(g["lr"]) for g in source.optimizer_state["param_groups"]]
        group_of, name_of_param = source.group_by_name(), {id(p): n for n, p in model.named_parameters()}
        peak_lrs = []
        for group in optimizer.param_groups:
            saved = [group_of[name_of_param[id(p)]] for p in group["params"] if name_of_param[id(p)] in group_of]
            peak_lrs.append(source_lrs[saved[0]] if saved else source_lrs[0])
    else:
        peak_lrs = [group["lr"] for group in optimizer.param_groups]
    layout = layout_or_none(kind)
    v_key = layout.second_moment[0] if layout is not None and layout.second_moment else None
    name_of = {id(p): n for n, p in model.named_parameters()}

    records: list[Record] = []
    batches = endless(task.train_batches, config.batch_size, torch.Generator().manual_seed(config.seed))
    source_stream = (
        endless(task.source_batches, config.batch_size, torch.Generator().manual_seed(config.seed + 7919))
        if config.replay and task.source_batches is not None
        else None
    )
    coin = torch.Generator().manual_seed(config.seed + 104729)
    records += evaluate(task, model, optimizer, kind, step=0)
    diverged_at = None
    g2_over_v: dict[str, float] = {}
    replayed = 0
    for step in range(1, config.steps + 1):
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * lr_factor(step, config)
        replay = source_stream is not None and float(torch.rand((), generator=coin)) < config.replay
        replayed += replay
        batch = next(source_stream if replay and source_stream is not None else batches)
        loss = task.loss(model, to_device(batch, on))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if step == 1:
            g2_over_v = gradient_to_second_moment(optimizer, name_of, v_key)
        before = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]
        grads = [[p.grad for p in group["params"] if p.grad is not None] for group in optimizer.param_groups]
        optimizer.step()
        updates = [
            [p.detach() - b for p, b in zip(group["params"], old)] for group, old in zip(optimizer.param_groups, before)
        ]
        records.append((step, "train_loss", ALL, float(loss.detach())))
        records += [(step, "lr", g, float(group["lr"])) for g, group in enumerate(optimizer.param_groups)]
        records += [(step, "grad_rms", g, v) for g, v in rms_by_group(grads).items()]
        records += [(step, "update_rms", g, v) for g, v in rms_by_group(updates).items()]
        if not math.isfinite(float(loss.detach())):
            diverged_at = step
            break
        if step % config.eval_every == 0 or step == config.steps:
            records += evaluate(task, model, optimizer, kind, step=step)

    info = {
        "optimizer": kind,
        "actions": dict(Counter(actions.values())),
        "carried": len(transfer.carried),
        "started_fresh": transfer.started_fresh,
        "reshaped": transfer.reshaped,
        "naming": source.naming_summary(),
        "new_weights": new_weights,
        "diverged_at": diverged_at,
        "replayed_steps": replayed,
        "g2_over_v": g2_over_v,
        **context,
        "threads": torch.get_num_threads(),
        "device": str(on),
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - started,
    }
    return TrialResult(config.trial_id(task.name, source.fingerprint, context), task.name, config, records, info)


def evaluate(
    task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, *, step: int
) -> list[Record]:
    """Eval-step records: the task's eval metrics (``eval_``), those on held-out source data
    (``source_``) and on the validation split (``val_``) where the task has them, and each
    group's median effective LR.

    A schedule-free optimizer (:func:`has_train_mode`) is put in eval mode for the evaluation
    (the weights become its averaged :math:`x`, as the library asks) and back in train mode
    after (:math:`y`, where it steps). A trial's first evaluation finds it as the source saved
    it: in eval mode (the library's advice) it evaluates the source's :math:`x` as saved, and
    its first ``train()`` is the one a resume from the source makes, so the first step is the
    library's own continuation.
    """
    modes = has_train_mode(optimizer)
    if modes:
        optimizer.eval()  # type: ignore[attr-defined]
    model.eval()
    records: list[Record] = []
    with torch.no_grad():
        for prefix, part, function in (
            ("eval", "evaluate", task.evaluate),
            ("source", "source_evaluate", task.source_evaluate),
            ("val", "validate", task.validate),
        ):
            if function is not None:
                records += evaluation_records(step, function(model), prefix, part)
    model.train()
    if modes:
        optimizer.train()  # type: ignore[attr-defined]
    if step > 0:  # before the first step a reset state may have step 0, where bias correction is undefined
        records += [(step, "eff_lr_p50", g, v) for g, v in median_effective_lr(optimizer, model, kind).items()]
    return records


def has_train_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has a train and an eval mode that move the weights (schedule-free's
    ``train()`` and ``eval()``, recorded in its groups' ``train_mode``).

    Example:
        >>> has_train_mode(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]))
        False
    """
    return (
        callable(getattr(optimizer, "train", None))
        and callable(getattr(optimizer, "eval", None))
        and all("train_mode" in group for group in optimizer.param_groups)
    )


def endless(
    make: Callable[[int, torch.Generator], Iterable[Any]], batch_size: int, generator: torch.Generator
) -> Iterator[Any]:
    """Batches from ``make(batch_size, generator)``, starting it again whenever it ends."""
    while True:
        empty = True
        for batch in make(batch_size, generator):
            empty = False
            yield batch
        if empty:
            raise OstateError("the task's train_batches produced no batch")
