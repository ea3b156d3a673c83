"""Watch the effective learning rate per param group while training, without saving anything.

`ostate.from_state_dict` reads an in-memory optimizer state dict; pass the model so the
rows carry parameter names. Run: python examples/monitor_training.py
"""

from __future__ import annotations

import torch
from torch import nn

import ostate

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))

for step in range(1, 301):
    x = torch.randn(32, 16)
    loss = (model(x).squeeze(-1) - x[:, 0]).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step in (1, 10, 100, 300):
        table = ostate.analyze(ostate.from_state_dict(optimizer.state_dict(), model=model))
        medians = ", ".join(f"{r.name}={r.eff_lr_p50:.2e}" for r in table.itertuples())
        print(f"step {step:3d} loss {loss.item():.4f} | median effective lr: {medians}")
