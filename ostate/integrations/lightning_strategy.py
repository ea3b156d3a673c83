"""``StrategyCallback`` for Lightning: a strategy applied to the optimizer state on resuming.

``Trainer.fit(model, ckpt_path=...)`` restores the optimizers' state before the fit
loop starts; ``on_train_start`` then applies the strategy, so the first step after
resuming is the one a resume from ``ostate reset``'s output would take. Clipping,
accumulation, precision and the schedule stay Lightning's.
"""

from __future__ import annotations

from typing import Any, Callable

# optional dependency (lightning): this module is imported only by who uses Lightning
from lightning.pytorch import Callback

from ostate.integrations.live import apply_to_optimizer
from ostate.reset.strategies import Strategy


class StrategyCallback(Callback):
    """Apply ``strategy`` (``fresh``, ``reload``, ``reset-m``, ``reset-v``, ``reset-step``,
    ``keep-v``, or ``NAME:REGEX``) to the optimizer state when ``fit`` resumes from ``ckpt_path``.

    ``params`` restricts it to the parameters whose names match the regex (names as in
    the LightningModule's ``named_parameters()``); ``optimizer_index`` to one optimizer of
    a module that has several (default: every one). A fit without ``ckpt_path`` has no
    state: the callback does nothing then. ``actions`` says what was done, per optimizer.

    Example::

        trainer = L.Trainer(max_steps=700, callbacks=[StrategyCallback(strategy="keep-v")])
        trainer.fit(module, data, ckpt_path="last.ckpt")
    """

    def __init__(self, strategy: str = "reload", params: str | None = None, optimizer_index: int | None = None):
        self.strategy = Strategy.parse(strategy)
        self.params = params
        self.optimizer_index = optimizer_index
        self.actions: list[dict[str, int]] = []
        self._detach: list[Callable[[], None]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.ckpt_path is None:
            return  # not resuming: nothing saved to apply a strategy to
        for index, optimizer in enumerate(trainer.optimizers):
            if self.optimizer_index is None or index == self.optimizer_index:
                actions, detach = apply_to_optimizer(optimizer, pl_module, self.strategy, self.params)
                self.actions.append(actions)
                self._detach.append(detach)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for detach in self._detach:
            detach()
        self._detach = []
