"""Load a DeepSpeed checkpoint with DeepSpeed itself and record the optimizer state it restored.

Usage: python -m tests.helpers.deepspeed_load CHECKPOINT_DIR CASE OUT  (from the repository root; needs deepspeed)

Two ranks (as tests/helpers/deepspeed_train.py wrote the checkpoints) build the same engine
for ``CASE`` (:data:`tests.helpers.deepspeed_train.CASES`), call ``engine.load_checkpoint`` on
``CHECKPOINT_DIR``, and gather each trainable parameter's full fp32 weight and Adam
moments with DeepSpeed's own ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``,
with the inner optimizer's step and param-group keys; rank 0 writes them to ``OUT``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from tests.helpers.deepspeed_train import TAG, TinyNet, config, free_port, ground_truth, param_groups, start_rank

WORLD_SIZE = 2


def worker(rank: int, world_size: int, port: int, checkpoint: str, case: str, out: str) -> None:
    start_rank(rank, world_size, port)
    import deepspeed
    import deepspeed.comm as dist

    torch.manual_seed(1)  # weights unlike the saved ones: the load must overwrite them
    model = TinyNet()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=config(case))
    engine.load_checkpoint(checkpoint, tag=TAG)
    loaded = ground_truth(engine)
    inner = engine.optimizer.optimizer
    steps = sorted({float(s["step"]) for s in inner.state.values() if "step" in s})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    if rank == 0:
        torch.save({"params": loaded, "steps": steps, "groups": groups}, out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    checkpoint, case, out = argv
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Private build folder for DeepSpeed's C++ ops: see tests/test_deepspeed.py.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="ostate-torch-ext-"))
    torch.multiprocessing.spawn(
        worker, args=(WORLD_SIZE, free_port(), checkpoint, case, out), nprocs=WORLD_SIZE, join=True
    )


if __name__ == "__main__":
    main(sys.argv[1:])
