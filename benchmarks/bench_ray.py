"""How does `--executor ray` scale? The parts of the scaling model, measured on a local Ray cluster.

Writes the AdamW checkpoint of benchmarks/bench_inspect.py (``--layers`` x
``Linear(width, width)``, model and optimizer in one ``torch.save``), starts a local Ray
cluster with ``--cpus`` CPUs, and times, in this process, with the page cache warm:

- before Ray starts: the index, ``ostate.load`` (every Ray task repeats it: it does not
  split); the analysis in this process, ``summarize(..., workers=1)`` inside
  ``tuned_process()`` (one worker's throughput); and the driver's merge, building the
  ``param`` and ``model`` tables from the summaries of ``--merge-params`` tiny parameters;
- ``summarize_on_ray`` with 1, 2, ... ``--cpus`` tasks (after one untimed run that starts
  the workers; median of ``--repeat``), each result checked against the local one.

It prints the figures that docs/performance.md's projection uses: throughput per
worker (GB/s of state and weights read), the index time, the merge time per parameter,
and Ray's fixed cost per call.

Usage:
    python benchmarks/bench_ray.py [--layers 4] [--width 4096] [--cpus 2] [--dir /tmp/ostate-bench] [--keep]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inspect  # noqa: E402  (the checkpoint writer, beside this file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/ostate-bench")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each Ray measurement (the median is shown)")
    parser.add_argument("--merge-params", type=int, default=20_000, help="tiny parameters for the merge's cost")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by the next run)")
    args = parser.parse_args()

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    size = bench_inspect.checkpoint_bytes(args.layers, args.width)
    path = directory / f"adamw-{args.layers}x{args.width}.pt"
    if not path.exists():
        print(f"writing {path} ({bench_inspect.gb(size)}) ...", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                bench_inspect.__file__,
                "--write",
                str(path),
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
            ],
            check=True,
        )
    try:
        measure(path, size, args)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


def merge_cost(params: int) -> tuple[float, int]:
    """Seconds the driver takes to build the param and model tables of ``params`` tiny parameters' summaries."""
    import torch

    import ostate
    from ostate.analysis import summarize
    from ostate.analysis.engine import analysis_of

    weights = [torch.nn.Parameter(torch.randn(4)) for _ in range(params)]
    opt = torch.optim.AdamW(weights, lr=1e-3)
    for w in weights:
        w.grad = torch.randn(4)
    opt.step()
    checkpoint = ostate.from_state_dict(opt.state_dict())
    summaries = [o.summaries for o in summarize(checkpoint, workers=1).optimizers]
    started = time.perf_counter()
    merged = analysis_of(checkpoint.optimizers, summaries, None, None)
    merged.table("param"), merged.table("model")
    return time.perf_counter() - started, params


def measure(path: Path, size: int, args: argparse.Namespace) -> None:
    import ray

    import ostate
    from ostate.analysis import summarize
    from ostate.analysis.native.tuning import tuned_process
    from ostate.distributed import RayExecutor, summarize_on_ray

    bench_inspect.warm(path)
    with tuned_process():  # before Ray starts: its processes would share the cores
        started = time.perf_counter()
        checkpoint = ostate.load(path)
        index = time.perf_counter() - started
        started = time.perf_counter()
        local = summarize(checkpoint, workers=1)
        one_worker = time.perf_counter() - started
        merge, params = merge_cost(args.merge_params)
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - started
    summarize_on_ray(checkpoint, RayExecutor(tasks=args.cpus))  # starts the workers: not timed
    on_ray = {}
    for tasks in range(1, args.cpus + 1):
        runs = []
        for _ in range(args.repeat):
            bench_inspect.warm(path)
            started = time.perf_counter()
            result = summarize_on_ray(checkpoint, RayExecutor(tasks=tasks))
            runs.append(time.perf_counter() - started)
            assert result.table("model").equals(local.table("model"))
        on_ray[tasks] = statistics.median(runs)
    ray.shutdown()
    load = os.getloadavg()
    print(
        f"checkpoint: {path} ({bench_inspect.gb(size)}, {args.layers} x Linear({args.width}, {args.width}), "
        f"{sum(len(o.summaries) for o in local.optimizers)} parameters); local Ray cluster of {args.cpus} CPUs on a machine of {os.cpu_count()} cores; "
        f"load average {load[0]:.1f} at the end"
    )
    print()
    print("| measurement | s | GB/s of checkpoint |")
    print("|---|---:|---:|")
    print(f"| Ray start-up (ray.init, local cluster) | {ray_start:.2f} | |")
    print(f"| the index: ostate.load (every task repeats it) | {index:.2f} | |")
    print(f"| one worker in this process: summarize(workers=1) | {one_worker:.2f} | {size / 1e9 / one_worker:.3f} |")
    print(f"| the driver's merge: param and model tables of {params:,} tiny parameters | {merge:.3f} | |")
    for tasks, seconds in on_ray.items():
        print(
            f"| summarize_on_ray, {tasks} task{'s' if tasks > 1 else ''} | {seconds:.2f} | {size / 1e9 / seconds:.3f} |"
        )
    print()
    print(
        f"per worker: {size / 1e9 / one_worker:.3f} GB/s; index {index:.2f} s; merge "
        f"{merge / max(params, 1) * 1e6:.0f} us per parameter; Ray's cost per call with 1 task "
        f"{on_ray[1] - one_worker - index:.2f} s beyond the index and the work (median of {args.repeat})"
    )


if __name__ == "__main__":
    main()
