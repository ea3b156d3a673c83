"""A small, real checkpoint to try ostate on, made on the spot from data every machine has.

A character-level model (embedding, two MLP blocks with LayerNorm, a head) learns to
predict the next character of the Zen of Python (the text of ``import this``) for a
few hundred steps with AdamW, a decay / no-decay param-group split like Hugging Face's
Trainer, and a warmup-then-cosine LR schedule (down to a tenth of the peak). The result is saved the way training
scripts usually save: ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'global_step'}``.
:func:`make_demo_run` saves several such checkpoints along one run.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import math
import os
from typing import Iterator

import torch
from torch import nn

from ostate.outputs import atomic_file


def zen_of_python() -> str:
    """The text that ``import this`` prints (stored rot13-encoded in the stdlib's ``this`` module)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


class CharMLP(nn.Module):
    """Predict the next character from the previous ``context`` characters."""

    def __init__(self, vocab: int, context: int = 8, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width * 2), nn.GELU(), nn.Linear(width * 2, width))
            for _ in range(2)
        )
        self.proj = nn.Linear(16 * context, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(x).flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def make_demo_checkpoint(path: str | os.PathLike, *, steps: int = 300, seed: int = 0) -> str:
    """Train the demo model for ``steps`` steps and save a checkpoint at ``path`` (atomically).

    Example:
        >>> import tempfile, os, ostate
        >>> p = make_demo_checkpoint(os.path.join(tempfile.mkdtemp(), "demo.pt"), steps=5)
        >>> ostate.load(p).optimizers[0].kind
        'adamw'
    """
    path = os.fspath(path)
    for _step, checkpoint in _train(steps, seed, save_at={steps}):
        save_atomically(checkpoint, path)
    return path


def make_demo_run(directory: str | os.PathLike, *, steps: int = 300, save_every: int = 100, seed: int = 0) -> list[str]:
    """Train the demo model once for ``steps`` steps, saving ``checkpoint-<step>.pt`` every ``save_every`` steps.

    The checkpoints are snapshots of one run (one schedule over ``steps`` steps), as a
    training script that saves periodically writes them. Returns their paths in step order.

    Example:
        >>> import tempfile, os
        >>> [os.path.basename(p) for p in make_demo_run(tempfile.mkdtemp(), steps=4, save_every=2)]
        ['checkpoint-2.pt', 'checkpoint-4.pt']
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for step, checkpoint in _train(steps, seed, save_at=set(range(save_every, steps + 1, save_every))):
        paths.append(os.path.join(directory, f"checkpoint-{step}.pt"))
        save_atomically(checkpoint, paths[-1])
    return paths


def _train(steps: int, seed: int, save_at: set[int]) -> Iterator[tuple[int, dict]]:
    """Train the demo model; after each step in ``save_at`` yield the step and the checkpoint to save."""
    torch.manual_seed(seed)
    text = zen_of_python()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    context = 8
    windows = ids.unfold(0, context + 1, 1)
    model = CharMLP(len(chars), context)
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)}
    no_decay = {n for n, _ in model.named_parameters() if n.endswith("bias") or n in norms}
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for n, p in params.items() if n not in no_decay], "weight_decay": 0.1},
        {"params": [p for n, p in params.items() if n in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))),
    )
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        batch = windows[torch.randint(len(windows), (64,), generator=generator)]
        loss = nn.functional.cross_entropy(model(batch[:, :-1]), batch[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in save_at:
            yield (
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": schedule.state_dict(),
                    "epoch": step * 64 // len(windows),
                    "global_step": step,
                    "vocab": "".join(chars),
                },
            )


def save_atomically(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_file(path) as f:
        torch.save(obj, f)
