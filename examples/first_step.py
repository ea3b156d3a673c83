"""A new head has no optimizer state yet: ostate predicts its first step exactly, as torch takes it.

A model is trained with its head frozen (torch keeps no state for it), then the head joins.
``ostate.next_update`` steps the head from the state AdamW creates at its first step, and the
prediction is checked against the real ``optimizer.step()``; ``ostate inspect`` lists the head
as "no state yet (first step)".

Run: python examples/first_step.py [WORKDIR]
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import ostate
from ostate.errors import OstateError

workdir = sys.argv[1] if len(sys.argv) > 1 else "ostate-first-step"
os.makedirs(workdir, exist_ok=True)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model[2].requires_grad_(False)  # the head: no gradient, so no state
for _ in range(3):
    optimizer.zero_grad()
    model(torch.randn(16, 4)).square().mean().backward()
    optimizer.step()
model[2].requires_grad_(True)
path = os.path.join(workdir, "checkpoint.pt")
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)

saved = ostate.load(path).optimizers[0]
head = saved.param("2.weight")
print(f"{head.name}: state keys {sorted(head.state) or 'none'}")

optimizer.zero_grad()
model(torch.randn(16, 4)).square().mean().backward()
weight = model[2].weight
predicted = ostate.next_update(head, saved.groups[head.group], weight.grad, weight.detach())
before = weight.detach().clone()
optimizer.step()
actual = weight.detach() - before
print(f"first step predicted: largest difference from the real step {float((predicted - actual).abs().max()):.2g}")
try:
    ostate.effective_lr(head, saved.groups[head.group])
except OstateError as e:  # Adam's first step divides by the first gradient: no rate without it
    print(f"effective_lr: {e}")

shown = subprocess.run([sys.executable, "-m", "ostate_cli.main", "inspect", path], capture_output=True, text=True)
print("\n".join(line for line in shown.stdout.splitlines() if "first step" in line))
