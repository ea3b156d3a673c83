"""Resume DeepSpeed checkpoints written by ``ostate reset`` with DeepSpeed itself and record the first step.

Usage: python -m tests.helpers.deepspeed_resume WORK LR CASE[=FIXTURE_DIR] ...  (from the repository root; needs deepspeed)

One spawn of two ranks (gloo on 127.0.0.1) does, for each case of
:data:`tests.helpers.deepspeed_train.CASES`:

1. the source checkpoint: ``FIXTURE_DIR`` when given, else the ranks train the case for three
   steps as tests/helpers/deepspeed_train.py does and save to ``WORK/CASE``;
2. rank 0 writes ``WORK/CASE-reset`` with ``ostate.reset(source, ..., "reset-m", lr=LR)``
   (the library call behind ``ostate reset --strategy reset-m --lr LR``);
3. both ranks build the case's engine (weights unlike the saved ones, lr as configured),
   ``engine.load_checkpoint(WORK/CASE-reset)``, record the inner optimizer's param groups,
   gather each trainable parameter's fp32 weight and Adam moments (DeepSpeed's
   ``safe_get_full_*``), take one ``engine.step()`` on a batch of their own and gather the
   weights again.

Rank 0 writes ``WORK/resumed.pt``: per case the groups, the state before and the weights
after the step, and each rank's batch (the test replays the step with torch's AdamW).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from tests.helpers.deepspeed_train import STEPS, TAG, TinyNet, config, free_port, ground_truth, param_groups, start_rank

WORLD_SIZE = 2
STRATEGY = "reset-m"


def batch(rank: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = generator or torch.Generator().manual_seed(500 + rank)
    return torch.randn(4, 7, generator=g), torch.randn(4, 3, generator=g)


def train(case: str, rank: int, run_dir: str) -> None:
    """The source checkpoint, as tests/helpers/deepspeed_train.py writes one."""
    import deepspeed

    torch.manual_seed(0)
    model = TinyNet()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=config(case))
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x, y = batch(rank, g)
        engine.backward((engine(x) - y).square().mean())
        engine.step()
    engine.save_checkpoint(run_dir, tag=TAG)


def resume(case: str, rank: int, checkpoint: str) -> dict:
    import deepspeed

    torch.manual_seed(1)  # weights unlike the saved ones: the load must overwrite them
    model = TinyNet()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=config(case))
    engine.load_checkpoint(checkpoint, tag=TAG)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer DeepSpeed steps
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    before = ground_truth(engine)
    x, y = batch(rank)
    engine.backward((engine(x) - y).square().mean())
    engine.step()
    after = {name: truth["fp32"] for name, truth in ground_truth(engine).items()}
    return {"groups": groups, "before": before, "after": after}


def worker(rank: int, world_size: int, port: int, work: str, lr: float, cases: list[tuple[str, str | None]]) -> None:
    start_rank(rank, world_size, port)
    import deepspeed.comm as dist

    from ostate.reset.write import reset

    recorded = {}
    for case, fixture in cases:
        source = fixture or os.path.join(work, case)
        if fixture is None:
            train(case, rank, source)
        target = os.path.join(work, f"{case}-reset")
        if rank == 0:
            reset(source, target, STRATEGY, lr=lr)
        dist.barrier()
        recorded[case] = resume(case, rank, target)
        recorded[case]["batches"] = [batch(r) for r in range(world_size)]
    if rank == 0:
        torch.save(recorded, os.path.join(work, "resumed.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    work, lr, specs = argv[0], float(argv[1]), argv[2:]
    cases = [(case, fixture or None) for case, _, fixture in (s.partition("=") for s in specs)]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Private build folder for DeepSpeed's C++ ops: see tests/test_deepspeed.py.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="ostate-torch-ext-"))
    torch.multiprocessing.spawn(worker, args=(WORLD_SIZE, free_port(), work, lr, cases), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main(sys.argv[1:])
