"""What does ``ostate.Monitor`` cost inside a training loop?

Trains a GPT-2-shaped causal language model (built from a config: token and position
embeddings, pre-norm blocks of attention and MLP, tied head; plain torch, no download)
with AdamW on random tokens, on the CPU, and measures in the same run:

- the training step (forward, backward, ``optimizer.step()``), over ``--steps`` steps;
- one monitor call (``Monitor.summarize``: the live state read and summarised at the
  ``layer`` view, the record built; no writer), over ``--calls`` calls made between
  the training steps;
- the overhead at the default interval: one call per ``every`` steps, as a fraction of
  the training time of those steps;
- with ``--sizes``, the cost of one call against the model size, beside the old way
  of watching the state (``ostate.analyze(ostate.from_state_dict(optimizer.state_dict(),
  model=model), by="layer")``).

Step and call are timed alternately in one process, so a load on the machine that
changes over the run weighs on both alike: compare the ratios, not the absolute times.

Usage:
    python benchmarks/bench_monitor.py [--layers 6] [--width 384] [--seq 256] [--batch 8] [--steps 20] [--calls 5]
    python benchmarks/bench_monitor.py --sizes 128,256,512,768 [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import ostate
from ostate.monitor import Monitor


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, seq: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq, width)
        self.h = nn.ModuleList([Block(width, max(1, width // 64)) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        mask = torch.triu(torch.full((seq, seq), float("-inf")), 1)
        x = self.wte(ids) + self.wpe(torch.arange(seq))
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x) @ self.wte.weight.T


def setup(width: int, layers: int, seq: int, vocab: int):
    torch.manual_seed(0)
    model = TinyGPT(vocab, width, layers, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    return model, optimizer


def train_step(model, optimizer, batch: int, seq: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, seq))
    start = time.perf_counter()
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def old_way(optimizer, model) -> None:
    """What examples/monitor_training.py did before the monitor: a state dict, wrapped and analysed."""
    ostate.analyze(ostate.from_state_dict(optimizer.state_dict(), model=model), by="layer", workers=1)


def overhead(args) -> None:
    model, optimizer = setup(args.width, args.layers, args.seq, args.vocab)
    params = sum(p.numel() for p in model.parameters())
    monitor = Monitor(optimizer, model, every=args.every, by="layer", writer=[])
    train_step(model, optimizer, args.batch, args.seq, args.vocab)  # warm-up: the state exists
    monitor.summarize(0)
    steps, calls = [], []
    per_call = max(1, args.steps // args.calls)
    for i in range(args.steps):
        steps.append(train_step(model, optimizer, args.batch, args.seq, args.vocab))
        if (i + 1) % per_call == 0 and len(calls) < args.calls:
            calls.append(timed(monitor.summarize, i))
    step, call = statistics.median(steps), statistics.median(calls)
    print(
        f"model: {params / 1e6:.2f}M parameters ({args.layers} blocks, width {args.width}), "
        f"batch {args.batch} x {args.seq} tokens, torch threads {torch.get_num_threads()}"
    )
    print(f"training step (median of {len(steps)}): {step * 1e3:.1f} ms")
    print(f"monitor call (median of {len(calls)}): {call * 1e3:.1f} ms = {call / step:.2f} training steps")
    print(f"overhead at every={args.every}: {call / (args.every * step):.2%} of the training time")


def sizes(args) -> None:
    print("| parameters | state | monitor call | old way (state_dict + analyze) | ratio | call / training step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for width in (int(w) for w in args.sizes.split(",")):
        model, optimizer = setup(width, args.layers, args.seq, args.vocab)
        step = statistics.median(train_step(model, optimizer, args.batch, args.seq, args.vocab) for _ in range(3))
        monitor = Monitor(optimizer, model, by="layer", writer=[])
        monitor.summarize(0)
        call, old = [], []
        for _ in range(args.calls):  # alternately: the same load on both
            call.append(timed(monitor.summarize, 0))
            old.append(timed(old_way, optimizer, model))
        params = sum(p.numel() for p in model.parameters())
        c, o = statistics.median(call), statistics.median(old)
        print(
            f"| {params / 1e6:.2f}M | {params * 8 / 2**20:.0f} MiB | {c * 1e3:.0f} ms | {o * 1e3:.0f} ms | "
            f"{c / o:.2f} | {c / step:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--sizes", help="comma-separated widths: the cost of one call against the model size")
    args = parser.parse_args()
    if args.sizes:
        sizes(args)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
