"""``MonitorCallback`` for the Lightning ``Trainer``: the optimizer state summarised every N steps.

Example:

    >>> import lightning, tempfile
    >>> trainer = lightning.Trainer(callbacks=[MonitorCallback(every=50)], default_root_dir=tempfile.mkdtemp(),
    ...                             logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> [type(c).__name__ for c in trainer.callbacks if isinstance(c, MonitorCallback)]
    ['MonitorCallback']

The log goes to ``ostate_monitor.csv`` in the trainer's ``log_dir`` (or
``default_root_dir``) unless ``writer`` says otherwise
(``ostate.monitor.TensorBoardWriter(trainer.logger.experiment)`` writes into the
TensorBoardLogger's own files).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import Callback

from ostate.monitor import Monitor
from ostate.monitor.monitor import WriterSpec
from ostate.monitor.writers import LOG_NAME


class MonitorCallback(Callback):
    """An :class:`ostate.Monitor` of the LightningModule's optimizer (``optimizer_index``), stepped after
    every optimizer step (``trainer.global_step``).

    Args are :class:`ostate.Monitor`'s; the monitor (``callback.monitor``) is made when
    training starts and closed when it ends.
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
        optimizer_index: int = 0,
    ):
        self.options: dict[str, Any] = {"every": every, "by": by, "checks": checks, "shards": shards, "kind": kind}
        self.writer = writer
        self.optimizer_index = optimizer_index
        self.monitor: Monitor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        folder = trainer.log_dir or trainer.default_root_dir
        writer = self.writer if self.writer is not None else os.path.join(folder, LOG_NAME)
        optimizer = trainer.optimizers[self.optimizer_index]
        self.monitor = Monitor(optimizer, pl_module, writer=writer, **self.options)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is not None and trainer.global_step > 0:
            self.monitor.step(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
