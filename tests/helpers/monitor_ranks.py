"""Two gloo ranks on CPU training with ostate.Monitor: DDP (replicated), ZeroRedundancyOptimizer and FSDP2 (sharded).

Each scenario trains a tiny model for a few steps with the monitor at every step, then
rank 0 saves the monitor's last table beside the oracle: ``ostate.analyze`` of the whole
optimizer state gathered the plain way (DDP: any rank's ``state_dict()``;
ZeroRedundancyOptimizer: ``consolidate_state_dict``; FSDP2: ``get_optimizer_state_dict``
with ``full_state_dict=True``). Rank 1's monitor must return nothing and write nothing.
"""

from __future__ import annotations

import os
import pickle

import torch
from torch import nn

SCENARIOS = ("ddp", "zero", "fsdp2")


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32)), nn.Linear(32, 8)])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def run(directory: str, world_size: int = 2) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world_size, directory), nprocs=world_size, join=True)


def _worker(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed as dist

    import ostate
    from ostate.monitor import Monitor

    dist.init_process_group("gloo", init_method=f"file://{directory}/.store", rank=rank, world_size=world_size)
    results = {}
    try:
        for scenario in SCENARIOS:
            torch.manual_seed(0)
            model = Blocks()
            optimizer, trained = _setup(scenario, model)
            log = os.path.join(directory, f"{scenario}.csv")
            monitor = Monitor(optimizer, model, every=1, by="param", writer=log)
            g = torch.Generator().manual_seed(rank + 1)
            records = []
            for _ in range(3):
                trained(torch.randn(16, 8, generator=g)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                records.append(monitor.step())
            monitor.close()
            oracle = _oracle(scenario, model, optimizer, rank)
            results[scenario] = {
                "records": [None if r is None else r.table for r in records],
                "oracle": None if oracle is None else ostate.analyze(oracle, by="param"),
                "log_exists": os.path.exists(log),
            }
        with open(os.path.join(directory, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


def _setup(scenario: str, model: nn.Module):
    if scenario == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        return torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1), ddp
    if scenario == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        ddp = nn.parallel.DistributedDataParallel(model)
        return ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2), ddp
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model


def _oracle(scenario: str, model: nn.Module, optimizer, rank: int):
    import ostate

    if scenario == "ddp":
        return ostate.from_state_dict(optimizer.state_dict(), model=model) if rank == 0 else None
    if scenario == "zero":
        optimizer.consolidate_state_dict(to=0)
        return ostate.from_state_dict(optimizer.state_dict(), model=model) if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    state = get_optimizer_state_dict(model, optimizer, options=full)
    weights = get_model_state_dict(model, options=full)
    return ostate.from_state_dict(state, model=weights) if rank == 0 else None
