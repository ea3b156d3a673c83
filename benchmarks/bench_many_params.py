"""How fast is `ostate inspect` on a checkpoint of very many tiny parameters?

Per-tensor fixed costs (loading many small storages, one histogram per tensor, a task
per parameter, one table row each, rendering) dominate when a checkpoint holds
100,000 parameters of 4 elements. This writes such a checkpoint (a real
``torch.optim.AdamW`` step over ``--params`` parameters of ``--numel`` elements,
model and optimizer in one ``torch.save``), then measures whole processes (wall time,
CPU time and peak resident memory, from ``wait4``'s rusage, as
benchmarks/bench_inspect.py does):

- ``ostate inspect CKPT --format json`` (every parameter's row);
- ``ostate inspect CKPT --by model`` (the table a person reads first);
- the floor: ``torch.load(mmap=True)`` and one ``torch.sum`` of every tensor;
- ``ostate.load`` and ``ostate.analyze`` timed apart, in one process of their own
  (``--phases``: the split between reading and statistics), inside ``tuned_process()`` as
  the ``ostate`` program runs them.

Usage:
    python benchmarks/bench_many_params.py [--params 100000] [--numel 4] [--repeat 3] [--dir /tmp/ostate-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inspect  # noqa: E402  (the measuring helpers, beside this file)


def write_checkpoint(path: Path, params: int, numel: int, seed: int = 0) -> None:
    """``params`` parameters of ``numel`` elements after two real AdamW steps, saved in one torch.save."""
    import torch

    from ostate.demo import save_atomically

    torch.manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(numel)) for _ in range(params)]
    opt = torch.optim.AdamW(weights, lr=1e-3, weight_decay=0.1, foreach=True)
    for _ in range(2):
        for w in weights:
            w.grad = torch.randn(numel)
        opt.step()
    model = {f"blocks.{i // 4}.p{i % 4}": w.detach() for i, w in enumerate(weights)}
    save_atomically({"model": model, "optimizer": opt.state_dict()}, str(path))


def floor(path: str) -> None:
    import torch

    sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    print(sum(float(t.sum()) for t in bench_inspect._tensors(sd) if t.is_floating_point()))


def phases(path: str) -> None:
    """Time ``ostate.load`` and ``ostate.analyze`` apart, tuned as the ``ostate`` program runs them; print
    them with this process's peak RSS."""
    import contextlib
    import resource
    import time

    import ostate

    try:
        from ostate.analysis.native.tuning import tuned_process
    except ImportError:  # an older ostate (PYTHONPATH), whose load and analyze tuned the process themselves
        tuned_process = contextlib.nullcontext
    with tuned_process():
        start = time.perf_counter()
        checkpoint = ostate.load(path)
        loaded = time.perf_counter()
        table = ostate.analyze(checkpoint)
        analyzed = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"load {loaded - start:.2f} s, analyze {analyzed - loaded:.2f} s ({len(table)} rows), "
        f"peak RSS {bench_inspect.gb(peak)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/ostate-bench")
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--numel", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is shown)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by the next run)")
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--floor", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time ostate.load and ostate.analyze apart, in one process of their own",
    )
    args = parser.parse_args()
    if args.write:
        write_checkpoint(Path(args.write), args.params, args.numel)
        return
    if args.floor:
        floor(args.floor)
        return

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"adamw-{args.params}x{args.numel}.pt"
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        # A process of its own, so that this one stays small (a child's peak RSS starts from its parent's).
        subprocess.run(
            [sys.executable, __file__, "--write", str(path), "--params", str(args.params), "--numel", str(args.numel)],
            check=True,
        )
    python = sys.executable
    commands = {
        "floor: mmap + torch.sum of every tensor": [python, __file__, "--floor", str(path)],
        "ostate inspect --format json": [python, "-m", "ostate_cli.main", "inspect", str(path), "--format", "json"],
        "ostate inspect --by model": [python, "-m", "ostate_cli.main", "inspect", str(path), "--by", "model"],
    }
    try:
        print(
            f"checkpoint: {path} ({os.path.getsize(path) / 1e6:.0f} MB; {args.params:,} parameters of "
            f"{args.numel} elements, AdamW); {os.cpu_count()} cores, median of {args.repeat} warm-cache runs"
        )
        print()
        print(f"| {'measurement':<40} | {'wall s':>7} | {'CPU s':>7} | {'peak RSS':>9} |")
        print(f"|{'-' * 42}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
        for label, argv in commands.items():
            bench_inspect.warm(path)
            runs = [bench_inspect.measure(argv) for _ in range(args.repeat)]
            wall = statistics.median(r.wall_s for r in runs)
            cpu = statistics.median(r.cpu_s for r in runs)
            peak = max(r.peak_rss_bytes for r in runs)
            print(f"| {label:<40} | {wall:7.2f} | {cpu:7.2f} | {bench_inspect.gb(peak):>9} |", flush=True)
        if args.phases:
            bench_inspect.warm(path)
            print()
            subprocess.run(
                [
                    python,
                    "-c",
                    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import bench_many_params as b; b.phases({str(path)!r})",
                ],
                check=True,
            )
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
