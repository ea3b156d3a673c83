"""How fast is `ostate inspect` on a large checkpoint, against the floor and the straightforward way?

Writes an AdamW checkpoint (by default 24 ``Linear(4096, 4096)`` layers after one
step, model and optimizer in one ``torch.save``: 4.8 GB; it needs that much free disk
in ``--dir``), warms the page cache, and measures whole processes (wall time and peak
resident memory, from ``wait4``'s rusage):

- ``ostate inspect CKPT --format json`` (the default statistics) and
  ``ostate inspect CKPT --format json --columns all`` (every statistic, compressibility
  and the 8-bit error too);
- the floor: memory-map the file and read every tensor once (``torch.sum``);
- the straightforward way: ``torch.load`` everything and compute the same per-tensor
  statistics with plain torch ops (sorting for quantiles, ``torch.bucketize`` for the
  8-bit codes);
- with ``--plots``, also ``ostate plot CKPT -o plot.png --kind K`` for every plot kind.

``--larger-than-memory GB`` instead writes a checkpoint of about that size (more than
this machine's memory), runs ``ostate inspect`` on it and reports its peak memory.
That checkpoint is written without holding it in memory: ``torch.save`` under
``torch.serialization.skip_data`` lays out the file, and each layer's tensors (from a
real ``torch.optim.AdamW`` step on that layer alone) are written into a shared memory
map of it.

Every checkpoint written is deleted at the end unless ``--keep`` is given.

Usage:
    python benchmarks/bench_inspect.py [--dir /tmp/ostate-bench] [--layers 24] [--width 4096] [--repeat 3] [--plots]
    python benchmarks/bench_inspect.py --larger-than-memory 30 [--dir /tmp/ostate-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLOT_KINDS = ("lr-histogram", "layer-profile", "moments")
DEFAULT = "ostate inspect --format json"
FULL = "ostate inspect --format json --columns all"
# Targets, as multiples of the floor's wall time measured in the same run.
DEFAULT_TARGET = 2.5
FULL_TARGET = 4.0


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_bytes(layers: int, width: int) -> int:
    """Weights, biases and AdamW's two moments, float32."""
    return layers * (width * width + width) * 4 * 3


def write_checkpoint(path: Path, layers: int, width: int, seed: int = 0) -> None:
    """A real model after one real AdamW step, saved in one torch.save (needs ~1.4x its size in memory)."""
    import torch
    from torch import nn

    from ostate.demo import save_atomically

    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(torch.randn(8, width)).square().mean().backward()
    opt.step()
    for p in model.parameters():
        p.grad = None
    save_atomically({"model": model.state_dict(), "optimizer": opt.state_dict()}, str(path))


