"""What a trial run by a trainer records, fed from the trainer's own events (see :mod:`ostate.harness.trainers`)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ostate.harness.metrics import ALL, Record, rms_by_group
from ostate.harness.task import Task
from ostate.integrations.live import torch_optimizer
from ostate.reset.strategies import optimizer_kind


class StepRecorder:
    """The records of one trial, taken at the points every trainer passes through."""

    def __init__(self, task: Task, steps: int, eval_every: int, evaluate: Callable[..., list[Record]]):
        self.task, self.steps, self.eval_every, self._evaluate = task, steps, eval_every, evaluate
        self.records: list[Record] = []
        self.step = 0
        self.kind = "unknown"
        self._before: list[list[torch.Tensor]] = []
        self._loss: float | None = None

    def begin(self, model: torch.nn.Module, optimizer: Any) -> None:
        self.kind = optimizer_kind(torch_optimizer(optimizer))
        self.records += self._evaluate(self.task, model, torch_optimizer(optimizer), self.kind, step=0)

    def before_step(self, optimizer: Any) -> None:
        groups = torch_optimizer(optimizer).param_groups
        step = self.step + 1
        self.records += [(step, "lr", g, float(group["lr"])) for g, group in enumerate(groups)]
        grads = [[p.grad for p in group["params"] if p.grad is not None] for group in groups]
        self.records += [(step, "grad_rms", g, v) for g, v in rms_by_group(grads).items()]
        self._before = [[p.detach().clone() for p in group["params"]] for group in groups]

    def after_step(self, optimizer: Any) -> None:
        groups = torch_optimizer(optimizer).param_groups
        self.step += 1
        updates = [[p.detach() - b for p, b in zip(group["params"], old)] for group, old in zip(groups, self._before)]
        self.records += [(self.step, "update_rms", g, v) for g, v in rms_by_group(updates).items()]

    def loss(self, value: float) -> None:
        self.records.append((self.step, "train_loss", ALL, float(value)))

    def evaluate_if_due(self, model: torch.nn.Module, optimizer: Any) -> None:
        if self.step % self.eval_every == 0 or self.step == self.steps:
            self.records += self._evaluate(self.task, model, torch_optimizer(optimizer), self.kind, step=self.step)

    @property
    def done(self) -> bool:
        return self.step >= self.steps
