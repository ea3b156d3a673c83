"""Watch the optimizer state while Lightning trains: ostate's MonitorCallback.

The callback summarises the LightningModule's optimizer every 10 optimizer steps, per
parameter kind, into ostate_monitor.csv in the trainer's folder; TensorBoardWriter with
the TensorBoardLogger's experiment writes into the logger's own event files instead.

Run: python examples/monitor_lightning.py
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn

from ostate.integrations.lightning import MonitorCallback
from ostate.monitor import read_log


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


torch.manual_seed(0)
x = torch.randn(512, 8)
data = torch.utils.data.TensorDataset(x, x[:, 0] - 2 * x[:, 1])
trainer = L.Trainer(
    max_steps=40,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    default_root_dir="lightning_run",
    callbacks=[MonitorCallback(every=10, by="kind")],
)
trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=32))
log = read_log("lightning_run")
print(log.pivot(index="step", columns="key", values="eff_lr_p50").to_string())