def write_checkpoint_streamed(path: Path, layers: int, width: int, seed: int = 0) -> None:
    """The same layout without holding the checkpoint in memory (for checkpoints larger than memory)."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ostate.formats.files.pages import page_releaser

    probe = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=0.1)
    group = {k: v for k, v in probe.state_dict()["param_groups"][0].items() if k != "params"}
    with FakeTensorMode():
        model = {}
        state = {}
        for i in range(layers):
            for j, (name, shape) in enumerate(((f"{i}.weight", (width, width)), (f"{i}.bias", (width,)))):
                model[name] = torch.empty(shape)
                state[2 * i + j] = {"exp_avg": torch.empty(shape), "exp_avg_sq": torch.empty(shape)}
    for entry in state.values():
        entry["step"] = torch.tensor(1.0)
    layout = {"model": model, "optimizer": {"state": state, "param_groups": [dict(group, params=list(state))]}}
    tmp = path.with_suffix(".partial")
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(layout, tmp)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        target = torch.load(tmp, mmap=True, weights_only=True)
    for entry in target["optimizer"]["state"].values():
        entry["step"].fill_(1.0)  # skip_data left every tensor's bytes empty, these too
    torch.manual_seed(seed)
    for i in range(layers):
        layer = nn.Linear(width, width)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.1)
        layer(torch.randn(8, width)).square().mean().backward()
        opt.step()
        for j, (name, p) in enumerate((("weight", layer.weight), ("bias", layer.bias))):
            pairs = [(target["model"][f"{i}.{name}"], p.detach())]
            pairs += [(target["optimizer"]["state"][2 * i + j][k], opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq")]
            for destination, source in pairs:
                destination.copy_(source)
                page_releaser(destination)(0, None)  # written to the page cache; not kept in this process
        print(f"\r  layer {i + 1}/{layers}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    del target
    os.replace(tmp, path)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# ---------------------------------------------------------------------------- the two baselines
def floor(path: str) -> None:
    """Memory-map the file and read every tensor once."""
    import torch

    sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    total = 0.0
    for t in _tensors(sd):
        if t.is_floating_point():
            total += float(t.sum())
    print(total)


def straightforward(path: str) -> None:
    """torch.load everything, then the same per-tensor statistics with plain torch ops."""
    import torch

    sd = torch.load(path, weights_only=True, map_location="cpu")
    model, optimizer = sd["model"], sd["optimizer"]
    names = list(model)
    qs = torch.tensor([0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    (group,) = optimizer["param_groups"]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    signed = _dynamic_map(True)
    unsigned = _dynamic_map(False)
    rows = []
    for index, state in optimizer["state"].items():
        m, v, w = state["exp_avg"], state["exp_avg_sq"], model[names[index]]
        t = float(state["step"])
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        vhat = v / bc2
        eff = lr / (vhat.sqrt() + eps)
        snr = torch.where(v > 0, (m.abs() / bc1) / vhat.sqrt(), torch.zeros_like(v))
        update = -lr / (1 - beta1 ** (t + 1)) * beta1 * m / ((beta2 * v / (1 - beta2 ** (t + 1))).sqrt() + eps)
        row = {"name": names[index]}
        for name, x in (
            ("eff_lr", eff),
            ("exp_avg_abs", m.abs()),
            ("exp_avg_sq", v),
            ("snr", snr),
            ("update", update),
            ("weight", w),
        ):
            x = x.reshape(-1)
            ordered = x.sort().values
            row.update(
                {
                    f"{name}_mean": float(x.mean()),
                    f"{name}_rms": float(x.square().mean().sqrt()),
                    f"{name}_min": float(ordered[0]),
                    f"{name}_max": float(ordered[-1]),
                }
            )
            ranks = (qs * (x.numel() - 1)).floor().long()
            row.update({f"{name}_q{int(q * 100)}": float(ordered[r]) for q, r in zip(qs, ranks)})
        row["second_moment_zero_frac"] = float((v == 0).float().mean())
        row["eps_dominated_frac"] = float((vhat.sqrt() <= eps).float().mean())
        row["nonfinite_frac"] = float((~torch.isfinite(m) | ~torch.isfinite(v)).float().mean())
        row["update_to_weight_rms"] = float(update.square().mean().sqrt() / w.square().mean().sqrt())
        a = 1 / (vhat.sqrt() + eps)
        u = m * a
        matrix = vhat.reshape(vhat.shape[0], -1) if vhat.dim() > 1 else vhat.reshape(1, -1)
        for level, mean in (("tensor", vhat.mean()), ("row", matrix.mean(1, keepdim=True).expand_as(matrix))):
            shared = 1 / (mean.sqrt() + eps)
            row[f"vmean_{level}_relchange"] = float(
                (m.reshape(matrix.shape) * (a.reshape(matrix.shape) - shared)).norm() / u.norm()
            )
        for key, x, code in (("exp_avg", m, signed), ("exp_avg_sq", v, unsigned)):
            row[f"{key}_q8_relerr"] = _blockwise_error(x.reshape(-1), code)
        rows.append(row)
    print(json.dumps(rows)[:200])


def _dynamic_map(signed: bool):
    import torch

    values = []
    for k in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (k if signed else k + 1) + 1)
        centres = (10.0 ** (k - 6)) * (edges[:-1] + edges[1:]) / 2
        values += centres.tolist() + ((-centres).tolist() if signed else [])
    return torch.tensor(sorted(values + [0.0, 1.0]))


def _blockwise_error(x, code) -> float:
    import torch

    blocks = x.reshape(-1, 256)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-38)
    y = blocks / absmax
    index = torch.bucketize(y, (code[1:] + code[:-1]) / 2)
    return float(((y - code[index]) * absmax).norm() / x.norm())


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


# ---------------------------------------------------------------------------- measuring
@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float  # user + system time of the process: less sensitive than wall time to a busy machine


def measure(argv: list[str], *, stdout=subprocess.DEVNULL, env: dict | None = None) -> Run:
    """Wall time and peak resident memory of one whole process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}):\n{stderr[-2000:]}")
    return Run(wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)  # ru_maxrss is in KiB on Linux


