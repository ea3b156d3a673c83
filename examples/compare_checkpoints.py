"""Compare the optimizer state of three checkpoints of one training run, parameter by parameter.

Trains ostate's demo model (a character MLP on the Zen of Python) with AdamW and saves a
checkpoint after 40, 80 and 160 steps; then compares them: how far each parameter's
effective learning rate and second moment moved, how aligned its first moment stayed,
and which parameters moved most. Draws the comparison to compare.png.

Run: python examples/compare_checkpoints.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from ostate.compare.compute import compare
from ostate.compare.output import render
from ostate.demo import CharMLP, save_atomically, zen_of_python
from ostate.plots.compare import save_compare_figure

workdir = sys.argv[1] if len(sys.argv) > 1 else "compare-demo"
os.makedirs(workdir, exist_ok=True)

# One run, saved three times, as a training script would.
torch.manual_seed(0)
text = zen_of_python()
chars = sorted(set(text))
windows = torch.tensor([chars.index(c) for c in text]).unfold(0, 9, 1)
model = CharMLP(len(chars))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
paths = []
for step in range(1, 161):
    batch = windows[torch.randint(len(windows), (64,))]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(batch[:, :-1]), batch[:, -1]).backward()
    optimizer.step()
    if step in (40, 80, 160):
        paths.append(os.path.join(workdir, f"step{step}.pt"))
        save_atomically(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "global_step": step}, paths[-1]
        )

# The same as: ostate compare step40.pt step80.pt step160.pt --top 3 --plot compare.png
result = compare(*paths)
print(render(result, top=3, columns=["name", "step_delta", "m_cosine", "log10_v_ratio_p50", "eff_lr_relchange_p50"]))

for pair in result.pairs:
    model_row = pair.model.row
    print(
        f"{os.path.basename(pair.a)} -> {os.path.basename(pair.b)}: first moments' cosine {model_row['m_cosine']:.3f}, "
        f"median second-moment change x{10 ** model_row['log10_v_ratio_p50']:.2f}, "
        f"largest mover {pair.movers(1)['name'][0]}"
    )
print(f"wrote {save_compare_figure(result, os.path.join(workdir, 'compare.png'))}")
