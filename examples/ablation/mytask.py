"""One's own fine-tuning task for `ostate ablate spec.toml` (see spec.toml beside this file).

A small MLP learns one linear map (the "source" task), and is fine-tuned on another.
Replace each function with your own: the harness only calls them.
"""

from __future__ import annotations

import torch
from torch import nn

_g = torch.Generator().manual_seed(0)
SOURCE_MAP = torch.randn(16, 4, generator=_g)
TARGET_MAP = SOURCE_MAP + 0.5 * torch.randn(16, 4, generator=_g)
EVAL_X = torch.randn(512, 16, generator=_g)
VALIDATION_X = torch.randn(512, 16, generator=_g)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4))


def _batches(mapping: torch.Tensor, batch_size: int, generator: torch.Generator):
    while True:
        x = torch.randn(batch_size, 16, generator=generator)
        yield x, x @ mapping + 0.1 * torch.randn(batch_size, 4, generator=generator)


def train_batches(batch_size: int, generator: torch.Generator):
    """Target-task batches, drawn with the trial's seeded generator."""
    return _batches(TARGET_MAP, batch_size, generator)


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _held_out_loss(model: nn.Module, x: torch.Tensor, mapping: torch.Tensor) -> float:
    device = next(model.parameters()).device  # the trial's device: a GPU when there is one
    return float(loss(model, (x.to(device), (x @ mapping).to(device))))


def evaluate(model: nn.Module) -> float:
    return _held_out_loss(model, EVAL_X, TARGET_MAP)


def evaluate_source(model: nn.Module) -> float:
    """Forgetting: the loss on the source map (optional; every eval step, as source_loss)."""
    return _held_out_loss(model, EVAL_X, SOURCE_MAP)


def source_batches(batch_size: int, generator: torch.Generator):
    """Source-task batches, for replay (optional)."""
    return _batches(SOURCE_MAP, batch_size, generator)


def validate(model: nn.Module) -> float:
    """A validation split apart from evaluate's test data, for --tune (optional)."""
    return _held_out_loss(model, VALIDATION_X, TARGET_MAP)


def pretrain(path: str) -> None:
    """Write the source checkpoint (the harness calls this once and caches the file)."""
    from ostate.demo import save_atomically
    from ostate.harness.pretrain import pretrain as train

    torch.manual_seed(0)
    model = make_model()
    checkpoint = train(
        model, _batches(SOURCE_MAP, 64, torch.Generator().manual_seed(0)), loss, steps=200, lr=3e-3, progress=False
    )
    save_atomically(checkpoint, path)
