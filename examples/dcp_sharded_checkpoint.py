"""Save a sharded torch.distributed.checkpoint from two processes, then read it with no process group.

Two CPU processes (gloo) train a small model under FSDP2 (`fully_shard`), so every
weight and optimizer moment is split in two, and save it with `dcp.save`: each rank
writes its own `__<rank>_0.distcp` file. ostate then reads the directory from this
single process: it reassembles each tensor from its chunks, reading only their byte
ranges, when a statistic needs it.

Run: python examples/dcp_sharded_checkpoint.py [WORKDIR]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ostate
from ostate.report import inspect, render


def train_and_save(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.abspath(directory)}.store", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(10):
        x = torch.randn(64, 8, generator=generator)
        loss = (model(x).squeeze(-1) - x.sum(-1).sin()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=directory,
    )
    # Both ranks leave together: a rank tearing down gloo while its peer still finishes
    # dcp.save's last collective aborts ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    # The files are written; the process's own teardown can still abort in gloo's threads
    # now and then (the same message), so the rank leaves without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    workdir = sys.argv[1] if len(sys.argv) > 1 else "dcp-demo"
    directory = os.path.join(workdir, "step-10")
    os.makedirs(workdir, exist_ok=True)
    mp.spawn(train_and_save, args=(2, directory), nprocs=2, join=True)
    print(f"two ranks saved {directory}: {', '.join(sorted(os.listdir(directory)))}\n")

    checkpoint = ostate.load(directory)  # no process group here
    print(render(inspect(checkpoint)))
    weight = checkpoint.optimizers[0].param("2.weight")
    print(f"2.weight exp_avg reassembled from both ranks' chunks: shape {tuple(weight.read('exp_avg').shape)}")
