"""Diagnose a checkpoint's optimizer state, break it the way a loss spike does, and repair it with a reset.

1. Makes ostate's demo checkpoint and runs the doctor on it (what a CI job would do:
   `ostate doctor checkpoint.pt`, exit code 3 on a warning, 4 on an error).
2. Writes a copy whose head has NaN in its second moment (what an fp16 overflow leaves
   behind) and diagnoses that: an error, with the parameters and coordinates concerned.
3. Writes a repaired copy with `ostate reset` (the head's state started fresh, every other
   entry of the checkpoint kept) and loads it into the real model and optimizer.

Run: python examples/doctor_and_reset.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import torch

import ostate
from ostate.demo import CharMLP, make_demo_checkpoint, save_atomically
from ostate.doctor.checks import diagnose, exit_code
from ostate.reset.write import lr_lines, reset

workdir = sys.argv[1] if len(sys.argv) > 1 else "doctor-demo"
source = make_demo_checkpoint(os.path.join(workdir, "checkpoint.pt"), steps=60)


def report(path: str) -> None:
    diagnosis = diagnose(ostate.load(path))  # the same as: ostate doctor PATH
    print(f"{os.path.basename(path)}: exit code {exit_code(diagnosis)}")
    for finding in diagnosis.findings:
        where = ", ".join(
            f"{e.subject} ({e.coordinates} coords)" if e.coordinates is not None else e.subject
            for e in finding.evidence[:3]
        )
        print(f"  {finding.severity:7} {finding.code}: {where}")


report(source)

# A loss spike in float16 leaves inf/NaN in the second moment of the layer it hit.
checkpoint = torch.load(source, weights_only=True)
head = ostate.load(source).optimizers[0].param("head.weight")  # its index in the optimizer, found by name
checkpoint["optimizer"]["state"][head.index]["exp_avg_sq"][:3] = float("nan")
broken = os.path.join(workdir, "broken.pt")
save_atomically(checkpoint, broken)
report(broken)

# Repair: start the head's optimizer state fresh; the model, the schedule and every other state stay.
# The same as: ostate reset broken.pt --strategy fresh --params '^head\.' -o repaired.pt
repaired = os.path.join(workdir, "repaired.pt")
result = reset(broken, repaired, "fresh", params=r"^head\.", overwrite=True)
print(f"reset: {result.optimizers[0].counts()}")
for line in lr_lines(result):  # which lr the resumed run takes: the saved one, restored by load_state_dict
    print(f"  {line}")
report(repaired)

# It loads into the real model and optimizer (same param groups), and the next step is finite.
saved = torch.load(repaired, weights_only=True)
model = CharMLP(len(saved["vocab"]))
model.load_state_dict(saved["model"])
named = dict(model.named_parameters())
read = ostate.load(repaired).optimizers[0]  # the parameters' names, in each group's order
groups = [{"params": [named[p.name] for p in read.params if p.group == g]} for g in range(len(read.groups))]
optimizer = torch.optim.AdamW(groups)
optimizer.load_state_dict(saved["optimizer"])
batch = torch.randint(len(saved["vocab"]), (8, 9))
torch.nn.functional.cross_entropy(model(batch[:, :-1]), batch[:, -1]).backward()
optimizer.step()
print(
    f"one step from the repaired checkpoint: weights finite = {all(bool(torch.isfinite(p).all()) for p in named.values())}"
)
