"""A trial as ``transformers.Trainer.train(resume_from_checkpoint=SOURCE)`` with a StrategyCallback (see trainers.py)."""

from __future__ import annotations

from typing import Any

# optional dependency (ostate[hf]): imported only for a task whose trainer is a Hugging Face Trainer
from transformers import Trainer, TrainerCallback

from ostate.errors import OstateError
from ostate.harness.recorder import StepRecorder
from ostate.harness.task import Task
from ostate.integrations.hf_strategy import StrategyCallback
from ostate.reset.strategies import Strategy


class RecordingCallback(TrainerCallback):
    """Feeds a :class:`StepRecorder` from the Trainer's events and stops after the trial's steps."""

    def __init__(self, recorder: StepRecorder):
        self.recorder = recorder

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.recorder.begin(kwargs["model"], kwargs["optimizer"])
        return control

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.recorder.before_step(kwargs["optimizer"])
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.recorder.after_step(kwargs["optimizer"])
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.recorder.evaluate_if_due(kwargs["model"], kwargs["optimizer"])
        control.should_log = True  # the step's loss, to on_log
        if self.recorder.done:
            control.should_training_stop = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> Any:
        if (
            logs
            and "loss" in logs
            and self.recorder.step
            and not any(
                s == self.recorder.step and name == "train_loss" for s, name, _, _ in self.recorder.records[-8:]
            )
        ):
            self.recorder.loss(float(logs["loss"]))
        return control


def train_hf(task: Task, source: str, strategy: Strategy, config: Any, recorder: StepRecorder) -> dict[str, int]:
    """Build the task's Trainer with the callbacks, resume it from ``source``; the strategy's actions."""
    assert task.trainer is not None
    callback = StrategyCallback(strategy=str(strategy))
    trainer = task.trainer(config, [callback, RecordingCallback(recorder)])
    if not isinstance(trainer, Trainer):
        raise OstateError(
            f"task '{task.name}': its trainer function returned a {type(trainer).__name__}, not a transformers.Trainer"
        )
    names = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    if "RecordingCallback" not in names or "StrategyCallback" not in names:
        raise OstateError(
            f"task '{task.name}': the Trainer lacks the callbacks the harness gave its trainer function",
            hint="build it with Trainer(..., callbacks=callbacks)",
        )
    trainer.args.logging_steps = 1  # a train loss every step, as the built-in loop records
    trainer.args.logging_strategy = "steps"
    trainer.args.save_strategy = "no"
    trainer.train(resume_from_checkpoint=source)
    return callback.actions
