"""Inspect what accelerate's `Accelerator.save_state` wrote: two models, two optimizers, a scheduler.

A small GAN-like setup (a generator trained with AdamW, a critic with SGD) is saved
with `save_state` twice: with safetensors weights (the default; they keep no
parameter order, so only parameters with a unique shape can be named) and with
`safe_serialization=False` (`pytorch_model.bin` keeps the model's order: every
parameter is named).

Run: python examples/accelerate_state.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from torch import nn

import ostate

workdir = sys.argv[1] if len(sys.argv) > 1 else "accelerate-demo"
torch.manual_seed(0)
generator = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 8))
critic = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 1))
accelerator = Accelerator(cpu=True)
generator, critic, gen_opt, critic_opt = accelerator.prepare(
    generator,
    critic,
    torch.optim.AdamW(generator.parameters(), lr=1e-3),
    torch.optim.SGD(critic.parameters(), lr=1e-2, momentum=0.9),
)
for _ in range(10):
    loss = critic(generator(torch.randn(32, 4))).mean()
    accelerator.backward(loss)
    gen_opt.step()
    critic_opt.step()
    gen_opt.zero_grad()
    critic_opt.zero_grad()

for name, safe in (("state-safetensors", True), ("state-bin", False)):
    directory = os.path.join(workdir, name)
    accelerator.save_state(directory, safe_serialization=safe)
    checkpoint = ostate.load(directory)
    print(f"{directory} ({checkpoint.format}): {', '.join(sorted(os.listdir(directory)))}")
    for optimizer in checkpoint.optimizers:
        names = ", ".join(f"{p.name} [{p.name_source}]" for p in optimizer.params)
        print(f"  {optimizer.location}: {optimizer.kind}; {names}")
