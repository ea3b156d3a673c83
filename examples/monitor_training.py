"""Watch the optimizer state while training a plain PyTorch loop: ostate.Monitor, one call per step.

The monitor summarises the live optimizer's tensors every N steps (the columns of
`ostate inspect`, here per layer), writes them to a CSV log (and TensorBoard, when
installed), and with checks=True warns when something goes wrong. Halfway, this example
clears the second moments and the step counts but keeps the first moments, as a bad
resume would: the checks say so at that record, and the loss diverges (a kept first
moment over a fresh second moment makes steps of 1/sqrt(1-beta1)... times the usual).
Then the log is drawn over the steps: ostate plot ostate_monitor.csv --kind timeline.

Run: python examples/monitor_training.py   (writes ostate_monitor.csv and timeline.png here)
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import ostate
from ostate.figures import plot
from ostate.monitor import CSVWriter, MonitorWarning
from ostate.plots import save_figure

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))

writers = [CSVWriter("ostate_monitor.csv")]
try:
    from ostate.monitor import TensorBoardWriter

    writers.append(TensorBoardWriter("tb"))  # tensorboard --logdir tb
except ostate.OstateError:
    pass  # tensorboard is not installed: the CSV log alone

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", MonitorWarning)
    with ostate.Monitor(optimizer, model, every=20, by="layer", writer=writers, checks=True) as monitor:
        for step in range(1, 301):
            x = torch.randn(32, 16)
            loss = (model(x).squeeze(-1) - x[:, 0]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 160:  # what resuming from a checkpoint that lost the second moments does
                for state in optimizer.state.values():
                    state["exp_avg_sq"].zero_()
                    state["step"].zero_()
            record = monitor.step()
            if record is not None and step % 100 == 0:
                medians = ", ".join(f"{r.layer}={r.eff_lr_p50:.2e}" for r in record.table.itertuples())
                print(f"step {step:3d} loss {loss.item():.4f} | median effective lr by layer: {medians}")

for warning in caught:
    print("warning:", warning.message)
save_figure(plot("timeline", "ostate_monitor.csv"), "timeline.png")
print("wrote ostate_monitor.csv and timeline.png")
