"""Built-in task ``code-to-prose``: a character model pretrained on Python code, fine-tuned on English.

Source domain: the Python standard library's own ``.py`` files (the top-level modules
of this interpreter's stdlib, about 4.7 MB on CPython 3.11); every tenth file (sorted
by name) is held out of pretraining, and the forgetting eval (``source_loss``) is on
it. Target domain: the English prose of the interpreter's help topics
(``pydoc_data.topics``, the text ``help('assert')`` shows: about 0.46 MB). Both ship
with every CPython, so the task runs offline. Text is read as ASCII (other characters
become ``?``); every fifth help topic (sorted by name) is held out of fine-tuning, and
those alternate between the test split (``evaluate``) and the validation split
(``validate``, for ``--tune``).

The model is a small causal transformer (2 blocks, width 64, 4 heads, 64 characters
of context, about 110k parameters); the eval loss is the mean cross-entropy in nats
per character over 64 fixed windows (4,096 characters) of the held-out text.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ostate.demo import save_atomically
from ostate.errors import OstateError
from ostate.harness.device import model_device
from ostate.harness.pretrain import pretrain

VOCAB = 128
CONTEXT = 64
EVAL_WINDOWS = 64


class TinyGPT(nn.Module):
    """A causal transformer over characters: embeddings, pre-norm blocks, a final norm and a head."""

    def __init__(self, vocab: int = VOCAB, context: int = CONTEXT, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.position(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


def encode(text: str) -> torch.Tensor:
    """Characters as ASCII codes (anything else becomes ``?``)."""
    return torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8).long()


@functools.lru_cache(maxsize=2)
def stdlib_code(held_out: bool = False) -> torch.Tensor:
    """The top-level modules of this interpreter's standard library, concatenated in name order:
    every tenth file (``held_out=True``) or the others (pretraining data)."""
    directory = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(directory, "*.py")))
    if not files:
        raise OstateError(
            "this Python has no standard-library source files",
            where=directory,
            hint="the code-to-prose task needs the stdlib's .py files",
        )
    parts = []
    for path in [f for i, f in enumerate(files) if (i % 10 == 0) == held_out]:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return encode("\n\n".join(parts))


@functools.lru_cache(maxsize=1)
def help_prose() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, test, validation)``: the interpreter's help topics; every fifth topic is held
    out, the held-out ones alternating between test and validation."""
    try:
        # a large module, and some Pythons lack it: only for this task
        from pydoc_data.topics import topics
    except ImportError:
        raise OstateError(
            "this Python has no pydoc_data.topics (the interpreter's help text)",
            hint="the code-to-prose task needs it; try the sans-to-serif task",
        ) from None
    names = sorted(topics)
    train = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 5)
    test = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 10 == 0)
    validation = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 10 == 5)
    return encode(train), encode(test), encode(validation)


def random_windows(
    text: torch.Tensor, batch_size: int, generator: torch.Generator, *, context: int = CONTEXT
) -> Iterator[torch.Tensor]:
    """Endless batches of ``context + 1`` consecutive characters at random places."""
    while True:
        starts = torch.randint(len(text) - context - 1, (batch_size,), generator=generator)
        yield torch.stack([text[s : s + context + 1] for s in starts.tolist()])


def next_char_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def prose_batches(batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    return random_windows(help_prose()[0], batch_size, generator)


def code_batches(batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    return random_windows(stdlib_code(), batch_size, generator)


def held_out_loss(
    model: nn.Module, held_out: torch.Tensor, *, context: int = CONTEXT, windows: int = EVAL_WINDOWS
) -> dict[str, float]:
    """Mean next-character cross-entropy (nats) over ``windows`` fixed, evenly spaced windows of
    ``context + 1`` characters of ``held_out``."""
    starts = torch.linspace(0, len(held_out) - context - 2, windows).long()
    batch = torch.stack([held_out[s : s + context + 1] for s in starts.tolist()])
    return {"loss": float(next_char_loss(model, batch.to(model_device(model))))}


def evaluate_prose(model: nn.Module) -> dict[str, float]:
    """The test split: held-out help topics."""
    return held_out_loss(model, help_prose()[1])


def validate_prose(model: nn.Module) -> dict[str, float]:
    """The validation split: other held-out help topics."""
    return held_out_loss(model, help_prose()[2])


def evaluate_code(model: nn.Module) -> dict[str, float]:
    """Forgetting: the source domain's held-out files (never pretrained on)."""
    return held_out_loss(model, stdlib_code(held_out=True))


def data_fingerprint() -> str:
    """Identifies this interpreter's data (the cached source model depends on it)."""
    digest = hashlib.sha256()
    digest.update(stdlib_code().numpy().tobytes())
    digest.update(stdlib_code(held_out=True).numpy().tobytes())
    for part in help_prose():
        digest.update(part.numpy().tobytes())
    return digest.hexdigest()[:12]


def pretrain_source(path: str, *, steps: int, progress: bool | str = True, device: str = "cpu") -> Any:
    """Pretrain the model on stdlib code (on ``device``) and save the checkpoint at ``path``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    checkpoint = pretrain(
        TinyGPT(),
        code_batches(32, generator),
        next_char_loss,
        steps=steps,
        lr=3e-3,
        description="pretraining code-to-prose on stdlib code",
        progress=progress,
        device=device,
    )
    checkpoint["task"] = "code-to-prose"
    save_atomically(checkpoint, path)
