"""Trials run by the user's own trainer: Hugging Face ``Trainer.train(resume_from_checkpoint=...)``
or Lightning ``Trainer.fit(ckpt_path=...)``, with the strategy applied by a StrategyCallback.

The task's ``trainer(config, callbacks)`` builds the trainer for one trial (its seed is
``config.seed``) with ``callbacks`` added, and returns the Hugging Face ``Trainer``, or
for Lightning ``(trainer, module, *fit_args)`` (``fit_args``: the dataloaders or a
datamodule). Its checkpoint (the task's ``source``) is the one it resumes from. Clipping,
accumulation, precision, the optimizer and its schedule are the trainer's; a trial runs
``config.steps`` steps from the checkpoint's step (``config.lr``, ``warmup``,
``schedule`` and ``batch_size`` are recorded but the trainer's own settings rule).

A recording callback writes the records of the built-in loop
(:mod:`ostate.harness.metrics`): every step the train loss, each group's ``lr``, the
gradients' RMS (after the trainer's clipping) and the updates' RMS; at step 0 and every
``eval_every`` steps the task's ``evaluate(model)`` (and ``eff_lr_p50``).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Callable

import torch

from ostate.errors import OstateError
from ostate.harness.metrics import Record
from ostate.harness.recorder import StepRecorder
from ostate.harness.task import Task
from ostate.reset.strategies import Strategy


def run_with_trainer(task: Task, source: str, config: Any, evaluate: Callable[..., list[Record]]) -> dict[str, Any]:
    """Run one trial with the task's trainer; its records and what happened (``info``)."""
    if task.trainer is None:
        raise OstateError(f"task '{task.name}' has no trainer")
    knobs = [k for k in ("grad_clip", "beta2", "replay") if getattr(config, k, 0)]
    if knobs:
        raise OstateError(
            f"{', '.join(knobs)} cannot be set for a trial run by the task's own trainer",
            hint="set them in the trainer (TrainingArguments(max_grad_norm=..., adam_beta2=...), "
            "Lightning's gradient_clip_val)",
        )
    started = time.perf_counter()
    recorder = StepRecorder(task, config.steps, config.eval_every, evaluate)
    strategy = Strategy.parse(config.strategy)
    probe = _probe_library(task)
    if probe == "hf":
        from ostate.harness.trainer_hf import train_hf

        actions = train_hf(task, source, strategy, config, recorder)
    else:
        from ostate.harness.trainer_lightning import fit_lightning

        actions = fit_lightning(task, source, strategy, config, recorder)
    losses = [v for _, name, _, v in recorder.records if name == "train_loss"]
    diverged = next((s for s, name, _, v in recorder.records if name == "train_loss" and not math.isfinite(v)), None)
    if recorder.step < config.steps and diverged is None:
        raise OstateError(
            f"the trainer stopped after {recorder.step} of {config.steps} steps",
            hint="give it max_steps (or epochs of data) beyond the checkpoint's step plus the trial's steps",
        )
    return {
        "records": recorder.records,
        "info": {
            "trainer": probe,
            "optimizer": recorder.kind,
            "actions": dict(Counter(actions)) if isinstance(actions, list) else actions,
            "diverged_at": diverged,
            "train_losses": len(losses),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "wall_s": time.perf_counter() - started,
        },
    }


def _probe_library(task: Task) -> str:
    kind = task.trainer_kind
    if kind not in ("hf", "lightning"):
        raise OstateError(
            f"task '{task.name}': trainer_kind must be 'hf' or 'lightning', not '{kind}'",
            hint="Task(trainer=make_trainer, trainer_kind='hf') (TOML: trainer = 'module:function', trainer_kind = 'hf')",
        )
    return kind
