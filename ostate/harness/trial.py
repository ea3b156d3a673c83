"""One trial: load the source, build the optimizer, apply the strategy, fine-tune, evaluate.

:func:`run_trial` is the whole procedure, top to bottom; everything it calls is a
swappable part (the task's callables, the strategy, the schedule).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from ostate.errors import OstateError
from ostate.harness.metrics import ALL, Record, evaluation_records, median_effective_lr, rms_by_group
from ostate.harness.source import Source, load_source
from ostate.harness.task import Task
from ostate.harness.transfer import load_weights, optimizer_like_source, transfer_state
from ostate.reset.strategies import Strategy, apply_strategy, attach, optimizer_kind, plan

SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.1


@dataclass(frozen=True)
class TrialConfig:
    """One point of the sweep.

    ``lr`` is the peak learning rate, reached after ``warmup`` steps of linear warmup;
    with ``schedule="cosine"`` it then decays to a tenth of the peak at the last step.
    The model is evaluated before the first step and every ``eval_every`` steps (and
    after the last).
    """

    strategy: str
    seed: int
    lr: float
    warmup: int = 0
    batch_size: int = 32
    steps: int = 200
    eval_every: int = 20
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        Strategy.parse(self.strategy)
        if self.schedule not in SCHEDULES:
            raise OstateError(f"unknown schedule '{self.schedule}'", hint=f"choose one of: {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.eval_every < 1 or self.batch_size < 1 or self.warmup < 0 or not self.lr > 0:
            raise OstateError(
                f"invalid trial settings: {self}", hint="steps, eval_every and batch_size >= 1; warmup >= 0; lr > 0"
            )

    def trial_id(self, task: str, source_fingerprint: str) -> str:
        """A stable identifier of this trial of this task on this source (16 hex digits)."""
        text = json.dumps({"task": task, "source": source_fingerprint, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def lr_factor(step: int, config: TrialConfig) -> float:
    """The fraction of the peak lr at 1-based ``step``.

    Example:
        >>> c = TrialConfig("reload", 0, 1e-3, warmup=4, steps=10)
        >>> [round(lr_factor(s, c), 3) for s in (1, 4, 5, 10)]
        [0.25, 1.0, 1.0, 0.1]
    """
    if step <= config.warmup:
        return step / config.warmup
    if config.schedule == "constant":
        return 1.0
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


def run_trial(task: Task, source: Source | str, config: TrialConfig, *, threads: int | None = None) -> TrialResult:
    """Fine-tune ``task``'s model from ``source`` under ``config``; every record in the result.

    With the same ``threads`` (torch's intra-op threads) the result is the same on every run.
    """
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    source = load_source(source, optimizer_index=task.source_optimizer) if isinstance(source, str) else source
    if task.trainer is not None:  # the user's own Trainer runs the trial (start-up time: imported when used)
        from ostate.harness.trainers import run_with_trainer

        done = run_with_trainer(task, source.path, config, evaluate)
        return TrialResult(config.trial_id(task.name, source.fingerprint), task.name, config, **done)

    model = task.model()
    new_weights = load_weights(model, source)
    optimizer = (task.optimizer or optimizer_like_source(source))(model, config.lr)
    kind = optimizer_kind(optimizer)
    transfer = transfer_state(source, optimizer, model)
    actions = plan(transfer.state_dict, config.strategy, names=transfer.names)
    optimizer.load_state_dict(apply_strategy(transfer.state_dict, config.strategy, names=transfer.names, kind=kind))
    attach(optimizer)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]

    records: list[Record] = []
    batches = endless(task.train_batches, config.batch_size, torch.Generator().manual_seed(config.seed))
    records += evaluate(task, model, optimizer, kind, step=0)
    diverged_at = None
    for step in range(1, config.steps + 1):
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * lr_factor(step, config)
        loss = task.loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - started,
    }
    return TrialResult(config.trial_id(task.name, source.fingerprint), task.name, config, records, info)


def evaluate(
    task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, *, step: int
) -> list[Record]:
    """Eval-step records: the task's eval metrics and each group's median effective LR."""
    model.eval()
    with torch.no_grad():
        result = task.evaluate(model)
    model.train()
    records = evaluation_records(step, result)
    if step > 0:  # before the first step a reset state may have step 0, where bias correction is undefined
        records += [(step, "eff_lr_p50", g, v) for g, v in median_effective_lr(optimizer, model, kind).items()]
    return records


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