def median_run(argv: list[str], repeat: int) -> Run:
    runs = [measure(argv) for _ in range(repeat)]
    return Run(
        statistics.median(r.wall_s for r in runs),
        max(r.peak_rss_bytes for r in runs),
        statistics.median(r.cpu_s for r in runs),
    )


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_disk(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * 1.05:
        raise SystemExit(f"{directory} has {gb(free)} free; this needs {gb(needed)} (choose another --dir)")


def run_benchmark(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    size = checkpoint_bytes(args.layers, args.width)
    path = directory / f"adamw-{args.layers}x{args.width}.pt"
    if not path.exists():
        check_disk(directory, size)
        print(f"writing {path} ({gb(size)}) ...", file=sys.stderr)
        # In a process of its own: on Linux a child's peak RSS starts from its parent's at
        # fork, so this process must stay small for the measurements below to be right.
        subprocess.run(
            [sys.executable, __file__, "--write", str(path), "--layers", str(args.layers), "--width", str(args.width)],
            check=True,
        )
    python = sys.executable
    commands = {
        "floor: mmap + torch.sum of every tensor": [python, __file__, "--floor", str(path)],
        DEFAULT: [python, "-m", "ostate_cli.main", "inspect", str(path), "--format", "json"]
        + (["--workers", str(args.workers)] if args.workers else []),
        FULL: [python, "-m", "ostate_cli.main", "inspect", str(path), "--format", "json", "--columns", "all"]
        + (["--workers", str(args.workers)] if args.workers else []),
        "straightforward: torch.load + plain torch ops": [python, __file__, "--straightforward", str(path)],
    }
    figures = [directory / f"plot-{kind}.png" for kind in PLOT_KINDS] if args.plots else []
    for kind, figure in zip(PLOT_KINDS, figures):
        commands[f"ostate plot --kind {kind}"] = [
            python,
            "-m",
            "ostate_cli.main",
            "plot",
            str(path),
            "-o",
            str(figure),
            "--kind",
            kind,
        ] + (["--workers", str(args.workers)] if args.workers else [])
    try:
        results = {}
        for label, argv in commands.items():
            repeat = 1 if label.startswith("straightforward") and not args.repeat_straightforward else args.repeat
            if label.startswith("straightforward") and args.skip_straightforward:
                continue
            warm(path)
            print(f"measuring: {label} (x{repeat}) ...", file=sys.stderr)
            results[label] = median_run(argv, repeat)
        report(path, size, args, results)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            for figure in figures:
                figure.unlink(missing_ok=True)


def report(path: Path, size: int, args: argparse.Namespace, results: dict[str, Run]) -> None:
    base = results["floor: mmap + torch.sum of every tensor"].wall_s
    ours = results[DEFAULT]
    print(f"checkpoint: {path} ({gb(size)}; {args.layers} x Linear({args.width}, {args.width}), AdamW after one step)")
    print(
        f"machine: {os.cpu_count()} cores, {gb(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} memory, "
        f"load average {os.getloadavg()[0]:.1f} at the end; median of {args.repeat} warm-cache runs "
        "(straightforward: 1 run)"
    )
    print()
    cpu_base = results["floor: mmap + torch.sum of every tensor"].cpu_s
    print(f"| {'measurement':<46} | {'wall s':>7} | {'x floor':>7} | {'CPU s':>7} | {'x floor':>7} | {'peak RSS':>9} |")
    print(f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for label, run in results.items():
        print(
            f"| {label:<46} | {run.wall_s:7.2f} | {run.wall_s / base:7.2f} | {run.cpu_s:7.2f} | "
            f"{run.cpu_s / cpu_base:7.2f} | {gb(run.peak_rss_bytes):>9} |"
        )
    print()
    print(
        f"default ostate / floor: {ours.wall_s / base:.2f}x (target <= {DEFAULT_TARGET}x); "
        f"peak RSS {gb(ours.peak_rss_bytes)} (target < 1.5 GB)"
    )
    full = results[FULL]
    print(
        f"every statistic (--columns all) / floor: {full.wall_s / base:.2f}x (target <= {FULL_TARGET}x); "
        f"peak RSS {gb(full.peak_rss_bytes)}"
    )
    naive = results.get("straightforward: torch.load + plain torch ops")
    if naive:
        print(f"straightforward / ostate: {naive.wall_s / ours.wall_s:.1f}x (target >= 5x)")


def run_larger_than_memory(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    layers = max(1, math.ceil(args.larger_than_memory * 1e9 / checkpoint_bytes(1, args.width)))
    size = checkpoint_bytes(layers, args.width)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    path = directory / f"adamw-{layers}x{args.width}-large.pt"
    check_disk(directory, size)
    print(f"writing {path} ({gb(size)}; this machine has {gb(memory)} of memory) ...", file=sys.stderr)
    try:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--write-streamed",
                str(path),
                "--layers",
                str(layers),
                "--width",
                str(args.width),
            ],
            check=True,
        )  # keeps this process small (see above)
        print(f"written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        argv = [sys.executable, "-m", "ostate_cli.main", "inspect", str(path), "--format", "json", "--by", "model"]
        with open(directory / "large-inspect.json", "w") as out:
            run = measure(argv, stdout=out)
        data = json.loads((directory / "large-inspect.json").read_text())
        (row,) = data["optimizers"][0]["rows"]
        print(
            f"checkpoint: {path} ({gb(size)}, {layers} x Linear({args.width}, {args.width}); "
            f"machine memory {gb(memory)})"
        )
        print(
            f"ostate inspect --format json --by model: {run.wall_s:.1f} s, peak RSS {gb(run.peak_rss_bytes)}, "
            f"{row['params']} parameters, {row['numel']:,} coordinates, eff_lr_p50 {row['eff_lr_p50']:.4g}"
        )
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            path.with_suffix(".partial").unlink(missing_ok=True)
        (directory / "large-inspect.json").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/ostate-bench", help="where checkpoints are written")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is shown)")
    parser.add_argument("--repeat-straightforward", action="store_true", help="repeat the slow baseline too")
    parser.add_argument("--skip-straightforward", action="store_true")
    parser.add_argument("--workers", type=int, help="pass --workers N to ostate inspect")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (reused by the next run)")
    parser.add_argument("--plots", action="store_true", help="also time `ostate plot` of each kind on the checkpoint")
    parser.add_argument(
        "--larger-than-memory", type=float, metavar="GB", help="instead: inspect a checkpoint of about this many GB"
    )
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--write-streamed", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--floor", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--straightforward", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_checkpoint(Path(args.write), args.layers, args.width)
    elif args.write_streamed:
        write_checkpoint_streamed(Path(args.write_streamed), args.layers, args.width)
    elif args.floor:
        floor(args.floor)
    elif args.straightforward:
        straightforward(args.straightforward)
    elif args.larger_than_memory:
        run_larger_than_memory(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
