"""Two DeepSpeed ranks on CPU (gloo) training with ostate.Monitor: ZeRO stages 1-3 and the BF16_Optimizer.

Usage: python -m tests.helpers.monitor_deepspeed OUT  (from the repository root; needs deepspeed)

For each case of :data:`CASES` (tests/helpers/deepspeed_train.py's model, param groups and
configs) both ranks train three steps with the monitor at every step after
``engine.step()``, then save a checkpoint with ``engine.save_checkpoint``; rank 0 pickles
the monitor's records (per parameter and per layer) beside the oracle: ``ostate.analyze``
of ``ostate.load`` of that checkpoint (what ``ostate inspect`` shows) and of the whole state
DeepSpeed itself gathers (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``),
to ``OUT/rank0.pkl`` (rank 1: its records, which must be ``None``). The stage 3 case gives
the monitor the engine itself (no model): names come from ``engine.module``; the stage 1
case gives it accelerate's ``DeepSpeedOptimizerWrapper``, as the Hugging Face Trainer does.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time

import torch

from tests.helpers.deepspeed_train import STEPS, TAG, TinyNet, config, free_port, ground_truth, param_groups, start_rank

CASES = ("zero1", "zero2", "zero3", "zero3_subgroups", "bf16")


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    start_rank(rank, world_size, port)
    import deepspeed
    import deepspeed.comm as dist

    import ostate
    from ostate.monitor import Monitor

    results = {}
    for case in CASES:
        torch.manual_seed(0)
        model = TinyNet()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=config(case))
        if case == "zero3":
            monitors = {"param": Monitor(engine, every=1, by="param", writer=os.path.join(out, f"{case}.csv"))}
        else:
            optimizer = _trainer_optimizer(engine) if case == "zero1" else engine.optimizer
            monitors = {
                by: Monitor(optimizer, engine.module, every=1, by=by, writer=os.path.join(out, f"{case}_{by}.csv"))
                for by in ("param", "layer")
            }
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        g = torch.Generator().manual_seed(100 + rank)
        records: dict[str, list] = {by: [] for by in monitors}
        seconds = []
        for _ in range(STEPS):
            x, y = torch.randn(4, 7, generator=g).to(dtype), torch.randn(4, 3, generator=g)
            engine.backward((engine(x).float() - y).square().mean())
            engine.step()
            for by, monitor in monitors.items():
                began = time.perf_counter()
                record = monitor.step()
                seconds.append(time.perf_counter() - began)
                records[by].append(None if record is None else record.table)
        for monitor in monitors.values():
            monitor.close()
        run_dir = os.path.join(out, case)
        engine.save_checkpoint(run_dir, tag=TAG)
        truth = ground_truth(engine)
        dist.barrier()
        result = {"records": records, "seconds": seconds}
        if rank == 0:
            loaded = ostate.load(run_dir)
            result["oracle"] = {by: ostate.analyze(loaded, by=by) for by in ("param", "layer")}
            result["gathered"] = ostate.analyze(_gathered_state(engine, truth), by="param")
        results[case] = result
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


def _trainer_optimizer(engine):
    """What a Hugging Face Trainer under DeepSpeed holds as its optimizer: accelerate's wrapper of ``engine.optimizer``.

    Made without its ``__init__`` (which wants accelerate's launcher state): the monitor
    reads only its class and its ``optimizer`` attribute.
    """
    from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper

    wrapper = DeepSpeedOptimizerWrapper.__new__(DeepSpeedOptimizerWrapper)
    wrapper.optimizer = engine.optimizer
    return wrapper


def _gathered_state(engine, truth):
    """The whole state DeepSpeed gathers, as a torch optimizer state dict named from the model."""
    import ostate

    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    inner = engine.optimizer.optimizer
    step = next(iter(inner.state.values()))["step"]
    state = {
        i: {"step": step, "exp_avg": truth[n]["exp_avg"], "exp_avg_sq": truth[n]["exp_avg_sq"]}
        for i, n in enumerate(names)
    }
    groups = []
    for suffix, group in zip(("weight", "bias"), inner.param_groups):  # param_groups(): weights, then biases
        members = [i for i, n in enumerate(names) if n.endswith(suffix)]
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": members, "param_names": [names[i] for i in members]})
    weights = {n: truth[n]["fp32"] for n in names}
    return ostate.from_state_dict({"state": state, "param_groups": groups}, model=weights)


def main(out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="ostate-torch-ext-"))
    torch.multiprocessing.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)


if __name__ == "__main__":
    main(sys.argv[1])
