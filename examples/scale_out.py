"""Scale: the fast default statistics, the optional ones, and the same analysis on Ray.

Saves a small AdamW checkpoint, then:

1. ``ostate inspect`` computes the core statistics only (what its default columns need);
   ``--compressibility`` (or ``--columns all``) adds Adam-mini compressibility and the
   8-bit error, and the JSON's ``statistics`` says which families it holds;
2. the same analysis runs as Ray tasks, each reading its share of the parameters, and
   gives the same table (``--executor ray`` on the command line; a local Ray of 2 CPUs here).

Run: python examples/scale_out.py   (part 2 needs ``pip install 'ostate[ray]'``)
"""

import json
import os
import subprocess
import sys
import tempfile

import torch

import ostate
from ostate.analysis import summarize
from ostate.distributed import RayExecutor, summarize_on_ray

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
for _ in range(5):
    model(torch.randn(32, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()
path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)


def inspect_json(*flags: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "ostate_cli.main", "inspect", path, "--format", "json", *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


# 1. The default computes the core; the optional families come when asked for.
default, full = inspect_json(), inspect_json("--compressibility")
print("default statistics:", default["statistics"], "| with --compressibility:", full["statistics"])
row = full["optimizers"][0]["params"][0]
print(
    f"{row['name']}: vmean_row_relchange={row['vmean_row_relchange']:.3g}, "
    f"exp_avg_q8_relerr={row['exp_avg_q8_relerr']:.3g}"
)

# 2. The same analysis on Ray: tasks read disjoint parameters, the driver merges their sketches.
try:
    import ray
except ImportError:
    print("Ray is not installed: pip install 'ostate[ray]' for the second part")
    sys.exit(0)
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
checkpoint = ostate.load(path)
local = summarize(checkpoint, statistics=()).table("layer")
distributed = summarize_on_ray(checkpoint, RayExecutor(tasks=2), statistics=()).table("layer")
ray.shutdown()
print("Ray tables equal the local ones:", distributed.equals(local))
print(distributed[["layer", "params", "numel", "eff_lr_p50"]].to_string(index=False))
