"""``StrategyCallback`` for the Hugging Face ``Trainer``: a strategy applied to the optimizer state on resuming.

``Trainer.train(resume_from_checkpoint=...)`` loads the checkpoint's optimizer state
before it calls ``on_train_begin``; there the callback applies the strategy, so the
first step after resuming is the one a resume from ``ostate reset``'s output would take.
Clipping, accumulation, mixed precision and the schedule stay the Trainer's.
"""

from __future__ import annotations

from typing import Any, Callable

# optional dependency (ostate[hf]): this module is imported only by who uses the Trainer
from transformers import TrainerCallback

from ostate.integrations.live import apply_to_optimizer
from ostate.reset.strategies import Strategy


class StrategyCallback(TrainerCallback):
    """Apply ``strategy`` (``fresh``, ``reload``, ``reset-m``, ``reset-v``, ``reset-step``,
    ``keep-v``, or ``NAME:REGEX``) to the optimizer state when training resumes from a checkpoint.

    ``params`` restricts it to the parameters whose names match the regex (the others
    are reloaded). A training that starts without a checkpoint has no state: the
    callback does nothing then. ``actions`` says, after ``on_train_begin``, how many
    parameters got each action.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[StrategyCallback(strategy="reset-v", params=r"lm_head")])
        trainer.train(resume_from_checkpoint="out/checkpoint-500")
    """

    def __init__(self, strategy: str = "reload", params: str | None = None):
        self.strategy = Strategy.parse(strategy)
        self.params = params
        self.actions: dict[str, int] = {}
        self._detach: Callable[[], None] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        optimizer, model = kwargs.get("optimizer"), kwargs.get("model")
        if optimizer is None or model is None or state.global_step == 0:
            return control  # not resuming: nothing saved to apply a strategy to
        self.actions, self._detach = apply_to_optimizer(optimizer, model, self.strategy, self.params)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._detach is not None:
            self._detach()
            self._detach = None
        return control
