"""``MonitorCallback`` for the Hugging Face ``Trainer``: the optimizer state summarised every N steps.

Example (a tiny model built from a config; nothing is downloaded):

    >>> from transformers import Trainer, TrainingArguments
    >>> callback = MonitorCallback(every=50, by="layer")  # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP

The log goes to ``OUTPUT_DIR/ostate_monitor.csv`` unless ``writer`` says otherwise
(``ostate.monitor.TensorBoardWriter(args.logging_dir)`` puts it beside the Trainer's own
TensorBoard logs); ``ostate plot OUTPUT_DIR --kind timeline`` draws it.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from ostate.monitor import Monitor
from ostate.monitor.monitor import WriterSpec
from ostate.monitor.writers import LOG_NAME


class MonitorCallback(TrainerCallback):
    """An :class:`ostate.Monitor` of the Trainer's optimizer and model, stepped at every optimizer step.

    Args are :class:`ostate.Monitor`'s; ``writer=None`` writes ``ostate_monitor.csv`` in the
    Trainer's ``output_dir``. The monitor (``callback.monitor``) is made when training
    begins (the optimizer exists then) and closed when it ends; ``callback.monitor.last``
    is the last record.
    """

    def __init__(
        self,
        every: int = 100,
        by: str = "layer",
        writer: WriterSpec = None,
        *,
        checks: bool = False,
        shards: str = "auto",
        kind: str | None = None,
    ):
        self.options: dict[str, Any] = {"every": every, "by": by, "checks": checks, "shards": shards, "kind": kind}
        self.writer = writer
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        writer = self.writer if self.writer is not None else os.path.join(args.output_dir, LOG_NAME)
        self.monitor = Monitor(optimizer, model, writer=writer, **self.options)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
