"""Built-in task ``gpt-code-to-prose``: the code-to-prose transfer at a realistic shape and with LLM settings.

The same data and splits as ``code-to-prose`` (source: the Python standard library's
own code, every tenth file held out for the forgetting eval; target: the English prose
of the interpreter's help topics, every fifth topic held out, alternately test and
validation; both ship with CPython, :mod:`ostate.harness.tasks.code_to_prose`), with a
GPT-style model of about 4.8 M parameters (6 pre-norm blocks, width 256, 8 heads,
128 characters of context) trained the way language models are: AdamW with
beta2 = 0.95 and weight decay 0.1 (none on biases and norms), linear warmup then
cosine decay, gradients clipped to norm 1.0. With ``new_head=True`` the fine-tuning
model's output layer is a new, freshly initialised one (named ``prose_head``: no
weights or optimizer state carried to it), as when a new task gets its own head.

Time: see docs/harness.md (a 200-step trial is minutes on a CPU; the source model's
pretraining is run once and cached).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ostate.demo import save_atomically
from ostate.harness.pretrain import pretrain
from ostate.harness.tasks.code_to_prose import (
    TinyGPT,
    held_out_loss,
    help_prose,
    next_char_loss,
    random_windows,
    stdlib_code,
)
from ostate.harness.tasks.code_to_prose import data_fingerprint as data_fingerprint  # the same data

CONTEXT = 128
WIDTH, LAYERS, HEADS = 256, 6, 8
EVAL_WINDOWS = 32
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
CLIP = 1.0


def gpt() -> nn.Module:
    """The model (the source's architecture)."""
    return TinyGPT(context=CONTEXT, width=WIDTH, layers=LAYERS, heads=HEADS)


class GPTNewHead(TinyGPT):
    """The model with a new output layer, ``prose_head``, in place of the source's ``head``."""

    def __init__(self) -> None:
        super().__init__(context=CONTEXT, width=WIDTH, layers=LAYERS, heads=HEADS)
        self.prose_head = self.head
        del self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.position(positions)
        for block in self.blocks:
            h = block(h)
        return self.prose_head(self.norm(h))


def prose_batches(batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    return random_windows(help_prose()[0], batch_size, generator, context=CONTEXT)


def code_batches(batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    return random_windows(stdlib_code(), batch_size, generator, context=CONTEXT)


def _held_out_loss(model: nn.Module, text: torch.Tensor) -> dict[str, float]:
    return held_out_loss(model, text, context=CONTEXT, windows=EVAL_WINDOWS)


def evaluate_prose(model: nn.Module) -> dict[str, float]:
    """The test split (held-out help topics, as code-to-prose's): mean next-character cross-entropy in nats."""
    return _held_out_loss(model, help_prose()[1])


def validate_prose(model: nn.Module) -> dict[str, float]:
    """The validation split: other held-out help topics."""
    return _held_out_loss(model, help_prose()[2])


def evaluate_code(model: nn.Module) -> dict[str, float]:
    """Forgetting: the source domain's held-out stdlib files (never pretrained on)."""
    return _held_out_loss(model, stdlib_code(held_out=True))


def pretrain_source(path: str, *, steps: int, progress: bool | str = True, device: str = "cpu") -> Any:
    """Pretrain the model on stdlib code with LLM settings (on ``device``) and save the checkpoint at ``path``."""
    torch.manual_seed(0)
    checkpoint = pretrain(
        gpt(),
        code_batches(16, torch.Generator().manual_seed(0)),
        next_char_loss,
        steps=steps,
        lr=1e-3,
        weight_decay=WEIGHT_DECAY,
        betas=BETAS,
        clip=CLIP,
        description="pretraining gpt-code-to-prose on stdlib code",
        progress=progress,
        device=device,
    )
    checkpoint["task"] = "gpt-code-to-prose"
    save_atomically(checkpoint, path)
