"""Built-in task ``sans-to-serif``: recognise characters, pretrained on sans-serif fonts, fine-tuned on serif.

36 classes (the digits and the capital letters), rendered from the TrueType fonts that
ship with matplotlib (a dependency of ostate, so present wherever ostate is):

- source domain: DejaVu Sans, DejaVu Sans Bold, DejaVu Sans Mono, Computer Modern Sans (cmss10);
- target domain: DejaVu Serif, STIX General, Computer Modern Roman (cmr10), Computer Modern Bold (cmb10).

Each glyph is rendered once (FreeType, via matplotlib's ``FT2Font``), cropped and
centred on a 28 x 28 canvas; batches apply a random affine map (rotation within
+-12 degrees, scale 0.85-1.15, shear, shift) and pixel noise, so every batch is new.
The eval loss is the cross-entropy on 720 fixed target-domain samples (20 per class,
drawn with a seed no trial uses); the accuracy is recorded beside it. The validation
split (``validate``, for ``--tune``) is 720 other target samples (another seed); the
forgetting eval (``source_loss``) is 720 fixed source-domain samples drawn with a
seed pretraining never used (new augmentations of the source fonts).

The model is a small CNN (two 3x3 conv layers, a 64-unit hidden layer; about 106k parameters).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import string
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ostate.demo import save_atomically
from ostate.harness.device import model_device
from ostate.harness.pretrain import pretrain

CLASSES = string.digits + string.ascii_uppercase
SOURCE_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "cmss10.ttf")
TARGET_FONTS = ("DejaVuSerif.ttf", "STIXGeneral.ttf", "cmr10.ttf", "cmb10.ttf")
SIZE = 28
EVAL_PER_CLASS = 20
EVAL_SEED = 1_000_003
VALIDATION_SEED = 1_000_033
SOURCE_EVAL_SEED = 1_000_037


class GlyphCNN(nn.Module):
    """conv(1->16) -> pool -> conv(16->32) -> pool -> hidden 64 -> 36 classes."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 7 * 7, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.hidden(x.flatten(1))))


def font_path(name: str) -> str:
    # start-up time: matplotlib (its fonts) only for this task
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", name)


def render(font: str, char: str) -> torch.Tensor:
    """One glyph, cropped to its ink and centred on a ``SIZE`` x ``SIZE`` canvas (values in [0, 1])."""
    # start-up time: matplotlib (its fonts) only for this task
    from matplotlib.ft2font import FT2Font

    face = FT2Font(font_path(font))
    face.set_size(48, 72)
    face.set_text(char)
    face.draw_glyphs_to_bitmap()
    ink = torch.from_numpy(np.asarray(face.get_image(), dtype=np.float32) / 255.0)
    rows, cols = ink.sum(1).nonzero(), ink.sum(0).nonzero()
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = 20 / max(ink.shape)  # like MNIST: the glyph fits a 20 x 20 box
    h, w = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    small = F.interpolate(ink[None, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    canvas = torch.zeros(SIZE, SIZE)
    top, left = (SIZE - h) // 2, (SIZE - w) // 2
    canvas[top : top + h, left : left + w] = small
    return canvas


@functools.lru_cache(maxsize=2)
def glyphs(domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: every class in every font of the domain (``source`` or ``target``)."""
    fonts = SOURCE_FONTS if domain == "source" else TARGET_FONTS
    images = torch.stack([render(f, c) for f in fonts for c in CLASSES])[:, None]
    labels = torch.arange(len(CLASSES)).repeat(len(fonts))
    return images, labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random affine map and pixel noise per image."""
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle, scale = uniform(-12, 12) * math.pi / 180, uniform(0.85, 1.15)
    shear, dx, dy = uniform(-0.15, 0.15), uniform(-0.12, 0.12), uniform(-0.12, 0.12)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    noise = 0.1 * torch.randn(warped.shape, generator=generator)
    return (warped + noise).clamp(0, 1)


def sample(domain: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = glyphs(domain)
    pick = torch.randint(len(labels), (batch_size,), generator=generator)
    return augment(images[pick], generator), labels[pick]


def target_batches(batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield sample("target", batch_size, generator)


def source_batches(batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield sample("source", batch_size, generator)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


@functools.lru_cache(maxsize=3)
def eval_set(domain: str = "target", seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``EVAL_PER_CLASS`` fixed augmented samples per class of a domain, drawn with ``seed``."""
    images, labels = glyphs(domain)
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in range(len(CLASSES))]
    pick = torch.cat([rows[torch.randint(len(rows), (EVAL_PER_CLASS,), generator=generator)] for rows in per_class])
    return augment(images[pick], generator), labels[pick]


def _scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    device = model_device(model)
    images, labels = images.to(device), labels.to(device)
    logits = model(images)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }


def evaluate_target(model: nn.Module) -> dict[str, float]:
    """Cross-entropy and accuracy on the fixed target-domain eval set (the test split)."""
    return _scores(model, *eval_set("target", EVAL_SEED))


def validate_target(model: nn.Module) -> dict[str, float]:
    """The same on the validation split (other target samples)."""
    return _scores(model, *eval_set("target", VALIDATION_SEED))


def evaluate_source(model: nn.Module) -> dict[str, float]:
    """Forgetting: the same on fixed source-domain samples."""
    return _scores(model, *eval_set("source", SOURCE_EVAL_SEED))


def data_fingerprint() -> str:
    digest = hashlib.sha256()
    for domain in ("source", "target"):
        digest.update(glyphs(domain)[0].numpy().tobytes())
    return digest.hexdigest()[:12]


def pretrain_source(path: str, *, steps: int, progress: bool | str = True, device: str = "cpu") -> Any:
    """Pretrain the CNN on the sans-serif fonts (on ``device``) and save the checkpoint at ``path``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    checkpoint = pretrain(
        GlyphCNN(),
        source_batches(64, generator),
        classification_loss,
        steps=steps,
        lr=3e-3,
        weight_decay=0.01,
        description="pretraining sans-to-serif on sans-serif fonts",
        progress=progress,
        device=device,
    )
    checkpoint["task"] = "sans-to-serif"
    save_atomically(checkpoint, path)
