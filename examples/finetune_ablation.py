"""Which handling of the optimizer state fine-tunes best? A tiny ablation of one's own task.

A small MLP is trained on one regression map (the source checkpoint: weights and AdamW
state), then fine-tuned on a nearby map under six strategies for the optimizer state,
three seeds each. The harness prints each strategy's final eval loss, area under the
eval curve and steps to reach reload's final loss, with 95% confidence intervals, and
the paired difference from reload. Runs in seconds; every file goes under ./ablation-example.

The same task from the command line: examples/ablation/spec.toml (`ostate ablate spec.toml`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ostate.harness import Spec, Sweep, Task, run
from ostate.harness.pretrain import pretrain
from ostate.harness.text import render_summary

OUT = "ablation-example"
_g = torch.Generator().manual_seed(0)
SOURCE_MAP = torch.randn(16, 4, generator=_g)
TARGET_MAP = SOURCE_MAP + 0.5 * torch.randn(16, 4, generator=_g)
EVAL_X = torch.randn(512, 16, generator=_g)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4))


def batches(mapping: torch.Tensor, batch_size: int, generator: torch.Generator):
    while True:
        x = torch.randn(batch_size, 16, generator=generator)
        yield x, x @ mapping + 0.1 * torch.randn(batch_size, 4, generator=generator)


def target_batches(batch_size: int, generator: torch.Generator):
    return batches(TARGET_MAP, batch_size, generator)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def evaluate(model: nn.Module) -> float:
    return float(mse(model, (EVAL_X, EVAL_X @ TARGET_MAP)))


def main() -> None:
    # 1. The source checkpoint: what a user already has (weights + optimizer state).
    source = os.path.join(OUT, "source.pt")
    if not os.path.exists(source):
        torch.manual_seed(0)
        model = make_model()
        checkpoint = pretrain(model, batches(SOURCE_MAP, 64, torch.Generator().manual_seed(0)), mse, steps=200,
                              lr=3e-3, progress=False)
        os.makedirs(OUT, exist_ok=True)
        torch.save(checkpoint, source)

    # 2. The task (plain callables) and the sweep.
    task = Task("linear-maps", model=make_model, train_batches=target_batches, loss=mse, evaluate=evaluate,
                source=source)
    sweep = Sweep(strategies=["fresh", "reload", "reset-m", "reset-v", "reset-step", "keep-v"], seeds=[0, 1, 2],
                  lr=[1e-3], steps=30, eval_every=5)

    # 3. Run (workers=1: in this process; leave it out for one worker per core) and read the answer.
    results = run(Spec(task, sweep, store=os.path.join(OUT, "results.sqlite"), out=OUT, workers=1, threads=1,
                       progress=False))
    print(render_summary(results.summary))
    print(f"{results.ran} trials ran, {results.skipped} were already in {results.store}")
    print("wrote", ", ".join(sorted(os.path.basename(f) for f in results.files)))


if __name__ == "__main__":
    main()
