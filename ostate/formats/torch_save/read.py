"""Reader for single ``torch.save`` files: ``.pt``, ``.pth``, ``.bin``, ``.ckpt`` (Lightning too).

The file is opened safely and memory-mapped (:mod:`ostate.formats.files.torchfile`); every
optimizer state dict in it is found by its structure (:mod:`ostate.formats.naming.discover`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ostate.formats.naming.objects import from_object
from ostate.formats.reader import Reader
from ostate.formats.files.torchfile import check_readable_file, load_torch_file
from ostate.formats.files.torchfile import sniff as sniff_file
from ostate.state import Checkpoint


def sniff(path: str) -> int:
    """Any regular file: the fallback reader, whose errors say what a file is when it is not a checkpoint."""
    return 1 if os.path.isfile(path) else 0


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    check_readable_file(path)
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    checkpoint = from_object(obj, path=path, mapped=sniff_file(path) == "zip")
    if checkpoint.config is None:
        checkpoint.config = sibling_config(path)
    unnamed = any(p.name_source == "none" for o in checkpoint.optimizers for p in o.params)
    parent = os.path.dirname(os.path.abspath(path))
    if unnamed and _directory_layout(parent):
        checkpoint.warnings.append(
            f"this file is part of a {_directory_layout(parent)} checkpoint directory; inspect the directory "
            f"({parent}) to get parameter names from the model saved beside it"
        )
    return checkpoint


def sibling_config(path: str) -> dict[str, Any] | None:
    """The model's ``config.json`` in the checkpoint's folder (Hugging Face layout), if it reads as a dict.

    It tells the analysis how attention projections split into heads.
    """
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(candidate, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _directory_layout(directory: str) -> str | None:
    from ostate.formats.registry import READERS  # the registry lists this module: import it late

    scored = [(r.sniff(directory), r.name) for r in READERS if r.name != READER.name]
    score, name = max(scored)
    return name if score > 1 else None


READER = Reader("torch", "a torch.save file (.pt, .pth, .bin, .ckpt; Lightning checkpoints too)", sniff, read)
