"""A tiny fine-tuning task for the harness tests: a small MLP regressing one linear map, then another.

Module-level functions, so the local process pool (spawn) can import them in its workers.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import nn

from ostate.harness.pretrain import decay_groups

_W = torch.Generator().manual_seed(1234)
W_SOURCE = torch.randn(8, 1, generator=_W)
W_TARGET = W_SOURCE + 0.5 * torch.randn(8, 1, generator=_W)
EVAL_X = torch.randn(256, 8, generator=_W)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def batches(weights: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator:
    while True:
        x = torch.randn(batch_size, 8, generator=generator)
        yield x, x @ weights


def target_batches(batch_size: int, generator: torch.Generator) -> Iterator:
    return batches(W_TARGET, batch_size, generator)


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


def evaluate(model: nn.Module) -> dict[str, float]:
    return {"loss": float(mse(model, (EVAL_X, EVAL_X @ W_TARGET))), "scale": float(model[0].weight.abs().mean())}


def make_source(path: str | os.PathLike, *, optimizer: str = "adamw", steps: int = 60, named: bool = True) -> str:
    """Train on the source map with a real torch optimizer and save {'model', 'optimizer'}."""
    torch.manual_seed(0)
    model = make_model()
    params = model.named_parameters() if named else model.parameters()
    opt = {
        "adamw": lambda: torch.optim.AdamW(decay_groups(model, 0.01) if named else params, lr=1e-2),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
        "nadam": lambda: torch.optim.NAdam(params, lr=1e-2),
    }[optimizer]()
    stream = batches(W_SOURCE, 32, torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        mse(model, next(stream)).backward()
        opt.step()
    checkpoint = {"optimizer": opt.state_dict()}
    if named:
        checkpoint["model"] = model.state_dict()
    torch.save(checkpoint, path)
    return os.fspath(path)


def wide_model() -> nn.Module:
    """The fine-tuning model with a new head of another shape (a new task's output)."""
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def wide_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x)[:, :1] - y).square().mean()


def wide_evaluate(model: nn.Module) -> float:
    return float(wide_loss(model, (EVAL_X, EVAL_X @ W_TARGET)))


def failing_batches(batch_size: int, generator: torch.Generator) -> Iterator:
    """Fails for seed 1 (to test that a failed trial is recorded and retried)."""
    if generator.initial_seed() == 1:
        raise RuntimeError("data for seed 1 is unavailable")
    return target_batches(batch_size, generator)


def source_batches(batch_size: int, generator: torch.Generator) -> Iterator:
    return batches(W_SOURCE, batch_size, generator)


def evaluate_source(model: nn.Module) -> float:
    """Forgetting: the loss on the source map."""
    return float(mse(model, (EVAL_X, EVAL_X @ W_SOURCE)))


def validate(model: nn.Module) -> float:
    x = EVAL_X.flip(0) * 0.5
    return float(mse(model, (x, x @ W_TARGET)))
