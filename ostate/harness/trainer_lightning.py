"""A trial as Lightning's ``Trainer.fit(module, ..., ckpt_path=SOURCE)`` with a StrategyCallback (see trainers.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

# optional dependency (lightning): imported only for a task whose trainer is Lightning's
from lightning.pytorch import Callback, LightningModule, Trainer

from ostate.errors import OstateError
from ostate.harness.recorder import StepRecorder
from ostate.harness.task import Task
from ostate.integrations.lightning_strategy import StrategyCallback
from ostate.reset.strategies import Strategy


class RecordingCallback(Callback):
    """Feeds a :class:`StepRecorder` from Lightning's hooks and stops after the trial's steps."""

    def __init__(self, recorder: StepRecorder):
        self.recorder = recorder

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.recorder.begin(pl_module, trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.recorder.before_step(optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        self.recorder.after_step(optimizer)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.recorder.loss(float(loss))
        self.recorder.evaluate_if_due(pl_module, optimizer)
        if self.recorder.done:
            trainer.should_stop = True


def fit_lightning(task: Task, source: str, strategy: Strategy, config: Any, recorder: StepRecorder) -> dict[str, int]:
    """Build the task's Lightning trainer with the callbacks, fit it from ``source``; the strategy's actions."""
    assert task.trainer is not None
    callback = StrategyCallback(strategy=str(strategy), optimizer_index=task.source_optimizer or 0)
    built = task.trainer(config, [callback, RecordingCallback(recorder)])
    if not (isinstance(built, tuple) and len(built) >= 2 and isinstance(built[0], Trainer)):
        raise OstateError(
            f"task '{task.name}': its trainer function must return (lightning Trainer, LightningModule, *fit_args)"
        )
    trainer, module, *fit_args = built
    if not isinstance(module, LightningModule):
        raise OstateError(f"task '{task.name}': the second item its trainer function returned is not a LightningModule")
    trainer.fit(module, *fit_args, ckpt_path=source)
    total: Counter[str] = Counter()
    for actions in callback.actions:
        total.update(actions)
    return dict(total)
