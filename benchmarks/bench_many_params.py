"""How fast is `ostate inspect` on a checkpoint of very many tiny parameters?

Per-tensor fixed costs (loading many small storages, one histogram per tensor, a task
per parameter, one table row each, rendering) dominate when a checkpoint holds
100,000 parameters of 4 elements. This writes such a checkpoint (a real
``torch.optim.AdamW`` step over ``--params`` parameters of ``--numel`` elements,
model and optimizer in one ``torch.save``), then measures whole processes (wall time,
CPU time and peak resident memory, from ``wait4``'s rusage, as
benchmarks/bench_inspect.py does):

- ``ostate inspect CKPT`` (the default table, a row per parameter);
- ``ostate inspect CKPT --format json`` (every parameter's row);
- ``ostate inspect CKPT --by model`` (the table a person reads first);
- ``torch.load(weights_only=True)`` alone, what ostate read with before its own reader;
- the floor: ``torch.load(mmap=True)`` and one ``torch.sum`` of every tensor;
- ``ostate.load`` and ``ostate.analyze`` timed apart, in one process of their own
  (``--phases``: the split between reading and statistics), inside ``tuned_process()`` as
  the ``ostate`` program runs them.

``--moe LAYERS EXPERTS`` writes a mixture of experts instead: a transformers
``Qwen2MoeForCausalLM`` built from a small config (hidden size 16, expert size 8, a
shared expert) with LAYERS layers of EXPERTS experts, trained by two real AdamW steps
with each expert's three matrices as parameters of their own, named as transformers
4.x named them (``model.layers.L.mlp.experts.E.gate_proj.weight``, ``up_proj``,
``down_proj``). transformers 5 keeps each layer's experts fused in two 3-D
parameters (``mlp.experts.gate_up_proj``, ``down_proj``), so this layout is built
explicitly from the model's own tensors: slices of the fused ones, one expert each.
``--moe 32 512`` gives 49,152 expert matrices and 49,697 parameters in all.

Usage:
    python benchmarks/bench_many_params.py [--params 100000] [--numel 4] [--repeat 3] [--dir /tmp/ostate-bench]
    python benchmarks/bench_many_params.py --moe 32 512 [--repeat 1]
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


def moe_parameters(layers: int, experts: int, seed: int = 0) -> dict:
    """A small Qwen2-MoE's parameters with every expert's matrices apart, in the model's order (module doc)."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        vocab_size=256,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=experts,
        num_experts_per_tok=2,
    )
    model = Qwen2MoeForCausalLM(config)
    out: dict = {}
    fused: dict = {}
    for name, p in model.named_parameters():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            fused[name] = p.detach()
            prefix = name.rsplit(".", 1)[0]
            if f"{prefix}.gate_up_proj" in fused and f"{prefix}.down_proj" in fused:
                gate_up, down = fused[f"{prefix}.gate_up_proj"], fused[f"{prefix}.down_proj"]
                half = gate_up.shape[1] // 2  # (experts, 2 * expert size, hidden)
                for e in range(gate_up.shape[0]):
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate_up[e, :half].clone()
                    out[f"{prefix}.{e}.up_proj.weight"] = gate_up[e, half:].clone()
                    out[f"{prefix}.{e}.down_proj.weight"] = down[e].clone()
        else:
            out[name] = p.detach().clone()
    return out


def write_moe_checkpoint(path: Path, layers: int, experts: int, seed: int = 0) -> None:
    """The MoE layout after two real AdamW steps, model and optimizer in one torch.save."""
    import torch

    from ostate.demo import save_atomically

    tensors = moe_parameters(layers, experts, seed)
    weights = {name: torch.nn.Parameter(t) for name, t in tensors.items()}
    opt = torch.optim.AdamW(weights.values(), lr=1e-3, weight_decay=0.1, foreach=True)
    for _ in range(2):
        for w in weights.values():
            w.grad = torch.randn_like(w)
        opt.step()
    model = {name: w.detach() for name, w in weights.items()}
    save_atomically({"model": model, "optimizer": opt.state_dict()}, str(path))


def torch_load_alone(path: str) -> None:
    import torch

    sd = torch.load(path, weights_only=True, map_location="cpu")
    print(len(sd))


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
    parser.add_argument(
        "--moe", nargs=2, type=int, metavar=("LAYERS", "EXPERTS"), help="a mixture-of-experts layout instead"
    )
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--torch-load", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--floor", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time ostate.load and ostate.analyze apart, in one process of their own",
    )
    args = parser.parse_args()
    if args.write:
        if args.moe:
            write_moe_checkpoint(Path(args.write), *args.moe)
        else:
            write_checkpoint(Path(args.write), args.params, args.numel)
        return
    if args.torch_load:
        torch_load_alone(args.torch_load)
        return
    if args.floor:
        floor(args.floor)
        return

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    if args.moe:
        path = directory / f"moe-{args.moe[0]}x{args.moe[1]}.pt"
        layout = ["--moe", *map(str, args.moe)]
        what = f"Qwen2-MoE layout, {args.moe[0]} layers x {args.moe[1]} experts x 3 matrices apart"
    else:
        path = directory / f"adamw-{args.params}x{args.numel}.pt"
        layout = ["--params", str(args.params), "--numel", str(args.numel)]
        what = f"{args.params:,} parameters of {args.numel} elements"
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        # A process of its own, so that this one stays small (a child's peak RSS starts from its parent's).
        subprocess.run([sys.executable, __file__, "--write", str(path), *layout], check=True)
    python = sys.executable
    commands = {
        "floor: mmap + torch.sum of every tensor": [python, __file__, "--floor", str(path)],
        "torch.load(weights_only=True) alone": [python, __file__, "--torch-load", str(path)],
        "ostate inspect": [python, "-m", "ostate_cli.main", "inspect", str(path)],
        "ostate inspect --format json": [python, "-m", "ostate_cli.main", "inspect", str(path), "--format", "json"],
        "ostate inspect --by model": [python, "-m", "ostate_cli.main", "inspect", str(path), "--by", "model"],
    }
    try:
        print(
            f"checkpoint: {path} ({os.path.getsize(path) / 1e6:.0f} MB; {what}, AdamW); "
            f"{os.cpu_count()} cores, median of {args.repeat} warm-cache runs"
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
