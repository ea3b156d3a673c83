"""Reader for single ``torch.save`` files: ``.pt``, ``.pth``, ``.bin``, ``.ckpt`` (Lightning too).

The file is opened safely and memory-mapped (:mod:`ostate.formats.files.torchfile`); every
optimizer state dict in it is found by its structure (:mod:`ostate.formats.naming.discover`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ostate.formats.files.torchfile import check_readable_file, file_kind, load_torch_file
from ostate.formats.naming.objects import from_object
from ostate.formats.reader import Reader
from ostate.state import Checkpoint


def sniff(path: str) -> int:
    """Any regular file: the fallback reader, whose errors say what a file is when it is not a checkpoint."""
    return 1 if os.path.isfile(path) else 0


def read(path: str, *, trust_pickle: bool = False) -> Checkpoint:
    check_readable_file(path)
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    checkpoint = from_object(obj, path=path, mapped=file_kind(path) == "zip")
    if checkpoint.config is None:
        checkpoint.config = sibling_config(path)
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


READER = Reader("torch", "a torch.save file (.pt, .pth, .bin, .ckpt; Lightning checkpoints too)", sniff, read)
