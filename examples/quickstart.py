"""Quick start: make a small real checkpoint, then read and analyse its optimizer state.

Run: python examples/quickstart.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import ostate
from ostate.demo import make_demo_checkpoint

workdir = sys.argv[1] if len(sys.argv) > 1 else "ostate-demo"
path = make_demo_checkpoint(os.path.join(workdir, "checkpoint.pt"), steps=200)

checkpoint = ostate.load(path)  # safe (weights_only) and memory-mapped
optimizer = checkpoint.optimizers[0]
print(f"{optimizer.kind} at '{optimizer.location}', {len(optimizer.params)} parameters")

# One row per layer (module), statistics merged from each parameter's sketches.
layers = ostate.analyze(checkpoint, by="layer")
print(layers[["layer", "numel", "eff_lr_p5", "eff_lr_p50", "eff_lr_p95"]].to_string(index=False))

# The parameters whose coordinates get the largest typical step.
params = ostate.analyze(checkpoint)
print(params.nlargest(3, "eff_lr_p50")[["name", "name_source", "eff_lr_p50"]].to_string(index=False))

# The exact per-coordinate effective learning rate of one parameter, as a tensor.
head = optimizer.param("head.weight")
eta = ostate.effective_lr(head, optimizer.groups[head.group])
print(f"head.weight: effective lr shape {tuple(eta.shape)}, largest {eta.max():.3g}")
