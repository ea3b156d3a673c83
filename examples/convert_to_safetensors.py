"""Convert optimizer state to safetensors and back, and load it into a real optimizer.

Makes a small checkpoint (ostate's demo model), writes its optimizer state as
safetensors (`state.<name>.<key>` tensors, param groups as JSON metadata), reads it
with the safetensors library itself to show the layout, then converts it back to a
plain torch optimizer state dict that `Optimizer.load_state_dict` accepts.

Run: python examples/convert_to_safetensors.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors import safe_open

import ostate
from ostate.demo import make_demo_checkpoint

workdir = sys.argv[1] if len(sys.argv) > 1 else "convert-demo"
source = make_demo_checkpoint(os.path.join(workdir, "checkpoint.pt"), steps=50)

out = os.path.join(workdir, "optimizer.safetensors")
written = ostate.convert(source, out, overwrite=True)  # the same as: ostate convert checkpoint.pt optimizer.safetensors
print(f"wrote {out}: {written.kind}, {len(written.params)} parameters, names from {written.params[0].name_source}")

with safe_open(out, framework="pt") as f:  # any safetensors reader can open it; no pickle involved
    keys = sorted(f.keys())
    groups = json.loads(f.metadata()["param_groups"])
    print(f"{len(keys)} tensors, e.g. {keys[0]}, {keys[1]}")
    print(
        f"{len(groups)} param groups; group 0: lr={groups[0]['lr']:.3g} weight_decay={groups[0]['weight_decay']} "
        f"params={groups[0]['params'][:2]}..."
    )

# Back to a torch optimizer state dict, loaded into a fresh AdamW whose groups are rebuilt from the names.
back = os.path.join(workdir, "optimizer.pt")
ostate.convert(out, back, overwrite=True)
weights = torch.load(source, weights_only=True)["model"]
params = {name: torch.nn.Parameter(weights[name].clone()) for g in groups for name in g["params"]}
fresh = torch.optim.AdamW([{"params": [params[name] for name in g["params"]]} for g in groups])
fresh.load_state_dict(torch.load(back, weights_only=True))

original = torch.load(source, weights_only=True)["optimizer"]
same = all(
    torch.equal(fresh.state_dict()["state"][i]["exp_avg"], original["state"][i]["exp_avg"]) for i in original["state"]
)
print(
    f"loaded {back} into a fresh AdamW: {len(fresh.state)} parameters with state, "
    f"exp_avg identical to the original: {same}"
)
